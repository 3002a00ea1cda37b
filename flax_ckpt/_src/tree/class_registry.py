"""The class registry: which classes ``load(path)`` without a template rebuilds, by what name.

Classes are rebuilt only when registered with :func:`register_class` (or known to a
resolver, see library_types.py); a name read from a checkpoint is looked up in this
registry and never imported.

One policy for a class defined again under the same name (a re-run notebook cell): a user's
:func:`register_class` refuses it unless ``override=True``; a known library class registered
with ``newest=True`` takes the name over; otherwise the first registration keeps it.

There is one registry, :func:`global_registry` (the Orbax pattern); the module functions
below act on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

# Rebuilds an instance from a node's keys and children.
Builder = Callable[[Sequence[Any], Sequence[Any]], Any]
# Called on a registry miss with the class (when saving) or the saved name (when loading):
# registers the classes it knows and returns whether it did. It never imports a name read
# from a checkpoint.
Resolver = Callable[[type | str], bool]


@dataclasses.dataclass(frozen=True)
class ClassEntry:
  cls: type
  name: str
  build: Builder | None
  from_aux: bool = False  # rebuilt by the class's own unflatten from its saved aux data


def default_class_name(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


class ClassRegistry:
  """Registered classes by class and by stored name, plus the resolvers asked on a miss."""

  def __init__(self) -> None:
    self._by_name: dict[str, ClassEntry] = {}
    self._by_class: dict[type, ClassEntry] = {}
    self._resolvers: list[Resolver] = []
    # Families of classes (e.g. nnx.Variable subclasses) always rebuilt from their aux
    # data, also when a user registers one with register_class.
    self._aux_families: list[Callable[[type], bool]] = []
    self._missed: set[type | str] = set()  # keys no resolver knew, within one save or load

  def add_resolver(self, resolver: Resolver) -> None:
    self._resolvers.append(resolver)

  def add_aux_family(self, is_member: Callable[[type], bool]) -> None:
    self._aux_families.append(is_member)

  def forget_misses(self) -> None:
    """Called when a save or load starts: classes defined since then get a fresh look."""
    self._missed.clear()

  def register(self, cls: type, *, name: str | None = None, build: Builder | None = None,
               override: bool = False) -> type:
    """See :func:`register_class`."""
    if not isinstance(cls, type):
      raise TypeError(f"register_class expects a class, got {cls!r}")
    name = name or default_class_name(cls)
    old = self._by_name.get(name)
    if not override and ((old is not None and old.cls is not cls) or (
        cls in self._by_class and self._by_class[cls].name != name)):
      raise ValueError(
          f"class name {name!r} / class {cls!r} is already registered; pass override=True to "
          "replace the registration."
      )
    if override and cls in self._by_class:
      self._by_name.pop(self._by_class[cls].name, None)
    self._missed.clear()
    from_aux = build is None and any(is_member(cls) for is_member in self._aux_families)
    entry = ClassEntry(cls, name, build, from_aux)
    self._by_name[name] = entry
    self._by_class[cls] = entry
    return cls

  def register_known(self, cls: type, name: str, *, aliases: Sequence[str] = (),
                     from_aux: bool = False, newest: bool = False) -> None:
    """Registers a library class under a stable ``name`` (plus ``aliases`` for reading).

    With ``newest``, a class defined again under the same name (a re-run notebook cell)
    takes the name over; otherwise the first registration keeps it.
    """
    if cls in self._by_class:
      return
    self._missed.clear()
    entry = ClassEntry(cls, name, None, from_aux)
    self._by_class[cls] = entry
    for alias in (name, *aliases):
      if newest:
        self._by_name[alias] = entry
      else:
        self._by_name.setdefault(alias, entry)

  def lookup(self, key: type | str) -> ClassEntry | None:
    """The entry for a class (saving) or a stored name (loading), asking the resolvers once."""
    table: dict[Any, ClassEntry] = self._by_name if isinstance(key, str) else self._by_class
    entry = table.get(key)
    if entry is None and key not in self._missed:
      if any(resolve(key) for resolve in self._resolvers):
        entry = table.get(key)
      else:
        self._missed.add(key)
    return entry

  def stored_name(self, cls: type) -> tuple[str, bool]:
    """The name ``cls`` is saved under, and whether it is registered."""
    entry = self.lookup(cls)
    return (entry.name, True) if entry else (default_class_name(cls), False)

  def is_registered(self, cls: type) -> bool:
    return cls in self._by_class

  def knows_name(self, name: str) -> bool:
    return name in self._by_name

  def has_dataclasses(self) -> bool:
    return any(dataclasses.is_dataclass(cls) for cls in self._by_class)


_GLOBAL = ClassRegistry()


def global_registry() -> ClassRegistry:
  """The process-wide registry that saves and loads use."""
  return _GLOBAL


def register_class(
    cls: type,
    *,
    name: str | None = None,
    build: Builder | None = None,
    override: bool = False,
) -> type:
  """Lets ``load(path)`` without a template rebuild instances of ``cls``.

  NamedTuples and dataclasses are rebuilt from their fields; for other PyTree node types
  pass ``build(keys, children) -> instance``. Nothing is ever imported by a name read from a
  checkpoint: only classes registered in this process are rebuilt. Usable as a decorator.

  Args:
    cls: the class (a NamedTuple, a dataclass, or a registered JAX PyTree node type).
    name: stable name stored in checkpoints; defaults to ``module.QualName``.
    build: optional constructor from the node's keys and children.
    override: replace an existing registration for the same class or name.

  Returns:
    ``cls``, so it can be used as ``@register_class``.

  Example:
    >>> import typing, flax_ckpt
    >>> class Point(typing.NamedTuple):
    ...   x: float
    ...   y: float
    >>> _ = flax_ckpt.register_class(Point)
  """
  return _GLOBAL.register(cls, name=name, build=build, override=override)


def register_known(cls: type, name: str, *, aliases: Sequence[str] = (),
                   from_aux: bool = False, newest: bool = False) -> None:
  """:meth:`ClassRegistry.register_known` on the global registry."""
  _GLOBAL.register_known(cls, name, aliases=aliases, from_aux=from_aux, newest=newest)


def is_registered_class(cls: type) -> bool:
  return _GLOBAL.is_registered(cls)


def forget_misses() -> None:
  """Called when a save or load starts: classes defined since then get a fresh look."""
  _GLOBAL.forget_misses()
