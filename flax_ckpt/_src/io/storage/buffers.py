"""What every storage backend shares: aligned buffers, offset packing, iovec bookkeeping."""

from __future__ import annotations

import threading

import numpy as np

from flax_ckpt._src.io import observe
from flax_ckpt._src.io.storage import checksums

ALIGN = 64  # every buffer starts at a multiple of this in the data file (and in memory)
IOV_MAX = 1024
MAX_CALL_BYTES = 1 << 30  # Linux caps one read/write at ~2 GiB


def aligned_empty(nbytes: int) -> np.ndarray:
  """A new uint8 buffer of ``nbytes`` whose data pointer is 64-byte aligned."""
  raw = np.empty(nbytes + ALIGN, np.uint8)
  off = (-raw.ctypes.data) % ALIGN
  return raw[off:off + nbytes]


def as_bytes_view(arr: np.ndarray) -> memoryview:
  """A flat byte view of a C-contiguous array of any dtype (ml_dtypes included)."""
  if not arr.flags.c_contiguous:
    raise ValueError("internal: buffer must be C-contiguous")
  try:
    view = memoryview(arr)  # pyright: ignore[reportArgumentType]  # Buffer is typed on 3.12+
    return view.cast("B")
  except (ValueError, TypeError):  # dtypes the buffer protocol cannot describe
    flat = arr.reshape(-1).view(np.uint8)
    return memoryview(flat)  # pyright: ignore[reportArgumentType]  # Buffer is typed on 3.12+


def flat_bytes(view: memoryview) -> memoryview:
  """``view`` as a 1-d view of unsigned bytes (no copy)."""
  return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Packer:
  """Assigns each added buffer its 64-byte aligned offset in the data file, and
  checksums it (on a thread pool, in blocks of whole rows of ``arr``)."""

  def __init__(self):
    self.size = 0
    self.hasher = checksums.Hasher()
    # the save's byte counter (progress lines, metrics): captured now, in the caller's
    # context, because the bytes are written from the writer's own threads
    self.counter = observe.current_counter()

  def count_done(self, nbytes: int) -> None:
    """Adds ``nbytes`` written to the save's counter (once per batch, not per leaf)."""
    if self.counter is not None:
      self.counter.add_done(nbytes)

  def place(self, arr: np.ndarray) -> tuple[int, memoryview]:
    """Returns (offset, byte view) for ``arr``: the next 64-byte aligned offset."""
    view = as_bytes_view(arr)
    offset = self.size + (-self.size) % ALIGN
    n = view.nbytes
    self.size = offset + n
    if self.counter is not None:
      self.counter.plan(n)
    if n:  # (this runs once per leaf: the small-chunk case without function calls)
      self.hasher.add(offset, view, n if n <= checksums.MIN_BLOCK_BYTES else
                      checksums.block_bytes(n, checksums.row_bytes(arr.shape, n)))
    return offset, view

  def checksum(self, offset: int, view: memoryview, shape: tuple[int, ...]) -> None:
    """Queues the checksums of the buffer of ``shape`` placed at ``offset``."""
    if n := view.nbytes:
      self.hasher.add(offset, view, checksums.block_bytes(n, checksums.row_bytes(shape, n)))

  def checksums(self) -> dict[int, tuple[int, list[str]]]:
    """``{offset: (block bytes, block checksums)}`` of every buffer placed (waits)."""
    return self.hasher.results()


def advance(views: list[memoryview], n: int) -> None:
  """Drops the first ``n`` bytes (done by one ``pwritev``/``preadv``) from ``views``."""
  while n and views:
    if views[0].nbytes <= n:
      n -= views[0].nbytes
      views.pop(0)
    else:
      views[0] = views[0][n:]
      n = 0


class ReadStats:
  """Counts bytes and system calls of reads.

  Test instrumentation: tests read :data:`READ_STATS` to check that partial and resharded
  loads read only the bytes they need. Counting costs one locked add per system call.
  """

  def __init__(self):
    self.bytes = 0
    self.calls = 0
    self._lock = threading.Lock()

  def add(self, nbytes: int) -> None:
    with self._lock:
      self.bytes += nbytes
      self.calls += 1

  def discount(self, nbytes: int, calls: int) -> None:
    """Takes back reads that were validation probes, not data a load needed."""
    with self._lock:
      self.bytes -= nbytes
      self.calls -= calls


READ_STATS = ReadStats()


def split_segments(requests, segment_bytes: int) -> dict[int, list[tuple[int, memoryview]]]:
  """(file offset, view) requests on a data file stored as segments of ``segment_bytes``
  as ``{segment index: [(offset in the segment, view)]}`` (views split at boundaries)."""
  out: dict[int, list[tuple[int, memoryview]]] = {}
  for off, view in requests:
    view = flat_bytes(view)
    while view.nbytes:
      k, at = divmod(off, segment_bytes)
      n = min(view.nbytes, segment_bytes - at)
      out.setdefault(k, []).append((at, view[:n]))
      off, view = off + n, view[n:]
  return out
