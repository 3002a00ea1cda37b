"""The tree of an Orbax PyTree item: its ``_METADATA`` parsed as hostile input, the tree
rebuilt without a template, and a template's leaves matched to Orbax's entries.

Orbax records each leaf as a list of ``(key, key_type)`` pairs (docs/orbax_format.md §2.1):
key_type 1 is a sequence index (list or tuple: Orbax does not say which), 2 a dict key or
attribute. Every key is a string. The on-disk name of a leaf is ``".".join(keys)``, which
is ambiguous (``{"a.b": x}`` and ``{"a": {"b": x}}`` collide), so leaves are matched by the
key tuple, never by the name.

Example:
  >>> raw = (b'{"tree_metadata": {"x": {"key_metadata": [{"key": "w", "key_type": 2}, '
  ...        b'{"key": "0", "key_type": 1}], "value_metadata": {"value_type": "jax.Array",'
  ...        b' "skip_deserialize": false}}}, "use_zarr3": true}')
  >>> meta = parse_metadata(raw, '_METADATA')
  >>> meta.entries[0].keys, meta.entries[0].name, meta.use_zarr3
  (('w', '0'), 'w.0', True)
  >>> build_tree(meta.entries, {('w', '0'): 1.5}, '_METADATA')
  {'w': [1.5]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from flax_ckpt._src import errors
from flax_ckpt._src.format import parse_json_object
from flax_ckpt._src.tree import treespec

SEQUENCE, DICT = 1, 2  # Orbax's KeyType values
_EMPTY = {"None": None, "Dict": dict, "List": list, "Tuple": tuple, "NamedTuple": tuple}
MAX_DEPTH = 1000  # deeper trees cannot be flattened by jax anyway (recursion)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One leaf of an Orbax tree: its key path, how Orbax stored it, and whether it has data."""

  keys: tuple[str, ...]
  kinds: tuple[int, ...]
  value_type: str
  skip: bool  # an empty node (None, {}, [], ()) recorded without data

  @property
  def name(self) -> str:
    """Orbax's name of the leaf: its data's key (OCDBT) or directory."""
    return ".".join(self.keys)

  @property
  def shown(self) -> str:
    """The path as a user reads it, e.g. ``['params']['dense'][0]``."""
    return "".join(f"[{int(k)}]" if t == SEQUENCE else f"[{k!r}]"
                   for k, t in zip(self.keys, self.kinds)) or "<root>"


@dataclasses.dataclass(frozen=True)
class TreeMetadata:
  """The parts of ``_METADATA`` a reader needs."""

  entries: list[Entry]
  use_zarr3: bool
  use_ocdbt: bool | None  # None: not recorded (old Orbax); decided from the files
  custom_metadata: Any


def _entry(raw: Any, where: str) -> Entry:
  if not isinstance(raw, dict):
    raise errors.FormatError(f"{where}: a tree_metadata entry is not a JSON object")
  km, vm = raw.get("key_metadata"), raw.get("value_metadata")
  if not isinstance(km, list) or not isinstance(vm, dict):
    raise errors.FormatError(f"{where}: an entry lacks key_metadata (a list) or "
                             "value_metadata (an object)")
  if len(km) > MAX_DEPTH:
    raise errors.FormatError(f"{where}: a key path {len(km)} levels deep (at most "
                             f"{MAX_DEPTH} are read)")
  keys, kinds = [], []
  for k in km:
    key = k.get("key") if isinstance(k, dict) else None
    kind = k.get("key_type") if isinstance(k, dict) else None
    if isinstance(key, int) and not isinstance(key, bool):
      key = str(key)
    if not isinstance(key, str) or kind not in (SEQUENCE, DICT):
      raise errors.FormatError(f"{where}: bad key_metadata {k!r} (want a string key and "
                               "key_type 1 or 2)")
    if kind == SEQUENCE and not (key.isdigit() and key.isascii() and len(key) < 19):
      raise errors.FormatError(f"{where}: sequence index {key!r} is not a small number")
    keys.append(key)
    kinds.append(kind)
  vt, skip = vm.get("value_type"), vm.get("skip_deserialize", False)
  if not isinstance(vt, str) or not isinstance(skip, bool):
    raise errors.FormatError(f"{where}: bad value_metadata {vm!r}")
  return Entry(tuple(keys), tuple(kinds), vt, skip)


def parse_metadata(raw: bytes, where: str) -> TreeMetadata:
  """Parses and checks an Orbax ``_METADATA`` file (hostile input: any shape of JSON).

  Raises:
    FormatError: not the JSON Orbax writes, or two leaves at one path.
  """
  meta = parse_json_object(raw, where)
  tm = meta.get("tree_metadata")
  if not isinstance(tm, dict):
    raise errors.FormatError(
        f"{where} has no tree_metadata object: not an Orbax PyTree checkpoint of a version "
        "flax_ckpt reads (orbax-checkpoint 0.5 and newer)")
  entries = [_entry(e, where) for e in tm.values()]
  seen: set[tuple[str, ...]] = set()
  for e in entries:
    if e.keys in seen:
      raise errors.FormatError(f"{where}: two entries for the leaf {e.shown}")
    seen.add(e.keys)
  zarr3, ocdbt = meta.get("use_zarr3", False), meta.get("use_ocdbt")
  if not isinstance(zarr3, bool) or not (ocdbt is None or isinstance(ocdbt, bool)):
    raise errors.FormatError(f"{where}: use_zarr3/use_ocdbt must be true or false")
  build_tree(entries, None, where)  # the structure is checked before any data is read
  return TreeMetadata(entries, zarr3, ocdbt, meta.get("custom_metadata"))


