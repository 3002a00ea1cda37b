"""Step-numbered checkpoint directories: names, listing, and removal.

A step's checkpoint is ``<root>/<name>`` where name is ``<step>``, ``<prefix>_<step>``, or
the step zero-padded to a fixed width. Only committed checkpoints are listed: temporary
directories of a save in progress (or of a crashed one) and directories without the
commit marker never are.
"""

from __future__ import annotations

import re

from flax_ckpt._src.format import OLD_TAG, TMP_TAG
from flax_ckpt._src.io import observe, storage


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
  return storage.backend_for(path).is_committed(path)


def committed_steps(root: str, naming: StepNaming) -> list[int]:
  """Steps with a committed checkpoint under ``root``, ascending."""
  steps = []
  for e in storage.backend_for(root).committed_entries(root):
    s = None if is_leftover(e) else naming.step_of(e)
    if s is not None:
      steps.append(s)
  return sorted(set(steps))


def remove(path: str) -> None:
  """Deletes a checkpoint so that it is never seen half-deleted (the backend's way: a
  rename to a leftover name locally, the commit marker first on an object store)."""
  storage.backend_for(path).remove_checkpoint(path)


def cleanup_leftovers(root: str) -> list[str]:
  """Removes every leftover under ``root`` (call only while holding the directory lock)."""
  removed = storage.backend_for(root).cleanup_leftovers(root)
  if removed:
    observe.child("manager").info(
        "removed %d leftover(s) of crashed saves under %s: %s", len(removed), root,
        ", ".join(map(str, removed[:10])) + (" ..." if len(removed) > 10 else ""))
  return removed
