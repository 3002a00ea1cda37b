"""Saving and loading one PyTree into a checkpointable directory (``<ckpt>/state/``).

Files (see docs/format.md): ``_TREE.json`` (structure + leaf records), ``_CHUNKS.p<i>.json``
(where process i put each array chunk), ``data.p<i>.bin`` (packed array bytes), and
``leaves/<name>/`` for handlers that write their own files.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import (
  CHECKSUM_ALGORITHM,
  DATA_FILE_PREFIX,
  LEAVES_DIR,
  TREE_FILE,
  TREE_VERSION,
  ChunkRecord,
  ChunksFile,
  LeafRecord,
  chunks_file,
  data_file,
  dump_json_bytes,
)
from flax_ckpt._src.io import background, gc_pause, storage
from flax_ckpt._src.leaves import array_writes, registry, reuse
from flax_ckpt._src.leaves import type_handlers as th
from flax_ckpt._src.parts import index_checks, save_cache
from flax_ckpt._src.parts.pytree_template import LoadPlan, as_saved_args, conform, match_template
from flax_ckpt._src.tree import class_registry, plain_dataclasses, treespec


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


def _naming(keypaths: list) -> th.LeafNaming:
  return th.LeafNaming(keypaths, treespec.path_str, _leaf_dirnames)


@dataclasses.dataclass
class SavePlan:
  root: dict
  leaves: list
  handlers: list


def _note(e: BaseException, doing: str, handler: Any, keypaths: list) -> None:
  """Adds the leaf paths a failing handler was working on to its exception (type kept)."""
  if registry.is_builtin(handler) or not hasattr(e, "add_note"):
    return
  names = [treespec.path_str(p) for p in keypaths[:10]]
  more = f" and {len(keypaths) - 10} more" if len(keypaths) > 10 else ""
  e.add_note(  # pyright: ignore[reportAttributeAccessIssue]  # Python >= 3.11, hasattr-checked
      f"flax_ckpt: TypeHandler {handler!r} failed while {doing} leaves "
      f"{', '.join(names)}{more}.")


def plan_save(tree: Any) -> SavePlan:
  """Walks and validates ``tree`` (raises UnsupportedLeafError before anything is written)."""
  class_registry.forget_misses()
  return SavePlan(*treespec.encode(tree, registry.handler_for_value))


def local_array_ids(plan: SavePlan) -> list[int]:
  """Leaves that are jax arrays held entirely by this process (written by process 0)."""
  return [i for i, (_, v) in enumerate(plan.leaves)
          if isinstance(v, jax.Array) and v.is_fully_addressable]


def prepare_save(cp_dir: epath.Path, plan: SavePlan, *, is_async: bool,
                 process_index: int = 0, primary_local: frozenset = frozenset(),
                 previous: reuse.PreviousChunks | None = None,
                 structure_cache: bool = False) -> TreeWrite:
  """Snapshots the planned tree and returns the :class:`TreeWrite` that writes it.

  Everything that reads the caller's values happens before this returns; ``finish`` only
  touches snapshots. Each process writes its own data file and chunk index; only process 0
  writes the tree metadata and runs custom handlers (which write per-leaf files).
  ``previous``: the same part of an earlier checkpoint, whose chunks are referred to
  instead of written again where the bytes are equal (:mod:`~flax_ckpt._src.leaves.reuse`).
  ``structure_cache``: a single-process save may reuse the planning of an earlier save of
  the same structure (:mod:`~flax_ckpt._src.parts.save_cache`).
  """
  backend = storage.backend_for(cp_dir)
  backend.makedirs(os.fspath(cp_dir))
  ctx = th.SaveContext(
      parent_dir=cp_dir, backend=backend, naming=_naming([p for p, _ in plan.leaves]),
      writer=backend.open_writer(os.path.join(cp_dir, data_file(process_index)),
                                 direct=is_async),
      process_index=process_index, primary_local=primary_local,
      reuse=None if previous is None else reuse.ChunkReuse(
          previous, os.fspath(cp_dir), process_index, backend, background=is_async))
  key = (save_cache.key_for(plan.root, plan.leaves, plan.handlers)
         if structure_cache else None)
  entry = save_cache.lookup(key) if key is not None else None
  if entry is not None:  # records and files planned by an earlier save: only the bytes
    return _write_known(plan, ctx, is_async, key, entry)
  primary = process_index == 0
  if primary and any(not registry.is_builtin(h) for h in plan.handlers):
    backend.makedirs(os.fspath(cp_dir / LEAVES_DIR))
  infos = [th.ParamInfo(keypath=plan.leaves[i][0], parent_dir=cp_dir, is_async=is_async,
                        index=i, context=ctx)
           for i in range(len(plan.leaves))]
  try:
    futures = background.run_coro(_serialize_all(plan, infos, primary))
  except BaseException:
    ctx.writer.close()
    raise
  return TreeWrite(plan, ctx, infos, futures, key=key)


def _write_known(plan: SavePlan, ctx: th.SaveContext, is_async: bool,
                 key: save_cache.Key | None, entry: save_cache.Entry) -> TreeWrite:
  """A save of a structure saved before: only the leaves' bytes go to the writer (or,
  where unchanged since the previous checkpoint, a reference to them)."""
  groups: dict[int, list[int]] = {}  # in the order _serialize_all writes them
  for i, h in enumerate(plan.handlers):
    groups.setdefault(id(h), []).append(i)
  leaves = [(i, *plan.leaves[i]) for ids in groups.values() for i in ids]
  try:
    if ctx.reuse is not None:
      records = array_writes.write_known_leaves_reusing(
          leaves, ctx.writer, ctx.reuse, ctx.process_index, is_async, treespec.path_str)
      return TreeWrite(plan, ctx, [], [], key=key, cached=(entry, None), records=records)
    known = array_writes.write_known_leaves(leaves, ctx.writer, is_async, treespec.path_str)
  except BaseException:
    ctx.writer.close()
    raise
  if len(groups) > 1:
    known.sort(key=lambda c: c[0])  # the index lists them by leaf
  return TreeWrite(plan, ctx, [], [], key=key, cached=(entry, known))


async def _serialize_all(plan: SavePlan, infos: list[th.ParamInfo], primary: bool) -> list:
  """Runs each handler once on its leaves (custom handlers on process 0 only)."""
  groups: dict[int, tuple[Any, list[int]]] = {}
  for i, h in enumerate(plan.handlers):
    if primary or registry.is_builtin(h):
      groups.setdefault(id(h), (h, []))[1].append(i)
  futs = []
  for h, idx in groups.values():
    try:
      r = await h.serialize([plan.leaves[i][1] for i in idx], [infos[i] for i in idx], None)
    except Exception as e:
      _note(e, "saving", h, [plan.leaves[i][0] for i in idx])
      raise
    futs.extend(r or [])
  return futs


def _add_checksums(chunks: dict[str, list[ChunkRecord]],
                   sums: dict[int, tuple[int, list[str]]]) -> None:
  """Records each chunk's block checksums (``x``, and ``xb`` for several blocks)."""
  for records in chunks.values():
    for c in records:
      if not c["n"] or "f" in c:
        continue  # nothing to check (a custom handler's empty chunk), or reused: has its own
      xb, digests = sums[c["o"]]
      c["x"] = digests
      if len(digests) > 1:
        c["xb"] = xb


