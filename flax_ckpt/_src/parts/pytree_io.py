"""Saving and loading one PyTree into a checkpointable directory (``<ckpt>/state/``).

Files (see docs/format.md): ``_TREE.json`` (structure + leaf records), ``_CHUNKS.p<i>.json``
(where process i put each array chunk), ``data.p<i>.bin`` (packed array bytes), and
``leaves/<name>/`` for handlers that write their own files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import (
  CHUNKS_PREFIX,
  LEAVES_DIR,
  TREE_FILE,
  TREE_VERSION,
  chunks_file,
  data_file,
  load_json_bytes,
)
from flax_ckpt._src.io import background, paths, storage
from flax_ckpt._src.leaves import builtin_handlers
from flax_ckpt._src.leaves import type_handlers as th
from flax_ckpt._src.tree import treespec


@dataclasses.dataclass
class _SaveIO:
  writer: Any  # storage.DataWriter or storage.KvStoreDataWriter
  process_index: int = 0
  primary_local: frozenset = frozenset()  # leaf ids process 0 writes as process-local


def _leaf_dirnames(names: list[str]) -> list[str]:
  """Distinct, filesystem-safe directory names for leaves (deterministic: load recomputes)."""
  out, seen = [], set()
  for i, n in enumerate(names):
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", n).strip("_.")[:120] or f"leaf{i}"
    s, k = base, 0
    while s in seen:
      k += 1
      s = f"{base}.{k}"
    seen.add(s)
    out.append(s)
  return out


@dataclasses.dataclass
class SavePlan:
  root: dict
  leaves: list
  handlers: list


def _note(e: BaseException, doing: str, handler: Any, keypaths: list) -> None:
  """Adds the leaf paths a failing handler was working on to its exception (type kept)."""
  if th.is_builtin(handler) or not hasattr(e, "add_note"):
    return
  names = [treespec.path_str(p) for p in keypaths[:10]]
  more = f" and {len(keypaths) - 10} more" if len(keypaths) > 10 else ""
  e.add_note(f"flax_ckpt: TypeHandler {handler!r} failed while {doing} leaves "
             f"{', '.join(names)}{more}.")


def plan_save(tree: Any) -> SavePlan:
  """Walks and validates ``tree`` (raises UnsupportedLeafError before anything is written)."""
  treespec.forget_misses()
  return SavePlan(*treespec.encode(tree, th.handler_for_value))


def local_array_ids(plan: SavePlan) -> list[int]:
  """Leaves that are jax arrays held entirely by this process (written by process 0)."""
  return [i for i, (_, v) in enumerate(plan.leaves)
          if isinstance(v, jax.Array) and v.is_fully_addressable]


def prepare_save(cp_dir: epath.Path, plan: SavePlan, *, is_async: bool,
                 process_index: int = 0,
                 primary_local: frozenset = frozenset()) -> Callable[[bool], None]:
  """Snapshots the planned tree and returns ``finish(fsync)`` that writes it.

  Everything that reads the caller's values happens before this returns; ``finish`` only
  touches snapshots. Each process writes its own data file and chunk index; only process 0
  writes the tree metadata and runs custom handlers (which write per-leaf files).
  """
  root, leaves, handlers = plan.root, plan.leaves, plan.handlers
  primary = process_index == 0
  os.makedirs(cp_dir, exist_ok=True)
  ts_ctx = th._LazyTsContext()
  io = _SaveIO(storage.backend_for(cp_dir).open_writer(os.path.join(
      cp_dir, data_file(process_index)), direct=is_async),
      process_index, primary_local)
  naming = th.LeafNaming([p for p, _ in leaves], treespec.path_str, _leaf_dirnames)
  leaves_dir = cp_dir / LEAVES_DIR
  if primary and any(not th.is_builtin(h) for h in handlers):
    os.makedirs(leaves_dir, exist_ok=True)
  infos = [
      th.ParamInfo(keypath=leaves[i][0], parent_dir=cp_dir, is_async=is_async,
                   _index=i, _naming=naming, _ts_context=ts_ctx, _io=io)
      for i in range(len(leaves))
  ]
  groups: dict[int, tuple[Any, list[int]]] = {}
  for i, h in enumerate(handlers):
    if primary or th.is_builtin(h):
      groups.setdefault(id(h), (h, []))[1].append(i)

  async def serialize_all():
    futs = []
    for h, idx in groups.values():
      try:
        r = await h.serialize([leaves[i][1] for i in idx], [infos[i] for i in idx], None)
      except Exception as e:
        _note(e, "saving", h, [leaves[i][0] for i in idx])
        raise
      futs.extend(r or [])
    return futs

  try:
    futures = background.run_coro(serialize_all())
  except BaseException:
    io.writer.close()
    raise
  typestrs = [h.typestr() for h in handlers]

  def finish(fsync: bool) -> None:
    try:
      background.wait_futures(futures)
    except BaseException:
      io.writer.close()
      raise
    for info in infos:
      info._io = None  # release the snapshot buffers held by chunk bookkeeping
    chunks = {str(i): info.chunks for i, info in enumerate(infos) if info.chunks}
    paths.write_json(cp_dir / chunks_file(process_index),
                     {"process_index": process_index,
                      "data_file": data_file(process_index),
                      "chunks": chunks}, fsync=fsync)
    if not primary:
      io.writer.write(fsync=fsync)
      if fsync:
        paths.fsync_path(cp_dir)  # this process's directory entries, before the barrier
      return
    records = [
        {"path": [list(e) for e in leaves[i][0]], "typestr": typestrs[i],
         "record": infos[i].record}
        for i in range(len(leaves))
    ]
    paths.write_json(cp_dir / TREE_FILE,
                     {"version": TREE_VERSION, "root": root, "leaves": records}, fsync=fsync)
    io.writer.write(fsync=fsync)  # data was streaming out meanwhile; wait for it here
    if fsync:
      if os.path.isdir(leaves_dir):  # files written by custom handlers
        paths.fsync_tree(leaves_dir)
      paths.fsync_path(cp_dir)

  def abort() -> None:
    """Stops background writes of a save that will not be finished."""
    try:
      io.writer.close()
    except Exception:  # noqa: BLE001,S110 - already failing; stopping is all that matters
      pass

  finish.abort = abort  # type: ignore[attr-defined]
  return finish


@dataclasses.dataclass
class _SavedTree:
  cp_dir: epath.Path
  root: dict
  leaves: list[dict]
  chunks: dict[int, list[dict]]
  files: storage.CheckpointFiles | None = None

  def close(self) -> None:
    if self.files is not None:
      self.files.close()



def read_saved_tree(cp_dir: epath.Path) -> _SavedTree:
  """Reads the tree and chunk indexes; the data files stay reachable through ``files``."""
  try:
    files = storage.CheckpointFiles(os.fspath(cp_dir))
  except FileNotFoundError as e:
    raise errors.CheckpointReplacedError(f"{cp_dir} disappeared while loading") from e
  try:
    try:
      tree = load_json_bytes(files.read_bytes(TREE_FILE))
    except FileNotFoundError as e:
      raise errors.FormatError(
          f"{cp_dir} has no {TREE_FILE}; the checkpoint is damaged.") from e
    if tree.get("version") != TREE_VERSION:
      raise errors.FormatError(
          f"{cp_dir / TREE_FILE}: tree format version {tree.get('version')} is not supported "
          f"by this flax_ckpt (knows {TREE_VERSION}); upgrade flax_ckpt.")
    chunks: dict[int, list[dict]] = {}
    for name in sorted(files.listdir()):
      if name.startswith(CHUNKS_PREFIX) and name.endswith(".json"):
        data = load_json_bytes(files.read_bytes(name))
        for k, v in data["chunks"].items():
          chunks.setdefault(int(k), []).extend(v)
  except BaseException as e:
    gone = isinstance(e, (FileNotFoundError, errors.FormatError)) and files.is_gone()
    files.close()
    if gone:
      raise errors.CheckpointReplacedError(f"{cp_dir} was replaced while loading") from e
    raise
  if files.is_gone():  # replaced while we listed: the index may be incomplete
    files.close()
    raise errors.CheckpointReplacedError(f"{cp_dir} was replaced while loading")
  return _SavedTree(cp_dir, tree["root"], tree["leaves"], chunks, files)


def _infos_for(saved: _SavedTree, ids: list[int]) -> list[th.ParamInfo]:
  naming = th.LeafNaming([leaf["path"] for leaf in saved.leaves], treespec.path_str,
                         _leaf_dirnames)
  ctx = th._LazyTsContext()
  out = []
  for i in ids:
    leaf = saved.leaves[i]
    out.append(th.ParamInfo(
        keypath=leaf["path"], parent_dir=saved.cp_dir, record=leaf["record"],
        chunks=saved.chunks.get(i, []), _index=i, _naming=naming, _ts_context=ctx,
        _files=saved.files))
  return out


def _handlers_for(saved: _SavedTree, ids: list[int]) -> list[Any]:
  out, missing = [], []
  for i in ids:
    ts_ = saved.leaves[i]["typestr"]
    h = th.handler_for_typestr(ts_)
    if h is None:
      missing.append(f"{treespec.path_str(saved.leaves[i]['path'])} (typestr {ts_!r})")
    out.append(h)
  if missing:
    raise errors.CheckpointError(
        "these leaves were saved by TypeHandlers that are not registered in this process: "
        + ", ".join(missing)
        + ". Register a handler whose typestr() matches with flax_ckpt.register_type_handler "
        "before loading.")
  return out


def _run_grouped(method: str, saved: _SavedTree, ids: list[int],
                 args: list[th.RestoreArgs] | None) -> list[Any]:
  handlers = _handlers_for(saved, ids)
  infos = _infos_for(saved, ids)
  groups: dict[int, tuple[Any, list[int]]] = {}
  for j, h in enumerate(handlers):
    groups.setdefault(id(h), (h, []))[1].append(j)

  async def run_all():
    out: list[Any] = [None] * len(ids)
    for h, js in groups.values():
      sub_infos = [infos[j] for j in js]
      try:
        if method == "metadata":
          vals = await h.metadata(sub_infos)
        else:
          vals = await h.deserialize(sub_infos, [args[j] for j in js] if args else None)
      except Exception as e:
        _note(e, "loading", h, [saved.leaves[ids[j]]["path"] for j in js])
        raise
      vals = list(vals)
      if len(vals) != len(js):
        raise errors.CheckpointError(
            f"TypeHandler {h!r}.{method} returned {len(vals)} values for {len(js)} leaves")
      for j, v in zip(js, vals):
        out[j] = v
    return out

  return background.run_coro(run_all())



def _args_from_template(t: Any) -> th.RestoreArgs:
  if t is None:
    return th.RestoreArgs()
  if isinstance(t, (jax.ShapeDtypeStruct, jax.Array)):
    is_key = jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key)
    sharding = getattr(t, "sharding", None)
    if isinstance(t, jax.Array) and not getattr(t, "committed", True):
      # An uncommitted template array (made without a device or sharding, e.g. a fresh
      # ``nnx.Rngs`` key) comes back uncommitted too, so jit may still move it next to
      # sharded operands as it could move the template.
      sharding = None
    return th.RestoreArgs(restore_type=jax.Array, dtype=None if is_key else np.dtype(t.dtype),
                          sharding=sharding, shape=tuple(t.shape),
                          weak_type=bool(getattr(t, "weak_type", False)))
  if isinstance(t, np.ndarray):
    return th.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype, shape=tuple(t.shape))
  if isinstance(t, np.generic):
    return th.RestoreArgs(restore_type=np.generic, dtype=t.dtype, shape=())
  if type(t) in (int, float, bool, complex):
    return th.RestoreArgs(restore_type=type(t), shape=())
  return th.RestoreArgs()


_NUMERIC = {"jax.Array", "np.ndarray", "np.generic", "int", "float", "bool", "complex"}


def _kind_conflict(t: Any, typestr: str, impl: str | None = None) -> str | None:
  """Why template leaf ``t`` cannot receive a leaf saved as ``typestr`` (None if it can)."""
  if t is None:
    return None
  if isinstance(t, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)):
    if jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
      if typestr == "jax.PRNGKey" and (impl is None or
                                       builtin_handlers.key_dtype(impl) == t.dtype):
        return None
      want = f"a typed PRNG key of {t.dtype}" + (f" (saved: key<{impl}>)" if impl else "")
    else:
      if typestr in _NUMERIC:
        return None
      want = f"an array of {t.dtype}"
  elif type(t) in (int, float, bool, complex):
    if typestr in _NUMERIC:
      return None
    want = f"a Python {type(t).__name__}"
  elif type(t) in (str, bytes):
    if typestr == type(t).__name__:
      return None
    want = f"a {type(t).__name__}"
  else:
    return None
  return (f"the checkpoint holds a {typestr} leaf, the template asks for {want} (use None "
          "in the template to load it as saved)")


def _saved_shape(leaf: dict) -> tuple[int, ...] | None:
  rec = leaf["record"]
  if "key_shape" in rec:
    return tuple(rec["key_shape"])
  if "shape" in rec:
    return tuple(rec["shape"])
  if leaf["typestr"] in ("int", "float", "bool", "complex", "np.generic"):
    return ()
  return None


def _host_as(v: Any, dtype: Any) -> np.ndarray:
  """``v`` as a numpy array of ``dtype`` with ``astype`` semantics (ints wrap)."""
  host = np.asarray(v)
  return host if dtype is None or host.dtype == dtype else host.astype(dtype)


def _conform(v: Any, a: th.RestoreArgs) -> Any:
  """Converts a loaded scalar/array to the template leaf's type when they differ."""
  rt = a.restore_type
  if rt is None:
    return v
  if rt is jax.Array and not isinstance(v, jax.Array):
    host = _host_as(v, a.dtype)
    return jax.device_put(host, a.sharding) if a.sharding is not None else jax.device_put(host)
  if rt is np.ndarray and not isinstance(v, np.ndarray):
    return _host_as(v, a.dtype)
  if rt is np.generic and not isinstance(v, np.generic):
    return _host_as(v, a.dtype)[()]
  if rt in (int, float, bool, complex) and type(v) is not rt:
    return rt(np.asarray(v).item())
  return v


