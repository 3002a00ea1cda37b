"""Which TypeHandler saves and loads which leaf: :class:`TypeHandlerRegistry` and its one
process-wide default, behind ``register_type_handler`` / ``get_type_handler`` /
``has_type_handler``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from flax_ckpt._src.leaves.type_handlers import TypeHandler


class BuiltinHandler:
  """Base of the built-in handlers (and of user subclasses of them).

  A built-in handler writes the leaves every process holds itself (into its data file);
  other handlers run on process 0 only, and their errors are annotated with leaf paths.
  """

  def typestr(self) -> str:
    raise NotImplementedError

  def __repr__(self):
    return f"{type(self).__name__}({self.typestr()!r})"


class TypeHandlerRegistry:
  """Handlers by leaf type (most specific class first), by stored typestr, and by
  predicate (checked before the type, e.g. typed PRNG keys, which are ``jax.Array``)."""

  def __init__(self):
    self._lock = threading.RLock()
    self._by_type: dict[type, TypeHandler] = {}
    self._order: list[type] = []  # registration order, for isinstance lookups (newest first)
    self._by_typestr: dict[str, TypeHandler] = {}
    self._builtin_types: set[type] = set()
    self._special: list[tuple[Callable[[Any], bool], TypeHandler]] = []

  def register(self, ty: type, handler: TypeHandler, override: bool = False, *,
               builtin: bool = False) -> None:
    """See :func:`register_type_handler`; ``builtin``: not a user type."""
    if not isinstance(ty, type):
      raise TypeError(f"register_type_handler expects a type, got {ty!r}")
    for m in ("typestr", "serialize", "deserialize", "metadata"):
      if not callable(getattr(handler, m, None)):
        raise TypeError(f"{handler!r} is not a TypeHandler: it has no {m}() method")
    with self._lock:
      if ty in self._by_type and not override:
        raise ValueError(
            f"a TypeHandler is already registered for {ty.__module__}.{ty.__qualname__} "
            f"({self._by_type[ty]!r}); pass override=True to replace it."
        )
      self._by_type[ty] = handler
      if ty in self._order:
        self._order.remove(ty)
      self._order.append(ty)
      self._by_typestr[handler.typestr()] = handler
      if builtin:
        self._builtin_types.add(ty)

  def register_predicate(self, pred: Callable[[Any], bool], handler: TypeHandler) -> None:
    """Uses ``handler`` for values where ``pred`` holds, before any type lookup."""
    with self._lock:
      self._by_typestr[handler.typestr()] = handler
      self._special.append((pred, handler))

  def _lookup(self, ty: type) -> TypeHandler | None:
    # the most specific registered class in the MRO wins (np.float64 -> np.generic, not
    # float); then virtual bases such as jax.Array, newest registration first
    for t in ty.__mro__:
      h = self._by_type.get(t)
      if h is not None:
        return h
    for t in reversed(self._order):
      if issubclass(ty, t):
        return self._by_type[t]
    return None

  def has(self, ty: type) -> bool:
    with self._lock:
      return self._lookup(ty) is not None

  def get(self, ty: type) -> TypeHandler:
    with self._lock:
      h = self._lookup(ty)
    if h is None:
      raise ValueError(f"no TypeHandler registered for {ty.__module__}.{ty.__qualname__}")
    return h

  def for_value(self, x: Any) -> TypeHandler | None:
    for pred, h in self._special:
      if pred(x):
        return h
    with self._lock:
      return self._lookup(type(x))

  def for_typestr(self, typestr: str) -> TypeHandler | None:
    with self._lock:
      return self._by_typestr.get(typestr)

  def custom_types(self) -> frozenset:
    """Types registered by users (not built in)."""
    with self._lock:
      return frozenset(t for t in self._by_type if t not in self._builtin_types)


_DEFAULT = TypeHandlerRegistry()


def default_registry() -> TypeHandlerRegistry:
  """The process-wide registry that saves and loads use."""
  return _DEFAULT


def register_type_handler(ty: type, handler: TypeHandler, override: bool = False) -> None:
  """Registers ``handler`` for leaves of type ``ty`` (and its subclasses).

  Args:
    ty: the leaf type.
    handler: an object implementing :class:`TypeHandler`.
    override: replace an existing registration for ``ty``; without it a second
      registration is an error.

  Example:
    >>> import flax_ckpt
    >>> class Celsius(float): ...
    >>> class CelsiusHandler(flax_ckpt.ScalarHandler):
    ...   def typestr(self): return 'Celsius'
    >>> flax_ckpt.register_type_handler(Celsius, CelsiusHandler(Celsius), override=True)
  """
  _DEFAULT.register(ty, handler, override)


def has_type_handler(ty: type) -> bool:
  """Whether leaves of type ``ty`` can be saved (a handler is registered for it or a base)."""
  return _DEFAULT.has(ty)


def get_type_handler(ty: type) -> TypeHandler:
  """The handler used for leaves of type ``ty``; raises ValueError if there is none."""
  return _DEFAULT.get(ty)


def handler_for_value(x: Any) -> TypeHandler | None:
  return _DEFAULT.for_value(x)


def handler_for_typestr(typestr: str) -> TypeHandler | None:
  return _DEFAULT.for_typestr(typestr)


def custom_types() -> frozenset:
  """Types registered by users (not built in)."""
  return _DEFAULT.custom_types()


def is_builtin(handler: TypeHandler) -> bool:
  """Whether ``handler`` is a built-in handler (or a subclass of one)."""
  return isinstance(handler, BuiltinHandler)