def _chunk_records(known: list[tuple], process_index: int) -> dict[str, list[ChunkRecord]]:
  """``{leaf id: chunk records}`` of chunks written without records (a cached save)."""
  out: dict[str, list[ChunkRecord]] = {}
  for i, start, shape, off, n in known:
    out.setdefault(str(i), []).append(
        {"s": list(start), "h": list(shape), "o": off, "n": n, "p": process_index})
  return out


class TreeWrite:
  """The writing half of a tree save: :meth:`finish` (``fsync``) or :meth:`abort`.

  It keeps the structure and key paths, not the caller's values: what is written lives in
  the writer's snapshot, so a background save does not hold the caller's arrays alive.
  """

  def __init__(self, plan: SavePlan, ctx: th.SaveContext, infos: list[th.ParamInfo],
               futures: list, *, key: save_cache.Key | None = None,
               cached: tuple[save_cache.Entry, list[tuple] | None] | None = None,
               records: dict[str, list[ChunkRecord]] | None = None):
    self._root = plan.root
    self._keypaths = [keypath for keypath, _ in plan.leaves]
    self._handlers = plan.handlers
    self._ctx = ctx
    self._infos = infos
    self._futures = futures
    # key: this save's structure, when it may be cached; cached: the entry of an earlier
    # save of that structure and the (leaf, start, shape, offset, nbytes) chunks written,
    # or None with ``records``: a hit that reuses unchanged bytes, whose chunk records
    # (by leaf id) refer to them
    self._key, self._cached, self._records = key, cached, records
    self._template: tuple[list, list[bytes]] | None = None  # a miss's, for its entry

  def finish(self, fsync: bool) -> None:
    """Waits for the handlers, then writes the chunk index, tree and data file."""
    ctx, cp_dir = self._ctx, self._ctx.parent_dir
    try:
      background.wait_futures(self._futures)
      if ctx.reuse is not None:
        ctx.reuse.settle(ctx.writer)
    except BaseException:
      ctx.writer.close()
      raise
    # the per-leaf bookkeeping, not the waits for the data (io/gc_pause.py: an async save's
    # commit thread must not keep the training loop's collector off for the whole write)
    with gc_pause.paused():
      data = self._index_bytes()
    ctx.backend.write_bytes(os.fspath(cp_dir / chunks_file(ctx.process_index)), data,
                            fsync=fsync)
    if ctx.process_index != 0:
      ctx.writer.write(fsync=fsync)
      if fsync:
        ctx.backend.sync_dir(os.fspath(cp_dir))  # this process's entries, before the barrier
      return
    self._write_tree(fsync)
    ctx.writer.write(fsync=fsync)  # data was streaming out meanwhile; wait for it here
    if fsync:
      ctx.backend.sync_tree(os.fspath(cp_dir / LEAVES_DIR))  # files of custom handlers
      ctx.backend.sync_dir(os.fspath(cp_dir))

  def _index_bytes(self) -> bytes:
    """The chunk index (``_CHUNKS.p<i>.json``), with every chunk's checksums."""
    ctx = self._ctx
    sums = ctx.writer.checksums()
    segment_bytes = getattr(ctx.writer, "segment_bytes", None)
    if self._records is not None:  # a hit that reuses bytes: records made per chunk
      chunks = self._records
    elif self._cached is not None:
      entry, known = self._cached
      assert known is not None  # set whenever records are not
      at = [(c[3], c[4]) for c in known]
      if (entry.pieces is not None and at == entry.chunks
          and segment_bytes == entry.segment_bytes):
        return save_cache.fill(entry.pieces, at, sums)
      save_cache.STATS.full_index += 1
      chunks = _chunk_records(known, ctx.process_index)  # not where planned: in full
    else:
      chunks = {str(i): info.chunks for i, info in enumerate(self._infos) if info.chunks}
    index: ChunksFile = {"process_index": ctx.process_index,
                         "data_file": data_file(ctx.process_index), "chunks": chunks,
                         "checksum": CHECKSUM_ALGORITHM}
    if self._key is not None and self._cached is None and ctx.reuse is None:
      # a miss: dumped as the template (not with reuse: its records refer to old files)
      at = [(c["o"], c["n"]) for records in chunks.values() for c in records]
      marks = (c for records in chunks.values() for c in records if c["n"])
      for k, c in enumerate(marks):
        c["x"] = save_cache.mark(k)
    else:
      at = None
      _add_checksums(chunks, sums)
      if ctx.reuse is not None:
        ctx.reuse.remember()
    if segment_bytes:  # object stores: the data file is stored as segments
      index["segment_bytes"] = segment_bytes
    data = dump_json_bytes(index)
    if at is None:
      return data
    pieces = save_cache.split(data)
    self._template = (at, pieces)
    return save_cache.fill(pieces, at, sums)

  def _write_tree(self, fsync: bool) -> None:
    if self._cached is not None:
      data = self._cached[0].tree_bytes
    else:
      with gc_pause.paused():  # a dict per leaf, then one big dump
        records = [
            {"path": [list(e) for e in keypath], "typestr": h.typestr(), "record": info.record}
            for keypath, h, info in zip(self._keypaths, self._handlers, self._infos)
        ]
        data = dump_json_bytes({"version": TREE_VERSION, "root": self._root,
                                "leaves": records})
        del records
    self._ctx.backend.write_bytes(os.fspath(self._ctx.parent_dir / TREE_FILE), data,
                                  fsync=fsync)
    if self._key is not None and self._cached is None:  # a miss: the next save's entry
      at, pieces = self._template if self._template is not None else (None, None)
      save_cache.remember(save_cache.Entry(
          self._key, data, at, pieces,
          segment_bytes=getattr(self._ctx.writer, "segment_bytes", None)))

  def abort(self) -> None:
    """Stops background writes of a save that will not be finished."""
    try:
      self._ctx.writer.close()
    except Exception:  # noqa: BLE001,S110 - already failing; stopping is all that matters
      pass


