"""The core API: ``save``, ``save_async``, ``load`` and ``metadata`` for any PyTree."""

from __future__ import annotations

import os
from typing import Any

from flax_ckpt._src.engine import checkpointables
from flax_ckpt._src.engine.checkpointables import (  # noqa: F401 - re-exported
  DEFAULT_CHECKPOINTABLE,
  FORMAT_VERSION,
  CheckpointMetadata,
)
from flax_ckpt._src.io import background, paths
from flax_ckpt._src.parts.pytree import check_restore_type


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
  _, finish = checkpointables.start_save(
      path, checkpointables.parts_from({checkpointable_name: state}), overwrite=overwrite,
      custom_metadata=custom_metadata, is_async=False, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s)
  finish()


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
  final, finish = checkpointables.start_save(
      path, checkpointables.parts_from({checkpointable_name: state}), overwrite=overwrite,
      custom_metadata=custom_metadata, is_async=True, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s)
  return background.start_background(finish, os.fspath(final))


def load(path: paths.PathLike, abstract_state: Any = None, *, partial: bool = False,
         restore_type: type | None = None,
         checkpointable_name: str = DEFAULT_CHECKPOINTABLE) -> Any:
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
    checkpointable_name: which part to load (default ``state``, what :func:`save` writes);
      see :func:`load_checkpointables` for several parts.

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
  restore_type = check_restore_type(restore_type)
  return checkpointables.load_part(path, checkpointable_name, abstract_state, partial=partial,
                                   restore_type=restore_type)


def metadata(path: paths.PathLike) -> CheckpointMetadata:
  """Describes a checkpoint without reading any array bytes.

  Args:
    path: the checkpoint directory.

  Returns:
    A :class:`CheckpointMetadata`: ``checkpointables`` lists the parts and their kinds
    (``pytree``, ``stateful``, ``handler``), ``parts`` holds each part's metadata, and
    ``tree`` mirrors the ``state`` part (what :func:`save` writes) with one metadata object
    per leaf (shape, dtype, type, size in bytes, saved sharding); ``md[key]`` indexes it.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': np.zeros((2, 3), np.float32)}, custom_metadata={'lr': 0.1})
    >>> md = flax_ckpt.metadata(path)
    >>> md['w'].shape, md.custom_metadata
    ((2, 3), {'lr': 0.1})
  """
  return checkpointables.checkpoint_metadata(path)
