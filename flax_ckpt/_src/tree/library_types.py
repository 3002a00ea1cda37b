"""Optax and Flax classes that load back as themselves without any registration.

* Every NamedTuple defined in optax's modules (optimizer states, ``EmptyState``,
  ``MaskedNode``, ...) is found by walking ``optax`` (public namespace first, then every
  loaded ``optax.*`` module), so a new optax release is covered without a list to
  maintain. A class with a public name is stored under it (``optax.ScaleByAdamState``,
  ``optax.contrib.ScheduleFreeState``), which survives optax moving classes between
  private modules; others under ``module.QualName``, which is also accepted for all.
* ``collections.OrderedDict`` (used by ``optax.named_chain``) keeps its type.
* ``flax.core.FrozenDict``, ``flax.nnx.State`` and every ``flax.nnx.Variable`` subclass
  defined in the running process (``Param``, ``BatchStat``, ``RngKey``, ..., and users'
  own) are rebuilt by their own unflatten from the saved aux data (Variable metadata such as
  sharding names; entries that are not JSON are left out with a warning).
* ``flax.training.train_state.TrainState`` is known, so loading it without a template
  names the fields that cannot come back (``apply_fn``, ``tx``).

Resolution happens on first use: when a save meets one of these classes, or a load meets a
name starting with ``optax.`` or ``flax.``. Only optax and flax themselves (dependencies of
flax_ckpt) are ever imported here; a name read from a checkpoint is only compared with the
names of classes found this way.
"""

from __future__ import annotations

import collections
import inspect
import sys
import threading
from types import ModuleType

from flax_ckpt._src.tree import class_registry
from flax_ckpt._src.tree.class_registry import default_class_name, register_known

_lock = threading.RLock()
_optax_done = False
_flax_done = False


def _is_namedtuple_cls(obj: object) -> bool:
  return inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def _optax_public_classes() -> dict[type, list[str]]:
  """Every NamedTuple class reachable from optax's public namespace -> its public names."""
  import optax

  try:
    import optax.contrib  # noqa: F401 - a public submodule that is imported lazily
  except ImportError:  # pragma: no cover - optax without contrib
    pass
  found: dict[type, list[str]] = {}
  seen_mods = set()

  def walk(mod, prefix: str, depth: int) -> None:
    if id(mod) in seen_mods or depth > 3:
      return
    seen_mods.add(id(mod))
    for attr in sorted(dir(mod)):
      if attr.startswith("_"):
        continue
      try:
        obj = getattr(mod, attr)
      except Exception:  # noqa: BLE001,S112 - a lazy attribute that fails: skip it
        continue
      if _is_namedtuple_cls(obj) and obj.__module__.startswith("optax"):
        found.setdefault(obj, []).append(f"{prefix}.{attr}")
      elif inspect.ismodule(obj) and obj.__name__ == f"{prefix}.{attr}":
        walk(obj, obj.__name__, depth + 1)

  walk(optax, "optax", 0)
  # States that only live in private modules (returned by public factories all the same)
  for modname, mod in list(sys.modules.items()):
    if mod is None or not (modname == "optax" or modname.startswith("optax.")):
      continue
    for obj in list(vars(mod).values()):
      if _is_namedtuple_cls(obj) and obj.__module__ == modname and obj not in found:
        found[obj] = []
  return found


def _stable_name(cls: type, names: list[str]) -> str:
  """The public name to store: the shortest one spelled like the class itself."""
  if not names:
    return default_class_name(cls)
  same = [n for n in names if n.rsplit(".", 1)[1] == cls.__name__]
  return min(same or names, key=lambda n: (n.count("."), n))


def _register_optax() -> None:
  global _optax_done
  with _lock:
    if _optax_done:
      return
    _optax_done = True
    for cls, names in _optax_public_classes().items():
      stable = _stable_name(cls, names)
      register_known(cls, stable, aliases=[*names, default_class_name(cls)])


def _register_flax() -> None:
  global _flax_done
  with _lock:
    if _flax_done:
      return
    _flax_done = True
    from flax.core import frozen_dict
    from flax.training import train_state

    register_known(frozen_dict.FrozenDict, "flax.core.FrozenDict",
                   aliases=[default_class_name(frozen_dict.FrozenDict)], from_aux=True)
    register_known(train_state.TrainState, "flax.training.train_state.TrainState")
    flax_nnx = nnx(import_it=True)
    if flax_nnx is not None:
      register_known(flax_nnx.State, "flax.nnx.State",
                     aliases=[default_class_name(flax_nnx.State)], from_aux=True)


def nnx(*, import_it: bool = False) -> ModuleType | None:
  """The ``flax.nnx`` module; None if flax has none, or (unless ``import_it``) if it is not
  imported yet.

  No value can be an nnx object before flax.nnx is imported, so nothing needs to import it
  to recognise one; importing it (with flax) takes seconds, which saving or loading a tree
  without nnx must not pay.
  """
  if not import_it and "flax.nnx" not in sys.modules:
    return None
  try:
    from flax import nnx as flax_nnx
  except ImportError:  # pragma: no cover - flax without nnx
    return None
  return flax_nnx


def _variable_classes() -> list[type]:
  flax_nnx = nnx()
  if flax_nnx is None:
    return []
  found, todo = [], collections.deque([flax_nnx.Variable])
  while todo:  # breadth first, siblings in definition order
    cls = todo.popleft()
    found.append(cls)
    todo.extend(cls.__subclasses__())
  return found


def _register_variable(cls: type) -> None:
  register_known(cls, default_class_name(cls), from_aux=True, newest=True)


def _is_variable_class(cls: type) -> bool:
  flax_nnx = nnx()
  return flax_nnx is not None and inspect.isclass(cls) and issubclass(cls, flax_nnx.Variable)


def resolve_class(cls: type) -> bool:
  """Registers ``cls`` if it is one of the known library classes; True if it now is."""
  module = getattr(cls, "__module__", "") or ""
  if module.startswith("optax"):
    _register_optax()
  elif module.startswith("flax"):
    _register_flax()
  if _is_variable_class(cls):
    with _lock:
      _register_variable(cls)
  return class_registry.is_registered_class(cls)


def resolve_name(name: str) -> bool:
  """Registers the known library class saved under ``name``; True if one was found."""
  if name.startswith("optax."):
    _register_optax()
  elif name.startswith("flax."):
    _register_flax()
  # (flax.nnx is imported by now if the name starts with "flax.": _register_flax did it)
  with _lock:
    same = [cls for cls in _variable_classes() if default_class_name(cls) == name]
    if same:
      _register_variable(same[-1])  # a class defined again: the newest definition
  return class_registry.global_registry().knows_name(name)


def resolve(key: type | str) -> bool:
  """The class registry's resolver: a class met when saving, or a name met when loading."""
  return resolve_name(key) if isinstance(key, str) else resolve_class(key)


def register_resolvers() -> None:
  """Lets the class registry find Optax/Flax classes (called once, by registration.py)."""
  register_known(collections.OrderedDict, "collections.OrderedDict", from_aux=True)
  registry = class_registry.global_registry()
  registry.add_resolver(resolve)
  registry.add_aux_family(_is_variable_class)
