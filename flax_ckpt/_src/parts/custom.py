"""The ``handler`` part kind: parts saved by a user's :class:`CheckpointHandler`.

A value given as :class:`CheckpointArgs` goes to the handler its class is registered with;
an object of a type registered with ``register_checkpointable_handler`` goes to that
handler. The manifest records the handler's qualified name; loading looks it up among the
handler classes registered in this process, never by importing it.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import KIND_HANDLER, PartEntry
from flax_ckpt._src.io import background, multihost, storage
from flax_ckpt._src.parts import handlers
from flax_ckpt._src.parts.handlers import CheckpointArgs, call_with_args
from flax_ckpt._src.parts.protocol import (
    JsonValue,
    PartFinish,
    PartWriter,
    RestoreRequest,
    native_writer,
)


class HandlerWriter:
  """The save of one part by a user's CheckpointHandler."""

  def __init__(self, handler: Any, args: Any, owned: bool):
    self._handler, self._args, self._owned = handler, args, owned

  def plan(self, what: str) -> None:
    for m in ("save", "restore"):
      if not callable(getattr(self._handler, m, None)):
        raise TypeError(f"{what}: {type(self._handler).__qualname__} has no {m}() method; a "
                        "CheckpointHandler needs save(directory, args) and restore(directory, "
                        "args)")

  def share(self) -> JsonValue:
    return None

  def start(self, directory: epath.Path, shared: JsonValue, is_async: bool) -> PartFinish:
    h = self._handler
    if multihost.process_index() != 0 and not getattr(h, "save_on_all_processes", False):
      return _Futures(directory, [], wrote=False)
    if is_async and callable(getattr(h, "async_save", None)):
      r = call_with_args(h.async_save, directory, self._args)
      if inspect.isawaitable(r):
        # on flax_ckpt's long-lived loop: tasks the handler starts keep running after this
        async def _await(x=r):
          return await x
        r = background.run_on_background_loop(_await())
      return _Futures(directory, list(r or []), wrote=True)
    call_with_args(h.save, directory, self._args)
    return _Futures(directory, [], wrote=True)

  def entry(self) -> PartEntry:
    return PartEntry(KIND_HANDLER,
                     fields={"handler": handlers.handler_name(type(self._handler))})

  def close(self) -> None:
    if self._owned and callable(getattr(self._handler, "close", None)):
      self._handler.close()


class _Futures:
  """A handler's background work: the futures its ``async_save`` returned."""

  def __init__(self, directory: epath.Path, futures: list, wrote: bool):
    self._directory, self._futures, self._wrote = directory, futures, wrote

  def finish(self, fsync: bool) -> None:
    background.wait_futures(self._futures)
    if fsync and self._wrote:
      storage.backend_for(self._directory).sync_tree(os.fspath(self._directory))

  def abort(self) -> None:
    background.wait_futures(self._futures, quiet=True)  # nothing may write after cleanup


def writer_for_handler(handler: Any, args: Any, *, owned: bool) -> PartWriter:
  """The writer saving ``args`` with ``handler``: the built-ins' own, or the handler's save."""
  native = native_writer(handler, args)
  return native if native is not None else HandlerWriter(handler, args, owned)


def construct_handler(hcls: type, what: str) -> Any:
  """``hcls()``, or a clear error when the handler needs constructor arguments."""
  try:
    return hcls()
  except TypeError as e:
    raise TypeError(
        f"{what}: flax_ckpt has to construct {handlers.handler_name(hcls)} without "
        f"arguments, which failed ({e}). Give the class defaults for its constructor "
        "arguments, or use flax_ckpt.Checkpointer(handler_instance) for this object.") from e


def default_restore_args(hcls: type) -> Any:
  """The handler's registered restore args built with their defaults, or None."""
  args_cls = handlers.registered_args_cls(hcls, for_save=False)
  if args_cls is None:
    return None
  try:
    return args_cls()
  except TypeError:  # required fields: the handler gets None and uses its own defaults
    return None


def _close(handler: Any) -> None:
  close = getattr(handler, "close", None)
  if callable(close):
    close()


