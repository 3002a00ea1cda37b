"""Loading checkpoints written by Orbax (orbax-checkpoint 0.5 and newer) without orbax.

``flax_ckpt.load`` / ``load_checkpointables`` come here when the path holds an Orbax
checkpoint (``errors.ForeignCheckpointError`` from the engine). A path is one of:

* a PyTree item (``_METADATA``): a ``StandardCheckpointer`` / ``PyTreeCheckpointer``
  directory, or ``<step>/<item>`` of a ``CheckpointManager``;
* a ``CheckpointManager`` step (``_CHECKPOINT_METADATA`` and item sub-directories): its
  items are the checkpointables. PyTree items load as trees, JSON items (``JsonSave``, the
  ``metrics`` item) as their JSON, grain data-iterator items (``process_<i>-of-<n>.json``)
  into the iterator passed for them, or as the saved state.

Orbax records no class types: without a template the tree comes back as nested dicts and
lists (with one ``UnregisteredClassWarning`` saying so); with one, the result has the
template's types and shardings. Layouts: docs/orbax_format.md.

Example:
  >>> import os, tempfile
  >>> d = tempfile.mkdtemp()
  >>> with open(os.path.join(d, '_METADATA'), 'w') as f:
  ...   _ = f.write('{"tree_metadata": {}}')
  >>> load(d, {}, partial=False, restore_type=None, item=None)  # with a template: no warning
  {}
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_ckpt._src import env, errors
from flax_ckpt._src.engine.loading import log_loaded
from flax_ckpt._src.format import DEFAULT_CHECKPOINTABLE, load_json_bytes, parse_json_object
from flax_ckpt._src.interop import orbax_leaves as leaves
from flax_ckpt._src.interop import orbax_tree as otree
from flax_ckpt._src.io import multihost, orbax_layout, paths, storage
from flax_ckpt._src.parts.stateful import is_stateful
from flax_ckpt._src.tree.treespec import UnregisteredClassWarning

STRINGS_FILE = "_strings.json"
SINGLE_ITEM = "default"  # the checkpointable name of a Checkpointer's one item
_GRAIN_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
_IGNORED = {"commit_success.txt"}


def _where(path: str, name: str) -> str:
  return f"{path.rstrip('/')}/{name}"


class PyTreeItem:
  """One Orbax PyTree item directory: its metadata, kvstores and string leaves."""

  def __init__(self, backend: storage.StorageBackend, path: str):
    self.backend, self.path = backend, path.rstrip("/")
    self.where = _where(self.path, orbax_layout.ORBAX_TREE_METADATA)
    try:
      raw = backend.read_bytes(self.where)
    except FileNotFoundError:
      raise errors.FormatError(f"{self.path} has no {orbax_layout.ORBAX_TREE_METADATA}: "
                               "not an Orbax PyTree item") from None
    self.meta = otree.parse_metadata(raw, self.where)
    if not env.allow_symlinks():  # as for flax_ckpt's own parts: hostile input
      links = backend.outside_links(self.path, self.path)
      if links:
        raise errors.FormatError(
            f"{links[0]} is a symlink that resolves outside the Orbax checkpoint {self.path}"
            f" ({len(links)} such link(s)); if this layout is trusted, set "
            f"{env.ALLOW_SYMLINKS}=1.")
    self._names = set(backend.listdir(self.path))
    self._kv: leaves.KvStores | None = None
    self._strings: dict | None = None

  def kv(self) -> leaves.KvStores:
    if self._kv is None:
      self._kv = leaves.KvStores(self.backend, self.path, self.meta.use_ocdbt, self._names)
    return self._kv

  def string(self, e: otree.Entry) -> str:
    if self._strings is None:
      where = _where(self.path, STRINGS_FILE)
      try:
        self._strings = parse_json_object(self.backend.read_bytes(where), where)
      except FileNotFoundError:
        self._strings = {}
    v = self._strings.get(e.name)
    if not isinstance(v, str):
      raise errors.FormatError(f"{self.path}: the string leaf {e.shown} is missing from "
                               f"{STRINGS_FILE}")
    return v

  def load(self, template: Any, *, partial: bool, restore_type: type | None) -> Any:
    """The item's tree: with ``template``'s structure and types, or as recorded."""
    if template is None:
      values = self._read_as_saved(self.meta.entries, restore_type)
      tree = otree.build_tree(self.meta.entries, values, self.where)
      warnings.warn(
          f"{self.path} was written by Orbax, which does not record class types: it loads "
          "as nested dicts and lists. Pass the abstract state (a template) to flax_ckpt.load "
          "to get your classes, dtypes and shardings back.", UnregisteredClassWarning,
          stacklevel=errors.user_stacklevel())
      return tree
    match = otree.match_template(self.meta.entries, template, partial, self.where)
    requests: list[tuple[otree.Entry, leaves.Target]] = []
    slots: list[tuple[int, int | _Boxed]] = []
    subtrees = {}
    for i, (keys, t, e) in enumerate(match.leaves):
      if t is None:
        subtrees[i] = keys
        continue
      assert e is not None
      if e.skip or e.value_type == "string":
        slots.append((i, self._simple_value(e, t)))
        continue
      requests.append((e, _target(t, e, self.where)))
      slots.append((i, len(requests) - 1))
    got = leaves.read_leaves(self.kv(), self.meta.use_zarr3, requests, self.where)
    out: list[Any] = [None] * len(match.leaves)
    for i, v in slots:
      out[i] = v.value if isinstance(v, _Boxed) else got[v]
    for i, keys in subtrees.items():
      under = [e for e in self.meta.entries if e.keys[:len(keys)] == keys]
      if under:
        values = self._read_as_saved(under, restore_type)
        out[i] = otree.build_tree(under, values, self.where, prefix=keys)
    return jax.tree_util.tree_unflatten(match.treedef, out)

  def _simple_value(self, e: otree.Entry, t: Any) -> _Boxed:
    if e.value_type == "string":
      if not isinstance(t, str):
        raise errors.StructureMismatchError(
            f"{self.where}: leaf {e.shown} is a string, the template asks for "
            f"{type(t).__name__}")
      return _Boxed(self.string(e))
    return _Boxed(otree.empty_value(e))

  def _read_as_saved(self, entries: list[otree.Entry],
                     restore_type: type | None) -> dict[tuple[str, ...], Any]:
    values: dict[tuple[str, ...], Any] = {}
    requests = []
    for e in entries:
      if e.skip:
        continue
      if e.value_type == "string":
        values[e.keys] = self.string(e)
        continue
      requests.append((e, _saved_target(e, restore_type, self.where)))
    got = leaves.read_leaves(self.kv(), self.meta.use_zarr3, requests, self.where)
    values.update({e.keys: v for (e, _), v in zip(requests, got)})
    return values


class _Boxed:
  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value


def _saved_target(e: otree.Entry, restore_type: type | None, where: str) -> leaves.Target:
  """How a leaf loads without a template: as Orbax's value_type says."""
  if e.value_type == "scalar":
    return leaves.Target("item", convert=lambda a: a.item())
  if e.value_type not in ("jax.Array", "np.ndarray"):
    raise errors.FormatError(
        f"{where}: leaf {e.shown} was saved by an Orbax TypeHandler for {e.value_type!r}; "
        "flax_ckpt reads Orbax's jax.Array, np.ndarray, scalar and string leaves only")
  if restore_type is np.ndarray or (restore_type is None and e.value_type == "np.ndarray"):
    return leaves.Target.host()
  return leaves.Target("jax", committed=False)


