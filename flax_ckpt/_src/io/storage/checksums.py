"""Checksums of what a save writes, and their verification when it is read.

The algorithm is XXH3-64 (the ``xxhash`` package, about 10 GB/s per core, and it releases
the GIL, so hashing runs on a thread pool next to the file I/O). Array chunks are
checksummed in blocks of whole rows (:func:`block_bytes`) so that a load that reads only
some rows of a chunk (resharding) verifies the blocks it reads, not the whole chunk; every
other file of a checkpoint gets one checksum of its bytes (docs/format.md, "Checksums").

Example:
  >>> digest(b"flax_ckpt")
  'ec520f4c29d54d8e'
  >>> block_bytes(8 << 20, 1000)  # 1000-byte rows: blocks of 524 rows (8 MiB / 16)
  524000
  >>> len(block_digests(memoryview(bytes(3000)), 1000))
  3
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import xxhash

from flax_ckpt._src.format import CHECKSUM_BLOCK_BYTES, CHECKSUM_MIN_BLOCK_BYTES
from flax_ckpt._src.io import background

MIN_BLOCK_BYTES = CHECKSUM_MIN_BLOCK_BYTES  # a chunk this small is one block
_VERIFY = contextvars.ContextVar("flax_ckpt_verify", default=True)
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_WRITE_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_BATCH_BYTES = 8 << 20  # hash work is handed to the pool in batches of this many bytes


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                    thread_name_prefix="flax_ckpt_hash")
    return _POOL


def _write_pool() -> concurrent.futures.ThreadPoolExecutor:
  """The pool that checksums what saves write: its threads run at the lowered priority of
  the other background save threads (``background.lower_thread_priority``), so hashing
  behind an async save yields the cores to the training step it overlaps with; loads
  verify on :func:`_pool`, at full priority."""
  global _WRITE_POOL
  with _POOL_LOCK:
    if _WRITE_POOL is None:
      _WRITE_POOL = concurrent.futures.ThreadPoolExecutor(
          max_workers=2, thread_name_prefix="flax_ckpt_hash_w",
          initializer=background.lower_thread_priority)
    return _WRITE_POOL


def verifying() -> bool:
  """Whether the load running in this thread verifies checksums (the default)."""
  return _VERIFY.get()


@contextlib.contextmanager
def verify_reads(on: bool) -> Iterator[None]:
  """Loads in this block verify checksums (``on``) or not; handlers' ``restore`` methods
  are called inside it, so the setting reaches them without an argument."""
  token = _VERIFY.set(bool(on))
  try:
    yield
  finally:
    _VERIFY.reset(token)


def digest(data: bytes | bytearray | memoryview) -> str:
  """The checksum of ``data`` as 16 lowercase hex digits."""
  return xxhash.xxh3_64_hexdigest(data)


def block_bytes(nbytes: int, row_bytes: int) -> int:
  """The block size of a chunk of ``nbytes`` whose rows have ``row_bytes`` bytes: as many
  whole rows (at least one) as fit in about a 16th of the chunk, but at least
  ``CHECKSUM_MIN_BLOCK_BYTES`` and at most ``CHECKSUM_BLOCK_BYTES``; a small chunk is one
  block. Why: a resharding load that needs some rows of a chunk reads whole blocks, so a
  block is small next to the chunk (little extra reading), yet big enough that the
  checksums stay a tiny part of the metadata (one per MiB of big chunks)."""
  if nbytes <= CHECKSUM_MIN_BLOCK_BYTES or row_bytes <= 0:
    return max(nbytes, 1)
  target = min(CHECKSUM_BLOCK_BYTES, max(CHECKSUM_MIN_BLOCK_BYTES, nbytes // 16))
  return max(1, target // row_bytes) * row_bytes


def block_digests(view: memoryview, xb: int) -> list[str]:
  """The checksums of ``view``'s consecutive blocks of ``xb`` bytes (the last shorter)."""
  n = view.nbytes
  if n <= xb:
    return [xxhash.xxh3_64_hexdigest(view)]
  return [xxhash.xxh3_64_hexdigest(view[i:i + xb]) for i in range(0, n, xb)]


def row_bytes(shape: Sequence[int], nbytes: int) -> int:
  """Bytes of one index of the first dimension of a C-order box of ``shape``."""
  return nbytes // shape[0] if len(shape) and shape[0] else nbytes


class Hasher:
  """Checksums the buffers a data writer places, on a thread pool, while it writes.

  ``add`` only queues (it runs on the save's critical path); full batches go to the pool.
  ``results`` waits and returns ``{offset: (block bytes, digests)}``. Queued views keep
  their buffers alive until hashed; the writer's caller keeps them unchanged until the
  write finishes, so the checksums are of exactly the bytes written.
  """

  def __init__(self) -> None:
    self._batch: list[tuple[int, memoryview, int]] = []
    self._batch_bytes = 0
    self._futures: list[concurrent.futures.Future] = []

  def add(self, offset: int, view: memoryview, xb: int) -> None:
    self._batch.append((offset, view, xb))
    self._batch_bytes += view.nbytes
    if self._batch_bytes >= _BATCH_BYTES:
      self._submit()

  def _submit(self) -> None:
    if self._batch:
      self._futures.append(_write_pool().submit(_hash_batch, self._batch))
      self._batch, self._batch_bytes = [], 0

  def results(self) -> dict[int, tuple[int, list[str]]]:
    self._submit()
    out: dict[int, tuple[int, list[str]]] = {}
    for f in self._futures:
      out.update(f.result())
    self._futures = []
    return out


