"""The storage layer for packed data files: many arrays' bytes in one file per process.

Two backends sit behind one interface (:func:`open_writer` returns an object with
``add``/``write``/``close``; :func:`read_into` fills byte views from file offsets):

* ``posix`` (the default for local paths): writes gather the caller's buffers straight into
  the file with ``pwritev``; reads scatter straight into freshly allocated, 64-byte aligned
  destination buffers with ``preadv`` (adjacent requests are coalesced into one system call,
  large ones are split across a few threads). Zero extra copies.
* ``tensorstore``: the same bytes through a tensorstore kvstore opened from
  :func:`kvstore_spec` (byte-range reads, one write per data file). This is the path by which
  object stores (``gs://``, ``s3://``) slot in: only :func:`kvstore_spec` needs to learn their
  specs. Select it for local paths with ``FLAX_CKPT_STORAGE=tensorstore``; it costs one
  extra copy of the data on save.

See docs/format.md for the file layout.
"""

from __future__ import annotations

import concurrent.futures
import errno
import mmap
import os
import queue
import threading
from collections.abc import Sequence

import numpy as np

from flax_ckpt._src.io import background

BACKEND_ENV = "FLAX_CKPT_STORAGE"
BACKENDS = ("posix", "tensorstore")

ALIGN = 64
_IOV_MAX = 1024
_MAX_CALL_BYTES = 1 << 30  # Linux caps one read/write at ~2 GiB
_PIECE = 32 << 20  # split big reads into pieces read in parallel
_GAP = 4096  # read through gaps smaller than this instead of another system call
_ZEROS = bytes(ALIGN)
_JUNK = memoryview(bytearray(_GAP))
_READ_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


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
    return memoryview(arr).cast("B")
  except (ValueError, TypeError):  # dtypes the buffer protocol cannot describe
    return memoryview(arr.reshape(-1).view(np.uint8))


class _Packer:
  """Assigns each added buffer its 64-byte aligned offset in the data file."""

  def __init__(self):
    self.size = 0

  def _place(self, arr: np.ndarray) -> tuple[int, memoryview]:
    view = as_bytes_view(arr)
    self.size += (-self.size) % ALIGN
    offset = self.size
    self.size += view.nbytes
    return offset, view