def _target(t: Any, e: otree.Entry, where: str) -> leaves.Target:
  """How a leaf loads into template leaf ``t``."""
  if e.value_type not in ("jax.Array", "np.ndarray", "scalar"):
    raise errors.FormatError(
        f"{where}: leaf {e.shown} was saved by an Orbax TypeHandler for {e.value_type!r}; "
        "flax_ckpt reads Orbax's jax.Array, np.ndarray, scalar and string leaves only")
  if isinstance(t, (jax.ShapeDtypeStruct, jax.Array)):
    sharding = getattr(t, "sharding", None)
    if jnp.issubdtype(t.dtype, jax.dtypes.prng_key):
      return leaves.Target("key", t.dtype, sharding, tuple(t.shape))
    if isinstance(t, jax.Array) and not t.committed:
      sharding = None  # an uncommitted template array comes back uncommitted
    return leaves.Target("jax", np.dtype(t.dtype), sharding, tuple(t.shape),
                         weak=bool(getattr(t, "weak_type", False)))
  if isinstance(t, np.ndarray):
    return leaves.Target.host(t.dtype, tuple(t.shape))
  if isinstance(t, np.generic):
    dt = t.dtype
    return leaves.Target("item", dt, shape=(), convert=lambda a: a.astype(dt)[()])
  if type(t) in (int, float, bool, complex):
    kind = type(t)
    return leaves.Target("item", shape=(), convert=lambda a: kind(a.item()))
  raise errors.UnsupportedLeafError(
      f"{where}: template leaf {e.shown} is a {type(t).__qualname__}; for an Orbax "
      "checkpoint use jax.ShapeDtypeStruct / arrays, numpy arrays, Python scalars, str or "
      "None (as saved)")


