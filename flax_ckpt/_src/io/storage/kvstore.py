"""The ``tensorstore`` backend: the packed data files through a tensorstore kvstore.

Byte-range reads, one write per data file. This is the path by which object stores
(``gs://``, ``s3://``) slot in: only :func:`kvstore_spec` needs to learn their specs. Select
it for local paths with ``FLAX_CKPT_STORAGE=tensorstore``; it costs one extra copy of the
data on save.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from flax_ckpt._src.io.storage.buffers import READ_STATS, Packer, flat_bytes


def kvstore_spec(directory: str | os.PathLike) -> dict:
  """The tensorstore kvstore spec of a (local) checkpoint directory, ending in ``/``.

  Custom TypeHandlers that store data with tensorstore should build their specs from this
  (plus ``ParamInfo.ts_context``), so they follow the checkpoint to any storage backend.

  Example:
    >>> kvstore_spec('/tmp/ckpt/state')
    {'driver': 'file', 'path': '/tmp/ckpt/state/'}
  """
  return {"driver": "file", "path": os.fspath(directory).rstrip("/") + "/"}


def _open_kvstore(directory: str, *, sync: bool = True, ts_context=None):
  import tensorstore as ts

  spec = dict(kvstore_spec(directory), file_io_sync=sync)
  ctx = ts_context if ts_context is not None else ts.Context()
  return ts.KvStore.open(spec, context=ctx).result()


class KvStoreDataWriter(Packer):
  """The posix writers' interface on a tensorstore kvstore (one write per data file)."""

  direct_used = False  # test instrumentation, as on the posix writers

  def __init__(self, path: str, *, ts_context=None):
    super().__init__()
    self.path = path
    self._views: list[tuple[int, memoryview]] = []
    self._ts_context = ts_context

  def add(self, arr: np.ndarray) -> tuple[int, int]:
    """Schedules ``arr``'s bytes; returns (offset, nbytes) it will have in the file."""
    offset, view = self.place(arr)
    if view.nbytes:
      self._views.append((offset, view))
    return offset, view.nbytes

  def write(self, *, fsync: bool) -> None:
    """Assembles the file in memory and writes it with one kvstore write."""
    try:
      if not self._views:
        return
      blob = bytearray(self.size)
      for off, view in self._views:
        blob[off:off + view.nbytes] = view
      directory, key = os.path.split(self.path)
      kv = _open_kvstore(directory, sync=fsync, ts_context=self._ts_context)
      kv.write(key, blob).result()  # pyright: ignore[reportArgumentType]  # takes bytes-like
      self.count_done(self.size)
    finally:
      self.close()

  def close(self) -> None:
    self._views = []


def read_into(path: str, requests: Sequence[tuple[int, memoryview]]) -> None:
  """Fills each (file offset, writable byte view) request with byte-range kvstore reads."""
  directory, key = os.path.split(path)
  kv = _open_kvstore(directory)
  pending = []
  for off, view in requests:
    view = flat_bytes(view)
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
    view[:] = r.value  # pyright: ignore[reportPossiblyUnboundVariable]  # else raised above
    READ_STATS.add(view.nbytes)
