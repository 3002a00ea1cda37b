"""Storage backends as objects, chosen once per save or load from the path (etils style).

A backend does everything a checkpoint needs from its storage: the packed data files, the
small files, the namespace (list, delete) and the commit protocol (docs/format.md).
Local paths use ``posix`` (the default) or, with ``FLAX_CKPT_STORAGE=tensorstore``, a
tensorstore kvstore for the data files; ``s3://`` and ``gs://`` paths use
:class:`ObjectStoreBackend` (``objcommit.py``), chosen by :data:`_BY_SCHEME`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

from flax_ckpt._src import env, errors
from flax_ckpt._src.format import COMMIT_MARKER, Manifest, segment_file
from flax_ckpt._src.io import paths
from flax_ckpt._src.io.storage import kvstore, posix
from flax_ckpt._src.io.storage.buffers import split_segments
from flax_ckpt._src.io.storage.direct import DirectWriter
from flax_ckpt._src.io.storage.objcommit import ObjectStoreBackend

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

  def checksums(self) -> dict[int, tuple[int, list[str]]]:
    """``{offset: (block bytes, block checksums)}`` of every buffer added (waits)."""
    ...

  def close(self) -> None:
    """Drops the writer without finishing the file (also after a failure)."""
    ...


class CheckpointDir(Protocol):
  """The files of one checkpointable directory, as read by one load."""

  directory: str

  def is_gone(self) -> bool: ...
  def listdir(self) -> list[str]: ...
  def prefetch(self, prefix: str, nbytes: int) -> None: ...
  def read_bytes(self, name: str) -> bytes: ...
  def close(self) -> None: ...


class StorageBackend(Protocol):
  """Where a checkpoint lives, and how its bytes move: one class per storage kind.

  Paths are ``str``: an absolute local path, or an ``s3://``/``gs://`` URL. Above this
  layer nothing tests the scheme; it asks :func:`backend_for` once and calls these.
  """

  name: str

  # data files
  def open_writer(self, path: str, *, direct: bool = False, ts_context: Any = None
                  ) -> DataWriter:
    """A writer for the data file at ``path``; ``direct``: a background save."""
    ...

  def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]],
                files: Any = None, segment_bytes: int | None = None) -> None:
    """Fills each (file offset, writable byte view) request from the data file at
    ``path`` (stored as segments of ``segment_bytes`` when given)."""
    ...

  def open_dir(self, path: str) -> CheckpointDir:
    """Opens a checkpointable directory for one consistent load."""
    ...

  def kvstore_spec(self, directory: str | os.PathLike) -> dict:
    """The tensorstore kvstore spec of ``directory`` (for tensorstore-based handlers)."""
    ...

  # small files and the namespace
  def read_bytes(self, path: str) -> bytes:
    """The file's bytes; FileNotFoundError when there is none."""
    ...

  def write_bytes(self, path: str, data: bytes, *, fsync: bool) -> None: ...
  def read_versioned(self, path: str) -> tuple[bytes, Any] | None:
    """``(data, version)``, None when absent; the version changes with every write."""
    ...

  def modified_at(self, version: Any) -> float | None:
    """The modification time a version carries (None: the store keeps none)."""
    ...

  def create_exclusive(self, path: str, data: bytes) -> bool:
    """Creates ``path`` only if it does not exist; whether it did."""
    ...

  def replace_if(self, path: str, data: bytes, version: Any) -> bool:
    """Replaces ``path`` only if it still has ``version``; whether it did."""
    ...

  def heartbeat(self, path: str, data: bytes, version: Any) -> Any:
    """Marks ``path`` as refreshed; its new version, or None if it was replaced."""
    ...

  def list_files(self, directory: str) -> list[str]:
    """Every file under ``directory``, recursively, as ``/``-joined relative paths."""
    ...

  def outside_links(self, directory: str, root: str) -> list[str]:
    """Symlinks at or under ``directory`` that resolve outside ``root`` (none on object
    stores)."""
    ...

  def file_digests(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
    """The checksum (``digest``) of each file ``directory/name``; None where it is missing."""
    ...

  has_links: bool  # whether ``link_file`` can make hard links here

  def remove_file(self, path: str) -> None: ...
  def link_file(self, src: str, dst: str) -> bool:
    """Makes ``dst`` another name of the regular file ``src`` (a hard link, so deleting
    either name keeps the other's bytes); False where the storage has no links."""
    ...

  def is_dir(self, path: str) -> bool: ...
  def listdir(self, path: str) -> list[str]:
    """The names directly under ``path`` ([] when there is nothing)."""
    ...

  def makedirs(self, path: str) -> None: ...
  def remove_tree(self, path: str) -> None:
    """Deletes ``path`` and everything under it, ignoring errors."""
    ...

  def sync_tree(self, path: str) -> None:
    """Makes everything under ``path`` durable (nothing there: nothing to do)."""
    ...

  def sync_dir(self, path: str) -> None:
    """Makes the entries of directory ``path`` durable."""
    ...

  # the commit protocol (docs/format.md)
  def is_committed(self, path: str) -> bool: ...
  def committed_entries(self, root: str) -> list[str]:
    """The names under ``root`` that hold a committed checkpoint."""
    ...

  def check_destination(self, final: str, overwrite: bool, flag: str = "overwrite") -> None:
    """Raises before anything is written if ``final`` cannot receive a checkpoint."""
    ...

  def cleanup_stale(self, final: str) -> list[str]:
    """Removes what dead saves to ``final`` left behind; the names removed."""
    ...

  def begin(self, final: str) -> tuple[str, list[str]]:
    """Where a save to ``final`` writes its parts, and the directories it created."""
    ...

  def commit(self, tmp: str, final: str, manifest: Manifest, *, overwrite: bool,
             fsync: bool) -> None:
    """Writes the commit marker last and makes ``tmp``'s parts the checkpoint ``final``."""
    ...

  def abort(self, tmp: str | None, created: list[str]) -> None:
    """Removes what a failed save made."""
    ...

  def explain_missing(self, final: str) -> errors.CheckpointError:
    """The clear error for ``final`` without a commit marker."""
    ...

  def remove_checkpoint(self, path: str) -> None:
    """Deletes a committed checkpoint, never leaving it half-deleted but listed."""
    ...

  def cleanup_leftovers(self, root: str) -> list[str]:
    """Removes every leftover of a crashed save under ``root`` (owner lock held)."""
    ...


class PosixBackend:
  """Local files through the POSIX API (``FLAX_CKPT_STORAGE=posix``, the default)."""

  name = "posix"
  has_links = True  # a save may hard-link unchanged data files of the previous checkpoint

  def open_writer(self, path: str, *, direct: bool = False, ts_context: Any = None
                  ) -> DataWriter:
    """A buffered writer; with ``direct`` (background saves) an O_DIRECT one where allowed:
    it leaves the CPU and memory bandwidth to the training step the save overlaps."""
    del ts_context  # only the kvstore backend uses one
    if direct and hasattr(os, "O_DIRECT") and env.direct_io():
      return DirectWriter(path)
    return posix.BufferedWriter(path)

  def read_into(self, path: str, requests: Sequence[tuple[int, memoryview]],
                files: Any = None, segment_bytes: int | None = None) -> None:
    if segment_bytes:  # a checkpoint copied here from an object store
      for k, reqs in split_segments(requests, segment_bytes).items():
        posix.read_into(segment_file(path, k), reqs, files)
      return
    posix.read_into(path, requests, files)

  def open_dir(self, path: str) -> posix.CheckpointFiles:
    return posix.CheckpointFiles(path)

  def kvstore_spec(self, directory: str | os.PathLike) -> dict:
    return kvstore.kvstore_spec(directory)

  def read_bytes(self, path: str) -> bytes:
    with os.fdopen(posix.open_regular(path), "rb") as f:
      return f.read()

  def write_bytes(self, path: str, data: bytes, *, fsync: bool) -> None:
    paths.write_file(path, data, fsync=fsync)

  def read_versioned(self, path: str) -> tuple[bytes, Any] | None:
    try:
      with os.fdopen(posix.open_regular(path), "rb") as f:
        st = os.fstat(f.fileno())
        return f.read(), (st.st_ino, st.st_mtime_ns)
    except FileNotFoundError:
      return None

  def modified_at(self, version: Any) -> float | None:
    return version[1] / 1e9

  def create_exclusive(self, path: str, data: bytes) -> bool:
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True

  def replace_if(self, path: str, data: bytes, version: Any) -> bool:
    cur = self.read_versioned(path)
    if cur is not None:
      if cur[1] != version:
        return False
      self.remove_file(path)  # then only one O_EXCL creator wins
    return self.create_exclusive(path, data)

  def heartbeat(self, path: str, data: bytes, version: Any) -> Any:
    del data  # the modification time is the heartbeat
    try:
      if os.stat(path).st_ino != version[0]:
        return None  # replaced by a taker: not ours any more
      os.utime(path)
      st = os.stat(path)
    except FileNotFoundError:
      return None
    return (st.st_ino, st.st_mtime_ns)

  def list_files(self, directory: str) -> list[str]:
    return posix.list_files(directory)

  def outside_links(self, directory: str, root: str) -> list[str]:
    return posix.outside_links(directory, root)

  def file_digests(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
    return {n: posix.file_digest(os.path.join(directory, n)) for n in names}

  def remove_file(self, path: str) -> None:
    try:
      os.unlink(path)
    except FileNotFoundError:
      pass

  def link_file(self, src: str, dst: str) -> bool:
    if not stat.S_ISREG(os.lstat(src).st_mode):  # never a link to a link or a device
      return False
    os.link(src, dst, follow_symlinks=False)
    return True

  def is_dir(self, path: str) -> bool:
    return os.path.isdir(path)

  def listdir(self, path: str) -> list[str]:
    try:
      return os.listdir(path)
    except FileNotFoundError:
      return []

  def makedirs(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)

  def remove_tree(self, path: str) -> None:
    paths.remove_quietly(path)

  def sync_tree(self, path: str) -> None:
    if os.path.isdir(path):
      paths.fsync_tree(path)

  def sync_dir(self, path: str) -> None:
    paths.fsync_path(path)

  def is_committed(self, path: str) -> bool:
    return os.path.exists(os.path.join(path, COMMIT_MARKER))

  def committed_entries(self, root: str) -> list[str]:
    return [e for e in self.listdir(root) if self.is_committed(os.path.join(root, e))]

  def check_destination(self, final: str, overwrite: bool, flag: str = "overwrite") -> None:
    paths.check_destination(epath.Path(final), overwrite, flag)

  def cleanup_stale(self, final: str) -> list[str]:
    return paths.cleanup_stale_tmp(epath.Path(final))

  def begin(self, final: str) -> tuple[str, list[str]]:
    tmp, created = paths.make_tmp_dir(epath.Path(final))
    return os.fspath(tmp), created

  def commit(self, tmp: str, final: str, manifest: Manifest, *, overwrite: bool,
             fsync: bool) -> None:
    """Writes the marker into ``tmp`` (durably when ``fsync``), then renames it in place."""
    paths.write_json(os.path.join(tmp, COMMIT_MARKER), manifest.to_json(), fsync=fsync)
    if fsync:
      paths.fsync_path(tmp)
    paths.commit(epath.Path(tmp), epath.Path(final), overwrite=overwrite, fsync=fsync)

  def abort(self, tmp: str | None, created: list[str]) -> None:
    if tmp is not None:
      paths.remove_quietly(tmp)
    paths.remove_created(created)

  def explain_missing(self, final: str) -> errors.CheckpointError:
    return paths.explain_missing(final)

  def remove_checkpoint(self, path: str) -> None:
    paths.remove_checkpoint(path)

  def cleanup_leftovers(self, root: str) -> list[str]:
    return paths.cleanup_leftovers(root)


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
                files: Any = None, segment_bytes: int | None = None) -> None:
    del files  # the kvstore opens the file itself
    if segment_bytes:
      for k, reqs in split_segments(requests, segment_bytes).items():
        kvstore.read_into(segment_file(path, k), reqs)
      return
    kvstore.read_into(path, requests)


_BY_NAME: dict[str, StorageBackend] = {"posix": PosixBackend(), "tensorstore": KvStoreBackend()}
BACKENDS = tuple(_BY_NAME)
_BY_SCHEME: dict[str, StorageBackend] = {
    "s3": ObjectStoreBackend("s3"), "gs": ObjectStoreBackend("gs")}


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

