"""The O_DIRECT writer of the ``posix`` backend, for background saves.

Direct I/O (O_DIRECT): bytes go from a reused aligned bounce buffer straight to the device,
not through the page cache; this costs the overlapping computation far less CPU and memory
bandwidth than buffered writes (see docs/design.md). Big 64-byte aligned buffers skip the
bounce buffer: their whole blocks go from the caller's memory to the device (zero copy).
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from flax_ckpt._src.io.storage.buffers import ALIGN, as_bytes_view, flat_bytes
from flax_ckpt._src.io.storage.posix import BufferedWriter

BLOCK = 4096  # direct I/O granularity (offsets, lengths, buffer addresses)
BOUNCE = 16 << 20  # the reused, page-aligned staging buffer
ZERO_COPY_MIN = 1 << 20  # buffers this big skip the bounce buffer (up to 8 KiB padding)


def _address(view: memoryview) -> int:
  return np.frombuffer(view, np.uint8).ctypes.data


class DirectWriter(BufferedWriter):
  """:class:`BufferedWriter` writing with O_DIRECT through a bounce buffer.

  Falls back to buffered writes (same bytes) where the filesystem refuses direct I/O, at
  open (e.g. tmpfs) or midway. The file is padded with zeros to whole blocks.
  """

  def __init__(self, path: str):
    super().__init__(path)
    self._direct = True  # until the filesystem refuses it at open
    self._bounce: mmap.mmap | None = None
    self._cursor = 0  # file offset of the bounce buffer's first byte (block aligned)
    self._fill = 0  # bytes staged in the bounce buffer
    self.zero_copy_bytes = 0  # bytes written straight from the caller's buffers
    self._fell_back = False  # the filesystem refused direct I/O midway

  @property
  def direct_used(self) -> bool:
    """Whether the file was written with direct I/O (after ``write``; test instrumentation)."""
    return self._direct and not self._fell_back

  def place(self, arr: np.ndarray) -> tuple[int, memoryview]:
    view = as_bytes_view(arr)
    addr = arr.ctypes.data
    if self._direct and view.nbytes >= ZERO_COPY_MIN and addr % ALIGN == 0:
      # Zero-copy direct I/O: give the buffer a file offset congruent to its address modulo
      # the block size, so all but its first and last partial blocks go from the caller's
      # memory straight to the device, with no copy through the bounce buffer.
      self.size += (addr - self.size) % BLOCK
      offset = self.size
      self.size += view.nbytes
      if self.counter is not None:
        self.counter.plan(view.nbytes)
      self.checksum(offset, view, arr.shape)
      return offset, view
    return super().place(arr)

  def _open(self) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
      return os.open(self.path, flags | os.O_DIRECT, 0o644)
    except OSError:  # e.g. tmpfs: no direct I/O there
      self._direct = False
    return os.open(self.path, flags, 0o644)

  def _write_batch(self, batch: list) -> None:
    if self._direct:
      self._stage(batch)
    else:
      super()._write_batch(batch)

  def _stage_bytes(self, src: memoryview) -> None:
    """Copies ``src`` into the bounce buffer, writing out each time it fills up."""
    assert self._bounce is not None  # _stage allocated it
    buf = memoryview(self._bounce)
    i = 0
    while i < src.nbytes:
      n = min(src.nbytes - i, BOUNCE - self._fill)
      buf[self._fill:self._fill + n] = src[i:i + n]
      self._fill += n
      i += n
      if self._fill == BOUNCE:
        self._flush_blocks()

  def _stage_zeros(self, count: int) -> None:
    assert self._bounce is not None  # _stage allocated it
    buf = memoryview(self._bounce)
    while count > 0:
      n = min(count, BOUNCE - self._fill)
      buf[self._fill:self._fill + n] = bytes(n)
      self._fill += n
      count -= n
      if self._fill == BOUNCE:
        self._flush_blocks()

  def _stage(self, batch: list) -> None:
    """Copies a batch into the bounce buffer (zeros in gaps), writing out full blocks.

    Batches arrive in file order; the bytes of a partly filled last block stay staged
    until the next batch (or ``write``) completes it, so no block is written twice.
    """
    if self._bounce is None:
      self._bounce = mmap.mmap(-1, BOUNCE)  # page aligned
    for off, view in batch:
      self._stage_zeros(off - (self._cursor + self._fill))
      src = flat_bytes(view)
      if src.nbytes >= ZERO_COPY_MIN and off % BLOCK == _address(src) % BLOCK:
        # stage the head up to the first block boundary, then write whole blocks straight
        # from the caller's (now block aligned) memory; the tail is staged below
        head = (-off) % BLOCK
        self._stage_bytes(src[:head])
        self._flush_blocks()  # the staged bytes now end exactly on a block boundary
        middle = (src.nbytes - head) - (src.nbytes - head) % BLOCK
        self._pwrite_direct(src[head:head + middle], self._cursor)
        self._cursor += middle
        self.zero_copy_bytes += middle
        src = src[head + middle:]
      self._stage_bytes(src)

  def _flush_blocks(self, final: bool = False) -> None:
    """Writes the staged whole blocks (with ``final``, the rest too, padded with zeros)."""
    if self._bounce is None or self._fill == 0:
      return
    whole = self._fill - self._fill % BLOCK
    if final and whole < self._fill:
      end = whole + BLOCK
      self._bounce[self._fill:end] = bytes(end - self._fill)
      whole = end
    if whole:
      self._pwrite_direct(memoryview(self._bounce)[:whole], self._cursor)
      rest = self._fill - whole if self._fill > whole else 0
      if rest:
        self._bounce[:rest] = self._bounce[whole:whole + rest]
      self._cursor += whole
      self._fill = rest if rest > 0 else 0
    if final:
      self._fill = 0

  def _pwrite_direct(self, view: memoryview, offset: int) -> None:
    """Writes block-aligned ``view`` at ``offset``; falls back to buffered writes if the
    filesystem refuses direct I/O midway (the bytes are the same either way)."""
    assert self._fd is not None  # opened by _flush before any batch is written
    while view:
      try:
        n = os.pwrite(self._fd, view, offset)
      except OSError as e:
        if e.errno != errno.EINVAL:
          raise
        self._fell_back = True
        fd = os.open(self.path, os.O_WRONLY)
        os.close(self._fd)
        self._fd = fd
        continue
      view = view[n:]
      offset += n

  def _finish_file(self) -> None:
    if self._direct:
      self._flush_blocks(final=True)  # the last block, zero padded

  def close(self) -> None:
    super().close()
    if self._bounce is not None:
      bounce, self._bounce = self._bounce, None
      try:
        bounce.close()
      except BufferError:
        # views of it live on in the traceback of the write error being raised (which
        # this must not replace); the mapping is freed with them
        pass
