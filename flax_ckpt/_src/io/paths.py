"""Checkpoint paths and the atomic commit protocol (temporary sibling + rename).

A save writes everything into a sibling directory
``<name>.flax_ckpt-tmp-<host>-<pid>-<rand>``, makes it durable, writes the commit
marker last and then renames the directory into place. With ``overwrite=True`` the
new directory is swapped with the old one atomically (``renameat2(RENAME_EXCHANGE)``
on Linux); the old one is deleted only after the swap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import socket
from typing import Any, Union

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import (
    COMMIT_MARKER,
    OLD_TAG,
    TMP_TAG,
    dump_json_bytes,
)

PathLike = Union[str, os.PathLike, epath.Path]  # noqa: UP007 - runtime alias



OBJECT_SCHEMES = ("s3", "gs")


def to_path(path: PathLike) -> epath.Path:
  """Normalizes ``path``: an absolute local ``epath.Path``, or an ``s3://``/``gs://`` one.

  Object-store URLs keep their scheme and lose duplicate or trailing slashes; the storage
  layer validates the bucket name and key when it opens them.
  """
  if isinstance(path, bytes):
    raise TypeError(f"checkpoint path must be str or os.PathLike, not bytes: {path!r}")
  s = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
  if "://" in s:
    scheme, _, rest = s.partition("://")
    if scheme in OBJECT_SCHEMES:
      bucket, _, key = rest.partition("/")
      key = "/".join(p for p in key.split("/") if p)
      return epath.Path(f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}")
    if scheme != "file":
      raise errors.CheckpointError(
          f"{s!r}: storage scheme {scheme!r}:// is not supported by flax_ckpt; use a local "
          "or mounted filesystem path, s3://bucket/prefix or gs://bucket/prefix."
      )
    s = s[len("file://"):]
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def canonical(path: PathLike) -> str:
  """One spelling per location (symlinks resolved locally): keys of in-process tables."""
  s = os.fspath(path)
  return s if "://" in s else os.path.realpath(s)


def fsync_path(path: PathLike) -> None:
  """fsyncs a file or directory."""
  fd = os.open(os.fspath(path), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(directory: PathLike) -> None:
  """fsyncs every file and directory under ``directory``."""
  for dirpath, _, files in os.walk(os.fspath(directory)):
    for f in files:
      fsync_path(os.path.join(dirpath, f))
    fsync_path(dirpath)


def unique_tag() -> str:
  """``<host>-<pid>-<random>``: names temporary siblings (dead owners are recognizable)."""
  return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def write_json(path: PathLike, obj: Any, *, fsync: bool) -> None:
  """Writes ``obj`` as JSON to ``path`` (and fsyncs it when asked)."""
  write_file(path, dump_json_bytes(obj), fsync=fsync)  # the one JSON rule


def write_file(path: PathLike, data: bytes, *, fsync: bool) -> None:
  """Writes ``data`` to the file ``path`` (and fsyncs it when asked).

  Raises:
    OSError: with its errno and ``path`` (an ENOSPC from ``write`` names no file).
  """
  try:
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      if fsync:
        os.fsync(fd)
    finally:
      os.close(fd)
  except OSError as e:
    if e.filename is not None:
      raise
    raise type(e)(e.errno, f"{e.strerror or e} (writing {len(data)} bytes)",
                  os.fspath(path)) from e


def check_destination(final: epath.Path, overwrite: bool, flag: str = "overwrite") -> None:
  """Raises before anything is written if ``final`` cannot receive a checkpoint."""
  p = os.fspath(final)
  if os.path.lexists(p):
    if not os.path.isdir(p):
      raise errors.CheckpointExistsError(
          f"{p} exists and is not a directory; choose another checkpoint path or remove the file."
      )
    if not overwrite:
      raise errors.CheckpointExistsError(
          f"a checkpoint already exists at {p}; pass {flag}=True to replace it "
          "(the old one stays intact until the new one is committed) or choose a new path."
      )
  parent = os.path.dirname(p)
  probe = parent
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if probe and not os.path.isdir(probe):
    raise errors.CheckpointError(f"{p}: ancestor {probe} is a file, not a directory.")


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def cleanup_stale_tmp(final: epath.Path) -> list[str]:
  """Removes temporary siblings of ``final`` left by dead processes on this host."""
  parent, name = os.path.split(os.fspath(final))
  removed = []
  host = socket.gethostname()
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return removed
  for entry in entries:
    for tag in (TMP_TAG, OLD_TAG):
      prefix = f"{name}{tag}"
      if not entry.startswith(prefix):
        continue
      parts = entry[len(prefix):].rsplit("-", 2)
      if len(parts) != 3 or parts[0] != host:
        continue
      try:
        pid = int(parts[1])
      except ValueError:
        continue
      if pid != os.getpid() and not pid_alive(pid):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        removed.append(entry)
  return removed


def make_tmp_dir(final: epath.Path) -> tuple[epath.Path, list[str]]:
  """Creates the temporary sibling a save writes into.

  Returns:
    The directory, and the parent directories that had to be created (deepest last), so a
    failed save can remove them again.
  """
  parent, name = os.path.split(os.fspath(final))
  created = []
  probe = parent
  while probe and not os.path.exists(probe):
    created.append(probe)
    probe = os.path.dirname(probe)
  created.reverse()
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f"{name}{TMP_TAG}{unique_tag()}")
  os.mkdir(tmp)
  return epath.Path(tmp), created


def remove_created(created: list[str]) -> None:
  """Removes directories made by :func:`make_tmp_dir` if they are empty again."""
  for d in reversed(created):
    try:
      os.rmdir(d)
    except OSError:
      return


_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths; False if the platform cannot."""
  global _libc
  if not hasattr(os, "uname") or os.uname().sysname != "Linux":
    return False
  if _libc is None:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
  fn = getattr(_libc, "renameat2", None)
  if fn is None:
    return False
  at_fdcwd = -100
  rc = fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), _RENAME_EXCHANGE)
  if rc == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def commit(tmp: epath.Path, final: epath.Path, *, overwrite: bool, fsync: bool) -> None:
  """Moves a fully written temporary checkpoint into place."""
  tmp_s, final_s = os.fspath(tmp), os.fspath(final)
  parent = os.path.dirname(final_s)
  if os.path.lexists(final_s):
    if not overwrite:
      raise errors.CheckpointExistsError(
          f"a checkpoint appeared at {final_s} while saving; pass overwrite=True or use a "
          "new path. The new data was discarded."
      )
    if _exchange(tmp_s, final_s):
      if fsync:
        fsync_path(parent)
      shutil.rmtree(tmp_s, ignore_errors=True)  # now holds the old checkpoint
      return
    old = tmp_s.replace(TMP_TAG, OLD_TAG)
    os.rename(final_s, old)
    os.rename(tmp_s, final_s)
    if fsync:
      fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)
    return
  try:
    os.rename(tmp_s, final_s)
  except OSError as e:
    # another writer committed in between; with overwrite, replace that checkpoint
    if overwrite and e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(final_s):
      commit(tmp, final, overwrite=True, fsync=fsync)
      return
    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
      raise errors.CheckpointExistsError(
          f"a checkpoint appeared at {final_s} while saving; pass overwrite=True or use a "
          "new path. The new data was discarded.") from e
    raise
  if fsync:
    fsync_path(parent)


