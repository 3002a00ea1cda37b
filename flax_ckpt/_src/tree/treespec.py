"""Recording and rebuilding the exact structure of a PyTree, and the class registry.

The structure is stored as a JSON tree of nodes (see docs/format.md). Classes are rebuilt
only when registered with :func:`register_class`; a name read from a checkpoint is looked
up in that registry and never imported.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import jsontags

# A path element on disk: [kind, key] with kind "d" (dict key), "a" (attribute),
# "i" (sequence index) or "f" (flattened index of a custom node).
PathElem = tuple[str, Any]
Path = tuple[PathElem, ...]


class UnregisteredClassWarning(UserWarning):
  """A class in the checkpoint is not registered; it was rebuilt as dict or tuple."""


@dataclasses.dataclass(frozen=True)
class _ClassEntry:
  cls: type
  name: str
  build: Callable[[Sequence[Any], Sequence[Any]], Any] | None
  from_aux: bool = False  # rebuilt by the class's own unflatten from its saved aux data


_BY_NAME: dict[str, _ClassEntry] = {}
_BY_CLASS: dict[type, _ClassEntry] = {}
# Known-library resolvers (see library_types.py): called on a registry miss, they register
# the classes they know (from libraries already imported or flax_ckpt's own dependencies)
# and return whether they did. They never import a name read from a checkpoint.
_CLASS_RESOLVERS: list[Callable[[type], bool]] = []
_NAME_RESOLVERS: list[Callable[[str], bool]] = []


def add_resolvers(by_class: Callable[[type], bool], by_name: Callable[[str], bool]) -> None:
  _CLASS_RESOLVERS.append(by_class)
  _NAME_RESOLVERS.append(by_name)


# Families of classes (e.g. nnx.Variable subclasses) always rebuilt from their aux data,
# also when a user registers one with register_class.
_AUX_FAMILIES: list[Callable[[type], bool]] = []


def add_aux_family(pred: Callable[[type], bool]) -> None:
  _AUX_FAMILIES.append(pred)


def _from_aux(cls: type) -> bool:
  return any(pred(cls) for pred in _AUX_FAMILIES)


def register_known(cls: type, name: str, *, aliases: Sequence[str] = (),
                   from_aux: bool = False, newest: bool = False) -> None:
  """Registers a library class under a stable ``name`` (plus ``aliases`` for reading).

  With ``newest``, a class defined again under the same name (a re-run notebook cell)
  takes the name over; otherwise the first registration keeps it.
  """
  if cls in _BY_CLASS:
    return
  _MISSED.clear()
  entry = _ClassEntry(cls, name, None, from_aux)
  _BY_CLASS[cls] = entry
  for n in (name, *aliases):
    if newest:
      _BY_NAME[n] = entry
    else:
      _BY_NAME.setdefault(n, entry)


def entry_known(name: str) -> bool:
  return name in _BY_NAME


_MISSED: set = set()  # classes / names the resolvers did not know, within one save or load


def forget_misses() -> None:
  """Called when a save or load starts: classes defined since then get a fresh look."""
  _MISSED.clear()


def _entry_for_class(cls: type) -> _ClassEntry | None:
  entry = _BY_CLASS.get(cls)
  if entry is None and cls not in _MISSED:
    if any(r(cls) for r in _CLASS_RESOLVERS):
      entry = _BY_CLASS.get(cls)
    else:
      _MISSED.add(cls)
  return entry


def _entry_for_name(name: str) -> _ClassEntry | None:
  entry = _BY_NAME.get(name)
  if entry is None and name not in _MISSED:
    if any(r(name) for r in _NAME_RESOLVERS):
      entry = _BY_NAME.get(name)
    else:
      _MISSED.add(name)
  return entry


def default_class_name(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def register_class(
    cls: type,
    *,
    name: str | None = None,
    build: Callable[[Sequence[Any], Sequence[Any]], Any] | None = None,
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
  if not isinstance(cls, type):
    raise TypeError(f"register_class expects a class, got {cls!r}")
  name = name or default_class_name(cls)
  old = _BY_NAME.get(name)
  if not override and ((old is not None and old.cls is not cls) or (
      cls in _BY_CLASS and _BY_CLASS[cls].name != name)):
    raise ValueError(
        f"class name {name!r} / class {cls!r} is already registered; pass override=True to "
        "replace the registration."
    )
  if override and cls in _BY_CLASS:
    _BY_NAME.pop(_BY_CLASS[cls].name, None)
  _MISSED.clear()
  entry = _ClassEntry(cls, name, build, build is None and _from_aux(cls))
  _BY_NAME[name] = entry
  _BY_CLASS[cls] = entry
  return cls


def is_registered_class(cls: type) -> bool:
  return cls in _BY_CLASS


def _class_name(cls: type) -> tuple[str, bool]:
  entry = _entry_for_class(cls)
  return (entry.name, True) if entry else (default_class_name(cls), False)


# --- aux data (a node's static part) as tagged JSON (see jsontags.py) -------------------

_NOT_JSON = object()


def encode_aux(v: Any) -> Any:
  """``v`` as tagged JSON, or ``_NOT_JSON`` when it has no faithful encoding."""
  try:
    return jsontags.encode(v)
  except jsontags.Unencodable:
    return _NOT_JSON


decode_aux = jsontags.decode


def _encode_node_aux(aux: Any) -> tuple[Any, list[str]]:
  """Encoded aux data, and the names of mapping entries left out because they are not JSON.

  A mapping (or a tuple of ``(str, value)`` pairs, as metadata is often kept) loses only
  its non-JSON entries; any other aux data is kept whole or not at all.
  """
  if type(aux) is dict and all(type(k) is str for k in aux):
    kept = [(k, encode_aux(x)) for k, x in aux.items()]
    dropped = [k for k, x in kept if x is _NOT_JSON]
    return {"d": [[k, x] for k, x in kept if x is not _NOT_JSON]}, dropped
  if (type(aux) is tuple and aux
      and all(type(p) is tuple and len(p) == 2 and type(p[0]) is str for p in aux)):
    pairs = [(k, encode_aux(x)) for k, x in aux]
    dropped = [k for k, x in pairs if x is _NOT_JSON]
    return {"t": [{"t": [k, x]} for k, x in pairs if x is not _NOT_JSON]}, dropped
  return encode_aux(aux), []


def _is_namedtuple(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(type(x), "_fields")


def path_from_jax(keypath: Sequence[Any]) -> Path:
  out = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(("d", k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(("i", k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(("a", k.name))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(("f", k.key))
    else:
      out.append(("d", str(k)))
  return tuple(out)


def match_key(path: Sequence[Sequence[Any]]) -> tuple:
  """Canonical form used to match template paths to saved paths.

  Dict keys and attribute names match each other (a template dataclass may stand for a saved
  dict); positions (list/tuple index, flattened index) are wrapped in a 1-tuple so an int
  dict key never matches a list index. str and int keys never compare equal in Python.
  """
  return tuple(key if kind == "d" or kind == "a" else (key,) for kind, key in path)


def path_str(path: Sequence[Sequence[Any]]) -> str:
  """Human-readable path, e.g. ``['params']['dense'][0].mu``."""
  if not path:
    return "<root>"
  parts = []
  for kind, key in path:
    parts.append(f".{key}" if kind == "a" else f"[{key!r}]")
  return "".join(parts)


def restore_dataclass(cls: type, fields: dict) -> Any:
  """An instance of dataclass ``cls`` from its saved ``fields``.

  Built like any dataclass, ``cls(**init_fields)``, so ``__post_init__`` sets up derived
  attributes again (it must therefore not transform fields it is given in a way that is not
  idempotent); fields with ``init=False`` are then set to their saved values. If the
  constructor fails, the object is built without it from the saved fields alone.
  """
  init = {f.name for f in dataclasses.fields(cls) if f.init}
  try:
    obj = cls(**{k: v for k, v in fields.items() if k in init})
  except Exception:  # noqa: BLE001 - a constructor that needs more than the saved fields
    obj = cls.__new__(cls)
    init = set()
  for name, value in fields.items():
    if name not in init:
      object.__setattr__(obj, name, value)
  return obj


def plain_dataclass_children(x: Any) -> list[tuple[PathElem, Any]]:
  """Fields of a registered dataclass that is not a JAX PyTree node, as (("a", name), value)."""
  return [(("a", f.name), getattr(x, f.name)) for f in dataclasses.fields(x)]


def _is_plain_registered_dataclass(x: Any) -> bool:
  t = type(x)
  return (t in _BY_CLASS and dataclasses.is_dataclass(x) and not isinstance(x, type)
          and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)))


class _PlainNode:
  """Stands in for a registered plain dataclass inside a template while JAX flattens it."""

  def __init__(self, cls: type, names: list[str], values: list[Any]):
    self.cls, self.names, self.values = cls, names, values


jax.tree_util.register_pytree_with_keys(
    _PlainNode,
    lambda n: ([(jax.tree_util.GetAttrKey(k), v) for k, v in zip(n.names, n.values)],
               (n.cls, tuple(n.names))),
    lambda aux, values: _PlainNode(aux[0], list(aux[1]), list(values)),
)


def expand_plain_dataclasses(template: Any) -> Any:
  """Makes registered plain dataclasses in a template visible to JAX's flattening."""
  if not any(dataclasses.is_dataclass(c) for c in _BY_CLASS):
    return template

  def expand(x):
    if _is_plain_registered_dataclass(x):
      kids = plain_dataclass_children(x)
      return _PlainNode(type(x), [k for (_, k), _ in kids],
                        [expand_plain_dataclasses(v) for _, v in kids])
    return x
  return jax.tree_util.tree_map(expand, template, is_leaf=_is_plain_registered_dataclass)


