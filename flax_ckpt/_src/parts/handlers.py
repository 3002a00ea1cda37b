"""The whole-object extension point: CheckpointHandler, CheckpointArgs and their registry.

A :class:`CheckpointHandler` saves one object into a directory it is given and restores it
from there. It never deals with atomicity: the caller (``Checkpointer``,
``save_checkpointables``) hands it a directory inside the temporary checkpoint and commits
only after the handler finished.

A :class:`CheckpointArgs` subclass (usually a dataclass) carries what one handler needs to
save or restore an object. :func:`register_with_handler` binds it to that handler, so a
checkpointable given as ``MySave(item)`` finds its handler, and a ``Checkpointer`` can check
that it was handed arguments its handler understands. This is the Orbax-compatible layer;
the part kind that drives these handlers is ``parts/custom.py``.

Handlers are found by class in this process only: a checkpoint records its handler's
qualified name, and loading looks that name up among the handler classes registered here
(nothing is ever imported by a name read from a file).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import threading
from typing import Any, Protocol, TypeVar, runtime_checkable

from etils import epath

from flax_ckpt._src import errors


@dataclasses.dataclass
class CheckpointArgs:
  """Base class of the argument objects passed to a CheckpointHandler's save/restore.

  Subclass it (usually as a ``@dataclasses.dataclass``) and bind the subclass to a handler
  with :func:`register_with_handler`.

  Example (a full handler with its args: :class:`CheckpointHandler`):
    >>> import flax_ckpt
    >>> save_args = flax_ckpt.args.PyTreeSave({'step': 3})
    >>> flax_ckpt.args.get_registered_handler_cls(save_args) is flax_ckpt.PyTreeCheckpointHandler
    True
  """


class RegistrationError(errors.CheckpointError, ValueError):
  """A registration conflicts with an earlier one, or a needed registration is missing."""


# What a handler's save / restore take: CheckpointHandler[MySave, MyRestore] (a plain
# ``CheckpointHandler`` subclass takes any CheckpointArgs).
_SaveArgsT = TypeVar("_SaveArgsT", bound="CheckpointArgs", contravariant=True)
_RestoreArgsT = TypeVar("_RestoreArgsT", bound="CheckpointArgs", contravariant=True)


@runtime_checkable
class CheckpointHandler(Protocol[_SaveArgsT, _RestoreArgsT]):
  """Saves and restores one object in a directory, driven by :class:`CheckpointArgs`.

  Subclass it (or write a class with the same methods) and bind your args classes to it
  with :func:`flax_ckpt.args.register_with_handler`. ``save`` is called with an existing,
  empty directory inside the temporary checkpoint; in a multi-process job only process 0
  calls it (read ``jax.process_index()`` yourself if every process must write; set the
  class attribute ``save_on_all_processes = True`` to be called on every process).
  ``restore`` is called on every process.

  Example:
    >>> import dataclasses, flax_ckpt, tempfile, os
    >>> class TextHandler(flax_ckpt.CheckpointHandler):
    ...   def save(self, directory, args):
    ...     (directory / 'text.txt').write_text(args.text)
    ...   def restore(self, directory, args=None):
    ...     return (directory / 'text.txt').read_text()
    >>> @flax_ckpt.args.register_with_handler(TextHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class TextSave(flax_ckpt.args.CheckpointArgs):
    ...   text: str
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.Checkpointer(TextHandler()).save(path, TextSave('hello'))
    >>> flax_ckpt.Checkpointer(TextHandler()).restore(path)
    'hello'
  """

  @abc.abstractmethod
  def save(self, directory: epath.Path, args: _SaveArgsT) -> None:
    """Writes the object described by ``args`` into ``directory`` (which exists)."""

  @abc.abstractmethod
  def restore(self, directory: epath.Path, args: _RestoreArgsT | None = None) -> Any:
    """Reads the object back from ``directory``."""

  def metadata(self, directory: epath.Path) -> Any:
    """Describes the saved object cheaply (default: None)."""
    return None

  def close(self) -> None:
    """Releases resources (thread pools, files); default: nothing to release."""


@runtime_checkable
class AsyncCheckpointHandler(CheckpointHandler[_SaveArgsT, _RestoreArgsT],
                             Protocol[_SaveArgsT, _RestoreArgsT]):
  """A handler whose save continues in the background.

  ``async_save`` (a coroutine function or a plain function) copies whatever the caller may
  change afterwards, starts the rest of the work and returns a list of futures
  (``concurrent.futures.Future``, asyncio futures or awaitables). The caller waits for those
  futures in a background thread before committing; ``save`` must still save synchronously.

  Example:
    >>> import asyncio, concurrent.futures, dataclasses, flax_ckpt
    >>> class SlowText(flax_ckpt.AsyncCheckpointHandler):
    ...   def __init__(self):
    ...     self._pool = concurrent.futures.ThreadPoolExecutor(1)
    ...   def _write(self, directory, text):
    ...     (directory / 'text.txt').write_text(text)
    ...   async def async_save(self, directory, args):
    ...     return [self._pool.submit(self._write, directory, args.text)]
    ...   def save(self, directory, args):
    ...     self._write(directory, args.text)
    ...   def restore(self, directory, args=None):
    ...     return (directory / 'text.txt').read_text()
    ...   def close(self):
    ...     self._pool.shutdown()
  """

  @abc.abstractmethod
  def async_save(self, directory: epath.Path, args: _SaveArgsT) -> Any:
    """Starts saving; returns a list of futures the caller waits for before committing."""


_A = TypeVar("_A", bound=type)


def handler_name(handler_cls: type) -> str:
  """The name a checkpoint records for a handler class: ``module.QualName``."""
  return f"{handler_cls.__module__}.{handler_cls.__qualname__}"


def related(a: type, b: type) -> bool:
  """Whether two handler classes are the same handler or one derives from the other."""
  return issubclass(a, b) or issubclass(b, a) or handler_name(a) == handler_name(b)


class HandlerRegistry:
  """Which handler saves which args class or object type, and handlers by recorded name.

  One default instance (:func:`handler_registry`) serves the process; the module-level
  functions below are its public face.
  """

  def __init__(self) -> None:
    self._lock = threading.RLock()
    # args class -> handler classes it is registered with (in registration order)
    self._save: dict[type, list[type]] = {}
    self._restore: dict[type, list[type]] = {}
    # qualified handler name -> handler class, for handlers known to this process
    self._by_name: dict[str, type] = {}
    # object type -> handler class (objects of that type are saved by that handler)
    self._by_type: dict[type, type] = {}

  def _remember(self, handler_cls: type) -> None:
    # the newest class under a name is what a checkpoint's recorded name resolves to (a
    # re-run notebook cell defines the class again)
    self._by_name[handler_name(handler_cls)] = handler_cls

  def bind_args(self, args_cls: type, handler_cls: type, *, for_save: bool,
                for_restore: bool) -> None:
    """``register_with_handler``'s table update (see its docstring for the rules)."""
    with self._lock:
      for flag, table, what in ((for_save, self._save, "saving"),
                                (for_restore, self._restore, "restoring")):
        if not flag:
          continue
        clash = [h for h in table.get(args_cls, []) if not related(h, handler_cls)]
        if clash:
          raise RegistrationError(
              f"{args_cls.__qualname__} is already registered for {what} with "
              f"{handler_name(clash[0])}; an args class selects one handler. Define a "
              f"separate args class for {handler_name(handler_cls)} (registering it with a "
              "subclass of the first handler is allowed).")
      self._remember(handler_cls)
      for flag, table in ((for_save, self._save), (for_restore, self._restore)):
        if flag:
          hs = [h for h in table.get(args_cls, []) if h is not handler_cls]
          table[args_cls] = [*hs, handler_cls]

  def bind_type(self, obj_type: type, handler_cls: type, *, override: bool) -> None:
    """``register_checkpointable_handler``'s table update."""
    with self._lock:
      current = self._by_type.get(obj_type)
      if (current is not None and handler_name(current) != handler_name(handler_cls)
          and not override):
        raise RegistrationError(
            f"{obj_type.__qualname__} already has a checkpointable handler "
            f"({handler_name(current)}); pass override=True to replace it.")
      self._remember(handler_cls)
      self._by_type[obj_type] = handler_cls

  def handlers_of(self, args_cls: type, *, for_save: bool) -> list[type]:
    with self._lock:
      return list((self._save if for_save else self._restore).get(args_cls, []))

  def args_items(self, *, for_save: bool) -> list[tuple[type, list[type]]]:
    with self._lock:
      return list((self._save if for_save else self._restore).items())

  def by_name(self, name: str) -> type | None:
    with self._lock:
      return self._by_name.get(name)

  def for_type(self, obj: Any) -> type | None:
    with self._lock:
      if not self._by_type:
        return None
      for c in type(obj).__mro__:
        h = self._by_type.get(c)
        if h is not None:
          return h
    return None


_DEFAULT = HandlerRegistry()


def handler_registry() -> HandlerRegistry:
  """The process-wide :class:`HandlerRegistry`."""
  return _DEFAULT


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

  Example (the handler side: :class:`CheckpointHandler`):
    >>> import dataclasses, flax_ckpt
    >>> class NoteHandler(flax_ckpt.CheckpointHandler):
    ...   pass  # save() and restore() as in CheckpointHandler's example
    >>> @flax_ckpt.args.register_with_handler(NoteHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class NoteSave(flax_ckpt.args.CheckpointArgs):
    ...   text: str
    >>> flax_ckpt.args.get_registered_handler_cls(NoteSave) is NoteHandler
    True
  """
  if not for_save and not for_restore:
    raise ValueError("register_with_handler: pass for_save=True and/or for_restore=True")
  if not inspect.isclass(handler_cls):
    raise TypeError(f"register_with_handler expects a handler class, got {handler_cls!r}")

  def decorator(cls: _A) -> _A:
    registered = cls  # returned as given (the check below narrows ``cls``)
    if not (inspect.isclass(cls) and issubclass(cls, CheckpointArgs)):
      raise TypeError(f"{cls!r} must subclass flax_ckpt.args.CheckpointArgs to be registered "
                      "with a handler")
    _DEFAULT.bind_args(cls, handler_cls, for_save=for_save, for_restore=for_restore)
    return registered

  return decorator


def get_registered_handler_cls(args: Any) -> type:
  """The handler class an args object (or class) is registered with (newest first)."""
  cls = args if inspect.isclass(args) else type(args)
  if not issubclass(cls, CheckpointArgs):
    raise TypeError(f"{cls!r} is not a flax_ckpt.args.CheckpointArgs subclass")
  hs = (_DEFAULT.handlers_of(cls, for_save=True)
        or _DEFAULT.handlers_of(cls, for_save=False))
  if not hs:
    raise RegistrationError(
        f"{cls.__qualname__} is not registered with any CheckpointHandler; decorate it with "
        "@flax_ckpt.args.register_with_handler(MyHandler, for_save=True) (or for_restore).")
  return hs[-1]


def save_handler_for(args: Any) -> type | None:
  hs = _DEFAULT.handlers_of(type(args), for_save=True)
  return hs[-1] if hs else None


def restore_handler_for(args: Any) -> type | None:
  hs = (_DEFAULT.handlers_of(type(args), for_save=False)
        or _DEFAULT.handlers_of(type(args), for_save=True))
  return hs[-1] if hs else None


def is_registered_for(args: Any, handler: Any, *, for_save: bool) -> bool:
  """Whether ``args`` is registered with the handler's class or one of its bases."""
  hs = _DEFAULT.handlers_of(type(args), for_save=for_save)
  mro = type(handler).__mro__
  names = {handler_name(c) for c in mro}
  return any(h in mro or handler_name(h) in names for h in hs)


def registered_args_cls(handler: Any, *, for_save: bool) -> type | None:
  """The newest args class registered for the handler's class (or a base), or None."""
  mro = type(handler).__mro__ if not inspect.isclass(handler) else handler.__mro__
  found = None
  for args_cls, hs in _DEFAULT.args_items(for_save=for_save):
    if any(h in mro for h in hs):
      found = args_cls
  return found


def handler_by_name(name: str) -> type | None:
  """A handler class known to this process under ``name`` (never imported)."""
  return _DEFAULT.by_name(name)


def type_handler_for(obj: Any) -> type | None:
  """The handler class registered for ``type(obj)`` or its closest registered base."""
  return _DEFAULT.for_type(obj)


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
  _DEFAULT.bind_type(obj_type, handler_cls, override=override)


def call_with_args(method: Any, directory: epath.Path, args: Any) -> Any:
  """Calls a handler's ``save``/``restore``/``async_save`` the way it was written for.

  Handlers written for Orbax take ``(directory, item=None, args=None)`` or a keyword-only
  ``args``; they get ``args=`` by name. Others get it as the second positional argument.
  """
  try:
    params = inspect.signature(method).parameters
  except (TypeError, ValueError):
    return method(directory, args)
  p = params.get("args")
  if p is not None:
    positional = [q for q in params.values()
                  if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 and positional[1].name == "args":
      return method(directory, args)
    return method(directory, args=args)
  return method(directory, args)
