"""The public functions: ``save``, ``save_async``, ``load``, ``metadata`` and their
several-part forms ``save_checkpointables``, ``save_checkpointables_async`` and
``load_checkpointables``.

Each is a thin layer over the engine: a save is ``PendingSave.start(...).commit()``
(``engine/saving.py``), a load is ``load_parts`` (``engine/loading.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.engine.loading import CheckpointMetadata, checkpoint_metadata, load_parts
from flax_ckpt._src.engine.saving import PendingSave, SaveOptions, parts_from
from flax_ckpt._src.engine.verifying import VerifyReport, verify_checkpoint
from flax_ckpt._src.format import DEFAULT_CHECKPOINTABLE
from flax_ckpt._src.interop import files, orbax_reading
from flax_ckpt._src.io import background, orbax_layout, paths, storage
from flax_ckpt._src.parts.pytree import check_restore_type


def _in_background(save: PendingSave) -> background.AsyncResponse:
  """Commits ``save`` in a background thread."""
  return background.start_background(save.commit, os.fspath(save.final))


def save(path: paths.PathLike, state: Any, *, overwrite: bool = False,
         custom_metadata: dict | None = None, fsync: bool = True,
         barrier_timeout_s: float | None = None,
         checkpointable_name: str = DEFAULT_CHECKPOINTABLE) -> None:
  """Saves any PyTree to ``path``; returns once the checkpoint is committed.

  This is :func:`save_checkpointables` with one part, named ``checkpointable_name``; like
  there, an object that is not a PyTree (a data iterator, args of a CheckpointHandler) is
  saved by its own handler.

  The checkpoint is written into a temporary sibling directory and renamed into place after
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
    checkpointable_name: the part's name (its sub-directory); ``load`` takes the same.

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
  PendingSave.start(path, parts_from({checkpointable_name: state}), SaveOptions(
      overwrite=overwrite, custom_metadata=custom_metadata, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s)).commit()


