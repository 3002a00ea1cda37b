"""The object-store backend and its commit protocol (docs/format.md, "Commit protocol").

Nothing can be renamed on an object store, so a save writes its parts under a new
*generation* prefix inside the checkpoint, ``<ckpt>/flax_ckpt-gen-<time>-<host>-<pid>-<hex>/``,
and commits by writing ``<ckpt>/_CHECKPOINT`` last, naming that generation. A single
object PUT is atomic, so a reader sees the old marker or the new one, never a mix:

* a new checkpoint's marker is created with a create-only write (GCS
  ``ifGenerationMatch=0``, S3 ``If-None-Match``), so of two racing saves one fails;
* ``overwrite=True`` replaces the marker with a compare-and-swap on the generation it
  read, and only then deletes the old generation: until the swap the old checkpoint is
  intact, and a reader holding the old marker notices the swap and reads again;
* a prefix without a marker is never listed, loaded or counted as a step; leftovers of
  crashed saves are deleted by a later save (when provably dead, see :func:`_stale`) or
  when a CheckpointManager opens (it holds the directory's owner lock).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

from flax_ckpt._src import env, errors
from flax_ckpt._src.format import (
    COMMIT_MARKER,
    GEN_RE,
    GEN_TAG,
    Manifest,
    dump_json_bytes,
    load_json_bytes,
)
from flax_ckpt._src.io import paths
from flax_ckpt._src.io.storage import checksums, cloud, objstore

STALE_AFTER_S = 6 * 3600.0  # an unfinished generation this old is a crashed save's
_CAS_ATTEMPTS = 8


def _host() -> str:
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in socket.gethostname()) or "h"


def new_generation() -> str:
  """``flax_ckpt-gen-<unix time>-<host>-<pid>-<hex>``: names one save's files."""
  return f"{GEN_TAG}{int(time.time())}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _stale(name: str, now: float) -> bool:
  """Whether generation ``name`` (not named by a marker) belongs to a save that died:
  its process is gone from this host, or it started more than STALE_AFTER_S ago."""
  m = GEN_RE.fullmatch(name)
  if not m:
    return False
  started, host, pid = int(m.group(1)), m.group(2), int(m.group(3))
  if host == _host() and pid != os.getpid() and not paths.pid_alive(pid):
    return True
  return now - started > STALE_AFTER_S


_UNREADABLE = "?"  # a marker cleanup cannot read: keep everything next to it


def _generation_of(marker: bytes | None, where: str) -> str | None:
  """The generation a commit marker names: None for none (or no marker), _UNREADABLE
  when the marker is damaged. Read leniently (any version, no validation of the rest), so
  cleanup never deletes what a damaged marker or a newer flax_ckpt's marker may name."""
  del where
  if marker is None:
    return None
  try:
    doc = load_json_bytes(marker)
  except ValueError:
    return _UNREADABLE
  gen = doc.get("generation") if isinstance(doc, dict) else None
  if gen is None and isinstance(doc, dict) and doc.get("version") == 1:
    return None
  return gen if isinstance(gen, str) and GEN_RE.fullmatch(gen) else _UNREADABLE