class HandlerKind:
  """The ``handler`` part kind (tried first when saving: args and registered types)."""

  name = KIND_HANDLER
  restore_last = False

  def writer_for(self, name: str, value: Any) -> PartWriter | None:
    what = f"checkpointable {name!r}"
    if isinstance(value, CheckpointArgs):
      hcls = handlers.save_handler_for(value)
      if hcls is None:
        raise handlers.RegistrationError(
            f"{what}: {type(value).__qualname__} is not registered for saving with any "
            "CheckpointHandler; decorate it with "
            "@flax_ckpt.args.register_with_handler(MyHandler, for_save=True). Nothing was "
            "written.")
      return writer_for_handler(construct_handler(hcls, what), value, owned=True)
    hcls = handlers.type_handler_for(value)
    if hcls is None:
      return None
    args_cls = handlers.registered_args_cls(hcls, for_save=True)
    if args_cls is None:
      raise handlers.RegistrationError(
          f"{what}: {type(value).__qualname__} is saved by {hcls.__qualname__}, which has no "
          f"save args class; register one with @flax_ckpt.args.register_with_handler("
          f"{hcls.__qualname__}, for_save=True). Nothing was written.")
    return writer_for_handler(construct_handler(hcls, what), args_cls(value), owned=True)

  def restore(self, directory: epath.Path, entry: PartEntry, request: RestoreRequest) -> Any:
    handler, args = self._restorer(entry, request)
    try:
      return call_with_args(handler.restore, directory, args)
    finally:
      _close(handler)

  def _restorer(self, entry: PartEntry, request: RestoreRequest) -> tuple[Any, Any]:
    """The handler instance and restore args for the part."""
    name, abstract = request.name, request.abstract
    saved_by = entry.fields.get("handler", "?")
    what = f"part {name!r}"
    if abstract is not None and not isinstance(abstract, CheckpointArgs):
      hcls = handlers.type_handler_for(abstract)
      if hcls is not None and handlers.handler_name(hcls) == saved_by:
        abstract = None  # an object of the registered type: restore with the defaults
    if abstract is None:
      hcls = handlers.handler_by_name(saved_by)
      if hcls is None:
        raise errors.CheckpointError(
            f"part {name!r} of {request.where} was saved by the CheckpointHandler "
            f"{saved_by}, which is not known in this process (handlers are never imported "
            "by name). Import the module that defines it and registers its args "
            f"(register_with_handler), or pass restore args for {name!r}.")
      return construct_handler(hcls, what), default_restore_args(hcls)
    if not isinstance(abstract, CheckpointArgs):
      raise TypeError(
          f"part {name!r} was saved by the CheckpointHandler {saved_by}; pass its restore "
          f"args (a CheckpointArgs registered for_restore) or None, not a "
          f"{type(abstract).__qualname__}")
    hcls = handlers.restore_handler_for(abstract)
    if hcls is None:
      raise handlers.RegistrationError(
          f"part {name!r}: {type(abstract).__qualname__} is not registered with any "
          "CheckpointHandler; decorate it with @flax_ckpt.args.register_with_handler("
          "MyHandler, for_restore=True).")
    known = handlers.handler_by_name(saved_by)
    if known is not None and not handlers.related(known, hcls):
      raise TypeError(
          f"part {name!r} was saved by {saved_by}, but {type(abstract).__qualname__} is "
          f"registered with {handlers.handler_name(hcls)}")
    return construct_handler(hcls, what), abstract

  def metadata(self, directory: epath.Path, entry: PartEntry) -> Any:
    hcls = handlers.handler_by_name(entry.fields.get("handler", ""))
    if hcls is None:
      return None
    try:
      handler = hcls()
    except TypeError:  # needs constructor arguments: no metadata without an instance
      return None
    try:
      fn = getattr(handler, "metadata", None)
      return fn(directory) if callable(fn) else None
    except (NotImplementedError, FileNotFoundError, ValueError, TypeError, KeyError, OSError):
      return None  # one handler's metadata must not hide the list of parts
    finally:
      _close(handler)

  def saved_by(self, entry: PartEntry, handler: Any) -> str | None:
    saved_by = entry.fields.get("handler", "?")
    known = handlers.handler_by_name(saved_by)
    if known is None or handlers.related(known, type(handler)):
      return None
    return saved_by