def _hash_batch(batch: list[tuple[int, memoryview, int]]) -> dict[int, tuple[int, list[str]]]:
  return {off: (xb, block_digests(view, xb)) for off, view, xb in batch}


def verify_all(items: Sequence[tuple[memoryview, int, list[str]]],
               on_mismatch: Callable[[int, int], None]) -> None:
  """Checks each ``(view, block bytes, expected digests)`` on the pool; calls
  ``on_mismatch(item index, block index)`` in this thread for the first mismatch found
  (it is expected to raise)."""
  units = _units(items)
  total = sum(u[2].nbytes for u in units)
  if total < 2 * _BATCH_BYTES:
    bad = _check(units)
  else:  # about four groups per worker, so both cores stay busy to the end
    step = max(1, math.ceil(len(units) / 8))
    futs = [_pool().submit(_check, units[j:j + step]) for j in range(0, len(units), step)]
    found = [f.result() for f in futs]
    bad = next((b for b in found if b is not None), None)
  if bad is not None:
    on_mismatch(*bad)


def bad_blocks(view: memoryview, xb: int, want: list[str]) -> list[int]:
  """The indexes of every block of ``view`` whose checksum is not ``want``'s, hashed on
  the pool (``verify`` reports them all, not just the first)."""
  units = _units([(view, xb, want)])
  step = max(1, math.ceil(len(units) / 8))
  parts = [units[j:j + step] for j in range(0, len(units), step)]
  found = (map(_all_bad, parts) if len(parts) == 1
           else (f.result() for f in [_pool().submit(_all_bad, u) for u in parts]))
  return [k for ks in found for k in ks]


def check_later(view: memoryview, xb: int, want: list[str], background: bool
                ) -> Callable[[], bool]:
  """Starts checking ``view``'s blocks of ``xb`` bytes against ``want`` on a pool (the
  lowered-priority one for ``background`` saves); returns a function that waits and
  says whether every block matches."""
  units = _units([(view, xb, want)])
  step = max(1, math.ceil(len(units) / 4))
  pool = _write_pool() if background else _pool()
  futs = [pool.submit(_all_bad, units[j:j + step])
          for j in range(0, len(units), step)]
  return lambda: not any(f.result() for f in futs)


def _all_bad(units: Sequence[tuple[int, int, memoryview, int, list[str]]]) -> list[int]:
  return [k + j for _, k, v, xb, want in units
          for j, (a, b) in enumerate(zip(block_digests(v, xb), want)) if a != b]


def read_and_verify(groups: Sequence[tuple[Callable[[], None],
                                           Sequence[tuple[memoryview, int, list[str]]]]]
                    ) -> tuple[int, int, int] | None:
  """Runs each group's read and then checks the group's ``(view, block bytes, expected)``
  items in the same pool thread, two groups at a time: one group is checked while the next
  one is read, from memory the read just wrote. Returns ``(group, item, block)`` of the
  first mismatch, or None; a failed read raises, once every group has stopped."""
  return start_read_and_verify(groups)()


def start_read_and_verify(groups: Sequence[tuple[Callable[[], None],
                                                 Sequence[tuple[memoryview, int, list[str]]]]]
                          ) -> Callable[[], tuple[int, int, int] | None]:
  """:func:`read_and_verify`, started: returns the function that waits for it (a load
  plans and places the next leaves meanwhile)."""

  def run(g: int) -> tuple[int, int] | None:
    read, items = groups[g]
    read()
    return _check(_units(items)) if items else None

  futs = [_pool().submit(run, g) for g in range(len(groups))]

  def wait() -> tuple[int, int, int] | None:
    concurrent.futures.wait(futs)  # nothing writes into the caller's buffers after this
    first = None
    for g, f in enumerate(futs):
      r = f.result()
      if r is not None and first is None:
        first = (g, *r)
    return first

  return wait


def _units(items: Sequence[tuple[memoryview, int, list[str]]]
           ) -> list[tuple[int, int, memoryview, int, list[str]]]:
  """Work units of about _BATCH_BYTES: (item, first block, view of whole blocks, xb, want)."""
  units: list[tuple[int, int, memoryview, int, list[str]]] = []
  for i, (view, xb, want) in enumerate(items):
    if len(want) == 1 and view.nbytes <= xb:  # one block (most chunks): as it is
      units.append((i, 0, view, xb, want))
      continue
    per = max(1, _BATCH_BYTES // xb)  # blocks per unit
    for k in range(0, max(len(want), 1), per):
      units.append((i, k, view[k * xb:(k + per) * xb], xb, want[k:k + per]))
  return units


def _check(units: Sequence[tuple[int, int, memoryview, int, list[str]]]
           ) -> tuple[int, int] | None:
  hexdigest = xxhash.xxh3_64_hexdigest
  for i, k, view, xb, want in units:
    if view.nbytes <= xb:  # one block
      if len(want) == 1 and hexdigest(view) == want[0]:
        continue
      got = [hexdigest(view)]
    else:
      got = block_digests(view, xb)
    if got != want:
      return i, k + next((j for j, (a, b) in enumerate(zip(got, want)) if a != b),
                         min(len(got), len(want)))
  return None
