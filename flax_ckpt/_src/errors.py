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


class TruncatedDataError(FormatError, OSError):
  """A data file holds fewer bytes than its chunk index claims (truncated or crafted); a
  FormatError, and an OSError as a short read always was."""


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