@dataclasses.dataclass
class _SavedTree:
  cp_dir: epath.Path
  root: dict
  leaves: list[LeafRecord]
  chunks: dict[int, list[ChunkRecord]]
  files: storage.CheckpointDir | None = None
  backend: storage.StorageBackend | None = None
  segments: dict[int, int] = dataclasses.field(default_factory=dict)

  def close(self) -> None:
    if self.files is not None:
      self.files.close()


_PREFETCH_BYTES = 64 << 20


def read_saved_tree(cp_dir: epath.Path) -> _SavedTree:
  """Reads the tree and chunk indexes; the data files stay reachable through ``files``."""
  backend = storage.backend_for(cp_dir)
  try:
    files = backend.open_dir(os.fspath(cp_dir))
  except FileNotFoundError as e:
    raise errors.CheckpointReplacedError(f"{cp_dir} disappeared while loading") from e
  # the disk starts on the data while the metadata is parsed and checked (5,000 leaves:
  # ~50 ms); a partial load may not need these bytes, hence the cap
  files.prefetch(DATA_FILE_PREFIX, _PREFETCH_BYTES)
  try:
    tree = index_checks.read_tree(files, cp_dir)
    chunks, segments = index_checks.read_chunk_index(files, cp_dir, len(tree["leaves"]))
  except BaseException as e:
    gone = isinstance(e, (FileNotFoundError, errors.FormatError)) and files.is_gone()
    files.close()
    if gone:
      raise errors.CheckpointReplacedError(f"{cp_dir} was replaced while loading") from e
    raise
  if files.is_gone():  # replaced while we listed: the index may be incomplete
    files.close()
    raise errors.CheckpointReplacedError(f"{cp_dir} was replaced while loading")
  return _SavedTree(cp_dir, tree["root"], tree["leaves"], chunks, files, backend, segments)


