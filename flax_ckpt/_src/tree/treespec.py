"""Recording and rebuilding the exact structure of a PyTree (the structure codec).

The structure is stored as a JSON tree of nodes (see docs/format.md). Classes are rebuilt
only when registered in the class registry (class_registry.py); a name read from a
checkpoint is looked up there and never imported.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import jsontags
from flax_ckpt._src.tree.class_registry import ClassRegistry, global_registry
from flax_ckpt._src.tree.plain_dataclasses import plain_dataclass_children, restore_dataclass

# A path element on disk: [kind, key] with kind "d" (dict key), "a" (attribute),
# "i" (sequence index) or "f" (flattened index of a custom node).
PathElem = tuple[str, Any]
Path = tuple[PathElem, ...]


class UnregisteredClassWarning(UserWarning):
  """A class in the checkpoint is not registered; it was rebuilt as dict or tuple."""


# --- aux data (a node's static part) as tagged JSON (see jsontags.py) -------------------

_NOT_JSON = object()


def encode_aux(value: Any) -> Any:
  """``value`` as tagged JSON, or ``_NOT_JSON`` when it has no faithful encoding."""
  try:
    return jsontags.encode(value)
  except jsontags.Unencodable:
    return _NOT_JSON


decode_aux = jsontags.decode


def _encode_node_aux(aux: Any) -> tuple[Any, list[str]]:
  """Encoded aux data, and the names of mapping entries left out because they are not JSON.

  A mapping (or a tuple of ``(str, value)`` pairs, as metadata is often kept) loses only
  its non-JSON entries; any other aux data is kept whole or not at all.
  """
  if type(aux) is dict and all(type(key) is str for key in aux):
    kept = [(key, encode_aux(value)) for key, value in aux.items()]
    dropped = [key for key, encoded in kept if encoded is _NOT_JSON]
    return {"d": [[key, encoded] for key, encoded in kept if encoded is not _NOT_JSON]}, dropped
  if (type(aux) is tuple and aux
      and all(type(p) is tuple and len(p) == 2 and type(p[0]) is str for p in aux)):
    pairs = [(key, encode_aux(value)) for key, value in aux]
    dropped = [key for key, encoded in pairs if encoded is _NOT_JSON]
    return {"t": [{"t": [key, encoded]} for key, encoded in pairs
                  if encoded is not _NOT_JSON]}, dropped
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


def key_strings(keypath: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path as plain strings, dict key, index and attribute name alike: the names
  other tools give leaves (Orbax's key tuples, safetensors' ``/``-joined names).

  Example:
    >>> import jax
    >>> (kp, _), = jax.tree_util.tree_flatten_with_path({'dense': [{'kernel': 1}]})[0]
    >>> key_strings(kp)
    ('dense', '0', 'kernel')
  """
  out = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(str(k.key))
    else:
      out.append(str(k))
  return tuple(out)


def match_key(path: Sequence[Sequence[Any]]) -> tuple:
  """Canonical form used to match template paths to saved paths.

  Dict keys and attribute names match each other (a template dataclass may stand for a saved
  dict); positions (list/tuple index, flattened index) are wrapped in a 1-tuple so an int
  dict key never matches a list index. str and int keys never compare equal in Python.
  """
  return tuple([key if kind == "d" or kind == "a" else (key,) for kind, key in path])


def jax_match_key(keypath: Sequence[Any]) -> tuple:
  """``match_key(path_from_jax(keypath))`` in one pass (a load makes one per template
  leaf: ~3 us less each than the two steps).

  Example:
    >>> import jax
    >>> (kp, _), = jax.tree_util.tree_flatten_with_path({'a': [{'b': 1}]})[0]
    >>> jax_match_key(kp)
    ('a', (0,), 'b')
  """
  out = []
  for k in keypath:
    t = type(k)
    if t is jax.tree_util.DictKey:
      out.append(k.key)
    elif t is jax.tree_util.GetAttrKey:
      out.append(k.name)
    elif t is jax.tree_util.SequenceKey:
      out.append((k.idx,))
    else:  # subclasses and other key types: the general rule
      out.extend(match_key(path_from_jax((k,))))
  return tuple(out)


def path_str(path: Sequence[Sequence[Any]]) -> str:
  """Human-readable path, e.g. ``['params']['dense'][0].mu``."""
  if not path:
    return "<root>"
  parts = []
  for kind, key in path:
    parts.append(f".{key}" if kind == "a" else f"[{key!r}]")
  return "".join(parts)


def _one_level(x: Any) -> tuple[list[tuple[PathElem, Any]], Any]:
  """Children of a custom PyTree node with their keys, and its treedef (None for a leaf)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if len(flat) == 1 and not flat[0][0] and flat[0][1] is x:  # (an empty node has no leaf)
    return [], None
  return [(path_from_jax(kp)[0], v) for kp, v in flat], treedef


def _aux_fields(treedef: Any) -> dict:
  """The ``aux`` / ``aux_dropped`` entries of a custom node's structure record."""
  try:
    aux = treedef.node_data()[1]
  except Exception:  # noqa: BLE001 - no node data: nothing more to record
    return {}
  encoded, dropped = _encode_node_aux(aux)
  fields: dict[str, Any] = {}
  if encoded is not _NOT_JSON:
    fields["aux"] = encoded
  if dropped:
    fields["aux_dropped"] = dropped
  return fields


