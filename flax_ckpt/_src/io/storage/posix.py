"""The ``posix`` backend (the default for local paths): zero-copy buffered I/O.

Writes gather the caller's buffers straight into the file with ``pwritev``; reads scatter
straight into freshly allocated, 64-byte aligned destination buffers with ``preadv``
(adjacent requests are coalesced into one system call, large ones are split across a few
threads). Zero extra copies. The O_DIRECT writer for background saves is in ``direct.py``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import stat
import threading
from collections.abc import Sequence
from typing import Any

import xxhash

from flax_ckpt._src import errors
from flax_ckpt._src.io import background
from flax_ckpt._src.io.storage.buffers import (
    ALIGN,
    IOV_MAX,
    MAX_CALL_BYTES,
    READ_STATS,
    Packer,
    advance,
    flat_bytes,
)

_PIECE = 32 << 20  # split big reads into pieces read in parallel
_GAP = 4096  # read through gaps smaller than this instead of another system call
_ZEROS = bytes(ALIGN)
_JUNK = memoryview(bytearray(_GAP))
_READ_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


class BufferedWriter(Packer):
  """Packs buffers into one data file, writing them in a background thread as they arrive.

  ``add`` returns the offset a buffer will have; full batches go to a writer thread at once,
  so file I/O overlaps with the caller's work on the remaining leaves. ``write`` flushes the
  rest, waits, and fsyncs. The caller must keep the added buffers unchanged until then.
  """

  _BATCH_BYTES = 16 << 20
  _BATCH_COUNT = IOV_MAX - 2

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    self._batch: list = []  # (offset, view)
    self._batch_bytes = 0
    self._queue: queue.SimpleQueue | None = None
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._fd: int | None = None

  @property
  def direct_used(self) -> bool:
    """Whether the file was written with direct I/O (test instrumentation)."""
    return False

  def add(self, arr) -> tuple[int, int]:
    """Schedules ``arr``'s bytes; returns (offset, nbytes) it will have in the file."""
    offset, view = self.place(arr)
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
    assert self._queue is not None  # created with the thread
    self._queue.put(self._batch)
    self._batch, self._batch_bytes = [], 0

  def _run(self) -> None:
    background.lower_thread_priority()
    assert self._queue is not None  # created before the thread that runs this
    while True:
      batch = self._queue.get()
      if batch is None:
        return
      if self._error is not None:
        continue
      try:
        self._write_batch(batch)
        end = batch[-1][0] + batch[-1][1].nbytes
        assert self._fd is not None  # opened by _flush before the writer thread starts
        start_writeback(self._fd, batch[0][0], end - batch[0][0])
        self.count_done(sum(v.nbytes for _, v in batch))
      except BaseException as e:  # noqa: BLE001 - re-raised by write()
        self._error = e

  def _write_batch(self, batch: list) -> None:
    """Writes one batch of (offset, view), zeros in the alignment gaps, with ``pwritev``."""
    iov: list = []
    start = pos = batch[0][0]
    for off, view in batch:
      if off != pos:
        iov.append(_ZEROS[: off - pos] if off - pos <= ALIGN else bytes(off - pos))
      iov.append(view)
      pos = off + view.nbytes
    assert self._fd is not None  # opened by _flush before the writer thread starts
    _pwritev_all(self._fd, iov, start)

  def _open(self) -> int:
    return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

  def _finish_file(self) -> None:
    """Hook run after the writer thread is done and before the fsync."""

  def _join(self) -> None:
    if self._thread is not None:
      assert self._queue is not None  # created with the thread
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def write(self, *, fsync: bool) -> None:
    """Writes everything still pending, waits for the file, and fsyncs it when asked."""
    self._flush()
    self._join()
    try:
      try:
        if self._error is not None:
          raise self._error
        if self._fd is not None:
          self._finish_file()
        if fsync and self._fd is not None:
          os.fsync(self._fd)
      except OSError as e:
        raise _named(e, self.path, self.size) from e
    finally:
      self.close()

  def close(self) -> None:
    """Stops the writer thread and closes the file (also on failure paths)."""
    self._batch = []
    self._join()
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None  # libc's, once looked up; False where there is none


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
  """Starts writing a just-written range of ``fd`` to the disk, without waiting (Linux
  ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere).

  Why: the save's ``fsync`` at the end then finds most pages already written back, so
  the disk works while the save is still handing over the remaining leaves instead of
  after (5,000 arrays of 4-64 KiB, 105 MiB, medians of 6: the final wait for the writer
  and ``fsync`` fell from 50 ms to 16 ms, the save from 215 ms to 164 ms). The pages were
  going to be written back anyway; this only starts it sooner.
  """
  global _sync_file_range
  if _sync_file_range is None:
    try:
      fn = ctypes.CDLL(None, use_errno=True).sync_file_range
      fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
      _sync_file_range = fn
    except (AttributeError, OSError):
      _sync_file_range = False
  if _sync_file_range and nbytes > 0:
    _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # errors: fsync reports


def _named(e: OSError, path: str, size: int) -> OSError:
  """``e`` with the data file and what was being written (an ENOSPC from a worker thread
  names neither). Same errno and class (so callers can tell ENOSPC from EIO)."""
  if e.filename is not None:
    return e
  return type(e)(e.errno, f"{e.strerror or e} (writing the checkpoint data file, "
                 f"{size} bytes in all)", path)