def _as_saved_args(saved: _SavedTree, ids: list[int],
                   restore_type: Any) -> list[th.RestoreArgs] | None:
  """Args for leaves loaded without a template leaf: as saved, or arrays as ``restore_type``."""
  if restore_type is None:
    return None
  return [th.RestoreArgs(restore_type=restore_type)
          if saved.leaves[i]["typestr"] in ("jax.Array", "np.ndarray") else th.RestoreArgs()
          for i in ids]


def load(cp_dir: epath.Path, abstract: Any, *, partial: bool,
         restore_type: Any = None) -> Any:
  saved = read_saved_tree(cp_dir)
  treespec.forget_misses()
  try:
    return _load(saved, cp_dir, abstract, partial=partial, restore_type=restore_type)
  except (FileNotFoundError, errors.FormatError) as e:
    if saved.files is not None and saved.files.is_gone():  # replaced by an overwrite
      raise errors.CheckpointReplacedError(f"{cp_dir} was replaced while loading ({e})") from e
    if isinstance(e, errors.FormatError):
      raise
    raise FileNotFoundError(
        e.errno, f"{cp_dir}: a data file of this checkpoint is missing ({e.filename}); the "
        "checkpoint is damaged, load an earlier one.", e.filename) from e
  finally:
    saved.close()