class DataWriter(_Packer):
  """Packs buffers into one data file, writing them in a background thread as they arrive.

  ``add`` returns the offset a buffer will have; full batches go to a writer thread at once,
  so file I/O overlaps with the caller's work on the remaining leaves. ``write`` flushes the
  rest, waits, and fsyncs. The caller must keep the added buffers unchanged until then.
  """

  _BATCH_BYTES = 16 << 20
  _BATCH_COUNT = _IOV_MAX - 2

  def __init__(self, path: str, *, direct: bool = False):
    super().__init__()
    self.path = path
    self._batch: list = []  # (offset, view)
    self._batch_bytes = 0
    self._queue: queue.SimpleQueue | None = None
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._fd: int | None = None
    # Direct I/O (O_DIRECT): bytes go from a reused aligned bounce buffer straight to the
    # device, not through the page cache; this costs the overlapping computation far less
    # CPU and memory bandwidth than buffered writes (see docs/design.md).
    self._direct = direct and _direct_io_allowed()
    self._bounce: mmap.mmap | None = None
    self._cursor = 0  # file offset of the bounce buffer's first byte (block aligned)
    self._fill = 0  # bytes staged in the bounce buffer
    self.zero_copy_bytes = 0  # bytes written straight from the caller's buffers
    self._fell_back = False  # the filesystem refused direct I/O midway

  def _place(self, arr: np.ndarray) -> tuple[int, memoryview]:
    view = as_bytes_view(arr)
    addr = arr.ctypes.data
    if self._direct and view.nbytes >= _ZERO_COPY_MIN and addr % ALIGN == 0:
      # Zero-copy direct I/O: give the buffer a file offset congruent to its address modulo
      # the block size, so all but its first and last partial blocks go from the caller's
      # memory straight to the device, with no copy through the bounce buffer.
      self.size += (addr - self.size) % _BLOCK
      offset = self.size
      self.size += view.nbytes
      return offset, view
    return super()._place(arr)

  @property
  def direct_used(self) -> bool:
    """Whether the file was written with direct I/O (after ``write``)."""
    return self._direct and not self._fell_back

  def add(self, arr: np.ndarray) -> tuple[int, int]:
    """Schedules ``arr``'s bytes; returns (offset, nbytes) it will have in the file."""
    offset, view = self._place(arr)
    if view.nbytes:
      self._batch.append((offset, view))
      self._batch_bytes += view.nbytes
      if self._batch_bytes >= self._BATCH_BYTES or len(self._batch) >= self._BATCH_COUNT:
        self._flush()
    return offset, view.nbytes

  def _flush(self) -> None:
    if not self._batch:
      return
    if self._thread is None:
      self._fd = self._open()
      self._queue = queue.SimpleQueue()
      self._thread = threading.Thread(target=self._run, name="flax_ckpt_write", daemon=True)
      self._thread.start()
    self._queue.put(self._batch)
    self._batch, self._batch_bytes = [], 0

  def _run(self) -> None:
    background.lower_thread_priority()
    while True:
      batch = self._queue.get()
      if batch is None:
        return
      if self._error is not None:
        continue
      try:
        if self._direct:
          self._stage(batch)
          continue
        iov: list = []
        start = pos = batch[0][0]
        for off, view in batch:
          if off != pos:
            iov.append(_ZEROS[: off - pos] if off - pos <= ALIGN else bytes(off - pos))
          iov.append(view)
          pos = off + view.nbytes
        _pwritev_all(self._fd, iov, start)
      except BaseException as e:  # noqa: BLE001 - re-raised by write()
        self._error = e

  def _open(self) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if self._direct:
      try:
        return os.open(self.path, flags | os.O_DIRECT, 0o644)
      except OSError:  # e.g. tmpfs: no direct I/O there
        self._direct = False
    return os.open(self.path, flags, 0o644)

  def _stage(self, batch: list) -> None:
    """Copies a batch into the bounce buffer (zeros in gaps), writing out full blocks.

    Batches arrive in file order; the bytes of a partly filled last block stay staged
    until the next batch (or ``write``) completes it, so no block is written twice.
    """
    if self._bounce is None:
      self._bounce = mmap.mmap(-1, _BOUNCE)  # page aligned
    buf = memoryview(self._bounce)
    for off, view in batch:
      gap = off - (self._cursor + self._fill)
      while gap > 0:
        n = min(gap, _BOUNCE - self._fill)
        buf[self._fill:self._fill + n] = bytes(n)
        self._fill += n
        gap -= n
        if self._fill == _BOUNCE:
          self._flush_blocks()
      src = view.cast("B") if view.format != "B" else view
      i = 0
      if src.nbytes >= _ZERO_COPY_MIN and off % _BLOCK == _address(src) % _BLOCK:
        # stage the head up to the first block boundary, then write whole blocks straight
        # from the caller's (now block aligned) memory; the tail is staged below
        head = (-off) % _BLOCK
        buf[self._fill:self._fill + head] = src[:head]
        self._fill += head
        self._flush_blocks()  # the staged bytes now end exactly on a block boundary
        middle = (src.nbytes - head) - (src.nbytes - head) % _BLOCK
        _pwrite_direct(self, src[head:head + middle], self._cursor)
        self._cursor += middle
        self.zero_copy_bytes += middle
        i = head + middle
      while i < src.nbytes:
        n = min(src.nbytes - i, _BOUNCE - self._fill)
        buf[self._fill:self._fill + n] = src[i:i + n]
        self._fill += n
        i += n
        if self._fill == _BOUNCE:
          self._flush_blocks()

  def _flush_blocks(self, final: bool = False) -> None:
    """Writes the staged whole blocks (with ``final``, the rest too, padded with zeros)."""
    if self._bounce is None or self._fill == 0:
      return
    whole = self._fill - self._fill % _BLOCK
    if final and whole < self._fill:
      end = whole + _BLOCK
      self._bounce[self._fill:end] = bytes(end - self._fill)
      whole = end
    if whole:
      _pwrite_direct(self, memoryview(self._bounce)[:whole], self._cursor)
      rest = self._fill - whole if self._fill > whole else 0
      if rest:
        self._bounce[:rest] = self._bounce[whole:whole + rest]
      self._cursor += whole
      self._fill = rest if rest > 0 else 0
    if final:
      self._fill = 0

  def _join(self) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def write(self, *, fsync: bool) -> None:
    """Writes everything still pending, waits for the file, and fsyncs it when asked."""
    self._flush()
    self._join()
    try:
      if self._error is not None:
        raise self._error
      if self._direct and self._fd is not None:
        self._flush_blocks(final=True)  # the last block, zero padded
      if fsync and self._fd is not None:
        os.fsync(self._fd)
    finally:
      self.close()

  def close(self) -> None:
    """Stops the writer thread and closes the file (also on failure paths)."""
    self._batch = []
    self._join()
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    if self._bounce is not None:
      self._bounce.close()
      self._bounce = None


_BLOCK = 4096  # direct I/O granularity (offsets, lengths, buffer addresses)
_BOUNCE = 16 << 20
_ZERO_COPY_MIN = 1 << 20  # buffers this big skip the bounce buffer (up to 8 KiB padding)
DIRECT_ENV = "FLAX_CKPT_DIRECT_IO"


def _address(view: memoryview) -> int:
  return np.frombuffer(view, np.uint8).ctypes.data


