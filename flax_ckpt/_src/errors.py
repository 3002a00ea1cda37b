"""Exception types raised by flax_ckpt.

Every error names the offending leaf path (when there is one) and says what to do.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


class CheckpointError(Exception):
  """Base class of all flax_ckpt errors."""


class CheckpointExistsError(CheckpointError, FileExistsError, ValueError):
  """The destination already holds a checkpoint and ``overwrite`` was not set."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """There is no checkpoint at the given path."""


class IncompleteCheckpointError(CheckpointError):
  """The directory exists but was never committed (an interrupted save)."""


class UnsupportedLeafError(CheckpointError, TypeError):
  """A leaf of the tree has a type no registered TypeHandler can save."""


class StructureMismatchError(CheckpointError, ValueError):
  """The template and the checkpoint disagree on which leaves exist or their shapes."""


class FormatError(CheckpointError, ValueError):
  """The checkpoint's metadata is unreadable or of an unknown format version."""


class ForeignCheckpointError(FormatError):
  """``path`` holds a checkpoint of another tool (Orbax); internal: ``flax_ckpt.load``,
  ``load_checkpointables`` and the CheckpointManager catch it and read it with the
  matching reader, every other API reports it as the FormatError it is. ``marker``: the
  file that identified it."""

  def __init__(self, message: str, path: str, marker: str):
    super().__init__(message)
    self.path = path
    self.marker = marker


class TruncatedDataError(FormatError, OSError):
  """A data file holds fewer bytes than its chunk index claims (truncated or crafted); a
  FormatError, and an OSError as a short read always was. ``path``: the data file."""

  path: str | None = None


class CorruptCheckpointError(FormatError):
  """Bytes read from a checkpoint do not match the checksum recorded when it was saved:
  the checkpoint was damaged after it was written (a flipped bit, a truncated or edited
  file). Nothing read is returned; load an earlier checkpoint, or pass ``verify=False`` to
  read it anyway at your own risk. A :class:`FormatError` (so code that catches damaged
  checkpoints as FormatError keeps working), hence a :class:`CheckpointError`.

  Attributes:
    checkpoint: the checkpoint's path ("" when unknown).
    part: the part (checkpointable) the bytes belong to ("" when unknown).
    leaf: the leaf path of the damaged bytes ("" for a file that is not a leaf's).
    file: the damaged file.
  """

  def __init__(self, detail: str, *, checkpoint: str = "", part: str = "", leaf: str = "",
               file: str = ""):
    super().__init__(detail)
    self.detail, self.checkpoint, self.part, self.leaf, self.file = (
        detail, checkpoint, part, leaf, file)

  def __str__(self) -> str:
    where = ", ".join(x for x in (
        f"checkpoint {self.checkpoint}" if self.checkpoint else "",
        f"part {self.part!r}" if self.part else "",
        f"leaf {self.leaf}" if self.leaf else "",
        f"file {self.file}" if self.file else "") if x)
    return f"{where}: {self.detail}; {self._advice}"

  _advice = ("the checkpoint is corrupt (damaged after it was written). Load an earlier "
             "checkpoint, or pass verify=False to read it anyway.")


class MissingDataError(CorruptCheckpointError, FileNotFoundError):
  """A data file of a committed checkpoint is gone: a CorruptCheckpointError (so a
  FormatError), and a FileNotFoundError as a missing data file always was."""

  _advice = "the checkpoint is damaged."

  def __init__(self, detail: str, **where: str):
    super().__init__(detail, **where)
    self.errno, self.filename = 2, where.get("file")  # ENOENT


class StorageError(CheckpointError, OSError):
  """The storage refused a request or could not be reached (object stores: a missing
  bucket, missing or wrong credentials, permission denied, an unreachable endpoint)."""


class CheckpointReplacedError(CheckpointError):
  """The checkpoint was replaced (``overwrite=True``) while it was being read, repeatedly."""