def _load(saved: _SavedTree, cp_dir: epath.Path, abstract: Any, *, partial: bool,
          restore_type: Any) -> Any:
  if abstract is None:
    ids = list(range(len(saved.leaves)))
    values = _run_grouped("deserialize", saved, ids, _as_saved_args(saved, ids, restore_type))
    return treespec.decode(saved.root, values, warned=set())

  # JAX already treats arrays, ShapeDtypeStructs and unregistered classes as leaves; also
  # stop at None and at user types with a TypeHandler that happen to be PyTree nodes.
  custom = th.custom_types()
  abstract = treespec.expand_plain_dataclasses(abstract)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: x is None or (bool(custom) and type(x) in custom))
  by_key = {treespec.match_key(leaf["path"]): i for i, leaf in enumerate(saved.leaves)}
  ids, missing, problems = [], [], []
  subtrees: dict[int, tuple[dict, list[int]]] = {}  # position in flat -> (node, leaf ids)
  for pos, (kp, t) in enumerate(flat):
    path = treespec.path_from_jax(kp)
    i = by_key.get(treespec.match_key(path))
    if i is None and t is None:  # None stands for a whole saved subtree: load it as saved
      node = treespec.find_node(saved.root, path)
      if node is not None and node["t"] != "leaf":
        subtrees[pos] = (node, treespec.leaf_ids(node))
        ids.append(-1)
        continue
    if i is None:
      missing.append(treespec.path_str(path))
      continue
    ids.append(i)
  extra = []
  if not partial:
    used = set(ids).union(*(set(sub[1]) for sub in subtrees.values()))
    extra = [treespec.path_str(leaf["path"]) for i, leaf in enumerate(saved.leaves)
             if i not in used]
  if missing or extra:
    msg = ["the template does not match the checkpoint at " + os.fspath(cp_dir) + ":"]
    if missing:
      msg.append(f"  in the template but not in the checkpoint: {', '.join(missing)}")
    if extra:
      msg.append(f"  in the checkpoint but not in the template: {', '.join(extra)} "
                 "(pass partial=True to load only the template's leaves)")
    raise errors.StructureMismatchError("\n".join(msg))
  args = [_args_from_template(t) for _, t in flat]
  if restore_type is not None:  # None template leaves: arrays as restore_type
    for j, ((_, t), i) in enumerate(zip(flat, ids)):
      if t is None and i >= 0:
        args[j] = _as_saved_args(saved, [i], restore_type)[0]
  for i, (_, t) in zip(ids, flat):
    if i < 0:
      continue
    why = _kind_conflict(t, saved.leaves[i]["typestr"], saved.leaves[i]["record"].get("impl"))
    if why:
      problems.append(f"{treespec.path_str(saved.leaves[i]['path'])}: {why}")
  for i, a in zip(ids, args):
    if i < 0:
      continue
    s = _saved_shape(saved.leaves[i])
    if a.shape is not None and s is not None and tuple(a.shape) != s:
      problems.append(f"{treespec.path_str(saved.leaves[i]['path'])}: checkpoint shape {s}, "
                      f"template shape {tuple(a.shape)}")
  if problems:
    raise errors.StructureMismatchError(
        "the template does not fit the checkpoint's leaves (fix the template, or load "
        "without one / call flax_ckpt.metadata to see what was saved):\n  "
        + "\n  ".join(problems))
  read_ids = [i for i in ids if i >= 0]
  read_args = [a for i, a in zip(ids, args) if i >= 0]
  sub_ids = sorted(set().union(*(set(sub[1]) for sub in subtrees.values())))
  got = _run_grouped("deserialize", saved, read_ids + sub_ids,
                     read_args + (_as_saved_args(saved, sub_ids, restore_type)
                                  or [th.RestoreArgs()] * len(sub_ids)))
  by_id = dict(zip(sub_ids, got[len(read_ids):]))
  def conform(v: Any, a: th.RestoreArgs, i: int) -> Any:
    try:
      return _conform(v, a)
    except (TypeError, ValueError, OverflowError) as e:
      raise errors.StructureMismatchError(
          f"{treespec.path_str(saved.leaves[i]['path'])}: cannot convert the saved value to "
          f"the template's type ({type(e).__name__}: {e}); fix the template leaf or use None "
          "to load it as saved.") from e

  loaded = iter(conform(v, a, i) for v, a, i in zip(got[:len(read_ids)], read_args,
                                                      read_ids))
  warned: set[str] = set()
  values = [treespec.decode(subtrees[pos][0], by_id, warned) if i < 0 else next(loaded)
            for pos, i in enumerate(ids)]
  return treespec.collapse_plain_dataclasses(jax.tree_util.tree_unflatten(treedef, values))


def metadata_tree(cp_dir: epath.Path) -> Any:
  saved = read_saved_tree(cp_dir)
  treespec.forget_misses()
  saved.close()  # metadata reads no data file
  ids = list(range(len(saved.leaves)))
  handlers = [th.handler_for_typestr(saved.leaves[i]["typestr"]) for i in ids]
  known = [i for i in ids if handlers[i] is not None]
  vals: list[Any] = [None] * len(ids)
  for i, v in zip(known, _run_grouped("metadata", saved, known, None)):
    vals[i] = v
  infos = _infos_for(saved, ids)
  for i in ids:
    if handlers[i] is None:
      vals[i] = th.Metadata(name=infos[i].name, directory=infos[i].path)
  return treespec.decode(saved.root, vals, warned=None)


def remove_quietly(p: Any) -> None:
  shutil.rmtree(os.fspath(p), ignore_errors=True)