def _infos_for(saved: _SavedTree, ids: list[int]) -> list[th.ParamInfo]:
  ctx = th.LoadContext(parent_dir=saved.cp_dir, backend=saved.backend, files=saved.files,
                       naming=_naming([leaf["path"] for leaf in saved.leaves]),
                       segments=saved.segments, verify=storage.verifying())
  out = []
  for i in ids:
    leaf = saved.leaves[i]
    out.append(th.ParamInfo(
        # the same (kind, key) tuples a save gives handlers (JSON holds them as lists)
        keypath=tuple(map(tuple, leaf["path"])), parent_dir=saved.cp_dir,
        record=leaf["record"],
        chunks=saved.chunks.get(i, []), index=i, context=ctx))
  return out


def _handlers_for(saved: _SavedTree, ids: list[int]) -> list[Any]:
  out, missing = [], []
  for i in ids:
    ts_ = saved.leaves[i]["typestr"]
    h = registry.handler_for_typestr(ts_)
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


def load(cp_dir: epath.Path, abstract: Any, *, partial: bool,
         restore_type: Any = None) -> Any:
  saved = read_saved_tree(cp_dir)
  class_registry.forget_misses()
  try:
    return _load(saved, cp_dir, abstract, partial=partial, restore_type=restore_type)
  except (FileNotFoundError, errors.FormatError) as e:
    if saved.files is not None and saved.files.is_gone():  # replaced by an overwrite
      raise errors.CheckpointReplacedError(f"{cp_dir} was replaced while loading ({e})") from e
    if isinstance(e, errors.FormatError):
      raise
    raise errors.MissingDataError(
        f"a data file of this checkpoint is missing ({e.filename}); load an earlier one",
        file=os.fspath(e.filename or cp_dir)) from e
  finally:
    saved.close()


