"""``Checkpointer`` and ``AsyncCheckpointer``: one handler, one checkpoint per path.

The handler writes straight into the checkpoint directory (a temporary sibling until the
commit), so a checkpoint looks like the handler's own files plus flax_ckpt's ``_CHECKPOINT``
marker, written last.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.engine.loading import (
  CommittedCheckpoint,
  log_loaded,
  read_committed,
  restore_part,
)
from flax_ckpt._src.engine.saving import Part, PendingSave, SaveOptions
from flax_ckpt._src.format import DEFAULT_CHECKPOINTABLE, ROOT_DIR
from flax_ckpt._src.io import background, paths, storage
from flax_ckpt._src.parts import handlers
from flax_ckpt._src.parts.custom import default_restore_args, writer_for_handler
from flax_ckpt._src.parts.handlers import CheckpointArgs, CheckpointHandler, call_with_args
from flax_ckpt._src.parts.protocol import part_kinds


class Checkpointer:
  """Saves and restores with one :class:`CheckpointHandler`, atomically.

  ``save`` writes into a temporary directory and renames it into place once the handler
  finished and everything is durable; ``restore`` and ``metadata`` read through the handler.

  Args:
    handler: the handler (an instance).
    fsync: make the data durable before committing.
    barrier_timeout_s: multi-process only: how long each process waits for the others.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> with flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler()) as ckptr:
    ...   ckptr.save(path, args=flax_ckpt.args.PyTreeSave({'w': np.ones(2)}))
    ...   ckptr.restore(path, args=flax_ckpt.args.PyTreeRestore())
    {'w': array([1., 1.])}
  """

  _is_async = False

  def __init__(self, handler: CheckpointHandler, *, fsync: bool = True,
               barrier_timeout_s: float | None = None):
    if isinstance(handler, type):
      raise TypeError(f"pass a handler instance, e.g. {type(self).__name__}"
                      f"({handler.__qualname__}()), not the class")
    for m in ("save", "restore"):
      if not callable(getattr(handler, m, None)):
        raise TypeError(f"{handler!r} is not a CheckpointHandler (no {m}() method); pass a "
                        "handler instance, e.g. Checkpointer(MyHandler())")
    self._handler = handler
    self._fsync = fsync
    self._barrier_timeout_s = barrier_timeout_s

  @property
  def handler(self) -> CheckpointHandler:
    """The handler this checkpointer drives."""
    return self._handler

  def _save_args(self, args: Any) -> Any:
    if args is None:
      raise TypeError("save needs args=..., e.g. MySave(item) registered with this handler")
    if not isinstance(args, CheckpointArgs):
      args_cls = handlers.registered_args_cls(self._handler, for_save=True)
      if args_cls is None:
        raise TypeError(
            f"save takes a CheckpointArgs object, not a {type(args).__qualname__}; "
            f"{type(self._handler).__qualname__} has no registered save args to wrap it in.")
      return args_cls(args)
    if not handlers.is_registered_for(args, self._handler, for_save=True):
      raise handlers.RegistrationError(
          f"{type(args).__qualname__} is not registered for saving with "
          f"{type(self._handler).__qualname__}; decorate it with "
          f"@flax_ckpt.args.register_with_handler({type(self._handler).__qualname__}, "
          "for_save=True). Nothing was written.")
    return args

  def _start(self, path: paths.PathLike, args: Any, force: bool,
             custom_metadata: Any) -> PendingSave:
    args = self._save_args(args)
    part = Part(DEFAULT_CHECKPOINTABLE, writer_for_handler(self._handler, args, owned=False),
                ROOT_DIR)
    return PendingSave.start(path, [part], SaveOptions(
        overwrite=force, custom_metadata=custom_metadata, is_async=self._is_async,
        fsync=self._fsync, barrier_timeout_s=self._barrier_timeout_s, overwrite_flag="force"))

  def save(self, path: paths.PathLike, args: CheckpointArgs | None = None, *,
           force: bool = False, custom_metadata: dict | None = None) -> None:
    """Saves and commits; returns when the checkpoint is complete.

    Args:
      path: destination directory.
      args: save args registered with the handler (a plain object is wrapped in the
        handler's registered save args class).
      force: replace an existing checkpoint at ``path`` (kept intact until the new one
        commits); without it an existing ``path`` is an error.
      custom_metadata: a JSON-serializable dict stored in the commit marker.

    Raises:
      CheckpointExistsError: ``path`` exists and ``force`` is False.
      RegistrationError: ``args`` is not registered with this handler.
    """
    self._start(path, args, force, custom_metadata).commit()

  def _part_dir(self, ckpt: CommittedCheckpoint) -> Any:
    """The single part's directory, once the checkpoint is known to be this handler's."""
    name = ckpt.only_part()
    entry = ckpt.manifest.parts[name]
    saved_by = part_kinds().get(entry, name, str(ckpt.path)).saved_by(entry, self._handler)
    if saved_by is not None:  # a clear error when another kind of handler wrote it
      raise errors.CheckpointError(
          f"{ckpt.path} was written by {saved_by}; this Checkpointer's handler is "
          f"{handlers.handler_name(type(self._handler))}. Restore it with a Checkpointer of "
          "that handler (or flax_ckpt.load_checkpointables).")
    return ckpt.part_dir(name)

  def restore(self, path: paths.PathLike, args: CheckpointArgs | None = None, *,
              verify: bool = True) -> Any:
    """Restores through the handler; ``args=None`` uses its restore args' defaults.

    Args:
      path: a checkpoint written by this kind of handler.
      args: restore args registered with the handler, or None (its registered restore
        args with their defaults); another object is wrapped in the registered restore
        args class (e.g. a template for :class:`PyTreeCheckpointHandler`).
      verify: check every byte read against the checksums recorded at save time
        (:class:`CorruptCheckpointError` on a mismatch); False skips the checks.
    """
    if args is None:
      args = default_restore_args(type(self._handler))
    elif not isinstance(args, CheckpointArgs):
      args_cls = handlers.registered_args_cls(self._handler, for_save=False)
      if args_cls is None:
        raise TypeError(
            f"restore takes a CheckpointArgs object, not a {type(args).__qualname__}; "
            f"{type(self._handler).__qualname__} has no registered restore args to wrap it in.")
      args = args_cls(args)
    elif not (handlers.is_registered_for(args, self._handler, for_save=False)
              or handlers.is_registered_for(args, self._handler, for_save=True)):
      raise handlers.RegistrationError(
          f"{type(args).__qualname__} is not registered for restoring with "
          f"{type(self._handler).__qualname__}; decorate it with "
          f"@flax_ckpt.args.register_with_handler({type(self._handler).__qualname__}, "
          "for_restore=True).")
    def read(ckpt: CommittedCheckpoint) -> Any:
      part_dir = self._part_dir(ckpt)
      return restore_part(ckpt, ckpt.only_part(), lambda: call_with_args(
          self._handler.restore, part_dir, args))

    first, t0 = storage.READ_STATS.bytes, time.monotonic()
    with storage.verify_reads(verify):
      out = read_committed(path, read)
    log_loaded(f"{type(self).__name__}.restore of {paths.to_path(path)}",
               [type(self._handler).__name__], storage.READ_STATS.bytes - first,
               time.monotonic() - t0)
    return out

  def metadata(self, path: paths.PathLike) -> Any:
    """The handler's ``metadata()`` for the checkpoint at ``path``."""
    fn = getattr(self._handler, "metadata", None)

    def read(ckpt: CommittedCheckpoint) -> Any:
      part_dir = self._part_dir(ckpt)
      return fn(part_dir) if callable(fn) else None

    return read_committed(path, read)

  def close(self) -> None:
    """Closes the handler."""
    fn = getattr(self._handler, "close", None)
    if callable(fn):
      fn()

  def __enter__(self):
    return self

  def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
    self.close()


class AsyncCheckpointer(Checkpointer):
  """A :class:`Checkpointer` whose ``save`` returns before the data is written.

  ``save`` returns once the handler's ``async_save`` has scheduled its work (a handler
  without ``async_save`` saves synchronously before ``save`` returns); the checkpoint is
  written under a temporary name next to ``path`` and renamed to ``path`` when complete.
  At most one save is in flight: the next ``save`` waits for the previous one. An error in
  the background is raised by the next call (``save``, ``restore``, ``metadata``,
  ``wait_until_finished`` or ``close``; each of them first waits for the pending save).

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> with flax_ckpt.AsyncCheckpointer(flax_ckpt.PyTreeCheckpointHandler()) as ckptr:
    ...   ckptr.save(path, args=flax_ckpt.args.PyTreeSave({'w': np.ones(2)}))
    ...   ckptr.wait_until_finished()
    ...   ckptr.restore(path)['w']
    array([1., 1.])
  """

  _is_async = True

  def __init__(self, handler: CheckpointHandler, *, fsync: bool = True,
               barrier_timeout_s: float | None = None):
    super().__init__(handler, fsync=fsync, barrier_timeout_s=barrier_timeout_s)
    self._lock = threading.Lock()
    self._save_lock = threading.Lock()  # wait-then-start of one save at a time
    self._pending: background.AsyncResponse | None = None
    self._closed = False

  def save(self, path: paths.PathLike, args: CheckpointArgs | None = None, *,
           force: bool = False, custom_metadata: dict | None = None) -> None:
    """Starts a save; returns once the data to write is captured (see the class doc)."""
    with self._save_lock:
      if self._closed:
        raise errors.CheckpointError("this AsyncCheckpointer is closed; create a new one")
      self.wait_until_finished()
      save = self._start(path, args, force, custom_metadata)
      with self._lock:
        self._pending = background.start_background(save.commit, os.fspath(save.final))

  def wait_until_finished(self) -> None:
    """Blocks until the pending save is committed; raises its error if it failed."""
    with self._lock:
      r, self._pending = self._pending, None
    if r is not None:
      r.result()

  def restore(self, path: paths.PathLike, args: CheckpointArgs | None = None, *,
              verify: bool = True) -> Any:
    """Waits for a pending save (raising its error), then restores."""
    self.wait_until_finished()
    return super().restore(path, args, verify=verify)

  def metadata(self, path: paths.PathLike) -> Any:
    """Waits for a pending save (raising its error), then reads the handler's metadata."""
    self.wait_until_finished()
    return super().metadata(path)

  def close(self) -> None:
    """Waits for the pending save, then closes the handler (once)."""
    with self._save_lock:
      try:
        self.wait_until_finished()
      finally:
        if not self._closed:
          self._closed = True
          super().close()

  def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
    if exc is None:
      self.close()
      return
    try:  # the block's own error wins; a failed pending save is noted on it
      self.close()
    except Exception as e:  # noqa: BLE001
      if hasattr(exc, "add_note"):
        exc.add_note(f"flax_ckpt: the pending save failed too: {type(e).__name__}: {e}")
