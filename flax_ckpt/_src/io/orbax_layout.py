"""Recognising a checkpoint written by Orbax (orbax-checkpoint 0.5 and newer), from its files.

Orbax marks a committed checkpoint (or a CheckpointManager step) with
``_CHECKPOINT_METADATA``, whose ``commit_timestamp_nsecs`` is set at commit, and a PyTree
item directory with ``_METADATA``; an unfinished save lives in a ``*.orbax-checkpoint-tmp*``
directory. flax_ckpt never writes those names. The layouts are in docs/orbax_format.md.
Nothing here imports orbax: it lists names and reads one JSON file.

Example:
  >>> import os, tempfile
  >>> d = tempfile.mkdtemp()
  >>> is_orbax_checkpoint(d)
  False
  >>> with open(os.path.join(d, '_METADATA'), 'w') as f:
  ...   _ = f.write('{"tree_metadata": {}}')
  >>> is_orbax_checkpoint(d)
  True
"""

from __future__ import annotations

import os

from flax_ckpt._src import errors
from flax_ckpt._src.format import COMMIT_MARKER, parse_json_object
from flax_ckpt._src.io import paths, storage

ORBAX_TMP_TAG = ".orbax-checkpoint-tmp"
ORBAX_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"  # a checkpoint or step directory
ORBAX_TREE_METADATA = "_METADATA"  # a PyTree item directory


def orbax_marker(backend: storage.StorageBackend, path: str) -> str | None:
  """The Orbax marker file that makes ``path`` a committed Orbax checkpoint, or None.

  A ``_CHECKPOINT_METADATA`` without a commit time (an unfinished save) does not count;
  neither does anything holding a flax_ckpt commit marker.
  """
  if ORBAX_TMP_TAG in os.path.basename(path.rstrip("/")):
    return None
  names = set(backend.listdir(path))
  if COMMIT_MARKER in names:
    return None
  if ORBAX_CHECKPOINT_METADATA in names:
    where = f"{path}/{ORBAX_CHECKPOINT_METADATA}"
    try:
      meta = parse_json_object(backend.read_bytes(where), where)
    except (FileNotFoundError, errors.FormatError):
      return None
    if meta.get("commit_timestamp_nsecs") is not None:
      return ORBAX_CHECKPOINT_METADATA
  if ORBAX_TREE_METADATA in names:
    return ORBAX_TREE_METADATA
  return None


LEGACY_AGGREGATE = "checkpoint"  # orbax-checkpoint before 0.5: one msgpack file


def orbax_unreadable(backend: storage.StorageBackend, path: str) -> errors.CheckpointError | None:
  """The error for an Orbax directory flax_ckpt cannot load (None if it is not one): an
  unfinished Orbax save, or a checkpoint of Orbax before 0.5."""
  base = os.path.basename(path.rstrip("/"))
  names = set(backend.listdir(path))
  if COMMIT_MARKER in names:
    return None
  if ORBAX_TMP_TAG in base or ORBAX_CHECKPOINT_METADATA in names:
    return errors.IncompleteCheckpointError(
        f"{path} is an unfinished Orbax save: Orbax never committed it ({ORBAX_TMP_TAG} "
        f"in its name, or no commit time in {ORBAX_CHECKPOINT_METADATA}). Load an earlier "
        "step.")
  if LEGACY_AGGREGATE in names and ORBAX_TREE_METADATA not in names:
    return errors.FormatError(
        f"{path} looks like a checkpoint of orbax-checkpoint before 0.5 (a msgpack "
        f"'{LEGACY_AGGREGATE}' file without {ORBAX_TREE_METADATA}), a layout flax_ckpt does "
        "not read: restore it with that Orbax and save it with flax_ckpt.save.")
  return None


def is_orbax_checkpoint(path: paths.PathLike) -> bool:
  """Whether ``path`` holds a committed checkpoint written by Orbax (a ``Checkpointer``
  directory, a ``CheckpointManager`` step, or one of a step's PyTree items)."""
  final = paths.to_path(path)
  backend = storage.backend_for(final)
  p = os.fspath(final)
  return backend.is_dir(p) and orbax_marker(backend, p) is not None