def _direct_io_allowed() -> bool:
  return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_ENV, "1") != "0"


def _pwrite_direct(w: DataWriter, view: memoryview, offset: int) -> None:
    """Writes block-aligned ``view`` at ``offset``; falls back to buffered writes if the
    filesystem refuses direct I/O midway (the bytes are the same either way)."""
    while view:
      try:
        n = os.pwrite(w._fd, view, offset)
      except OSError as e:
        if e.errno != errno.EINVAL:
          raise
        flags = os.O_WRONLY
        w._fell_back = True
        fd = os.open(w.path, flags)
        os.close(w._fd)
        w._fd = fd
        continue
      view = view[n:]
      offset += n


def _pwritev_all(fd: int, iov: list, offset: int) -> None:
  views = [memoryview(b).cast("B") for b in iov]
  while views:
    # a single buffer may exceed what one call writes; split it
    batch, total = [], 0
    for v in views:
      if (total + v.nbytes > _MAX_CALL_BYTES and batch) or len(batch) >= _IOV_MAX:
        break
      batch.append(v[: _MAX_CALL_BYTES - total] if total + v.nbytes > _MAX_CALL_BYTES else v)
      total += batch[-1].nbytes
    n = os.pwritev(fd, batch, offset)
    offset += n
    # drop what was written
    while n and views:
      if views[0].nbytes <= n:
        n -= views[0].nbytes
        views.pop(0)
      else:
        views[0] = views[0][n:]
        n = 0


class ReadStats:
  """Counts bytes and system calls of reads (tests use it to check partial reads)."""

  def __init__(self):
    self.bytes = 0
    self.calls = 0
    self._lock = threading.Lock()

  def add(self, nbytes: int) -> None:
    with self._lock:
      self.bytes += nbytes
      self.calls += 1


READ_STATS = ReadStats()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  global _READ_POOL
  with _POOL_LOCK:
    if _READ_POOL is None:
      _READ_POOL = concurrent.futures.ThreadPoolExecutor(
          max_workers=max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="flax_ckpt_read"
      )
    return _READ_POOL