def empty_value(e: Entry) -> Any:
  """The value of an entry recorded without data (``skip_deserialize``)."""
  make = _EMPTY.get(e.value_type)
  return make() if callable(make) else None


class _Node:
  """A container being rebuilt: children by key, and whether they are list positions."""

  __slots__ = ("children", "kind")

  def __init__(self, kind: int):
    self.kind = kind
    self.children: dict[str, Any] = {}


def build_tree(entries: Sequence[Entry], values: Mapping[tuple[str, ...], Any] | None,
               where: str, prefix: tuple[str, ...] = ()) -> Any:
  """The tree as Orbax recorded it: nested dicts, lists where keys are positions.

  ``values`` holds each data leaf's value by key path (None: only check the structure,
  with None for every leaf); empty nodes come from their entry.
  Only entries under ``prefix`` are used (``prefix`` itself is the root).
  """
  root: Any = None
  n = len(prefix)
  for e in entries:
    if e.keys[:n] != prefix:
      continue
    value = empty_value(e) if e.skip or values is None else values[e.keys]
    keys, kinds = e.keys[n:], e.kinds[n:]
    if not keys:
      if root is not None:
        raise errors.FormatError(f"{where}: {e.shown} is both a leaf and a container")
      root = _Leaf(value)
      continue
    if root is None:
      root = _Node(kinds[0])
    node = root
    for i, (k, kind) in enumerate(zip(keys, kinds)):
      if not isinstance(node, _Node) or node.kind != kind:
        raise errors.FormatError(f"{where}: {e.shown} conflicts with another entry (a "
                                 "leaf, or a list position next to a dict key)")
      last = i == len(keys) - 1
      child = node.children.get(k)
      if last:
        if child is not None:
          raise errors.FormatError(f"{where}: {e.shown} is both a leaf and a container")
        node.children[k] = _Leaf(value)
      else:
        if child is None:
          child = node.children[k] = _Node(kinds[i + 1])
        node = child
  return _materialize(root, where)


class _Leaf:
  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value


def _materialize(root: Any, where: str) -> Any:
  """Turns the _Node tree into dicts and lists, without recursion (a crafted file may be
  deep)."""
  if root is None:
    return {}
  out: dict[int, Any] = {}
  stack: list[tuple[Any, bool]] = [(root, False)]
  while stack:
    node, done = stack.pop()
    if isinstance(node, _Leaf):
      out[id(node)] = node.value
      continue
    if not done:
      stack.append((node, True))
      stack.extend((c, False) for c in node.children.values())
      continue
    if node.kind == SEQUENCE:
      order = sorted(node.children, key=int)
      if [int(k) for k in order] != list(range(len(order))):
        raise errors.FormatError(f"{where}: list positions {order[:10]} are not 0..n-1")
      out[id(node)] = [out.pop(id(node.children[k])) for k in order]
    else:
      out[id(node)] = {k: out.pop(id(c)) for k, c in node.children.items()}
  return out[id(root)]


def shown(keys: Sequence[str]) -> str:
  """A template path for messages, e.g. ``['params']['w']``."""
  return "".join(f"[{k!r}]" for k in keys) or "<root>"


@dataclasses.dataclass
class Match:
  """A template matched to the entries: per template leaf, the entry (or, for a ``None``
  template leaf, the prefix of the subtree to load as saved)."""

  leaves: list[tuple[tuple[str, ...], Any, Entry | None]]
  treedef: Any


def match_template(entries: Sequence[Entry], template: Any, partial: bool,
                   where: str) -> Match:
  """Pairs each template leaf with its Orbax entry.

  Raises:
    StructureMismatchError: a template leaf has no entry, or (unless ``partial``) the
      checkpoint has leaves the template lacks.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(template, is_leaf=lambda x: x is None)
  by_keys = {e.keys: e for e in entries}
  leaves, covered = [], []
  missing = []
  for kp, t in flat:
    keys = treespec.key_strings(kp)
    e = by_keys.get(keys)
    if t is None:  # the whole subtree, loaded as saved: it must exist
      if e is None and not any(k[:len(keys)] == keys for k in by_keys):
        missing.append(shown(keys))
      covered.append(keys)
    elif e is None:
      missing.append(shown(keys))
    else:
      covered.append(keys)
    leaves.append((keys, t, e))
  extra = []
  if not partial:
    cov = set(covered)
    extra = [e.shown for e in entries if not e.skip and not _under(e.keys, cov)]
  if missing or extra:
    raise errors.StructureMismatchError(errors.mismatch_summary(
        f"{where}: the template does not match the Orbax checkpoint", [
            ("missing from the checkpoint",
             "the template has leaves the Orbax checkpoint lacks: {}", missing),
            ("not in the template", "the Orbax checkpoint has leaves the template lacks: {}; "
             "pass partial=True to load only the template's leaves", extra)],
        "Fix the template; flax_ckpt.load(path) without a template shows the checkpoint's "
        "leaves."))
  return Match(leaves, treedef)


def _under(keys: tuple[str, ...], covered: set[tuple[str, ...]]) -> bool:
  return any(keys[:i] in covered for i in range(len(keys) + 1))