def _static_fields(x: Any, children: list[tuple[PathElem, Any]]) -> list[str]:
  """A dataclass node's fields that are not among its saved children (its static fields)."""
  if not dataclasses.is_dataclass(x) or not all(kind == "a" for (kind, _), _ in children):
    return []
  saved = {name for (_, name), _ in children}
  return [f.name for f in dataclasses.fields(x) if f.name not in saved]


class _Encoder:
  """One walk over a tree: its structure record, its leaves in order, and the problems."""

  def __init__(self, handler_of: Callable[[Any], Any], registry: ClassRegistry):
    self.handler_of = handler_of
    self.registry = registry
    self.leaves: list[tuple[Path, Any]] = []
    self.handlers: list[Any] = []
    self.problems: list[str] = []
    self._on_path: set[int] = set()  # ids of the containers from the root to here

  def walk(self, x: Any, path: Path) -> dict:
    if x is None:
      return self.leaf(path, x, self.handler_of(x))
    if len(path) > MAX_DEPTH:
      raise errors.UnsupportedLeafError(
          f"{path_str(path[:8])}...: the tree is nested deeper than {MAX_DEPTH} levels (at a "
          f"{type(x).__name__}); flatten that part of the state. Nothing was written.")
    if id(x) in self._on_path:
      raise errors.UnsupportedLeafError(
          f"{path_str(path)}: the tree contains itself here (a cycle through a "
          f"{type(x).__name__}); a checkpoint holds trees, not graphs. Nothing was written.")
    self._on_path.add(id(x))
    try:
      return self._walk(x, path)
    finally:
      self._on_path.discard(id(x))

  def _walk(self, x: Any, path: Path) -> dict:
    cls = type(x)
    if cls is dict:
      return self.dict_node(x, path)
    if cls is list or cls is tuple:
      return {"t": "list" if cls is list else "tuple",
              "c": [self.walk(v, path + (("i", i),)) for i, v in enumerate(x)]}
    handler = self.handler_of(x)
    if handler is not None:
      return self.leaf(path, x, handler)
    if _is_namedtuple(x):
      name, registered = self.registry.stored_name(cls)
      return {"t": "namedtuple", "cls": name, "reg": registered, "f": list(cls._fields),
              "c": [self.walk(getattr(x, f), path + (("a", f),)) for f in cls._fields]}
    return self.custom_node(x, path)

  def leaf(self, path: Path, value: Any, handler: Any) -> dict:
    self.leaves.append((path, value))
    self.handlers.append(handler)
    return {"t": "leaf", "id": len(self.leaves) - 1}

  def dict_node(self, x: dict, path: Path) -> dict:
    keys, key_types, children = [], [], []
    for key, value in x.items():
      if type(key) is str:
        key_types.append("s")
      elif type(key) is int:
        key_types.append("i")
      else:
        self.problems.append(
            f"{path_str(path)}: dict key {key!r} of type {type(key).__name__} "
            "(only str and int keys can be saved; convert the key)")
        continue
      keys.append(key)
      children.append(self.walk(value, path + (("d", key),)))
    return {"t": "dict", "k": keys, "kt": key_types, "c": children}

  def custom_node(self, x: Any, path: Path) -> dict:
    """A JAX PyTree node of any other type, or a registered plain dataclass."""
    cls = type(x)
    children, treedef = _one_level(x)
    is_node = treedef is not None
    if not is_node and self.registry.is_registered(cls) and dataclasses.is_dataclass(x):
      children, is_node = plain_dataclass_children(x), True
    if not is_node:
      self.problems.append(
          f"{path_str(path)}: unsupported leaf type {cls.__module__}.{cls.__qualname__} "
          "(register a TypeHandler with flax_ckpt.register_type_handler, or register "
          "the class as a JAX PyTree node)")
      return {"t": "leaf", "id": -1}
    name, registered = self.registry.stored_name(cls)
    node = {"t": "node", "cls": name, "reg": registered,
            "keys": [[kind, key] for (kind, key), _ in children],
            "c": [self.walk(v, path + ((kind, key),)) for (kind, key), v in children]}
    if treedef is not None:
      node.update(_aux_fields(treedef))
    static = _static_fields(x, children)
    if static:
      node["static"] = static
    return node


MAX_DEPTH = 200  # containers nested deeper than this are refused (well within Python's stack)


def encode(
    tree: Any, handler_of: Callable[[Any], Any]
) -> tuple[dict, list[tuple[Path, Any]], list[Any]]:
  """Walks ``tree``; returns its JSON structure, the (path, value) leaves in order, and the
  handler of each leaf (``handler_of(x)`` is None for values that are not handled leaves).

  Raises:
    UnsupportedLeafError: listing every leaf whose type no handler supports, or bad keys.
  """
  encoder = _Encoder(handler_of, global_registry())
  root = encoder.walk(tree, ())
  if encoder.problems:
    raise errors.UnsupportedLeafError(
        "cannot save this tree; nothing was written. Problems:\n  "
        + "\n  ".join(encoder.problems)
    )
  return root, encoder.leaves, encoder.handlers


