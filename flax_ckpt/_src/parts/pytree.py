"""The PyTree part: its handler (``PyTreeSave`` / ``PyTreeRestore``), writer and kind.

``save_checkpointables`` saves every value that no other kind claims as a PyTree, through
:class:`PyTreeWriter`; :class:`PyTreeCheckpointHandler` offers the same as a handler for a
:class:`~flax_ckpt.Checkpointer`. The format itself is ``pytree_io.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import KIND_PYTREE, PartEntry
from flax_ckpt._src.io import gc_pause, multihost
from flax_ckpt._src.leaves import reuse
from flax_ckpt._src.parts import pytree_io
from flax_ckpt._src.parts.handlers import CheckpointArgs, CheckpointHandler
from flax_ckpt._src.parts.protocol import (
    JsonValue,
    PartFinish,
    RestoreRequest,
    native_handler_save,
)


def check_restore_type(restore_type: Any) -> Any:
  """``restore_type`` if it is one a PyTree load accepts."""
  import jax
  import numpy as np

  if restore_type not in (None, np.ndarray, jax.Array):
    raise TypeError(f"restore_type must be None (as saved), numpy.ndarray or jax.Array, not "
                    f"{restore_type!r}")
  return restore_type


@dataclasses.dataclass
class PyTreeSave(CheckpointArgs):
  """Save args for a PyTree.

  Attributes:
    item: the PyTree (leaves of any type with a registered TypeHandler).
  """

  item: Any


@dataclasses.dataclass
class PyTreeRestore(CheckpointArgs):
  """Restore args for a PyTree; the template *is* the restore spec.

  Attributes:
    item: optional template (arrays, ``jax.ShapeDtypeStruct`` with or without sharding,
      ``None`` for "as saved"); see :func:`flax_ckpt.load`.
    partial: the template may be a subset of what was saved; only its leaves are read.
    restore_type: for leaves loaded without a template leaf: ``numpy.ndarray``,
      ``jax.Array`` or None (as saved).
  """

  item: Any = None
  partial: bool = False
  restore_type: type | None = None


class PyTreeWriter:
  """The save of one PyTree, in the steps the save transaction drives."""

  def __init__(self, item: Any):
    self._item = item
    self._plan: pytree_io.SavePlan | None = None
    # the same part of an earlier checkpoint whose equal chunks this save refers to
    # (set by the save transaction before ``start``)
    self.previous: reuse.PreviousChunks | None = None

  def plan(self, what: str) -> None:
    with gc_pause.paused():
      try:
        self._plan = pytree_io.plan_save(self._item)  # validates before the disk is touched
      except errors.UnsupportedLeafError as e:
        problem = str(e).split("\n  <root>: ", 1)
        if len(problem) == 2:  # the object itself is no PyTree and no known leaf
          raise errors.UnsupportedLeafError(
              f"{what or 'the object'} (leaf <root>): {problem[1].splitlines()[0]}. "
              f"{errors.SUPPORTED_KINDS}. Nothing was written.") from e
        raise

  def share(self) -> JsonValue:
    """Leaves process 0 writes as its own (process-local arrays)."""
    assert self._plan is not None, "plan() first"
    return pytree_io.local_array_ids(self._plan) if multihost.process_count() > 1 else []

  def start(self, directory: epath.Path, shared: JsonValue, is_async: bool) -> PartFinish:
    assert self._plan is not None, "plan() first"
    with gc_pause.paused():
      write = pytree_io.prepare_save(
          epath.Path(directory), self._plan, is_async=is_async,
          process_index=multihost.process_index(), primary_local=frozenset(shared or ()),
          previous=self.previous, structure_cache=multihost.process_count() == 1)
    self._plan = self._item = self.previous = None  # the snapshot lives in ``write`` now
    return write  # its finish pauses the collector for its bookkeeping only

  def entry(self) -> PartEntry:
    return PartEntry(KIND_PYTREE)

  def close(self) -> None:
    pass


class PyTreeCheckpointHandler(CheckpointHandler[PyTreeSave, PyTreeRestore]):
  """Saves a PyTree in flax_ckpt's packed format (see docs/format.md).

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> ckptr = flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
    >>> ckptr.save(path, flax_ckpt.args.PyTreeSave({'w': np.arange(3)}))
    >>> ckptr.restore(path)['w']
    array([0, 1, 2])
  """

  save_on_all_processes = True

  def save(self, directory: epath.Path, args: PyTreeSave) -> None:
    native_handler_save(self.part_writer(args), directory, "the object")

  def restore(self, directory: epath.Path, args: PyTreeRestore | None = None) -> Any:
    args = args if args is not None else PyTreeRestore()
    if not isinstance(args, PyTreeRestore):
      raise TypeError(f"PyTreeCheckpointHandler.restore takes PyTreeRestore args, not "
                      f"{type(args).__qualname__}")
    restore_type = check_restore_type(args.restore_type)
    with gc_pause.paused():
      return pytree_io.load(epath.Path(directory), args.item, partial=args.partial,
                            restore_type=restore_type)

  def metadata(self, directory: epath.Path) -> Any:
    return pytree_io.metadata_tree(epath.Path(directory))

  def part_writer(self, args: Any) -> PyTreeWriter:
    """The writer of this handler's save (the engine's fast path)."""
    if not isinstance(args, PyTreeSave):
      raise TypeError(f"PyTreeCheckpointHandler.save takes PyTreeSave args, not "
                      f"{type(args).__qualname__}")
    return PyTreeWriter(args.item)


class PyTreeKind:
  """The ``pytree`` part kind: the catch-all, so it is registered last."""

  name = KIND_PYTREE
  restore_last = False
  handler_cls = PyTreeCheckpointHandler

  def writer_for(self, name: str, value: Any) -> PyTreeWriter:
    return PyTreeWriter(value)

  def restore(self, directory: epath.Path, entry: PartEntry, request: RestoreRequest) -> Any:
    args = request.abstract
    if isinstance(args, PyTreeRestore):
      return PyTreeCheckpointHandler().restore(directory, args)
    if isinstance(args, CheckpointArgs):
      raise TypeError(f"part {request.name!r} is a PyTree; restore it with a template or "
                      f"PyTreeRestore, not {type(args).__qualname__}")
    with gc_pause.paused():  # restore_type was checked once by the API
      return pytree_io.load(epath.Path(directory), args, partial=request.partial,
                            restore_type=request.restore_type)

  def metadata(self, directory: epath.Path, entry: PartEntry) -> Any:
    return pytree_io.metadata_tree(epath.Path(directory))

  def saved_by(self, entry: PartEntry, handler: Any) -> str | None:
    if isinstance(handler, PyTreeCheckpointHandler):
      return None
    return f"flax_ckpt's pytree handler ({PyTreeCheckpointHandler.__name__})"