class ObjectStoreBackend:
  """``s3://`` and ``gs://`` checkpoints through tensorstore's kvstore drivers."""

  has_links = False  # no hard links: a save here writes every byte

  def __init__(self, scheme: str):
    self.scheme = scheme
    self.name = {"s3": "s3", "gs": "gcs"}[scheme]

  # --- data files -------------------------------------------------------------------

  def open_writer(self, path: str, *, direct: bool = False, ts_context: Any = None
                  ) -> objstore.ObjectDataWriter:
    del direct, ts_context  # no direct I/O; one shared tensorstore context per process
    return objstore.ObjectDataWriter(path, env.object_bytes())

  def read_into(self, path: str, requests: Any, files: Any = None,
                segment_bytes: int | None = None) -> None:
    del files
    objstore.read_ranges(path, requests, segment_bytes)

  def open_dir(self, path: str) -> objstore.ObjectDir:
    return objstore.ObjectDir(path)

  def kvstore_spec(self, directory: str | os.PathLike) -> dict:
    return cloud.kvstore_spec(cloud.parse(os.fspath(directory)))

  # --- small files and the namespace ---------------------------------------------------

  def read_bytes(self, path: str) -> bytes:
    got = objstore.read_versioned(path)
    if got is None:
      raise FileNotFoundError(path)
    return got[0]

  def write_bytes(self, path: str, data: bytes, *, fsync: bool) -> None:
    del fsync  # a finished PUT is durable
    objstore.write(path, data)

  def read_versioned(self, path: str) -> tuple[bytes, Any] | None:
    return objstore.read_versioned(path)

  def modified_at(self, version: Any) -> float | None:
    del version  # object generations carry no time: the lock's content does
    return None

  def create_exclusive(self, path: str, data: bytes) -> bool:
    return objstore.write(path, data, if_generation=objstore.missing_generation()) is not None

  def replace_if(self, path: str, data: bytes, version: Any) -> bool:
    return objstore.write(path, data, if_generation=version) is not None

  def heartbeat(self, path: str, data: bytes, version: Any) -> Any:
    """Rewrites ``path`` (compare-and-swap on ``version``); its new version, or None when
    someone else replaced it meanwhile."""
    return objstore.write(path, data, if_generation=version)

  def list_files(self, directory: str) -> list[str]:
    return sorted(objstore.list_keys(directory))

  def outside_links(self, directory: str, root: str) -> list[str]:
    del directory, root  # an object store has no links
    return []

  def file_digests(self, directory: str, names: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    names = list(names)
    for i in range(0, len(names), 32):  # read in parallel, 32 objects at a time
      batch = names[i:i + 32]
      got = objstore.read_many([posixpath.join(directory, n) for n in batch])
      out.update({n: None if g is None else checksums.digest(g) for n, g in zip(batch, got)})
    return out

  def link_file(self, src: str, dst: str) -> bool:
    del src, dst  # no hard links in an object store (a save there writes every byte)
    return False

  def remove_file(self, path: str) -> None:
    objstore.delete(path)

  def is_dir(self, path: str) -> bool:
    return bool(objstore.list_keys(path))

  def listdir(self, path: str) -> list[str]:
    return sorted({k.split("/", 1)[0] for k in objstore.list_keys(path)})

  def makedirs(self, path: str) -> None:
    del path  # prefixes need no creating

  def remove_tree(self, path: str) -> None:
    try:
      objstore.delete_prefix(path)
    except errors.StorageError:
      pass  # cleanup on a path already failing

  def sync_tree(self, path: str) -> None:
    del path  # a finished PUT is durable

  def sync_dir(self, path: str) -> None:
    del path  # no directories

  def is_committed(self, path: str) -> bool:
    return objstore.read_versioned(f"{path}/{COMMIT_MARKER}") is not None

  def committed_entries(self, root: str) -> list[str]:
    """One listing of ``root``: the entries with a ``<entry>/_CHECKPOINT`` object."""
    return sorted({k.split("/", 1)[0] for k in objstore.list_keys(root)
                   if k.count("/") == 1 and k.endswith(f"/{COMMIT_MARKER}")})

  # --- the commit protocol ------------------------------------------------------------

  def check_destination(self, final: str, overwrite: bool, flag: str = "overwrite") -> None:
    if objstore.read_versioned(f"{final}/{COMMIT_MARKER}") is not None and not overwrite:
      raise errors.CheckpointExistsError(
          f"a checkpoint already exists at {final}; pass {flag}=True to replace it (the old "
          "one stays intact until the new one is committed) or choose a new path.")
    objstore.check_bucket(final)  # a missing bucket or bad credentials fail here (S3)

  def cleanup_stale(self, final: str) -> list[str]:
    """Deletes the generations of dead saves under ``final`` (see :func:`_stale`)."""
    current = self._current_generation(final)
    if current == _UNREADABLE:
      return []
    now = time.time()
    doomed = [n for n in self.listdir(final) if n != current and _stale(n, now)]
    for n in doomed:
      self.remove_tree(f"{final}/{n}")
    return doomed

  def begin(self, final: str) -> tuple[str, list[str]]:
    """The prefix this save writes its parts under (nothing to create)."""
    return f"{final}/{new_generation()}", []

  def commit(self, tmp: str, final: str, manifest: Manifest, *, overwrite: bool,
             fsync: bool) -> None:
    """Writes the marker naming ``tmp``'s generation; with ``overwrite``, swaps it for the
    old one, then deletes the old generation."""
    del fsync
    gen = tmp.rsplit("/", 1)[-1]
    data = dump_json_bytes(
        dataclasses.replace(manifest, generation=gen, version=0).to_json())
    marker = f"{final}/{COMMIT_MARKER}"
    for _ in range(_CAS_ATTEMPTS):
      old = objstore.read_versioned(marker)
      if old is not None and not overwrite:
        raise errors.CheckpointExistsError(
            f"a checkpoint appeared at {final} while saving; pass overwrite=True or use a "
            "new path. The new data was discarded.")
      cond = objstore.missing_generation() if old is None else old[1]
      if objstore.write(marker, data, if_generation=cond) is not None:
        if old is not None:
          self._remove_replaced(final, old[0], gen)
        return
    raise errors.CheckpointError(
        f"{final}: the commit marker kept changing under {_CAS_ATTEMPTS} attempts to replace "
        "it (other jobs are saving there); the new data was discarded.")

  def _remove_replaced(self, final: str, old_marker: bytes, new_gen: str) -> None:
    """Deletes what the replaced marker named: its generation, or (a marker without one,
    e.g. a local checkpoint copied here) everything but the marker and the new one."""
    try:
      old = Manifest.from_bytes(old_marker, where=final)
      keep_only = old.generation
    except errors.FormatError:
      keep_only = None
    if keep_only is not None:
      if keep_only != new_gen:
        self.remove_tree(f"{final}/{keep_only}")
      return
    for name in self.listdir(final):
      if name not in (COMMIT_MARKER, new_gen) and not GEN_RE.fullmatch(name):
        self.remove_tree(f"{final}/{name}")
        if self.read_versioned(f"{final}/{name}") is not None:
          self.remove_file(f"{final}/{name}")

  def explain_missing(self, final: str) -> errors.CheckpointError:
    """The clear error for a checkpoint path without a commit marker."""
    if objstore.list_keys(final):  # raises StorageError for a missing bucket
      return errors.IncompleteCheckpointError(
          f"{final} is not a committed flax_ckpt checkpoint (no {COMMIT_MARKER} marker): the "
          "save that wrote it did not finish, or the objects were made by something else. "
          "Load an earlier checkpoint instead.")
    return errors.CheckpointNotFoundError(
        f"no checkpoint at {final} (nothing is stored under that prefix; check the bucket "
        "and prefix names).")

  def abort(self, tmp: str | None, created: list[str]) -> None:
    del created
    if tmp is not None:
      self.remove_tree(tmp)

  def _current_generation(self, final: str) -> str | None:
    got = objstore.read_versioned(f"{final}/{COMMIT_MARKER}")
    return _generation_of(None if got is None else got[0], final)

  def remove_checkpoint(self, path: str) -> None:
    """Deletes the marker first (from then on nothing lists or loads it), then the rest."""
    try:
      objstore.delete(f"{path}/{COMMIT_MARKER}")
    except errors.StorageError:
      return
    self.remove_tree(path)

  def cleanup_leftovers(self, root: str) -> list[str]:
    """Deletes every generation under ``root/<entry>`` that no marker names (call only
    while holding the directory's owner lock: no other save can be running there).

    One listing of ``root`` finds them; the markers of entries holding generations are
    then read in parallel (a marker may name another generation, or none: a version 1
    checkpoint copied here).
    """
    layout: dict[str, tuple[bool, set[str]]] = {}
    for key in objstore.list_keys(root):
      entry, _, rest = key.partition("/")
      first = rest.split("/", 1)[0]
      marked, gens = layout.setdefault(entry, (False, set()))
      if first == COMMIT_MARKER:
        layout[entry] = (True, gens)
      elif GEN_RE.fullmatch(first):
        gens.add(first)
    todo = [(e, marked, gens) for e, (marked, gens) in layout.items() if gens]
    markers = objstore.read_many([f"{root}/{e}/{COMMIT_MARKER}" for e, marked, _ in todo
                                  if marked])
    removed = []
    for entry, marked, gens in todo:
      current = _generation_of(markers.pop(0), f"{root}/{entry}") if marked else None
      if current == _UNREADABLE:
        continue
      for n in sorted(gens - {current}):
        self.remove_tree(f"{root}/{entry}/{n}")
        removed.append(f"{entry}/{n}")
    return removed