class CheckpointFiles:
  """The files of one checkpointable directory, all opened through one directory fd.

  A concurrent ``overwrite=True`` save swaps the directory's name to a new one; files opened
  through this fd still come from the version it was opened on (or fail to open if that
  version is being deleted), so one load never mixes two checkpoints.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._dfd: int | None = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()

  def is_gone(self) -> bool:
    """Whether the path no longer names this directory (replaced by an overwrite)."""
    if self._dfd is None:
      return False
    mine = os.fstat(self._dfd)
    try:
      now = os.stat(self.directory)
    except FileNotFoundError:
      return True
    return mine.st_nlink == 0 or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev)

  def listdir(self) -> list[str]:
    return os.listdir(self._dfd)

  def fd(self, name: str) -> int:
    with self._lock:
      if name not in self._fds:
        self._fds[name] = os.open(name, os.O_RDONLY, dir_fd=self._dfd)
      return self._fds[name]

  def read_bytes(self, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=self._dfd)
    try:
      with os.fdopen(fd, "rb", closefd=False) as f:
        return f.read()
    finally:
      os.close(fd)

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()
      if self._dfd is not None:
        os.close(self._dfd)
        self._dfd = None


def read_into(path: str, requests: Sequence[tuple[int, memoryview]],
              files: CheckpointFiles | None = None) -> None:
  """Fills each (file offset, writable byte view) request from the file at ``path``.

  With ``files`` (posix backend), the file is opened through its directory fd.
  """
  if backend_name() == "tensorstore":
    _kvstore_read_into(path, requests)
    return
  pieces: list[tuple[int, memoryview]] = []
  for off, view in requests:
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    for start in range(0, view.nbytes, _PIECE):
      pieces.append((off + start, view[start:start + _PIECE]))
  if not pieces:
    return
  pieces.sort(key=lambda p: p[0])
  batches: list[tuple[int, list[memoryview], int]] = []  # (offset, iov, useful bytes)
  cur_off, cur_iov, cur_bytes = pieces[0][0], [pieces[0][1]], pieces[0][1].nbytes
  cur_end = pieces[0][0] + pieces[0][1].nbytes
  for off, view in pieces[1:]:
    gap = off - cur_end
    # read through a small gap (its bytes are discarded) rather than make another system
    # call, unless that would read much more than asked (resharding reads only its share)
    if (0 <= gap <= min(_GAP, view.nbytes // 8) and len(cur_iov) < _IOV_MAX - 1
        and cur_bytes + view.nbytes <= _PIECE):
      if gap:
        cur_iov.append(_JUNK[:gap])  # read through small gaps; the bytes are discarded
      cur_iov.append(view)
      cur_bytes += view.nbytes
    else:
      batches.append((cur_off, cur_iov, cur_bytes))
      cur_off, cur_iov, cur_bytes = off, [view], view.nbytes
    cur_end = off + view.nbytes
  batches.append((cur_off, cur_iov, cur_bytes))
  fd = files.fd(os.path.basename(path)) if files is not None else os.open(path, os.O_RDONLY)
  try:
    if len(batches) == 1 or sum(b[2] for b in batches) < (8 << 20):
      for b in batches:
        _preadv_all(fd, b[0], b[1])
    else:
      futs = [_pool().submit(_preadv_all, fd, b[0], b[1]) for b in batches]
      for f in futs:
        f.result()
  finally:
    if files is None:
      os.close(fd)


def _preadv_all(fd: int, offset: int, iov: list[memoryview]) -> None:
  views = list(iov)
  while views:
    n = os.preadv(fd, views, offset)
    if n == 0:
      raise OSError(f"unexpected end of checkpoint data file (fd {fd}) at offset {offset}; "
                    "the checkpoint is truncated or damaged")
    READ_STATS.add(n)
    offset += n
    while n and views:
      if views[0].nbytes <= n:
        n -= views[0].nbytes
        views.pop(0)
      else:
        views[0] = views[0][n:]
        n = 0


# ------------------------------------------------------------------ backend selection


def backend_name() -> str:
  """The storage backend in use: ``$FLAX_CKPT_STORAGE`` or ``posix``."""
  name = os.environ.get(BACKEND_ENV, "") or "posix"
  if name not in BACKENDS:
    raise ValueError(f"{BACKEND_ENV}={name!r} is not a storage backend; use one of {BACKENDS}")
  return name


def kvstore_spec(directory: str | os.PathLike) -> dict:
  """The tensorstore kvstore spec of a (local) checkpoint directory, ending in ``/``.

  Custom TypeHandlers that store data with tensorstore should build their specs from this
  (plus ``ParamInfo.ts_context``), so they follow the checkpoint to any storage backend.

  Example:
    >>> kvstore_spec('/tmp/ckpt/state')
    {'driver': 'file', 'path': '/tmp/ckpt/state/'}
  """
  return {"driver": "file", "path": os.fspath(directory).rstrip("/") + "/"}


def open_writer(path: str, *, ts_context=None, direct: bool = False):
  """A data-file writer for ``path`` on the selected backend.

  ``direct``: write with direct I/O where the filesystem allows it (background saves: it
  leaves the CPU and memory bandwidth to the training step they overlap).
  """
  if backend_name() == "tensorstore":
    return KvStoreDataWriter(path, ts_context=ts_context)
  return DataWriter(path, direct=direct)


def _open_kvstore(directory: str, *, sync: bool = True, ts_context=None):
  import tensorstore as ts

  spec = dict(kvstore_spec(directory), file_io_sync=sync)
  ctx = ts_context if ts_context is not None else ts.Context()
  return ts.KvStore.open(spec, context=ctx).result()


class KvStoreDataWriter(_Packer):
  """:class:`DataWriter`'s interface on a tensorstore kvstore (one write per data file)."""

  def __init__(self, path: str, *, ts_context=None):
    super().__init__()
    self.path = path
    self._views: list[tuple[int, memoryview]] = []
    self._ts_context = ts_context

  def add(self, arr: np.ndarray) -> tuple[int, int]:
    offset, view = self._place(arr)
    if view.nbytes:
      self._views.append((offset, view))
    return offset, view.nbytes

  def write(self, *, fsync: bool) -> None:
    try:
      if not self._views:
        return
      blob = bytearray(self.size)
      for off, view in self._views:
        blob[off:off + view.nbytes] = view
      directory, key = os.path.split(self.path)
      kv = _open_kvstore(directory, sync=fsync, ts_context=self._ts_context)
      kv.write(key, blob).result()
    finally:
      self.close()

  def close(self) -> None:
    self._views = []


def _kvstore_read_into(path: str, requests: Sequence[tuple[int, memoryview]]) -> None:
  directory, key = os.path.split(path)
  kv = _open_kvstore(directory)
  pending = []
  for off, view in requests:
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if view.nbytes:
      pending.append((view, kv.read(key, byte_range=slice(off, off + view.nbytes))))
  for view, fut in pending:
    try:
      r = fut.result()
      problem = None if r.state == "value" and len(r.value) == view.nbytes else (
          f"got {len(r.value)} of {view.nbytes} bytes")
    except ValueError as e:  # tensorstore reports a short file as OUT_OF_RANGE
      problem = str(e)
    if problem is not None:
      raise OSError(f"{path}: checkpoint data file is missing or truncated ({problem}); "
                    "the checkpoint is damaged, load an earlier one.")
    view[:] = r.value
    READ_STATS.add(view.nbytes)