def _rebuild_class(node: dict, keys: list, values: list, warned: set[str] | None) -> Any:
  # Registered in this process is what counts (also for classes registered after saving).
  entry = global_registry().lookup(node["cls"])
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
        fields = dict(zip((k[1] for k in keys), values))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in fields]
        if missing:
          _warn(warned, node["cls"], f"fields {missing} are static (not saved) and cannot be "
                "restored without a template; pass abstract_state to restore the class")
          return fields
        return restore_dataclass(cls, fields)
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


_KINDS = frozenset(("leaf", "dict", "list", "tuple", "namedtuple", "node"))


def _is_key(k: Any) -> bool:
  return isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))


def _node_problem(node: Any, n_leaves: int, seen: set[int]) -> str:
  """What is wrong with one structure node read from a checkpoint ("" if nothing)."""
  if not isinstance(node, dict) or not isinstance(node.get("t"), str) or node["t"] not in _KINDS:
    return f"a node that is not an object with a known 't' ({str(node)[:80]})"
  kind = node["t"]
  if kind == "leaf":
    i = node.get("id")
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_leaves or i in seen:
      return f"leaf id {i!r} (out of range of {n_leaves} leaves, or used twice)"
    seen.add(i)
    return ""
  c = node.get("c")
  if not isinstance(c, list):
    return f"a {kind} node without a list of children"
  if kind == "dict":
    k = node.get("k")
    if not isinstance(k, list) or len(k) != len(c) or not all(map(_is_key, k)) or len(
        set(k)) != len(k):
      return "a dict node whose keys do not match its children (or repeat)"
  elif kind == "namedtuple":
    f = node.get("f")
    if not isinstance(node.get("cls"), str) or not isinstance(f, list) or len(f) != len(
        c) or not all(isinstance(x, str) for x in f):
      return "a namedtuple node without a class name or field names for its children"
  elif kind == "node":
    keys = node.get("keys")
    if not isinstance(node.get("cls"), str) or not isinstance(keys, list) or len(
        keys) != len(c) or not all(
            isinstance(k, list) and len(k) == 2 and k[0] in ("d", "a", "i", "f")
            and _is_key(k[1]) for k in keys):
      return "a node without a class name or keys for its children"
  return ""


def check_structure(root: Any, n_leaves: int, where: str) -> None:
  """Validates a saved structure (hostile input) before it is decoded: every node well
  formed, every leaf id in range and used exactly once. Iterative: no recursion limit.

  Raises:
    FormatError: naming ``where`` and the first problem.
  """
  seen: set[int] = set()
  stack = [root]
  while stack:
    node = stack.pop()
    problem = _node_problem(node, n_leaves, seen)
    if problem:
      raise errors.FormatError(f"{where}: malformed structure: {problem}; the checkpoint is "
                               "damaged or crafted.")
    if node["t"] != "leaf":
      stack.extend(node["c"])
  if len(seen) != n_leaves:
    raise errors.FormatError(f"{where}: malformed structure: {n_leaves - len(seen)} of its "
                             f"{n_leaves} leaves are not in the tree; the checkpoint is "
                             "damaged or crafted.")


def leaf_ids(node: dict) -> list[int]:
  """Ids of all leaves under ``node``."""
  if node["t"] == "leaf":
    return [node["id"]]
  return [i for c in node.get("c", ()) for i in leaf_ids(c)]


def find_node(root: dict, path: Sequence[Sequence[Any]]) -> dict | None:
  """The structure node at ``path`` (matched like template paths), or None."""
  node = root
  for elem in path:
    kind = node["t"]
    if kind == "dict":
      keys = [["d", k] for k in node["k"]]
    elif kind in ("list", "tuple"):
      keys = [["i", j] for j in range(len(node["c"]))]
    elif kind == "namedtuple":
      keys = [["a", f] for f in node["f"]]
    elif kind == "node":
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


def decode(node: dict, leaf_values: Sequence[Any] | Mapping[int, Any],
           warned: set[str] | None) -> Any:
  """Rebuilds the saved structure around ``leaf_values`` (indexed by leaf id)."""
  kind = node["t"]
  if kind == "leaf":
    return leaf_values[node["id"]]
  children = [decode(c, leaf_values, warned) for c in node.get("c", ())]
  if kind == "dict":
    return dict(zip(node["k"], children))
  if kind == "list":
    return children
  if kind == "tuple":
    return tuple(children)
  if kind == "namedtuple":
    keys = [["a", f] for f in node["f"]]
    return _rebuild_class(node, keys, children, warned)
  if kind == "node":
    return _rebuild_class(node, node["keys"], children, warned)
  raise errors.FormatError(f"unknown structure node type {kind!r} in checkpoint")
