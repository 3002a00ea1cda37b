"""Argument classes that select a CheckpointHandler, and the registries behind them.

A :class:`CheckpointArgs` subclass (usually a dataclass) carries what one handler needs to
save or restore an object. :func:`register_with_handler` binds it to that handler, so a
checkpointable given as ``MySave(item)`` finds its handler, and a ``Checkpointer`` can check
that it was handed arguments its handler understands.

Handlers are found by class in this process only: a checkpoint records its handler's
qualified name, and loading looks that name up among the handler classes registered here
(nothing is ever imported by a name read from a file).
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from typing import Any, TypeVar

from flax_ckpt._src import errors


@dataclasses.dataclass
class CheckpointArgs:
  """Base class of the argument objects passed to a CheckpointHandler's save/restore.

  Subclass it (usually as a ``@dataclasses.dataclass``) and bind the subclass to a handler
  with :func:`register_with_handler`.

  Example:
    >>> import dataclasses, flax_ckpt
    >>> class NoteHandler(flax_ckpt.CheckpointHandler):
    ...   def save(self, directory, args):
    ...     (directory / 'note.txt').write_text(args.text)
    ...   def restore(self, directory, args=None):
    ...     return (directory / 'note.txt').read_text()
    >>> @flax_ckpt.args.register_with_handler(NoteHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class NoteSave(flax_ckpt.args.CheckpointArgs):
    ...   text: str
    >>> flax_ckpt.args.get_registered_handler_cls(NoteSave) is NoteHandler
    True
  """


class RegistrationError(errors.CheckpointError, ValueError):
  """A registration conflicts with an earlier one, or a needed registration is missing."""


_lock = threading.RLock()
# args class -> handler classes it is registered with (in registration order)
_SAVE: dict[type, list[type]] = {}
_RESTORE: dict[type, list[type]] = {}
# qualified handler name -> handler class, for handlers known to this process
_HANDLERS_BY_NAME: dict[str, type] = {}
# object type -> handler class (objects of that type are saved by that handler)
_TYPE_HANDLERS: dict[type, type] = {}

_A = TypeVar("_A", bound=type)


def handler_name(handler_cls: type) -> str:
  """The name a checkpoint records for a handler class: ``module.QualName``."""
  return f"{handler_cls.__module__}.{handler_cls.__qualname__}"


def _remember_handler(handler_cls: type) -> None:
  # the newest class under a name is what a checkpoint's recorded name resolves to (a
  # re-run notebook cell defines the class again)
  _HANDLERS_BY_NAME[handler_name(handler_cls)] = handler_cls


def related(a: type, b: type) -> bool:
  """Whether two handler classes are the same handler or one derives from the other."""
  return issubclass(a, b) or issubclass(b, a) or handler_name(a) == handler_name(b)


def register_with_handler(handler_cls: type, for_save: bool = False,
                          for_restore: bool = False):
  """Class decorator binding a :class:`CheckpointArgs` subclass to a handler class.

  An args class selects one handler: registering it with a second, unrelated handler is an
  error (define another args class). Registering it again with a subclass of its handler
  (for example an async variant) is allowed, and the newest registration is the one a
  checkpointable given as this args object is saved with. Registering the same pair twice
  is a no-op.

  Args:
    handler_cls: the :class:`CheckpointHandler` class.
    for_save: the args class is what ``handler.save`` receives.
    for_restore: the args class is what ``handler.restore`` receives.

  Returns:
    A decorator returning the class unchanged.

  Raises:
    ValueError: neither ``for_save`` nor ``for_restore``.
    TypeError: the decorated class does not subclass :class:`CheckpointArgs`.
    RegistrationError: the args class is already bound to an unrelated handler.

  Example:
    >>> import dataclasses, flax_ckpt
    >>> class TextHandler(flax_ckpt.CheckpointHandler):
    ...   def save(self, directory, args):
    ...     (directory / 'text.txt').write_text(args.text)
    ...   def restore(self, directory, args=None):
    ...     return (directory / 'text.txt').read_text()
    >>> @flax_ckpt.args.register_with_handler(TextHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class TextSave(flax_ckpt.args.CheckpointArgs):
    ...   text: str
  """
  if not for_save and not for_restore:
    raise ValueError("register_with_handler: pass for_save=True and/or for_restore=True")
  if not inspect.isclass(handler_cls):
    raise TypeError(f"register_with_handler expects a handler class, got {handler_cls!r}")

  def decorator(cls: _A) -> _A:
    if not (inspect.isclass(cls) and issubclass(cls, CheckpointArgs)):
      raise TypeError(f"{cls!r} must subclass flax_ckpt.args.CheckpointArgs to be registered "
                      "with a handler")
    with _lock:
      for flag, table, what in ((for_save, _SAVE, "saving"), (for_restore, _RESTORE,
                                                                "restoring")):
        if not flag:
          continue
        current = table.get(cls, [])
        clash = [h for h in current if not related(h, handler_cls)]
        if clash:
          raise RegistrationError(
              f"{cls.__qualname__} is already registered for {what} with "
              f"{handler_name(clash[0])}; an args class selects one handler. Define a "
              f"separate args class for {handler_name(handler_cls)} (registering it with a "
              "subclass of the first handler is allowed).")
      _remember_handler(handler_cls)
      for flag, table in ((for_save, _SAVE), (for_restore, _RESTORE)):
        if flag:
          hs = [h for h in table.get(cls, []) if h is not handler_cls]
          table[cls] = [*hs, handler_cls]
    return cls

  return decorator


def get_registered_handler_cls(args: Any) -> type:
  """The handler class an args object (or class) is registered with (newest first)."""
  cls = args if inspect.isclass(args) else type(args)
  if not issubclass(cls, CheckpointArgs):
    raise TypeError(f"{cls!r} is not a flax_ckpt.args.CheckpointArgs subclass")
  with _lock:
    hs = _SAVE.get(cls) or _RESTORE.get(cls)
  if not hs:
    raise RegistrationError(
        f"{cls.__qualname__} is not registered with any CheckpointHandler; decorate it with "
        "@flax_ckpt.args.register_with_handler(MyHandler, for_save=True) (or for_restore).")
  return hs[-1]


def save_handler_for(args: Any) -> type | None:
  with _lock:
    hs = _SAVE.get(type(args))
  return hs[-1] if hs else None


def restore_handler_for(args: Any) -> type | None:
  with _lock:
    hs = _RESTORE.get(type(args)) or _SAVE.get(type(args))
  return hs[-1] if hs else None


def is_registered_for(args: Any, handler: Any, *, for_save: bool) -> bool:
  """Whether ``args`` is registered with the handler's class or one of its bases."""
  table = _SAVE if for_save else _RESTORE
  with _lock:
    hs = table.get(type(args), [])
  mro = type(handler).__mro__
  names = {handler_name(c) for c in mro}
  return any(h in mro or handler_name(h) in names for h in hs)


def registered_args_cls(handler: Any, *, for_save: bool) -> type | None:
  """The newest args class registered for the handler's class (or a base), or None."""
  table = _SAVE if for_save else _RESTORE
  mro = type(handler).__mro__ if not inspect.isclass(handler) else handler.__mro__
  with _lock:
    found = None
    for args_cls, hs in table.items():
      if any(h in mro for h in hs):
        found = args_cls
  return found


def handler_by_name(name: str) -> type | None:
  """A handler class known to this process under ``name`` (never imported)."""
  with _lock:
    return _HANDLERS_BY_NAME.get(name)


def register_checkpointable_handler(obj_type: type, handler_cls: type, *,
                                    override: bool = False) -> None:
  """Saves objects of ``obj_type`` given as checkpointables with ``handler_cls``.

  ``save_checkpointables(path, {'x': obj})`` then calls ``handler_cls().save(directory,
  SaveArgs(obj))``, where ``SaveArgs`` is the args class registered for saving with
  ``handler_cls`` (see :func:`register_with_handler`); its first field receives the object.
  Loading calls ``restore`` with the restore args given for that part, or the registered
  restore args class built with its defaults.

  Args:
    obj_type: the class of the objects (subclasses match too; the closest class wins).
    handler_cls: a :class:`CheckpointHandler` class constructible without arguments.
    override: replace an existing registration for ``obj_type`` instead of raising.

  Raises:
    RegistrationError: ``obj_type`` already has another handler and ``override`` is False.

  Example:
    >>> import dataclasses, json, flax_ckpt
    >>> class Config:
    ...   def __init__(self, d): self.d = d
    >>> class ConfigHandler(flax_ckpt.CheckpointHandler):
    ...   def save(self, directory, args):
    ...     (directory / 'config.json').write_text(json.dumps(args.item.d))
    ...   def restore(self, directory, args=None):
    ...     return Config(json.loads((directory / 'config.json').read_text()))
    >>> @flax_ckpt.args.register_with_handler(ConfigHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class ConfigSave(flax_ckpt.args.CheckpointArgs):
    ...   item: Config
    >>> flax_ckpt.register_checkpointable_handler(Config, ConfigHandler)
  """
  if not inspect.isclass(obj_type) or not inspect.isclass(handler_cls):
    raise TypeError("register_checkpointable_handler(obj_type, handler_cls) takes two classes")
  with _lock:
    current = _TYPE_HANDLERS.get(obj_type)
    if (current is not None and handler_name(current) != handler_name(handler_cls)
        and not override):
      raise RegistrationError(
          f"{obj_type.__qualname__} already has a checkpointable handler "
          f"({handler_name(current)}); pass override=True to replace it.")
    _remember_handler(handler_cls)
    _TYPE_HANDLERS[obj_type] = handler_cls


def type_handler_for(obj: Any) -> type | None:
  """The handler class registered for ``type(obj)`` or its closest registered base."""
  with _lock:
    if not _TYPE_HANDLERS:
      return None
    for c in type(obj).__mro__:
      h = _TYPE_HANDLERS.get(c)
      if h is not None:
        return h
  return None