def collapse_plain_dataclasses(tree: Any) -> Any:
  """Inverse of :func:`expand_plain_dataclasses` on the loaded result."""
  if not any(dataclasses.is_dataclass(c) for c in _BY_CLASS):
    return tree

  def collapse(x):
    if isinstance(x, _PlainNode):
      kw = dict(zip(x.names, (collapse_plain_dataclasses(v) for v in x.values)))
      return restore_dataclass(x.cls, kw)
    return x
  return jax.tree_util.tree_map(collapse, tree, is_leaf=lambda y: isinstance(y, _PlainNode))


def _one_level(x: Any) -> tuple[list[tuple[PathElem, Any]], Any]:
  """Children of a custom PyTree node with their keys, and its treedef (None for a leaf)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if len(flat) == 1 and not flat[0][0] and flat[0][1] is x:  # (an empty node has no leaf)
    return [], None
  return [(path_from_jax(kp)[0], v) for kp, v in flat], treedef


def encode(
    tree: Any, handler_of: Callable[[Any], Any]
) -> tuple[dict, list[tuple[Path, Any]], list[Any]]:
  """Walks ``tree``; returns its JSON structure, the (path, value) leaves in order, and the
  handler of each leaf (``handler_of(x)`` is None for values that are not handled leaves).

  Raises:
    UnsupportedLeafError: listing every leaf whose type no handler supports, or bad keys.
  """
  leaves: list[tuple[Path, Any]] = []
  handlers: list[Any] = []
  bad: list[str] = []

  def leaf(path: Path, value: Any, handler: Any) -> dict:
    leaves.append((path, value))
    handlers.append(handler)
    return {"t": "leaf", "id": len(leaves) - 1}

  def walk(x: Any, path: Path) -> dict:
    t = type(x)
    if x is None:
      return leaf(path, x, handler_of(x))
    if t is dict:
      keys, kts, children = [], [], []
      for k, v in x.items():
        if type(k) is str:
          kts.append("s")
        elif type(k) is int:
          kts.append("i")
        else:
          bad.append(f"{path_str(path)}: dict key {k!r} of type {type(k).__name__} "
                     "(only str and int keys can be saved; convert the key)")
          continue
        keys.append(k)
        children.append(walk(v, path + (("d", k),)))
      return {"t": "dict", "k": keys, "kt": kts, "c": children}
    if t is list or t is tuple:
      return {"t": "list" if t is list else "tuple",
              "c": [walk(v, path + (("i", i),)) for i, v in enumerate(x)]}
    h = handler_of(x)
    if h is not None:
      return leaf(path, x, h)
    if _is_namedtuple(x):
      name, reg = _class_name(t)
      return {"t": "namedtuple", "cls": name, "reg": reg, "f": list(t._fields),
              "c": [walk(getattr(x, f), path + (("a", f),)) for f in t._fields]}
    kids, treedef = _one_level(x)
    is_node = treedef is not None
    if not is_node and t in _BY_CLASS and dataclasses.is_dataclass(x):
      kids, is_node = plain_dataclass_children(x), True
    if not is_node:
      bad.append(f"{path_str(path)}: unsupported leaf type {t.__module__}.{t.__qualname__} "
                 "(register a TypeHandler with flax_ckpt.register_type_handler, or register "
                 "the class as a JAX PyTree node)")
      return {"t": "leaf", "id": -1}
    name, reg = _class_name(t)
    node = {"t": "node", "cls": name, "reg": reg,
            "keys": [[kind, key] for (kind, key), _ in kids],
            "c": [walk(v, path + ((kind, key),)) for (kind, key), v in kids]}
    if treedef is not None:
      try:
        aux = treedef.node_data()[1]
      except Exception:  # noqa: BLE001 - no node data: nothing more to record
        aux = _NOT_JSON
      enc, dropped = _encode_node_aux(aux) if aux is not _NOT_JSON else (_NOT_JSON, [])
      if enc is not _NOT_JSON:
        node["aux"] = enc
      if dropped:
        node["aux_dropped"] = dropped
    if dataclasses.is_dataclass(x) and all(kind == "a" for (kind, _), _ in kids):
      static = [f.name for f in dataclasses.fields(x)
                if f.name not in {k for (_, k), _ in kids}]
      if static:
        node["static"] = static
    return node

  root = walk(tree, ())
  if bad:
    raise errors.UnsupportedLeafError(
        "cannot save this tree; nothing was written. Problems:\n  " + "\n  ".join(bad)
    )
  return root, leaves, handlers


def _rebuild_class(node: dict, keys: list, values: list, warned: set[str] | None) -> Any:
  # Registered in this process is what counts (also for classes registered after saving).
  entry = _entry_for_name(node["cls"])
  named = all(k[0] in ("a", "d") for k in keys)
  if entry is not None:
    cls = entry.cls
    try:
      if entry.from_aux and "aux" in node:
        if node.get("aux_dropped"):
          _warn(warned, node["cls"], f"its entries {node['aux_dropped']} were not JSON and "
                "were not saved", rebuilt=True)
        leaf = jax.tree_util.tree_structure(0)
        treedef = jax.tree_util.PyTreeDef.from_node_data_and_children(
            jax.tree_util.default_registry, (cls, decode_aux(node["aux"])),
            [leaf] * len(values))
        return treedef.unflatten(values)
      if entry.build is not None:
        return entry.build([k[1] for k in keys], values)
      if _is_namedtuple_cls(cls):
        return cls(*values)
      if dataclasses.is_dataclass(cls) and named:
        kw = dict(zip((k[1] for k in keys), values))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kw]
        if missing:
          _warn(warned, node["cls"], f"fields {missing} are static (not saved) and cannot be "
                "restored without a template; pass abstract_state to restore the class")
          return kw
        return restore_dataclass(cls, kw)
      return cls(**dict(zip((k[1] for k in keys), values))) if named else cls(*values)
    except Exception as e:  # noqa: BLE001 - report and fall back, never fail the load
      _warn(warned, node["cls"], f"rebuilding it failed ({type(e).__name__}: {e})")
  else:
    static = (f"; its fields {node['static']} are static (not saved) and need a template"
              if node.get("static") else "")
    _warn(warned, node["cls"], f"it is not registered with flax_ckpt.register_class{static}")
  if named:
    return {k[1]: v for k, v in zip(keys, values)}
  return tuple(values)


def _is_namedtuple_cls(cls: type) -> bool:
  return issubclass(cls, tuple) and hasattr(cls, "_fields")


def _warn(warned: set[str] | None, name: str, why: str, rebuilt: bool = False) -> None:
  if warned is None or name in warned:
    return
  warned.add(name)
  what = "was rebuilt, but" if rebuilt else "was returned as a dict/tuple:"
  warnings.warn(
      f"class {name} from the checkpoint {what} {why}. "
      "Load with a template (abstract_state) to get the exact types back.",
      UnregisteredClassWarning,
      stacklevel=4,
  )


def leaf_ids(node: dict) -> list[int]:
  """Ids of all leaves under ``node``."""
  if node["t"] == "leaf":
    return [node["id"]]
  return [i for c in node.get("c", ()) for i in leaf_ids(c)]


def find_node(root: dict, path: Sequence[Sequence[Any]]) -> dict | None:
  """The structure node at ``path`` (matched like template paths), or None."""
  node = root
  for elem in path:
    t = node["t"]
    if t == "dict":
      keys = [["d", k] for k in node["k"]]
    elif t in ("list", "tuple"):
      keys = [["i", j] for j in range(len(node["c"]))]
    elif t == "namedtuple":
      keys = [["a", f] for f in node["f"]]
    elif t == "node":
      keys = node["keys"]
    else:
      return None
    want = match_key([elem])
    for j, k in enumerate(keys):
      if match_key([k]) == want and type(k[1]) is type(elem[1]):
        node = node["c"][j]
        break
    else:
      return None
  return node


def decode(node: dict, leaf_values: Sequence[Any], warned: set[str] | None) -> Any:
  """Rebuilds the saved structure around ``leaf_values`` (indexed by leaf id)."""
  t = node["t"]
  if t == "leaf":
    return leaf_values[node["id"]]
  children = [decode(c, leaf_values, warned) for c in node.get("c", ())]
  if t == "dict":
    return dict(zip(node["k"], children))
  if t == "list":
    return children
  if t == "tuple":
    return tuple(children)
  if t == "namedtuple":
    keys = [["a", f] for f in node["f"]]
    return _rebuild_class(node, keys, children, warned)
  if t == "node":
    return _rebuild_class(node, node["keys"], children, warned)
  raise errors.FormatError(f"unknown structure node type {t!r} in checkpoint")