SUPPORTED_KINDS = (
    "flax_ckpt saves (1) PyTrees whose leaves have a TypeHandler (jax/numpy arrays, Python "
    "and numpy scalars, str, bytes, None, typed PRNG keys; add leaf types with "
    "flax_ckpt.register_type_handler), (2) objects with get_state()/set_state() such as "
    "grain's DatasetIterator, (3) CheckpointArgs objects registered with a CheckpointHandler "
    "(flax_ckpt.args.register_with_handler), (4) objects of a type registered with "
    "flax_ckpt.register_checkpointable_handler(MyType, MyHandler)")


class LossyCastWarning(UserWarning):
  """A load casts leaves to a dtype that cannot hold every saved value (float32 to int8,
  float32 to bfloat16, int64 to int32, ...) because the template asks for that dtype."""


def mismatch_summary(where: str, kinds: Sequence[tuple[str, str, Sequence[str]]], fix: str,
                     cap: int = 10) -> str:
  """A template/checkpoint mismatch message that stays readable over thousands of leaves.

  The first line counts each kind of difference; then each kind shows its first ``cap``
  paths ("... and N more" for the rest); the last line says what to do.

  Args:
    where: what does not match, e.g. "the template does not match the checkpoint at /c".
    kinds: per kind of difference, in order, ``(what, heading, items)``: ``what`` names it
      in the counts ("missing from the checkpoint": "3 leaves missing from the checkpoint");
      ``heading`` is its line with ``{}`` standing for the comma-separated paths, or "" for
      items that are "path: why" lines of their own. Kinds without items are left out.
    fix: the advice that ends the message.
    cap: how many items each kind shows.

  Returns:
    The message.
  """
  kinds = [k for k in kinds if k[2]]
  counts = ", ".join(f"{len(items)} {'leaf' if len(items) == 1 else 'leaves'} {what}"
                     for what, _, items in kinds)
  lines = [f"{where}: {counts}"]
  for _, heading, items in kinds:
    shown, rest = list(items[:cap]), len(items) - cap
    more = f" ... and {rest} more" if rest > 0 else ""
    if heading:
      lines.append("  " + heading.format(", ".join(shown) + more))
    else:
      lines += [f"  {item}" for item in shown] + ([f" {more}"] if more else [])
  lines.append(fix)
  return "\n".join(lines)


def lossy_casts(pairs: Sequence[tuple[str, Any, Any, bool]]) -> list[str]:
  """"path saved->target" for each ``(path, saved dtype, target dtype, on_device)`` whose
  cast can lose information: numpy's "safe" casting rule says no (float to int, float32 to
  bfloat16, int64 to float32, signed to unsigned, complex to real, ...).

  A device (``jax.Array``) target's cast from a 64-bit dtype to the 32-bit one JAX makes of
  every array while x64 is off (float64 to float32, int64 to int32) is not counted: a
  template cannot ask for anything else then, so warning would be noise.
  """
  out = []
  for path, saved, target, on_device in pairs:
    if saved is None or target is None:  # (np.dtype(None) would be float64)
      continue
    try:
      s, t = np.dtype(saved), np.dtype(target)
      safe = s == t or np.can_cast(s, t, casting="safe") or (
          on_device and t == jax.dtypes.canonicalize_dtype(s))
    except TypeError:  # not numpy dtypes (typed PRNG keys): no cast happens
      continue
    if not safe:
      out.append(f"{path} {s.name}->{t.name}")
  return out


def warn_lossy_casts(casts: Sequence[str], cap: int = 10) -> None:
  """One :class:`LossyCastWarning` for a load's ``casts`` (from :func:`lossy_casts`),
  pointing at the user's call; nothing when there are none."""
  if not casts:
    return
  more = f", ... and {len(casts) - cap} more" if len(casts) > cap else ""
  n = len(casts)
  warnings.warn(
      f"casting {n} {'leaf' if n == 1 else 'leaves'} to a dtype that cannot hold every "
      f"saved value, as the template asks: {', '.join(casts[:cap])}{more} (pass a template "
      "leaf of the saved dtype, or None, to load it as saved)",
      LossyCastWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
  """The ``stacklevel`` that points a warning at the first caller outside flax_ckpt."""
  pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  frame, level = sys._getframe(2), 2  # noqa: SLF001 - the caller of the warning's caller
  while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(pkg):
    frame, level = frame.f_back, level + 1
  return level
