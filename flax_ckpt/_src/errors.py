"""Exception types raised by flax_ckpt.

Every error names the offending leaf path (when there is one) and says what to do.
"""

from __future__ import annotations


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
