"""The PyTree part of a checkpoint as a CheckpointHandler (``PyTreeSave`` / ``PyTreeRestore``).

``save_checkpointables`` routes every PyTree through this handler; use it directly with a
:class:`~flax_ckpt.Checkpointer` when you want the handler-style API.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.io import background, multihost
from flax_ckpt._src.parts import pytree_io
from flax_ckpt._src.parts.handler_api import CheckpointHandler
from flax_ckpt._src.parts.handlers import CheckpointArgs, register_with_handler


def check_restore_type(restore_type: Any) -> Any:
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


class PyTreeCheckpointHandler(CheckpointHandler):
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
    driver = PyTreeCheckpointHandler._flax_ckpt_driver(self, args)
    driver.plan()
    driver.start(directory, None, False)(True)

  def restore(self, directory: epath.Path, args: PyTreeRestore | None = None) -> Any:
    args = args if args is not None else PyTreeRestore()
    if not isinstance(args, PyTreeRestore):
      raise TypeError(f"PyTreeCheckpointHandler.restore takes PyTreeRestore args, not "
                      f"{type(args).__qualname__}")
    restore_type = check_restore_type(args.restore_type)
    with background.no_gc():
      return pytree_io.load(epath.Path(directory), args.item, partial=args.partial,
                            restore_type=restore_type)

  def metadata(self, directory: epath.Path) -> Any:
    return pytree_io.metadata_tree(epath.Path(directory))

  def _flax_ckpt_driver(self, args: Any) -> _PyTreeDriver:
    if not isinstance(args, PyTreeSave):
      raise TypeError(f"PyTreeCheckpointHandler.save takes PyTreeSave args, not "
                      f"{type(args).__qualname__}")
    return _PyTreeDriver(args.item)


register_with_handler(PyTreeCheckpointHandler, for_save=True)(PyTreeSave)
register_with_handler(PyTreeCheckpointHandler, for_restore=True)(PyTreeRestore)


class _PyTreeDriver:
  """The save of one PyTree, in the steps the checkpoint writer drives."""

  kind = "pytree"

  def __init__(self, item: Any):
    self.item = item
    self.plan_: pytree_io.SavePlan | None = None

  def plan(self, what: str = "") -> None:
    with background.no_gc():
      try:
        self.plan_ = pytree_io.plan_save(self.item)  # validates before the disk is touched
      except errors.UnsupportedLeafError as e:
        problem = str(e).split("\n  <root>: ", 1)
        if len(problem) == 2:  # the object itself is no PyTree and no known leaf
          raise errors.UnsupportedLeafError(
              f"{what or 'the object'} (leaf <root>): {problem[1].splitlines()[0]}. "
              f"{errors.SUPPORTED_KINDS}. Nothing was written.") from e
        raise

  def share(self) -> Any:
    """Leaves process 0 writes as its own (process-local arrays)."""
    return pytree_io.local_array_ids(self.plan_) if multihost.process_count() > 1 else []

  def start(self, directory: epath.Path, shared: Any, is_async: bool):
    with background.no_gc():
      finish = pytree_io.prepare_save(
          epath.Path(directory), self.plan_, is_async=is_async,
          process_index=multihost.process_index(), primary_local=frozenset(shared or ()))
    self.plan_ = None  # the snapshot lives in ``finish`` now; drop the caller's values
    self.item = None

    self._abort = finish.abort

    def run(fsync: bool) -> None:
      with background.no_gc():
        finish(fsync)

    return run

  def entry(self) -> dict:
    return {"kind": "pytree"}

  def abort(self) -> None:
    abort = getattr(self, "_abort", None)
    if abort is not None:
      abort()

  def close(self) -> None:
    pass