def remove_quietly(p: Any) -> None:
  """Removes a directory tree, ignoring errors (cleanup on a path already failing)."""
  shutil.rmtree(os.fspath(p), ignore_errors=True)


def remove_checkpoint(path: str) -> None:
  """Deletes a checkpoint so that it is never seen half-deleted.

  It is renamed to a leftover name first (atomic: after that it is no longer listed), then
  removed; a crash in between leaves a leftover that the next cleanup deletes.
  """
  parent, name = os.path.split(path)
  doomed = os.path.join(parent, f"{name}{OLD_TAG}{unique_tag()}")
  try:
    os.rename(path, doomed)
  except FileNotFoundError:
    return
  fsync_path(parent)
  shutil.rmtree(doomed, ignore_errors=True)


def cleanup_leftovers(root: str) -> list[str]:
  """Removes every leftover under ``root`` (call only while holding the directory lock)."""
  removed = []
  try:
    entries = os.listdir(root)
  except FileNotFoundError:
    return removed
  for e in entries:
    if TMP_TAG in e or OLD_TAG in e:
      shutil.rmtree(os.path.join(root, e), ignore_errors=True)
      removed.append(e)
  return removed


def explain_missing(final: str) -> errors.CheckpointError:
  """The clear error for a path without a readable commit marker."""
  p = os.fspath(final)
  if not os.path.exists(p):
    parent, name = os.path.split(p)
    olds = []
    if os.path.isdir(parent):
      olds = [e for e in os.listdir(parent) if e.startswith(f"{name}{OLD_TAG}")]
    hint = (
        f" {os.path.join(parent, olds[0])} exists: either a checkpoint being deleted right "
        "now, or, if no process is deleting it, the previous version left by a crash "
        "between the two renames of an overwrite (check that it has a _CHECKPOINT marker "
        "and loads, then rename it back)."
        if olds else "")
    return errors.CheckpointNotFoundError(f"no checkpoint at {p}.{hint}")
  if not os.path.isdir(p):
    return errors.CheckpointNotFoundError(f"{p} is a file, not a checkpoint directory.")
  return errors.IncompleteCheckpointError(
      f"{p} is not a committed flax_ckpt checkpoint (no {COMMIT_MARKER} marker): the save "
      "that wrote it did not finish, or the directory was made by something else. "
      "Load an earlier checkpoint instead.")
