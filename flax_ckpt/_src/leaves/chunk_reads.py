"""Read-plan geometry: which bytes of which saved chunks fill a destination box.

Pure numpy plus one storage backend to read through, so it can be unit-tested alone. A
chunk record (docs/format.md) is ``{"s": start, "h": shape, "o": file offset, "n": nbytes,
"p": process index of the data file}`` (plus ``"f"``, a reused data file, in format
version 3: :func:`~flax_ckpt._src.format.chunk_file` names the file); a box is a
(start, shape) region of the array.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np

from flax_ckpt._src import env, errors
from flax_ckpt._src.format import chunk_file, data_file
from flax_ckpt._src.io import observe, storage

_ARENA_BYTES = 4 << 20  # see ReadPlan._alloc
_ARENA_LEAF = 256 << 10
_MIN_RUN = 512  # contiguous runs shorter than this are staged instead of read one by one


def staging_bytes() -> int:
  """Host memory a load may use beyond its results (``$FLAX_CKPT_STAGING_BYTES``, 64 MiB)."""
  return env.staging_bytes()


def _name(leaf: Any) -> str:
  """A leaf's name for an error: ``leaf`` itself, or its ``.name`` (a ParamInfo's is made
  from its key path: ~4 us, too much to spend on every leaf of a load that succeeds)."""
  return leaf if isinstance(leaf, str) else str(getattr(leaf, "name", leaf))


def _contiguous(box_shape: Sequence[int], full: Sequence[int]) -> bool:
  """Whether a box of shape ``box_shape`` is one contiguous run inside C-order ``full``."""
  k = 0
  while k < len(box_shape) and box_shape[k] == 1:
    k += 1
  return all(box_shape[j] == full[j] for j in range(k + 1, len(box_shape)))


def _flat(idx: Sequence[int], shape: Sequence[int]) -> int:
  f = 0
  for i, n in zip(idx, shape):
    f = f * n + i
  return f


def _flat_off(idx: Sequence[int], strides: Sequence[int]) -> int:
  return sum(i * st for i, st in zip(idx, strides))


def _strides(shape: Sequence[int]) -> list[int]:
  out, acc = [], 1
  for n in reversed(shape):
    out.append(acc)
    acc *= n
  return out[::-1]


_PAIRWISE_MAX = 2048  # beyond this many chunks, only grid layouts are accepted


def _distinct_grid_cells(lo: np.ndarray, hi: np.ndarray) -> bool:
  """Whether every box is one cell of the grid all box boundaries draw, each cell at most
  once. Shards of any jax sharding form such a grid; checked in O(n log n)."""
  cells = []
  for k in range(lo.shape[1]):
    bounds = np.unique(np.concatenate([lo[:, k], hi[:, k]]))
    first, last = np.searchsorted(bounds, lo[:, k]), np.searchsorted(bounds, hi[:, k])
    if (last - first != 1).any():
      return False
    cells.append(first)
  if not cells:
    return len(lo) == 1
  return len(np.unique(np.stack(cells, axis=1), axis=0)) == len(lo)


def chunks_tile(chunks: list[dict], shape: Sequence[int]) -> bool:
  """Whether the chunk boxes lie inside ``shape``, do not overlap, and cover it.

  Example:
    >>> chunks_tile([{"s": [0], "h": [2]}, {"s": [2], "h": [2]}], (4,))
    True
    >>> chunks_tile([{"s": [0], "h": [3]}, {"s": [2], "h": [1]}], (4,))
    False
  """
  if len(chunks) == 1:  # the common case, first: this runs for every leaf of a load
    c = chunks[0]
    if any(c["s"]):
      return False
    return c["h"] == list(shape) if shape else math.prod(c["h"]) == 1
  if sum(math.prod(c["h"]) for c in chunks) != math.prod(shape):
    return False
  if len(chunks) < 2:  # one chunk: the whole array (0-d arrays may have a [1] chunk)
    return all(not any(c["s"]) and (list(c["h"]) == list(shape) or not shape)
               for c in chunks)
  lo = np.array([c["s"] for c in chunks], np.int64).reshape(len(chunks), len(shape))
  hi = lo + np.array([c["h"] for c in chunks], np.int64).reshape(len(chunks), len(shape))
  if (lo < 0).any() or (hi > np.asarray(shape, np.int64)).any():
    return False
  if _distinct_grid_cells(lo, hi):
    return True  # distinct cells of one grid + total volume == array volume: exact cover
  if len(chunks) > _PAIRWISE_MAX:
    return False  # not a grid (no save writes that) and too many boxes to compare pairwise
  # boxes i != j overlap when they intersect in every dimension
  inter = (lo[:, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[:, None, :])
  overlap = cast(np.ndarray, inter.all(axis=2))  # an array: ``inter`` is 3-d
  np.fill_diagonal(overlap, False)
  return not overlap.any()  # no overlaps + total volume == array volume: exact cover


_GROUP_BYTES = 4 << 20  # a verifying load reads and checks groups of about this size


def _split_checked(reqs: list[tuple[int, memoryview]], checked: dict[int, dict]) -> list:
  """``(offset, view, check item or None)`` per request; a checked request bigger than a
  group is cut at block boundaries, so its blocks are checked while the rest is read."""
  out = []
  for off, view in reqs:
    chunk = checked.get(id(view))
    if chunk is None:
      out.append((off, view, None))
      continue
    xb = chunk.get("xb", chunk["n"])
    step = max(1, _GROUP_BYTES // xb) * xb
    if view.nbytes <= step:
      out.append((off, view, (chunk, view, 0)))
      continue
    flat = storage.flat_bytes(view)
    for a in range(0, flat.nbytes, step):
      piece = flat[a:a + step]
      out.append((off + a, piece, (chunk, piece, a // xb)))
  return out


def _read_groups(reqs: list) -> list[list]:
  """Requests in file order, cut into groups of about ``_GROUP_BYTES``."""
  groups: list[list] = [[]]
  size = 0
  for r in sorted(reqs, key=lambda r: r[0]):
    if size >= _GROUP_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(r)
    size += r[1].nbytes
  return [g for g in groups if g]


class ReadPlan:
  """Collects reads for many destination boxes, then executes them in one pass.

  Every byte goes straight from the data file into its destination buffer when the part of a
  saved chunk a box needs is one contiguous run, or a set of runs of at least ``_MIN_RUN``
  bytes (resharding: e.g. columns of row-sharded chunks). Only tiny strided runs go through a
  scratch buffer, filled slab by slab within :func:`staging_bytes`, so a load never holds
  more than its results plus that budget.
  """

  def __init__(self, state_dir: str, files: Any = None, backend: Any = None,
               segments: dict[int, int] | None = None, verify: bool = False):
    self.state_dir = state_dir
    self.files = files
    self.segments = segments or {}
    self.backend = backend if backend is not None else storage.backend_for(state_dir)
    # by data file: a reused file's name, or the int p of process p's data file (why not
    # the name: making it cost ~0.5 us of every leaf), see _file_name
    self.requests: dict[str | int, list[tuple[int, memoryview]]] = {}
    self._proc: dict[str | int, int] = {}  # data file -> the process whose index lists it
    self.staged: list[tuple[dict, np.ndarray, list[int], list[int], list[int]]] = []
    # verify: every chunk read whole is checked as it is read (``checks``, see execute); a
    # chunk read in part goes through the staged path, which reads and checks whole blocks
    self.verify = verify
    self.checks: list[tuple[dict, memoryview]] = []
    self._leaf_of: dict[int, Any] = {}  # id(chunk) -> leaf name (see _name), for errors
    self._counter = observe.current_counter()  # the load's bytes to read (progress lines)
    self._planned = 0  # bytes boxed since the last start(), not yet told to _counter
    self._arena: np.ndarray | None = None  # small boxes are carved from it (see _alloc)
    self._arena_view = memoryview(b"")
    self._arena_used = 0

  def _alloc(self, nbytes: int) -> tuple[np.ndarray, int, memoryview]:
    """A 64-byte aligned buffer of ``nbytes``: (the uint8 block it is in, its offset there,
    a byte view of it). Why an arena: one allocation per small leaf cost as much as reading
    it (5000 leaves of 4-64 KiB); small boxes share blocks of _ARENA_BYTES instead. A block
    lives while any leaf in it does, so only leaves below _ARENA_LEAF use it (what a kept
    leaf can pin is bounded by the block size). Why the block and a slice of its one
    memoryview: a view or memoryview made per leaf cost ~2 us of every small leaf's load."""
    if nbytes > _ARENA_LEAF:
      block = storage.aligned_empty(nbytes)
      return block, 0, memoryview(block)  # pyright: ignore[reportArgumentType]  # Buffer is typed on 3.12+
    at = self._arena_used + (-self._arena_used) % storage.ALIGN
    if self._arena is None or at + nbytes > self._arena.nbytes:
      self._arena, at = storage.aligned_empty(_ARENA_BYTES), 0
      self._arena_view = memoryview(self._arena)  # pyright: ignore[reportArgumentType]  # Buffer is typed on 3.12+
    self._arena_used = at + nbytes
    return self._arena, at, self._arena_view[at:at + nbytes]

  def box(self, chunks: list[dict], dtype: np.dtype, start: Sequence[int],
          shape: Sequence[int]) -> np.ndarray:
    """A host buffer of ``shape`` at ``start`` that will hold the saved values."""
    item = dtype.itemsize
    nbytes = math.prod(shape) * item
    self._planned += nbytes  # told to the progress counter once per batch, in start()
    block, at, dest_view = self._alloc(nbytes)
    out = np.ndarray(tuple(shape), dtype, block, at)
    if len(chunks) == 1 and chunks[0]["n"] == nbytes and not any(start) and (
        chunks[0]["h"] == list(shape)):  # the common case: one chunk is the whole box
      if nbytes:
        self._reqs(chunks[0]).append((chunks[0]["o"], dest_view))
        if self.verify and "x" in chunks[0]:
          self.checks.append((chunks[0], dest_view))
      return out
    stop = [a + n for a, n in zip(start, shape)]
    for chunk in chunks:
      chunk_start, chunk_shape = chunk["s"], chunk["h"]
      lo = [max(a, b) for a, b in zip(start, chunk_start)]
      hi = [min(a, b + n) for a, b, n in zip(stop, chunk_start, chunk_shape)]
      overlap = [h - low for low, h in zip(lo, hi)]
      if any(n <= 0 for n in overlap):
        continue
      at_chunk = [x - s for x, s in zip(lo, chunk_start)]  # overlap's corner in the chunk
      at_dest = [x - s for x, s in zip(lo, start)]  # and in the box
      checked = self.verify and "x" in chunk
      if checked and overlap != list(chunk_shape):  # part of a chunk: verify whole blocks
        self.staged.append((chunk, out, at_chunk, at_dest, overlap))
      elif _contiguous(overlap, chunk_shape) and _contiguous(overlap, shape):
        n = math.prod(overlap) * item
        file_off = chunk["o"] + _flat(at_chunk, chunk_shape) * item
        dest_off = _flat(at_dest, shape) * item
        part = dest_view[dest_off:dest_off + n]
        self._reqs(chunk).append((file_off, part))
        if checked:
          self.checks.append((chunk, part))  # the request's own view (execute pairs them)
      elif checked:  # the whole chunk, strided in the box
        self.staged.append((chunk, out, at_chunk, at_dest, overlap))
      else:
        self._strided(chunk, item, overlap, at_chunk, at_dest, list(shape), dest_view, out)
    return out

  def _reqs(self, chunk: dict) -> list[tuple[int, memoryview]]:
    """The read requests on ``chunk``'s data file."""
    key = chunk.get("f") or chunk["p"]  # see self.requests
    reqs = self.requests.get(key)
    if reqs is None:
      reqs = self.requests[key] = []
      self._proc[key] = chunk["p"]
    return reqs

  def _path(self, key: str | int) -> str:
    """The path of the data file of a ``self.requests`` key."""
    return os.path.join(self.state_dir, key if isinstance(key, str) else data_file(key))

  def _strided(self, chunk: dict, item: int, overlap: list[int], at_chunk: list[int],
               at_dest: list[int], shape: list[int], dest_view: memoryview,
               out: np.ndarray) -> None:
    """Reads a box that is not one contiguous run of the chunk as several runs."""
    chunk_shape = chunk["h"]
    k = len(overlap) - 1  # runs span dims k.. (the dims after k are whole in chunk and box)
    while k > 0 and overlap[k] == chunk_shape[k] == shape[k]:
      k -= 1
    run = math.prod(overlap[k:]) * item
    if run < _MIN_RUN:
      self.staged.append((chunk, out, at_chunk, at_dest, overlap))
      return
    chunk_strides, dest_strides = _strides(chunk_shape), _strides(shape)
    file0 = chunk["o"] + item * sum(a * s for a, s in zip(at_chunk, chunk_strides))
    dest0 = item * sum(a * s for a, s in zip(at_dest, dest_strides))
    if k:
      idx = np.indices(overlap[:k]).reshape(k, -1).astype(np.int64)
      file_offs = (file0 + item * (idx * np.asarray(chunk_strides[:k], np.int64)[:, None])
                   .sum(0)).tolist()
      dest_offs = (dest0 + item * (idx * np.asarray(dest_strides[:k], np.int64)[:, None])
                   .sum(0)).tolist()
    else:
      file_offs, dest_offs = [file0], [dest0]
    reqs = self._reqs(chunk)
    for f, d in zip(file_offs, dest_offs):
      reqs.append((f, dest_view[d:d + run]))

  def _run_staged(self) -> None:
    """Serves tiny strided runs through one scratch buffer, a slab of chunk rows at a time.

    Items are grouped by chunk, so each chunk row is read once for all boxes that need it,
    and of each row only the span from the first to the last byte any of them needs.
    """
    budget = staging_bytes()
    by_chunk: dict[tuple[str, int], list] = {}
    for chunk, out, at_chunk, at_dest, overlap in self.staged:
      by_chunk.setdefault((chunk_file(chunk), chunk["o"]), [chunk, []])[1].append(
          (out, at_chunk, at_dest, overlap))
    scratch = None
    for chunk, items in by_chunk.values():
      scratch = self._staged_chunk(chunk, items, budget, scratch)

  def _staged_chunk(self, chunk: dict, items: list, budget: int,
                    scratch: np.ndarray | None) -> np.ndarray | None:
    """Serves the staged items of one chunk; returns the (maybe grown) scratch buffer."""
    chunk_shape = chunk["h"]
    dtype = items[0][0].dtype
    item = dtype.itemsize
    row = math.prod(chunk_shape[1:]) * item  # bytes of one index of dim 0 of the chunk
    inner = _strides(chunk_shape[1:])
    lo = min(_flat_off(a[1:], inner) for _, a, _, _ in items) * item
    hi = max(_flat_off([x + n - 1 for x, n in zip(a[1:], ov[1:])], inner) + 1
             for _, a, _, ov in items) * item
    first = min(a[0] for _, a, _, _ in items)
    last = max(a[0] + ov[0] for _, a, _, ov in items)
    per = max(1, budget // max(row, 1))
    rpb = 0  # rows per checksum block, when verifying
    if self.verify and "x" in chunk:
      rpb = self._rows_per_block(chunk, row)
      lo, hi = 0, row  # whole blocks are whole rows
      first, last = first // rpb * rpb, min(chunk_shape[0], -(-last // rpb) * rpb)
      per = max(1, per // rpb) * rpb
    path = os.path.join(self.state_dir, chunk_file(chunk))
    for r0 in range(first, last, per):
      r1 = min(last, r0 + per)
      if scratch is None or scratch.nbytes < (r1 - r0) * row:
        scratch = storage.aligned_empty(max(min(budget, (last - first) * row),
                                            (r1 - r0) * row))  # a checked block may exceed it
      view = memoryview(scratch)  # pyright: ignore[reportArgumentType]  # Buffer is typed on 3.12+
      if lo == 0 and hi == row:  # whole rows: one contiguous read for the slab
        reqs = [(chunk["o"] + r0 * row, view[:(r1 - r0) * row])]
      else:
        reqs = [(chunk["o"] + r * row + lo, view[(r - r0) * row + lo:(r - r0) * row + hi])
                for r in range(r0, r1)]
      self.backend.read_into(path, reqs, self.files, self.segments.get(chunk["p"]))
      if rpb:
        b0 = r0 // rpb
        self._verify([(chunk, view[:(r1 - r0) * row], b0)])
      src = scratch[:(r1 - r0) * row].view(dtype).reshape((r1 - r0, *chunk_shape[1:]))
      for out, at_chunk, at_dest, overlap in items:
        s0, s1 = max(r0, at_chunk[0]), min(r1, at_chunk[0] + overlap[0])
        if s0 >= s1:
          continue
        d0 = at_dest[0] + (s0 - at_chunk[0])
        out[(slice(d0, d0 + s1 - s0),
             *(slice(a, a + n) for a, n in zip(at_dest[1:], overlap[1:])))] = src[
            (slice(s0 - r0, s1 - r0), *(slice(a, a + n) for a, n in zip(at_chunk[1:],
                                                                        overlap[1:])))]
    return scratch

  def _rows_per_block(self, chunk: dict, row: int) -> int:
    xb = chunk.get("xb", chunk["n"])
    if row <= 0 or xb % row:
      raise errors.FormatError(
          f"leaf {_name(self._leaf_of.get(id(chunk), '?'))}: checksum block size {xb} of a "
          f"chunk in {self.state_dir} is not a whole number of its {row}-byte rows; the "
          "checkpoint is damaged or crafted.")
    return xb // row

  def _verify(self, items: list[tuple[dict, memoryview, int]]) -> None:
    """Checks ``(chunk, bytes from its block b0 on, b0)`` against the chunks' checksums."""
    storage.verify_all(self._work(items), lambda i, k: self._mismatch(items, i, k))

  @staticmethod
  def _work(items: list[tuple[dict, memoryview, int]]) -> list[tuple[memoryview, int, list]]:
    work = []
    for chunk, view, b0 in items:
      if "xb" not in chunk:  # one block: the whole chunk
        work.append((view, chunk["n"], chunk["x"]))
        continue
      xb = chunk["xb"]
      work.append((view, xb, chunk["x"][b0:b0 + -(-view.nbytes // xb)]))
    return work

  def _mismatch(self, items: list[tuple[dict, memoryview, int]], i: int, k: int) -> None:
    chunk, _, b0 = items[i]
    xb = chunk.get("xb", chunk["n"])
    a = chunk["o"] + (b0 + k) * xb
    raise errors.CorruptCheckpointError(
        f"bytes {a}..{min(a + xb, chunk['o'] + chunk['n'])} (the chunk at index "
        f"{chunk['s']}, block {b0 + k}) do not match their checksum",
        leaf=_name(self._leaf_of.get(id(chunk), "")),
        file=os.path.join(self.state_dir, chunk_file(chunk)))

  def check_extents(self, leaves: Sequence[tuple[Any, dict, list[dict]]]) -> None:
    """Before anything is allocated: each (name, record, chunks) leaf's chunk byte counts
    match its boxes and its record's ``nbytes``, and every data file really holds the
    bytes the chunks claim (one 1-byte read at each file's last claimed byte), so a
    crafted shape or offset is a FormatError, never a huge allocation. A name is a str or
    has a ``.name`` (a ParamInfo), made only for an error (see :func:`_name`)."""
    ends: dict[str, tuple[int, Any, int]] = {}  # file -> (end, leaf name, process)
    prod = math.prod
    for name, record, chunks in leaves:  # one pass: this runs once per leaf on every load
      for c in chunks:
        self._leaf_of[id(c)] = name
      shape, nbytes = record.get("shape"), record.get("nbytes")
      elems = prod(shape) if isinstance(shape, list) else 0
      item, rest = divmod(nbytes, elems) if isinstance(nbytes, int) and elems else (None, 0)
      bad = rest != 0
      for c in chunks:
        n = c["n"]
        if item is not None and n != prod(c["h"]) * item:
          bad = True
        end, f = c["o"] + n, chunk_file(c)
        if n and end > ends.get(f, (0, "", 0))[0]:
          ends[f] = (end, name, c["p"])
      if bad:
        raise errors.FormatError(
            f"leaf {_name(name)}: its chunks' byte counts do not match its shape {shape} and "
            f"nbytes {nbytes}; the checkpoint is damaged or crafted, nothing was read.")
    for f, (end, name, p) in sorted(ends.items()):
      probe = memoryview(bytearray(1))
      try:
        self.backend.read_into(os.path.join(self.state_dir, f), [(end - 1, probe)],
                               self.files, self.segments.get(p))
        storage.READ_STATS.discount(1, 1)  # a probe, not data the load needed
      except OSError as e:
        if isinstance(e, FileNotFoundError):
          raise  # a load racing an overwrite looks again; else the caller names it
        err = errors.TruncatedDataError(
            f"leaf {_name(name)}: its chunks claim {end} bytes of {f} in "
            f"{self.state_dir}, which is truncated ({e}); the checkpoint is damaged or "
            "crafted, nothing was allocated.")
        err.path = os.path.join(self.state_dir, f)  # for verify's report
        raise err from e

  def verify_chunk(self, chunk: dict) -> list[int]:
    """Reads one whole chunk, a slab of blocks at a time within :func:`staging_bytes`,
    and returns the indexes of its blocks that do not match their checksums
    (:func:`flax_ckpt.verify`; raises OSError when the bytes cannot be read)."""
    n, xb = chunk["n"], chunk.get("xb", chunk["n"])
    per = max(1, staging_bytes() // xb) * xb
    scratch = storage.aligned_empty(min(n, per))
    view = memoryview(scratch)  # pyright: ignore[reportArgumentType]  # Buffer is typed on 3.12+
    path = os.path.join(self.state_dir, chunk_file(chunk))
    bad: list[int] = []
    for a in range(0, n, per):
      m = min(per, n - a)
      self.backend.read_into(path, [(chunk["o"] + a, view[:m])], self.files,
                             self.segments.get(chunk["p"]))
      b0 = a // xb
      bad += [b0 + k for k in storage.bad_blocks(view[:m], xb,
                                                chunk["x"][b0:b0 + -(-m // xb)])]
    return bad

  def execute(self) -> None:
    """Reads (and checks) every planned request; returns once all are in place."""
    self.start()()

  def start(self) -> Callable[[], None]:
    """Starts the planned reads; returns the function that waits for them and raises what
    they found. Local files are read (and checked) on the pool, so the caller plans and
    places other leaves meanwhile; other stores are read before this returns."""
    if self._counter is not None and self._planned:
      self._counter.plan(self._planned)
    self._planned = 0
    if getattr(self.backend, "name", "") != "posix" or self.staged:
      self._execute_now()
      return lambda: None
    # read in groups in file order, each checked as soon as it is read (two at a time),
    # while it is still in the CPU cache
    checked = {id(view): chunk for chunk, view in self.checks}
    groups: list[tuple[Any, list[tuple[dict, memoryview, int]]]] = []
    for key, reqs in self.requests.items():
      read = functools.partial(self.backend.read_into, self._path(key),
                               files=self.files, segment_bytes=self.segments.get(
                                   self._proc[key]))
      for group in _read_groups(_split_checked(reqs, checked)):
        groups.append((functools.partial(read, [(o, v) for o, v, _ in group]),
                       [item for _, _, item in group if item is not None]))
    self.requests.clear()
    self.checks.clear()
    wait = storage.start_read_and_verify([(read, self._work(items)) for read, items in groups])

    def done() -> None:
      bad = wait()
      if bad is not None:
        self._mismatch(groups[bad[0]][1], bad[1], bad[2])

    return done

  def _execute_now(self) -> None:
    """Object stores (all ranged GETs in flight at once) read everything, then check on
    the pool; tiny strided runs are staged after the direct reads."""
    for key, reqs in self.requests.items():
      self.backend.read_into(self._path(key), reqs, self.files,
                             self.segments.get(self._proc[key]))
    self.requests.clear()
    if self.checks:
      self._verify([(chunk, view, 0) for chunk, view in self.checks])
    self.checks.clear()
    if self.staged:
      self._run_staged()
      self.staged.clear()
