"""Storage backends as objects, chosen once per save or load from the path (etils style).

A backend writes and reads the packed data files (docs/format.md); the small JSON files go
through ``io/paths.py``. Today only local paths exist: ``posix`` (the default) or, with
``FLAX_CKPT_STORAGE=tensorstore``, a tensorstore kvstore. An object store (``gs://``,
``s3://``) is one more class here plus one entry in :data:`_BY_SCHEME`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from flax_ckpt._src import env
from flax_ckpt._src.io.storage import kvstore, posix
from flax_ckpt._src.io.storage.direct import DirectWriter

BACKEND_ENV = env.STORAGE


class DataWriter(Protocol):
  """Packs arrays' bytes into one data file (what ``StorageBackend.open_writer`` returns)."""

  path: str
  size: int  # bytes placed so far

  def add(self, arr: np.ndarray) -> tuple[int, int]:
    """Schedules ``arr``'s bytes (kept unchanged by the caller until ``write``);
    returns the (offset, nbytes) they will have in the file."""
    ...

  def write(self, *, fsync: bool) -> None:
    """Writes everything, fsyncs when asked, and closes."""
    ...

  def close(self) -> None:
    """Drops the writer without finishing the file (also after a failure)."""
    ...


class CheckpointDir(Protocol):
  """The files of one checkpointable directory, as read by one load."""

  directory: str

  def is_gone(self) -> bool: ...
  def listdir(self) -> list[str]: ...
  def read_bytes(self, name: str) -> bytes: ...
  def close(self) -> None: ...


class StorageBackend(Protocol):
  """Where the data files of a checkpoint live, and how their bytes move."""

  name: str

  def open_writer(self, path: str, *, direct: bool = False, ts_context: Any = None
                  ) -> DataWriter:
    """A writer for the data file at ``path``; ``direct``: a background save."""
    ...

  def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]],
                files: Any = None) -> None:
    """Fills each (file offset, writable byte view) request from the file at ``path``."""
    ...

  def open_dir(self, path: str) -> CheckpointDir:
    """Opens a checkpointable directory for one consistent load."""
    ...

  def kvstore_spec(self, directory: str | os.PathLike) -> dict:
    """The tensorstore kvstore spec of ``directory`` (for tensorstore-based handlers)."""
    ...


class PosixBackend:
  """Local files through the POSIX API (``FLAX_CKPT_STORAGE=posix``, the default)."""

  name = "posix"

  def open_writer(self, path: str, *, direct: bool = False, ts_context: Any = None
                  ) -> DataWriter:
    """A buffered writer; with ``direct`` (background saves) an O_DIRECT one where allowed:
    it leaves the CPU and memory bandwidth to the training step the save overlaps."""
    del ts_context  # only the kvstore backend uses one
    if direct and hasattr(os, "O_DIRECT") and env.direct_io():
      return DirectWriter(path)
    return posix.BufferedWriter(path)

  def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]],
                files: Any = None) -> None:
    posix.read_into(path, requests, files)

  def open_dir(self, path: str) -> posix.CheckpointFiles:
    return posix.CheckpointFiles(path)

  def kvstore_spec(self, directory: str | os.PathLike) -> dict:
    return kvstore.kvstore_spec(directory)


class KvStoreBackend(PosixBackend):
  """The data files through a tensorstore kvstore (``FLAX_CKPT_STORAGE=tensorstore``).

  The small JSON files and the directory reader stay POSIX (local paths only today).
  """

  name = "tensorstore"

  def open_writer(self, path: str, *, direct: bool = False, ts_context: Any = None
                  ) -> DataWriter:
    del direct  # no direct I/O through a kvstore
    return kvstore.KvStoreDataWriter(path, ts_context=ts_context)

  def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]],
                files: Any = None) -> None:
    del files  # the kvstore opens the file itself
    kvstore.read_into(path, requests)


_BY_NAME: dict[str, StorageBackend] = {"posix": PosixBackend(), "tensorstore": KvStoreBackend()}
BACKENDS = tuple(_BY_NAME)
_BY_SCHEME: dict[str, StorageBackend] = {}  # "gs": GcsBackend(), ... in the next issue


def backend_name() -> str:
  """The storage backend asked for: ``$FLAX_CKPT_STORAGE`` or ``posix`` (validated)."""
  name = env.storage()
  if name not in _BY_NAME:
    raise ValueError(f"{BACKEND_ENV}={name!r} is not a storage backend; use one of {BACKENDS}")
  return name


def backend_for(path: str | os.PathLike) -> StorageBackend:
  """The backend for ``path``: by its scheme (``gs://``...), else by ``$FLAX_CKPT_STORAGE``.

  Resolve once per save or load and pass the backend down. Raises ValueError (before
  anything is written) for an unknown ``$FLAX_CKPT_STORAGE``.
  """
  scheme, sep, _ = os.fspath(path).partition("://")
  if sep and scheme in _BY_SCHEME:
    return _BY_SCHEME[scheme]
  return _BY_NAME[backend_name()]