# -- items of a step ---------------------------------------------------------------------

def item_kind(backend: storage.StorageBackend, item: str) -> str | None:
  """``pytree``, ``json:<file>``, ``grain`` or None (not an item flax_ckpt reads)."""
  names = [n for n in backend.listdir(item) if n not in _IGNORED]
  if orbax_layout.ORBAX_TREE_METADATA in names:
    return "pytree"
  if any(_GRAIN_FILE.fullmatch(n) for n in names):
    return "grain"
  files = [n for n in names if not backend.is_dir(_where(item, n))]
  if len(files) == 1:
    return "json:" + files[0]
  return None


def step_items(backend: storage.StorageBackend, step: str) -> dict[str, str | None]:
  """``{item name: kind}`` of an Orbax step directory, in name order."""
  out = {}
  for n in sorted(backend.listdir(step)):
    p = _where(step, n)
    if orbax_layout.ORBAX_TMP_TAG in n or not backend.is_dir(p):
      continue
    out[n] = item_kind(backend, p)
  return out


def _handler_of(backend: storage.StorageBackend, step: str, name: str) -> str:
  where = _where(step, orbax_layout.ORBAX_CHECKPOINT_METADATA)
  try:
    handlers = parse_json_object(backend.read_bytes(where), where).get("item_handlers")
  except (FileNotFoundError, errors.FormatError):
    return "an unknown handler"
  h = handlers.get(name) if isinstance(handlers, dict) else None
  return repr(h) if isinstance(h, str) else "an unknown handler"


def _load_item(backend: storage.StorageBackend, step: str, name: str, kind: str | None,
               spec: Any, *, partial: bool, restore_type: type | None) -> Any:
  path = _where(step, name)
  if kind == "pytree":
    return PyTreeItem(backend, path).load(spec, partial=partial, restore_type=restore_type)
  if kind == "grain":
    return _load_grain(backend, path, spec)
  if kind is not None and kind.startswith("json:"):
    where = _where(path, kind[5:])
    return load_json_bytes(backend.read_bytes(where))
  raise errors.FormatError(
      f"{path}: item {name!r} was written by {_handler_of(backend, step, name)}, a kind "
      "flax_ckpt does not read (it reads PyTree items, JSON items and grain iterator "
      "states); load the other items by name with flax_ckpt.load_checkpointables(path, "
      "{name: template})")


def _grain_wants_dict(obj: Any) -> bool:
  """grain's own handler gives a ``DatasetIterator`` the parsed JSON and any other
  iterator (``DataLoaderIterator``) the bytes; decided by class name, never by importing."""
  return any(c.__name__ == "DatasetIterator" for c in type(obj).__mro__) or not any(
      c.__module__.startswith("grain") for c in type(obj).__mro__)


def _load_grain(backend: storage.StorageBackend, path: str, target: Any) -> Any:
  found = {}
  for n in backend.listdir(path):
    m = _GRAIN_FILE.fullmatch(n)
    if m:
      found[(int(m.group(1)), int(m.group(2)))] = n
  me, count = multihost.process_index(), multihost.process_count()
  name = found.get((me, count))
  if name is None:
    raise errors.StructureMismatchError(
        f"{path}: no data-iterator state for process {me} of {count} (saved: "
        f"{sorted(found.values())}); the job must have the process count it was saved with")
  raw = backend.read_bytes(_where(path, name))
  if target is None:
    return load_json_bytes(raw)
  if not is_stateful(target):
    raise TypeError(f"{path}: restore a data-iterator state into an object with "
                    f"set_state(), not a {type(target).__qualname__}")
  state = load_json_bytes(raw) if _grain_wants_dict(target) else raw
  target.set_state(state)
  start = getattr(target, "start_prefetch", None)
  if callable(start):
    start()
  return target