def _load(saved: _SavedTree, cp_dir: epath.Path, abstract: Any, *, partial: bool,
          restore_type: Any) -> Any:
  if abstract is None:
    ids = list(range(len(saved.leaves)))
    values = _run_grouped("deserialize", saved, ids, as_saved_args(saved, ids, restore_type))
    return treespec.decode(saved.root, values, warned=set())
  plan = match_template(saved, abstract, partial, restore_type)
  return _read(saved, plan, restore_type)


def _read(saved: _SavedTree, plan: LoadPlan, restore_type: Any) -> Any:
  """Reads the matched leaves (and whole subtrees) and rebuilds the template's structure."""
  ids = plan.ids
  read_ids = [i for i in ids if i >= 0]
  read_args = [a for i, a in zip(ids, plan.args) if i >= 0]
  sub_ids = sorted(set().union(*(set(sub[1]) for sub in plan.subtrees.values())))
  got = _run_grouped("deserialize", saved, read_ids + sub_ids,
                     read_args + (as_saved_args(saved, sub_ids, restore_type)
                                  or [th.RestoreArgs()] * len(sub_ids)))
  by_id = dict(zip(sub_ids, got[len(read_ids):]))

  def conformed(v: Any, a: th.RestoreArgs, i: int) -> Any:
    try:
      return conform(v, a)
    except (TypeError, ValueError, OverflowError) as e:
      raise errors.StructureMismatchError(
          f"{treespec.path_str(saved.leaves[i]['path'])}: cannot convert the saved value to "
          f"the template's type ({type(e).__name__}: {e}); fix the template leaf or use None "
          "to load it as saved.") from e

  loaded = iter(conformed(v, a, i) for v, a, i in zip(got[:len(read_ids)], read_args,
                                                      read_ids))
  warned: set[str] = set()
  values = [treespec.decode(plan.subtrees[pos][0], by_id, warned) if i < 0 else next(loaded)
            for pos, i in enumerate(ids)]
  return plain_dataclasses.collapse_plain_dataclasses(
      jax.tree_util.tree_unflatten(plan.treedef, values))


def previous_chunks(cp_dir: epath.Path) -> reuse.PreviousChunks | None:
  """The reusable chunks of the committed PyTree part at ``cp_dir`` (validated like a
  load's), for a later save of the same part; None when it has none."""
  saved = read_saved_tree(cp_dir)
  saved.close()  # the index is all that is read; the files are linked by path
  return reuse.previous_chunks(os.fspath(cp_dir), saved.leaves, saved.chunks)


def metadata_tree(cp_dir: epath.Path) -> Any:
  saved = read_saved_tree(cp_dir)
  class_registry.forget_misses()
  saved.close()  # metadata reads no data file
  ids = list(range(len(saved.leaves)))
  handlers = [registry.handler_for_typestr(saved.leaves[i]["typestr"]) for i in ids]
  known = [i for i in ids if handlers[i] is not None]
  vals: list[Any] = [None] * len(ids)
  for i, v in zip(known, _run_grouped("metadata", saved, known, None)):
    vals[i] = v
  infos = _infos_for(saved, ids)
  for i in ids:
    if handlers[i] is None:
      vals[i] = th.Metadata(name=infos[i].name, directory=infos[i].path)
  return treespec.decode(saved.root, vals, warned=None)

