"""The core API: ``save``, ``save_async``, ``load`` and ``metadata`` for any PyTree."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any

from etils import epath

from flax_ckpt._src import async_utils, errors, multihost, paths, pytree_io, storage

FORMAT_VERSION = 1
DEFAULT_CHECKPOINTABLE = "state"
_ATTEMPTS = 5  # reads retried when an overwrite replaces the checkpoint mid-read


@dataclasses.dataclass
class CheckpointMetadata:
  """What :func:`metadata` returns.

  Attributes:
    tree: the saved structure with one metadata object per leaf
      (:class:`ArrayMetadata`, :class:`ValueMetadata` or a custom handler's class).
    custom_metadata: the dict passed to ``save(..., custom_metadata=...)``.
    format_version: on-disk format version.
    checkpointables: names of the parts stored in the checkpoint.
    created_at: UNIX time of the commit.
  """

  tree: Any
  custom_metadata: dict | None
  format_version: int
  checkpointables: dict
  created_at: float | None = None

  def __getitem__(self, key: Any) -> Any:
    return self.tree[key]


def _check_custom_metadata(custom_metadata: Any) -> None:
  if custom_metadata is None:
    return
  if not isinstance(custom_metadata, dict):
    raise TypeError("custom_metadata must be a dict of JSON-serializable values")
  try:
    json.dumps(custom_metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"custom_metadata is not JSON-serializable ({e}); convert arrays with .tolist() and "
        "other objects to str/int/float/bool/list/dict. Nothing was written.") from e


_in_flight: dict[str, list[threading.Event]] = {}  # destination -> saves in call order
_in_flight_lock = threading.Lock()


def _claim(final: epath.Path, overwrite: bool) -> tuple[str, threading.Event, list]:
  """Registers a save to ``final``; without overwrite, a second concurrent one is an error.

  Returns the key, this save's ticket, and the tickets of earlier saves to the same path in
  this process: this save commits only after those finished, so the last call wins.
  """
  key = os.path.realpath(final)  # one key however the path is spelled
  with _in_flight_lock:
    earlier = _in_flight.get(key, [])
    if earlier and not overwrite:
      raise errors.CheckpointExistsError(
          f"a save to {key} is already in progress in this process; wait for it "
          "(AsyncResponse.result()) or pass overwrite=True. Nothing was written.")
    ticket = threading.Event()
    _in_flight[key] = [*earlier, ticket]
  return key, ticket, list(earlier)


def _release(key: str, ticket: threading.Event) -> None:
  with _in_flight_lock:
    rest = [t for t in _in_flight.get(key, []) if t is not ticket]
    if rest:
      _in_flight[key] = rest
    else:
      _in_flight.pop(key, None)
  ticket.set()


def _start_save(path: paths.PathLike, state: Any, *, overwrite: bool, custom_metadata: Any,
                is_async: bool, fsync: bool, barrier_timeout_s: float | None = None):
  nproc, pid = multihost.process_count(), multihost.process_index()
  primary = pid == 0
  final = paths.to_path(path)
  # Numbered before any check that could fail in one process only, and named after the
  # path: processes that disagree about a save time out instead of pairing different saves.
  op = multihost.next_operation_id(os.fspath(final)) if nproc > 1 else ""
  timeout = multihost.timeout_s(barrier_timeout_s)
  storage.backend_name()  # a bad FLAX_CKPT_STORAGE fails before anything is written
  paths.check_destination(final, overwrite)
  _check_custom_metadata(custom_metadata)
  key, ticket, earlier = _claim(final, overwrite)
  try:
    if primary:
      paths.cleanup_stale_tmp(final)
    with async_utils.no_gc():
      plan = pytree_io.plan_save(state)  # validates the whole tree before touching the disk
    # The primary makes the temporary directory and says which arrays it writes as its own
    # (process-local values); every process writes its part into that directory.
    tmp, created = paths.make_tmp_dir(final) if primary else (None, [])
    shared = multihost.share(
        f"{op}/start",
        json.dumps({"tmp": os.fspath(tmp), "local": pytree_io.local_array_ids(plan)})
        if primary else None, timeout) if nproc > 1 else None
    primary_local: frozenset[int] = frozenset()
    if shared is not None:
      info = json.loads(shared)
      tmp, primary_local = epath.Path(info["tmp"]), frozenset(info["local"])
    try:
      with async_utils.no_gc():
        finish_tree = pytree_io.prepare_save(tmp / DEFAULT_CHECKPOINTABLE, plan,
                                             is_async=is_async, process_index=pid,
                                             primary_local=primary_local)
    except BaseException:
      if primary:
        pytree_io.remove_quietly(tmp)
        paths.remove_created(created)
      raise
  except BaseException:
    _release(key, ticket)
    raise

  def finish() -> None:
    try:
      _finish()
    finally:
      _release(key, ticket)

  def _finish() -> None:
    try:
      try:
        with async_utils.no_gc():
          finish_tree(fsync)
      except OSError as e:
        if primary:
          raise
        raise errors.CheckpointError(
            f"process {pid} could not write its part of {final} ({e}); if process 0 failed "
            "first, its error says why. Nothing was committed.") from e
      multihost.barrier(f"{op}/written", timeout, "finished writing its part")
      if primary:
        manifest = {
            "format": "flax_ckpt", "version": FORMAT_VERSION,
            "checkpointables": {DEFAULT_CHECKPOINTABLE: {"kind": "pytree"}},
            "custom_metadata": custom_metadata, "created_at": time.time(),
            "process_count": nproc,
        }
        paths.write_json(tmp / paths.COMMIT_MARKER, manifest, fsync=fsync)
        if fsync:
          paths.fsync_path(tmp)
        for t in earlier:  # earlier saves to this path commit (or fail) first
          t.wait()
        paths.commit(tmp, final, overwrite=overwrite, fsync=fsync)
    except BaseException:
      if primary:
        pytree_io.remove_quietly(tmp)
        paths.remove_created(created)
      raise
    multihost.barrier(f"{op}/committed", timeout, "saw the commit", committed=True)

  return final, finish


def save(path: paths.PathLike, state: Any, *, overwrite: bool = False,
         custom_metadata: dict | None = None, fsync: bool = True,
         barrier_timeout_s: float | None = None) -> None:
  """Saves any PyTree to ``path``; returns once the checkpoint is committed.

  The checkpoint is written into a hidden sibling directory and renamed into place after
  every byte is durable, so ``path`` either holds the complete checkpoint or nothing new.

  In a multi-process job every process calls ``save`` with the same path and tree (in the
  same order as its other saves). Each writes the shards whose replica 0 it holds; process 0
  writes the tree metadata and commits once every process has finished.

  Args:
    path: destination directory (``str``, ``os.PathLike`` or ``etils.epath.Path``).
    state: the PyTree (dicts with str/int keys, lists, tuples, NamedTuples, dataclasses and
      other PyTree nodes; leaves of any type with a registered TypeHandler).
    overwrite: replace an existing checkpoint at ``path``; the old one stays intact until
      the new one is committed.
    custom_metadata: a JSON-serializable dict stored with the checkpoint.
    fsync: make the data durable before committing (disable only for scratch data).
    barrier_timeout_s: in a multi-process (``jax.distributed``) job, how long a process
      waits for the others at each step of the save before raising (default
      ``$FLAX_CKPT_BARRIER_TIMEOUT_S`` or 300 s). Nothing is committed unless every
      process wrote its part.

  Raises:
    CheckpointExistsError: ``path`` exists and ``overwrite`` is False.
    UnsupportedLeafError: a leaf or dict key cannot be saved (nothing is written).

  Example:
    >>> import jax.numpy as jnp, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': jnp.ones((2, 3)), 'step': 10})
    >>> flax_ckpt.load(path)['step']
    10
  """
  _, finish = _start_save(path, state, overwrite=overwrite, custom_metadata=custom_metadata,
                          is_async=False, fsync=fsync, barrier_timeout_s=barrier_timeout_s)
  finish()


def save_async(path: paths.PathLike, state: Any, *, overwrite: bool = False,
               custom_metadata: dict | None = None, fsync: bool = True,
               barrier_timeout_s: float | None = None) -> async_utils.AsyncResponse:
  """Starts saving ``state`` and returns as soon as it is safe to change it.

  On return, the values are held in a form the caller can no longer affect: numpy arrays
  are copied; ``jax.Array`` buffers are pinned with a zero-copy host view (on CPU), so
  donating or deleting them afterwards cannot change what is written. Writing and the
  commit continue in a background thread. A save still pending at interpreter exit is
  finished before the process exits; if it fails, the error is printed to stderr.

  Args:
    path: destination directory.
    state: the PyTree to save.
    overwrite: replace an existing checkpoint (kept intact until the new one commits).
    custom_metadata: a JSON-serializable dict stored with the checkpoint.
    fsync: make the data durable before committing.
    barrier_timeout_s: in a multi-process (``jax.distributed``) job, how long a process
      waits for the others at each step of the save before raising (default
      ``$FLAX_CKPT_BARRIER_TIMEOUT_S`` or 300 s). Nothing is committed unless every
      process wrote its part.

  Returns:
    An :class:`AsyncResponse`; ``result()`` blocks until committed and re-raises failures.

  Example:
    >>> import jax.numpy as jnp, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> r = flax_ckpt.save_async(path, {'w': jnp.ones(3)})
    >>> r.result()
  """
  final, finish = _start_save(path, state, overwrite=overwrite,
                              custom_metadata=custom_metadata, is_async=True, fsync=fsync,
                              barrier_timeout_s=barrier_timeout_s)
  return async_utils.start_background(finish, os.fspath(final))


def _committed_checkpointable(path: paths.PathLike) -> tuple[epath.Path, dict]:
  final = paths.to_path(path)
  manifest = paths.require_committed(final)
  if manifest.get("version") != FORMAT_VERSION:
    raise errors.FormatError(
        f"{final}: format version {manifest.get('version')} is not supported (this flax_ckpt "
        f"reads version {FORMAT_VERSION}); upgrade flax_ckpt.")
  return final, manifest


def load(path: paths.PathLike, abstract_state: Any = None, *, partial: bool = False,
         restore_type: type | None = None) -> Any:
  """Loads a checkpoint written by :func:`save`.

  Without ``abstract_state`` the saved structure is rebuilt: dicts (int keys stay ints),
  lists, tuples, ``None``, and NamedTuples/dataclasses registered with
  :func:`register_class` (others come back as dict/tuple with one warning per class);
  ``jax.Array`` leaves come back on the default device, numpy leaves as numpy.

  With ``abstract_state`` (a PyTree whose leaves are arrays, ``jax.ShapeDtypeStruct``
  with or without ``sharding``, or ``None``), the result has exactly the template's
  structure and types. A template dtype different from the saved one casts the values
  (``astype`` semantics: float->int truncates, out-of-range values wrap). A ``None``
  template leaf loads that leaf as saved.

  Args:
    path: the checkpoint directory.
    abstract_state: optional template.
    partial: allow the template to be a subset of the checkpoint; only its leaves are read.
    restore_type: for array leaves loaded without a template leaf (no ``abstract_state``, or
      ``None`` in it): ``numpy.ndarray`` gives host numpy arrays, ``jax.Array`` arrays on
      the default device; None (default) gives each the kind it was saved as. The saved
      sharding is never required: a checkpoint saved on any topology loads anywhere.

  Raises:
    CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.
    StructureMismatchError: leaves missing on either side, or shapes differ.

  Example:
    >>> import jax, jax.numpy as jnp, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': jnp.ones((2, 3))})
    >>> template = {'w': jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)}
    >>> flax_ckpt.load(path, template)['w'].dtype
    dtype(bfloat16)
  """
  restore_type = _check_restore_type(restore_type)
  for attempt in range(_ATTEMPTS):  # a concurrent overwrite=True may replace it meanwhile
    final, _ = _committed_checkpointable(path)
    try:
      with async_utils.no_gc():
        return pytree_io.load(final / DEFAULT_CHECKPOINTABLE, abstract_state, partial=partial,
                              restore_type=restore_type)
    except errors.CheckpointReplacedError:
      if attempt == _ATTEMPTS - 1:
        raise
  raise AssertionError("unreachable")


def _check_restore_type(restore_type: Any) -> Any:
  import jax
  import numpy as np

  if restore_type not in (None, np.ndarray, jax.Array):
    raise TypeError(f"restore_type must be None (as saved), numpy.ndarray or jax.Array, not "
                    f"{restore_type!r}")
  return restore_type


def metadata(path: paths.PathLike) -> CheckpointMetadata:
  """Describes a checkpoint without reading any array bytes.

  Args:
    path: the checkpoint directory.

  Returns:
    A :class:`CheckpointMetadata` whose ``tree`` mirrors the saved structure with one
    metadata object per leaf (shape, dtype, type, size in bytes, saved sharding).
    ``md[key]`` indexes the tree.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': np.zeros((2, 3), np.float32)}, custom_metadata={'lr': 0.1})
    >>> md = flax_ckpt.metadata(path)
    >>> md['w'].shape, md.custom_metadata
    ((2, 3), {'lr': 0.1})
  """
  for attempt in range(_ATTEMPTS):  # a concurrent overwrite=True may replace it meanwhile
    final, manifest = _committed_checkpointable(path)
    try:
      tree = pytree_io.metadata_tree(final / DEFAULT_CHECKPOINTABLE)
      break
    except errors.CheckpointReplacedError:
      if attempt == _ATTEMPTS - 1:
        raise
  return CheckpointMetadata(
      tree=tree, custom_metadata=manifest.get("custom_metadata"),
      format_version=manifest["version"], checkpointables=manifest.get("checkpointables", {}),
      created_at=manifest.get("created_at"))