def _pwritev_all(fd: int, iov: list, offset: int) -> None:
  views = [memoryview(b).cast("B") for b in iov]
  while views:
    # a single buffer may exceed what one call writes; split it
    batch, total = [], 0
    for v in views:
      if (total + v.nbytes > MAX_CALL_BYTES and batch) or len(batch) >= IOV_MAX:
        break
      batch.append(v[: MAX_CALL_BYTES - total] if total + v.nbytes > MAX_CALL_BYTES else v)
      total += batch[-1].nbytes
    n = os.pwritev(fd, batch, offset)
    offset += n
    advance(views, n)  # drop what was written


def open_regular(path: str, dir_fd: int | None = None) -> int:
  """Opens a checkpoint file for reading, refusing anything but a regular file.

  O_NONBLOCK: opening a FIFO planted in a checkpoint must not hang (it changes nothing for
  regular files); a FIFO, device or socket is a FormatError at once.
  """
  where = path if dir_fd is None else f"{path} (in the checkpoint directory)"
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
  except OSError as e:  # e.g. ENXIO: a socket cannot be opened at all
    if isinstance(e, FileNotFoundError):
      raise
    try:
      regular = stat.S_ISREG(os.stat(path, dir_fd=dir_fd).st_mode)
    except OSError:
      raise e from None
    if regular:
      raise
    fd = -1
  if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
    if fd >= 0:
      os.close(fd)
    raise errors.FormatError(f"{where} is not a regular file (a FIFO, device or socket); "
                             "the checkpoint is damaged or crafted, nothing was read.")
  return fd


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
        self._fds[name] = open_regular(name, dir_fd=self._dfd)
      return self._fds[name]

  def prefetch(self, prefix: str, nbytes: int) -> None:
    """Asks the kernel to start reading the first ``nbytes`` of the files whose names
    start with ``prefix`` (in name order) into the page cache, in the background: a load
    does this before it parses the metadata, so the disk is busy meanwhile. Only a hint
    (errors are ignored; the load reports what is wrong)."""
    if not hasattr(os, "posix_fadvise"):
      return
    # listed here, not in the pool: listings through one directory fd share its offset,
    # so two at once (this and the load's own) would each see part of the directory
    names = sorted(n for n in self.listdir() if n.startswith(prefix))

    def run() -> None:
      left = nbytes
      for name in names:
        with self._lock:  # not after close(): _dfd None would open relative to the cwd
          if left <= 0 or self._dfd is None:
            return
          try:
            if name not in self._fds:
              self._fds[name] = open_regular(name, dir_fd=self._dfd)
            fd = self._fds[name]
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, min(size, left), os.POSIX_FADV_WILLNEED)
          except (OSError, errors.FormatError):  # not there, not a regular file: the
            return  # load itself will say so
          left -= size
    _pool().submit(run)

  def read_bytes(self, name: str) -> bytes:
    fd = open_regular(name, dir_fd=self._dfd)
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


def _batches(requests: Sequence[tuple[int, memoryview]]) -> list[tuple[int, list, int]]:
  """Sorts the requests into (offset, iov, useful bytes) batches, one ``preadv`` each."""
  pieces: list[tuple[int, memoryview]] = []
  for off, view in requests:
    view = flat_bytes(view)
    for start in range(0, view.nbytes, _PIECE):
      pieces.append((off + start, view[start:start + _PIECE]))
  if not pieces:
    return []
  pieces.sort(key=lambda p: p[0])
  batches: list[tuple[int, list[memoryview], int]] = []
  cur_off, cur_iov, cur_bytes = pieces[0][0], [pieces[0][1]], pieces[0][1].nbytes
  cur_end = pieces[0][0] + pieces[0][1].nbytes
  for off, view in pieces[1:]:
    gap = off - cur_end
    # read through a small gap (its bytes are discarded) rather than make another system
    # call, unless that would read much more than asked (resharding reads only its share)
    if (0 <= gap <= min(_GAP, view.nbytes // 8) and len(cur_iov) < IOV_MAX - 1
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
  return batches


def read_into(path: str, requests: Sequence[tuple[int, memoryview]],
              files: CheckpointFiles | None = None) -> None:
  """Fills each (file offset, writable byte view) request from the file at ``path``.

  With ``files``, the file is opened through its directory fd.
  """
  batches = _batches(requests)
  if not batches:
    return
  fd = files.fd(os.path.basename(path)) if files is not None else open_regular(path)
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
    advance(views, n)



def list_files(directory: str) -> list[str]:
  """Every file under ``directory`` (not following links to directories), relative."""
  out = []
  for d, _, files in os.walk(directory):
    rel = os.path.relpath(d, directory)
    out.extend(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files)
  return sorted(out)


def file_digest(path: str) -> str | None:
  """The checksum of the regular file at ``path``, read in pieces; None if it is missing."""
  try:
    fd = open_regular(path)
  except FileNotFoundError:
    return None
  h = xxhash.xxh3_64()
  try:
    with os.fdopen(fd, "rb", buffering=0) as f:
      while piece := f.read(_PIECE // 4):
        h.update(piece)
  except OSError as e:
    if e.filename is None:
      raise type(e)(e.errno, f"{e.strerror or e} (reading to checksum)", path) from e
    raise
  return h.hexdigest()


def outside_links(directory: str, root: str) -> list[str]:
  """Symlinks at or under ``directory`` (not followed) that resolve outside ``root``;
  ``root`` itself may be a link."""
  root = os.path.realpath(root)
  out = []
  if os.path.islink(directory) and not (
      os.path.realpath(directory) + os.sep).startswith(root + os.sep):
    return [directory]
  for d, dirs, files in os.walk(directory):
    for name in dirs + files:
      p = os.path.join(d, name)
      if os.path.islink(p):
        target = os.path.realpath(p)
        if target != root and not target.startswith(root + os.sep):
          out.append(p)
  return out
