"""Step-numbered checkpoint directories: names, listing, and removal.

A step's checkpoint is ``<root>/<name>`` where name is ``<step>``, ``<prefix>_<step>``, or
the step zero-padded to a fixed width. Only committed checkpoints are listed: temporary
directories of a save in progress (or of a crashed one) and directories without the
commit marker never are.
"""

from __future__ import annotations

import os
import re
import shutil

from flax_ckpt._src.format import COMMIT_MARKER, OLD_TAG, TMP_TAG
from flax_ckpt._src.io import paths


class StepNaming:
  """How step numbers map to directory names under one root."""

  def __init__(self, prefix: str | None = None, fixed_width: int | None = None):
    if prefix is not None and (not prefix or "/" in prefix or prefix.startswith(".")):
      raise ValueError(f"step_prefix {prefix!r}: use a plain name such as 'step'")
    self.prefix = prefix
    self.width = fixed_width
    head = re.escape(prefix) + "_" if prefix else ""
    self._re = re.compile(head + r"(\d+)")

  def name(self, step: int) -> str:
    if step < 0:
      raise ValueError(f"steps are non-negative integers, got {step}")
    digits = f"{step:0{self.width}d}" if self.width else str(step)
    return f"{self.prefix}_{digits}" if self.prefix else digits

  def step_of(self, name: str) -> int | None:
    m = self._re.fullmatch(name)
    return int(m.group(1)) if m else None


def is_leftover(name: str) -> bool:
  """A temporary directory of an unfinished save, or an old version being deleted."""
  return TMP_TAG in name or OLD_TAG in name


def is_committed(path: str) -> bool:
  """Whether the step directory ``path`` holds a committed checkpoint (now)."""
  return os.path.exists(os.path.join(path, COMMIT_MARKER))


def committed_steps(root: str, naming: StepNaming) -> list[int]:
  """Steps with a committed checkpoint under ``root``, ascending."""
  try:
    entries = os.listdir(root)
  except FileNotFoundError:
    return []
  steps = []
  for e in entries:
    if is_leftover(e):
      continue
    s = naming.step_of(e)
    if s is not None and is_committed(os.path.join(root, e)):
      steps.append(s)
  return sorted(set(steps))


def remove(path: str) -> None:
  """Deletes a checkpoint so that it is never seen half-deleted.

  It is renamed to a leftover name first (atomic: after that it is no longer listed), then
  removed; a crash in between leaves a leftover that the next cleanup deletes.
  """
  parent, name = os.path.split(path)
  doomed = os.path.join(parent, f"{name}{OLD_TAG}{paths.unique_tag()}")
  try:
    os.rename(path, doomed)
  except FileNotFoundError:
    return
  paths.fsync_path(parent)
  shutil.rmtree(doomed, ignore_errors=True)


def cleanup_leftovers(root: str) -> list[str]:
  """Removes every leftover under ``root`` (call only while holding the directory lock)."""
  removed = []
  try:
    entries = os.listdir(root)
  except FileNotFoundError:
    return removed
  for e in entries:
    if is_leftover(e):
      shutil.rmtree(os.path.join(root, e), ignore_errors=True)
      removed.append(e)
  return removed
