"""The object-store backends (``s3://``, ``gs://``): tensorstore's kvstore drivers.

There is no directory, rename or fsync on an object store: a "directory" is a key prefix,
a completed PUT is durable, and a single object is replaced atomically. The commit
protocol built on that is in ``objcommit.py``; this module moves the bytes:

* :class:`ObjectDataWriter` splits a data file into segments of at most
  ``FLAX_CKPT_OBJECT_BYTES`` and uploads them in parallel from a worker thread, holding
  at most a few segments in memory (never a second copy of the whole state);
* :func:`read_ranges` serves byte-range requests with coalesced ranged GETs in parallel,
  bounded in flight, so a resharding load reads only the ranges it needs;
* :class:`ObjectDir` reads one checkpoint directory and notices an overwrite (the first
  object it read, the commit marker for a checkpoint, changed generation).
"""

from __future__ import annotations

import collections
import errno
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from flax_ckpt._src.format import COMMIT_MARKER, segment_file
from flax_ckpt._src.io.storage import cloud
from flax_ckpt._src.io.storage.buffers import READ_STATS, Packer, flat_bytes, split_segments

_IN_FLIGHT_SEGMENTS = 8  # uploads in flight per writer (each holds one segment in memory)
_RANGE_GAP = 256 << 10  # read through gaps smaller than this: a request costs more
_RANGE_MAX = 64 << 20  # the largest ranged GET; big reads are split and run in parallel
_READ_IN_FLIGHT = 512 << 20  # bytes of ranged GETs in flight per read_into call

_lock = threading.Lock()
_stores: dict[str, Any] = {}
_missing_generation: bytes | None = None


def _ts():
  import tensorstore as ts

  return ts


def open_store(url: cloud.ObjectUrl) -> Any:
  """The bucket's kvstore (root path), opened once per configuration and reused.

  Each configuration gets its own tensorstore Context: tensorstore caches a driver (and
  the credentials it read from the environment) per spec within a context, so new keys or
  a rotated session token in the environment must open a new one.
  """
  spec = cloud.kvstore_spec(cloud.ObjectUrl(url.scheme, url.bucket, ""))
  key = cloud.spec_key(spec)
  with _lock:
    kv = _stores.get(key)
    if kv is None:
      ts = _ts()
      try:
        kv = ts.KvStore.open(spec, context=ts.Context()).result()
      except ValueError as e:
        raise cloud.storage_error(e, str(url), "open the bucket") from e
      _stores[key] = kv
    return kv


def missing_generation() -> bytes:
  """tensorstore's generation of "no object": a write conditioned on it only creates."""
  global _missing_generation
  if _missing_generation is None:
    mem = _ts().KvStore.open({"driver": "memory"}).result()
    _missing_generation = bytes(mem.read("x").result().stamp.generation)
  return _missing_generation


def read_versioned(path: str) -> tuple[bytes, bytes] | None:
  """``(data, generation)`` of the object at ``path``, or None when there is none."""
  url = cloud.parse(path)
  try:
    r = open_store(url).read(url.key).result()
  except ValueError as e:
    raise cloud.storage_error(e, path, "read") from e
  if r.state != "value":
    return None
  return bytes(r.value), bytes(r.stamp.generation)


def read_many(paths: list[str]) -> list[bytes | None]:
  """The objects at ``paths`` (None where absent), read in parallel."""
  urls = [cloud.parse(p) for p in paths]
  futs = [open_store(u).read(u.key) for u in urls]
  out = []
  for p, f in zip(paths, futs):
    try:
      r = f.result()
    except ValueError as e:
      raise cloud.storage_error(e, p, "read") from e
    out.append(bytes(r.value) if r.state == "value" else None)
  return out


def write(path: str, data: bytes | bytearray | memoryview, *,
          if_generation: bytes | None = None) -> bytes | None:
  """Writes one object; with ``if_generation``, only if the object's generation is that
  (:func:`missing_generation`: only if absent). Returns the new generation, or None when
  the condition failed and nothing was written."""
  url = cloud.parse(path)
  kw = {} if if_generation is None else {"if_equal": if_generation}
  try:
    stamp = open_store(url).write(url.key, data, **kw).result()  # pyright: ignore[reportArgumentType]  # bytes-like
  except ValueError as e:
    raise cloud.storage_error(e, path, "write") from e
  gen = bytes(stamp.generation)
  return gen or None  # an empty generation is tensorstore's answer to a failed condition


def delete(path: str) -> None:
  url = cloud.parse(path)
  try:
    open_store(url).write(url.key, None).result()
  except ValueError as e:
    raise cloud.storage_error(e, path, "delete") from e


def _prefix_range(prefix: str) -> Any:
  ts = _ts()
  # every key starting with prefix: [prefix, prefix with its last byte incremented)
  end = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""
  return ts.KvStore.KeyRange(prefix, end)


def list_keys(directory: str) -> list[str]:
  """Every key under the "directory" ``directory``, relative to it."""
  url = cloud.parse(directory)
  prefix = url.prefix
  try:
    keys = open_store(url).list(  # tensorstore strips bytes, not characters
        _prefix_range(prefix), strip_prefix_length=len(prefix.encode("utf-8"))).result()
  except ValueError as e:
    raise cloud.storage_error(e, directory, "list") from e
  return [k.decode("utf-8", "surrogateescape") for k in keys]