def save_async(path: paths.PathLike, state: Any, *, overwrite: bool = False,
               custom_metadata: dict | None = None, fsync: bool = True,
               barrier_timeout_s: float | None = None,
               checkpointable_name: str = DEFAULT_CHECKPOINTABLE
               ) -> background.AsyncResponse:
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
    checkpointable_name: the part's name (its sub-directory).

  Returns:
    An :class:`AsyncResponse`; ``result()`` blocks until committed and re-raises failures.

  Example:
    >>> import jax.numpy as jnp, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> r = flax_ckpt.save_async(path, {'w': jnp.ones(3)})
    >>> r.result()
  """
  return _in_background(PendingSave.start(
      path, parts_from({checkpointable_name: state}), SaveOptions(
          overwrite=overwrite, custom_metadata=custom_metadata, fsync=fsync,
          barrier_timeout_s=barrier_timeout_s, is_async=True)))


def load(path: paths.PathLike, abstract_state: Any = None, *, partial: bool = False,
         restore_type: type | None = None,
         checkpointable_name: str = DEFAULT_CHECKPOINTABLE, verify: bool = True) -> Any:
  """Loads a checkpoint written by :func:`save`.

  Without ``abstract_state`` the saved structure is rebuilt: dicts (int keys stay ints),
  lists, tuples, ``None``, and NamedTuples/dataclasses registered with
  :func:`register_class` (others come back as dict/tuple with one warning per class);
  ``jax.Array`` leaves come back on the default device, numpy leaves as numpy.

  With ``abstract_state`` (a PyTree whose leaves are arrays, ``jax.ShapeDtypeStruct``
  with or without ``sharding``, or ``None``), the result has exactly the template's
  structure and types. A template dtype different from the saved one casts the values
  (``astype`` semantics: float->int truncates, out-of-range values wrap; a cast that can
  lose information warns once per load with a :class:`LossyCastWarning` naming the
  leaves). A ``None``
  template leaf loads that leaf as saved.

  Args:
    path: the checkpoint directory.
    abstract_state: optional template.
    partial: allow the template to be a subset of the checkpoint; only its leaves are read.
    restore_type: for array leaves loaded without a template leaf (no ``abstract_state``, or
      ``None`` in it): ``numpy.ndarray`` gives host numpy arrays, ``jax.Array`` arrays on
      the default device; None (default) gives each the kind it was saved as. The saved
      sharding is never required: a checkpoint saved on any topology loads anywhere.
    checkpointable_name: which part to load (default ``state``, what :func:`save` writes);
      see :func:`load_checkpointables` for several parts.
    verify: check every byte read against the checksums recorded when it was saved
      (costs a few percent of a cold load); False skips the checks. Checkpoints saved
      without checksums load either way.

  Raises:
    CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.
    StructureMismatchError: leaves missing on either side, or shapes differ.
    CorruptCheckpointError: bytes differ from their checksums (the checkpoint was
      damaged after it was written); nothing is returned.
    FormatError: the checkpoint's metadata is malformed, inconsistent or crafted.

  Example:
    >>> import jax, jax.numpy as jnp, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': jnp.ones((2, 3), jnp.bfloat16)})
    >>> template = {'w': jax.ShapeDtypeStruct((2, 3), jnp.float32)}  # a lossless cast
    >>> flax_ckpt.load(path, template)['w'].dtype
    dtype('float32')
  """
  if files.is_single_file(path):  # a safetensors or flax msgpack file, not a checkpoint
    return files.load_file(path, abstract_state, partial=partial,
                           restore_type=check_restore_type(restore_type))
  try:
    return _load_native(path, {checkpointable_name: abstract_state}, partial=partial,
                        restore_type=restore_type, verify=verify)[checkpointable_name]
  except errors.ForeignCheckpointError:  # an Orbax checkpoint: its reader picks the item
    item = None if checkpointable_name == DEFAULT_CHECKPOINTABLE else checkpointable_name
    return orbax_reading.load(path, abstract_state, partial=partial,
                              restore_type=check_restore_type(restore_type), item=item)


def metadata(path: paths.PathLike) -> CheckpointMetadata:
  """:func:`flax_ckpt.metadata` (documented there, in ``flax_ckpt/metadata.py``)."""
  return checkpoint_metadata(path)


def is_orbax_checkpoint(path: paths.PathLike) -> bool:
  """Whether ``path`` holds a committed checkpoint written by Orbax, not by flax_ckpt.

  True for an Orbax ``Checkpointer``/``StandardCheckpointer`` directory, a
  ``CheckpointManager`` step, or one of a step's PyTree items (e.g. ``<step>/default``);
  False for flax_ckpt checkpoints, unfinished Orbax saves and anything else. It only
  looks at file names and Orbax's commit record; orbax is never imported.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': np.ones(2)})
    >>> flax_ckpt.is_orbax_checkpoint(path)
    False
  """
  return orbax_layout.is_orbax_checkpoint(path)


def verify(path: paths.PathLike) -> VerifyReport:
  """Reads a whole checkpoint and checks every checksum and every structural invariant.

  Unlike a load, which stops at the first damaged byte, it goes on and lists every
  problem found: files that are missing or differ from the checksums in the commit
  marker, malformed or inconsistent metadata (shapes, dtypes, chunk boxes, byte counts,
  file lengths) and every damaged block of array data. It reads each byte once through a
  bounded buffer and builds no value. A checkpoint saved before flax_ckpt wrote
  checksums gets ``has_checksums=False``: only its structure and file lengths are checked.

  Args:
    path: a checkpoint (local, ``gs://`` or ``s3://``). For a step of a
      :class:`CheckpointManager`, see :meth:`CheckpointManager.verify`.

  Returns:
    A :class:`VerifyReport`: falsy when any problem was found; ``problems`` lists them
    (each with file, part, leaf and message), ``str(report)`` prints them.

  Raises:
    CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': np.arange(4.0)})
    >>> with open(os.path.join(path, 'state', 'data.p0.bin'), 'r+b') as f:
    ...   _ = f.write(b'!')  # damage the first byte of the data
    >>> report = flax_ckpt.verify(path)
    >>> bool(report), report.problems[0].leaf
    (False, "['w']")
  """
  return verify_checkpoint(path)


def save_checkpointables(path: paths.PathLike, checkpointables: Mapping[str, Any], *,
                         overwrite: bool = False, custom_metadata: dict | None = None,
                         fsync: bool = True, barrier_timeout_s: float | None = None) -> None:
  """Saves several named parts as one checkpoint, committed atomically together.

  Each part is saved by a handler chosen by its type: a ``CheckpointArgs`` object by the
  handler it is registered with; an object of a type registered with
  :func:`register_checkpointable_handler` by that handler; an object with ``get_state()``
  and ``set_state()`` (grain's ``DatasetIterator``, your own iterators) by the stateful
  handler, each process saving its own state; anything else as a PyTree.

  Args:
    path: destination directory.
    checkpointables: ``{name: object}``; names become directory names
      (``[A-Za-z0-9_.-]``, not starting with ``.`` or ``_``).
    overwrite: replace an existing checkpoint (kept intact until the new one commits).
    custom_metadata: a JSON-serializable dict stored with the checkpoint.
    fsync: make the data durable before committing.
    barrier_timeout_s: multi-process only: how long each process waits for the others.

  Raises:
    CheckpointExistsError: ``path`` exists and ``overwrite`` is False.
    UnsupportedLeafError: a part (or a leaf of a PyTree part) cannot be saved; nothing is
      written.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save_checkpointables(
    ...     path, {'params': {'w': np.ones(3)}, 'opt_state': {'mu': np.zeros(3)}})
    >>> sorted(flax_ckpt.load_checkpointables(path))
    ['opt_state', 'params']
    >>> flax_ckpt.load_checkpointables(path, {'params': None})['params']['w']
    array([1., 1., 1.])
  """
  PendingSave.start(path, parts_from(checkpointables), SaveOptions(
      overwrite=overwrite, custom_metadata=custom_metadata, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s)).commit()


def save_checkpointables_async(path: paths.PathLike, checkpointables: Mapping[str, Any], *,
                               overwrite: bool = False, custom_metadata: dict | None = None,
                               fsync: bool = True, barrier_timeout_s: float | None = None
                               ) -> background.AsyncResponse:
  """Like :func:`save_checkpointables`, but returns once the parts are snapshotted.

  On return, array data is held in a form the caller can no longer change, each stateful
  object's ``get_state()`` has been taken, and each custom async handler's ``async_save``
  has returned; writing and the single commit continue in the background.

  Returns:
    An :class:`AsyncResponse`; ``result()`` blocks until committed and re-raises failures.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> r = flax_ckpt.save_checkpointables_async(path, {'params': {'w': np.ones(3)}})
    >>> r.result()
  """
  return _in_background(PendingSave.start(path, parts_from(checkpointables), SaveOptions(
      overwrite=overwrite, custom_metadata=custom_metadata, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s, is_async=True)))


def load_checkpointables(path: paths.PathLike,
                         abstract_checkpointables: Mapping[str, Any] | None = None, *,
                         partial: bool = False, restore_type: type | None = None,
                         verify: bool = True) -> dict[str, Any]:
  """Loads all parts of a checkpoint, or only the named ones.

  Parts not named in ``abstract_checkpointables`` are not read at all (not a byte, not a
  file), so ``{'params': template}`` loads parameters for evaluation without touching the
  optimizer state.

  Args:
    path: the checkpoint directory.
    abstract_checkpointables: None loads every part as saved. Otherwise ``{name: spec}``
      for the parts to load, where spec is: for a PyTree part, a template (see
      :func:`flax_ckpt.load`), None (as saved) or :class:`PyTreeRestore`; for a stateful
      part, the object to restore into (``set_state`` is called and the object returned),
      None (the saved state itself) or :class:`StatefulRestore`; for a custom handler's
      part, its restore args or None (the handler's registered restore args with their
      defaults).
    partial: PyTree templates may be subsets of what was saved.
    restore_type: ``numpy.ndarray`` / ``jax.Array`` for PyTree array leaves loaded without
      a template leaf; None keeps the saved kind.
    verify: check every byte read against its recorded checksum (see :func:`load`).

  Returns:
    ``{name: value}`` in the order the parts were saved.

  Raises:
    StructureMismatchError: a requested part does not exist (the error lists the parts).
    CorruptCheckpointError: bytes of a requested part differ from their checksums.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save_checkpointables(path, {'params': {'w': np.ones(2)}, 'step': 5})
    >>> flax_ckpt.load_checkpointables(path, {'step': None})
    {'step': 5}
  """
  try:
    return _load_native(path, abstract_checkpointables, partial=partial,
                        restore_type=restore_type, verify=verify)
  except errors.ForeignCheckpointError:  # written by Orbax: read with the Orbax reader
    return orbax_reading.load_items(path, abstract_checkpointables, partial=partial,
                                    restore_type=check_restore_type(restore_type))


def _load_native(path: paths.PathLike, abstract: Mapping[str, Any] | None, *, partial: bool,
                 restore_type: type | None, verify: bool) -> dict[str, Any]:
  """The parts of a flax_ckpt checkpoint (ForeignCheckpointError: it is Orbax's)."""
  restore_type = check_restore_type(restore_type)
  if abstract is not None and not isinstance(abstract, Mapping):
    raise TypeError("abstract_checkpointables must be a dict {name: template or args} or None")
  return load_parts(path, abstract, partial=partial, restore_type=restore_type, verify=verify)


def kvstore_spec(path: paths.PathLike) -> dict:
  """The tensorstore kvstore spec of a checkpoint location, as flax_ckpt opens it.

  For a local path a ``file`` kvstore; for ``s3://bucket/prefix`` or ``gs://bucket/prefix``
  the ``s3``/``gcs`` kvstore configured from the clouds' usual environment (endpoint,
  region, credentials, bounded retries; see docs/design.md, "Object storage"). Use it to
  keep your own files next to your checkpoints on the same storage, e.g. a run's config.

  Args:
    path: a directory (``str``, ``os.PathLike`` or ``etils.epath.Path``).

  Returns:
    A JSON spec for ``tensorstore.KvStore.open``; its ``path`` ends in ``/``.

  Example:
    >>> import flax_ckpt, tensorstore as ts, tempfile
    >>> kv = ts.KvStore.open(flax_ckpt.kvstore_spec(tempfile.mkdtemp())).result()
    >>> _ = kv.write('config.json', b'{}').result()
    >>> kv.read('config.json').result().value
    b'{}'
  """
  final = paths.to_path(path)
  return storage.backend_for(final).kvstore_spec(os.fspath(final))