# -- entry points ------------------------------------------------------------------------

def _items_of(backend: storage.StorageBackend, path: str) -> dict[str, str | None]:
  """A single-item path as ``{"default": "pytree"}``; a step as its items."""
  names = set(backend.listdir(path))
  if orbax_layout.ORBAX_TREE_METADATA in names:
    return {SINGLE_ITEM: "pytree"}
  return step_items(backend, path)


def load_items(path: paths.PathLike, abstract: Mapping[str, Any] | None, *, partial: bool,
               restore_type: type | None) -> dict[str, Any]:
  """``load_checkpointables`` of an Orbax checkpoint: ``{item: value}``."""
  final = os.fspath(paths.to_path(path)).rstrip("/")
  backend = storage.backend_for(paths.to_path(path))
  t0 = time.monotonic()
  out = _load_items(backend, final, abstract, partial=partial, restore_type=restore_type)
  log_loaded(f"load of {final} (written by Orbax)", list(out), _nbytes(out),
             time.monotonic() - t0)
  return out


def _nbytes(tree: Any) -> int:
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))


def _load_items(backend: storage.StorageBackend, final: str,
                abstract: Mapping[str, Any] | None, *, partial: bool,
                restore_type: type | None) -> dict[str, Any]:
  items = _items_of(backend, final)
  single = orbax_layout.ORBAX_TREE_METADATA in set(backend.listdir(final))
  names = list(items) if abstract is None else list(abstract)
  unknown = [n for n in names if n not in items]
  if unknown:
    raise errors.StructureMismatchError(
        f"{final} (an Orbax checkpoint) has no item(s) {unknown}; its items: {list(items)}")
  out = {}
  for n in names:
    spec = None if abstract is None else abstract[n]
    if single:
      out[n] = PyTreeItem(backend, final).load(spec, partial=partial,
                                               restore_type=restore_type)
    else:
      out[n] = _load_item(backend, final, n, items[n], spec, partial=partial,
                          restore_type=restore_type)
  return out


def load(path: paths.PathLike, abstract_state: Any, *, partial: bool,
         restore_type: type | None, item: str | None) -> Any:
  """``load`` of an Orbax checkpoint: one PyTree item (``item``, or the only/obvious one).

  A step's item is picked as: ``item`` if given; else ``state``, then ``default``, then the
  only PyTree item.
  """
  final = os.fspath(paths.to_path(path)).rstrip("/")
  backend = storage.backend_for(paths.to_path(path))
  t0 = time.monotonic()
  names = set(backend.listdir(final))
  if orbax_layout.ORBAX_TREE_METADATA in names:
    name = SINGLE_ITEM
    out = PyTreeItem(backend, final).load(abstract_state, partial=partial,
                                          restore_type=restore_type)
  else:
    items = step_items(backend, final)
    name = pick_item(final, items, item)
    out = _load_item(backend, final, name, items[name], abstract_state, partial=partial,
                     restore_type=restore_type)
  log_loaded(f"load of {final} (written by Orbax)", [name], _nbytes(out),
             time.monotonic() - t0)
  return out


def pick_item(where: str, items: Mapping[str, str | None], item: str | None) -> str:
  """The item ``load`` reads from a step with ``items``."""
  if item is not None:
    if item not in items:
      raise errors.StructureMismatchError(
          f"{where} (an Orbax step) has no item {item!r}; its items: {list(items)}")
    return item
  trees = [n for n, k in items.items() if k == "pytree"]
  for n in (DEFAULT_CHECKPOINTABLE, SINGLE_ITEM):
    if n in trees:
      return n
  if len(trees) == 1:
    return trees[0]
  raise errors.StructureMismatchError(
      f"{where} (an Orbax step) holds the PyTree items {trees}: pass checkpointable_name="
      "(or load '<step>/<item>'), or load them all with flax_ckpt.load_checkpointables")