def check_bucket(path: str) -> None:
  """Raises StorageError when the bucket of ``path`` is missing or unreachable (S3 says so
  on a listing; GCS lists a missing bucket as empty: its first write fails instead)."""
  url = cloud.parse(path)
  try:  # keys starting with <prefix>/_CHECKPOINT: one small request
    open_store(url).list(_prefix_range(url.prefix + COMMIT_MARKER)).result()
  except ValueError as e:
    raise cloud.storage_error(e, path, "list") from e


def delete_prefix(directory: str) -> None:
  """Deletes every object under the "directory" ``directory``."""
  url = cloud.parse(directory)
  if not url.key:
    raise ValueError(f"refusing to delete a whole bucket ({directory})")
  try:
    open_store(url).delete_range(_prefix_range(url.prefix)).result()
  except ValueError as e:
    raise cloud.storage_error(e, directory, "delete") from e


class ObjectDataWriter(Packer):
  """A data file as segment objects, uploaded in parallel while the save goes on.

  ``add`` only records the caller's buffers; each completed segment goes to a worker
  thread that assembles it and starts its upload, with at most ``_IN_FLIGHT_SEGMENTS``
  uploads (each holding one segment) in flight. ``write`` sends the last segment and waits.
  """

  direct_used = False  # test instrumentation, as on the posix writers

  def __init__(self, path: str, segment_bytes: int):
    super().__init__()
    self.path = path
    self.segment_bytes = segment_bytes
    self._pending: list[tuple[int, memoryview]] = []
    self._next = 0  # the first segment not yet handed to the worker
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._buf: bytearray | None = None

  def add(self, arr: np.ndarray) -> tuple[int, int]:
    """Schedules ``arr``'s bytes; returns (offset, nbytes) they will have in the file."""
    offset, view = self.place(arr)
    if view.nbytes:
      self._pending.append((offset, view))
      if self.size // self.segment_bytes > self._next:
        self._hand_off(self.size // self.segment_bytes)
    return offset, view.nbytes

  def _hand_off(self, upto: int) -> None:
    """Gives segments ``[_next, upto)`` to the worker (the last one may be partial)."""
    end = min(upto * self.segment_bytes, self.size)
    mine, rest = [], []
    for off, view in self._pending:
      if off + view.nbytes <= end:
        mine.append((off, view))
      elif off >= end:
        rest.append((off, view))
      else:  # straddles the boundary: split
        mine.append((off, view[:end - off]))
        rest.append((end, view[end - off:]))
    self._pending = rest
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="flax_ckpt_upload", daemon=True)
      self._thread.start()
    by_segment: dict[int, list] = {}
    for off, view in mine:  # a big buffer spans several segments
      while view.nbytes:
        k = off // self.segment_bytes
        n = min(view.nbytes, (k + 1) * self.segment_bytes - off)
        by_segment.setdefault(k, []).append((off, view[:n]))
        off, view = off + n, view[n:]
    for k in range(self._next, upto):
      lo, hi = k * self.segment_bytes, min((k + 1) * self.segment_bytes, end)
      self._queue.put((k, lo, hi, by_segment.get(k, [])))
    self._next = upto

  def _run(self) -> None:
    in_flight: collections.deque = collections.deque()
    while True:
      item = self._queue.get()
      if item is None:
        break
      if self._error is not None:
        continue
      try:
        while len(in_flight) >= _IN_FLIGHT_SEGMENTS:
          in_flight.popleft().result()
        in_flight.append(self._upload(*item))
        self.count_done(item[2] - item[1])  # handed to the upload (progress is approximate)
      except BaseException as e:  # noqa: BLE001 - re-raised by write()
        self._error = e
    for fut in in_flight:
      try:
        fut.result()
      except BaseException as e:  # noqa: BLE001 - re-raised by write()
        self._error = self._error or e

  def _upload(self, k: int, lo: int, hi: int, pieces: list) -> Any:
    # One reused buffer: tensorstore copies the value when write() is called, and memory
    # touched before is several times cheaper than fresh pages (on a VM, ~2.5 s/GiB).
    if hi - lo == self.segment_bytes:
      if self._buf is None:
        self._buf = bytearray(self.segment_bytes)
      blob = self._buf
    else:
      blob = bytearray(hi - lo)  # the last, shorter segment
    dest = np.frombuffer(blob, np.uint8)
    pos = 0
    for off, view in sorted(pieces, key=lambda p: p[0]):
      dest[pos:off - lo] = 0  # zeros in the alignment gaps
      # numpy copies without the GIL: the caller's thread goes on meanwhile
      dest[off - lo:off - lo + view.nbytes] = np.frombuffer(view, np.uint8)
      pos = off - lo + view.nbytes
    dest[pos:] = 0
    url = cloud.parse(segment_file(self.path, k))
    return open_store(url).write(url.key, blob)  # pyright: ignore[reportArgumentType]  # bytes-like

  def write(self, *, fsync: bool) -> None:
    """Uploads what is left and waits for every segment (a finished PUT is durable)."""
    del fsync
    try:
      if self.size:
        self._hand_off(-(-self.size // self.segment_bytes))
      self._join()
      if self._error is not None:
        raise cloud.storage_error(self._error, self.path, "upload") from self._error
    finally:
      self.close()

  def _join(self) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def close(self) -> None:
    """Stops handing out segments and waits for uploads in flight (so an abort that
    deletes the prefix afterwards leaves nothing behind)."""
    self._pending = []
    self._join()
    self._buf = None


def _pieces(requests: Sequence[tuple[int, memoryview]], segment_bytes: int | None
            ) -> dict[int, list[tuple[int, memoryview]]]:
  """Requests as ``{segment: [(offset in segment, view)]}`` (segment -1: one object),
  big views split so that each ranged GET is at most ``_RANGE_MAX``."""
  whole = {-1: [(off, flat_bytes(v)) for off, v in requests]}
  by_seg = split_segments(requests, segment_bytes) if segment_bytes else whole
  return {k: [(at + i, v[i:i + _RANGE_MAX]) for at, v in reqs
              for i in range(0, v.nbytes, _RANGE_MAX)]
          for k, reqs in by_seg.items()}


def _ranges(pieces: list[tuple[int, memoryview]]) -> list[tuple[int, int, list]]:
  """Coalesces sorted pieces into (start, end, pieces) ranged GETs."""
  pieces.sort(key=lambda p: p[0])
  out: list[tuple[int, int, list]] = []
  for off, view in pieces:
    end = off + view.nbytes
    if out and 0 <= off - out[-1][1] <= _RANGE_GAP and end - out[-1][0] <= _RANGE_MAX:
      start, _, group = out[-1]
      group.append((off, view))
      out[-1] = (start, max(end, out[-1][1]), group)
    else:
      out.append((off, end, [(off, view)]))
  return out


def read_ranges(path: str, requests: Sequence[tuple[int, memoryview]],
                segment_bytes: int | None = None) -> None:
  """Fills each (file offset, writable view) request from the data file at ``path``."""
  jobs = []
  for k, pieces in _pieces(requests, segment_bytes).items():
    name = path if k < 0 else segment_file(path, k)
    jobs.extend((name, r) for r in _ranges(pieces))
  in_flight: collections.deque = collections.deque()
  held = 0
  for name, (start, end, group) in jobs:
    url = cloud.parse(name)
    while in_flight and held + (end - start) > _READ_IN_FLIGHT:
      held -= _finish_read(*in_flight.popleft())
    fut = open_store(url).read(url.key, byte_range=slice(start, end))
    in_flight.append((name, start, end, group, fut))
    held += end - start
  while in_flight:
    _finish_read(*in_flight.popleft())


def _finish_read(name: str, start: int, end: int, group: list, fut: Any) -> int:
  try:
    r = fut.result()
  except ValueError as e:
    if "OUT_OF_RANGE" in str(e) or "416" in str(e):
      raise OSError(f"{name}: checkpoint data object is truncated ({e}); the checkpoint "
                    "is damaged, load an earlier one.") from e
    raise cloud.storage_error(e, name, "read") from e
  if r.state != "value":
    raise FileNotFoundError(errno.ENOENT, "checkpoint data object is missing", name)
  data = memoryview(r.value)  # pyright: ignore[reportArgumentType]  # bytes
  if data.nbytes != end - start:
    raise OSError(f"{name}: checkpoint data object is truncated (got {data.nbytes} of "
                  f"{end - start} bytes); the checkpoint is damaged, load an earlier one.")
  for off, view in group:
    view[:] = data[off - start:off - start + view.nbytes]
  READ_STATS.add(end - start)
  return end - start


class ObjectDir:
  """The objects of one checkpoint "directory", as read by one load.

  The first object read through it (the commit marker, or a part's ``_TREE.json``) is
  its sentinel: when that object is gone or has another generation, an overwrite
  replaced the checkpoint, and the reader starts again.
  """

  def __init__(self, directory: str):
    self.directory = directory.rstrip("/")
    self._sentinel: tuple[str, bytes] | None = None
    self._names: list[str] | None = None

  def read_bytes(self, name: str) -> bytes:
    got = read_versioned(f"{self.directory}/{name}")
    if got is None:
      raise FileNotFoundError(f"{self.directory}/{name}")
    if self._sentinel is None:
      self._sentinel = (name, got[1])
    return got[0]

  def is_gone(self) -> bool:
    if self._sentinel is None:
      return False
    name, gen = self._sentinel
    got = read_versioned(f"{self.directory}/{name}")
    return got is None or got[1] != gen

  def prefetch(self, prefix: str, nbytes: int) -> None:
    """Nothing: object stores are read by ranged GETs in parallel when the plan is known."""

  def listdir(self) -> list[str]:
    if self._names is None:
      self._names = sorted({k.split("/", 1)[0] for k in list_keys(self.directory)})
    return list(self._names)

  def close(self) -> None:
    pass
