"""Reading a committed checkpoint: one function opens it, every reader goes through it.

:func:`read_committed` opens the checkpoint directory once, reads and validates the commit
marker through that open directory (so the manifest always belongs to the version being
read) and runs the caller's read; when an overwrite replaces the checkpoint meanwhile, it
reads again. ``load``, ``load_checkpointables``, ``metadata``, ``Checkpointer`` and the
``CheckpointManager`` all read through it.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> from flax_ckpt._src.engine.loading import read_committed
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'w': np.ones(2)})
  >>> read_committed(path, lambda ckpt: list(ckpt.manifest.parts))
  ['state']
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from etils import epath

from flax_ckpt._src import env, errors
from flax_ckpt._src.format import (
    COMMIT_MARKER,
    DEFAULT_CHECKPOINTABLE,
    KIND_PYTREE,
    ROOT_DIR,
    Manifest,
)
from flax_ckpt._src.io import gc_pause, observe, orbax_layout, paths, storage
from flax_ckpt._src.parts.protocol import RestoreRequest, part_kinds

_log = observe.child("load")
_ATTEMPTS = 5  # reads retried when an overwrite replaces the checkpoint mid-read
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class CommittedCheckpoint:
  """A committed checkpoint as one read sees it.

  Attributes:
    path: the checkpoint directory.
    manifest: its validated commit marker.
  """

  path: epath.Path
  manifest: Manifest

  def part_dir(self, name: str) -> epath.Path:
    """The directory of part ``name`` (validated: a manifest is hostile input), inside
    the generation the marker names, if any (object stores)."""
    d = self.manifest.parts[name].directory(name, where=os.fspath(self.path))
    base = self.path if self.manifest.generation is None else (
        self.path / self.manifest.generation)
    return base if d == ROOT_DIR else base / d

  def only_part(self) -> str:
    """The name of the single part (a Checkpointer's checkpoint), or a clear error."""
    names = list(self.manifest.parts)
    if len(names) != 1:
      raise errors.CheckpointError(
          f"{self.path} holds several parts ({', '.join(names)}); restore them with "
          "flax_ckpt.load_checkpointables(path, {name: args}).")
    return names[0]


def _manifest(root: storage.CheckpointDir, final: epath.Path,
              backend: storage.StorageBackend) -> Manifest | None:
  """The manifest read through ``root``; None when the checkpoint went away meanwhile."""
  try:
    raw = root.read_bytes(COMMIT_MARKER)
  except FileNotFoundError:
    if not root.is_gone():
      raise _explain_missing(backend, final) from None
    return None
  return Manifest.from_bytes(raw, where=os.fspath(final))


def refuse_outside_links(ckpt: CommittedCheckpoint, name: str) -> None:
  """A checkpoint is hostile input: a link in part ``name`` (or the part's directory
  itself) must not make a load read files outside the checkpoint, unless the caller
  trusts the layout (``$FLAX_CKPT_ALLOW_SYMLINKS``). Only the part's own directory is
  walked, so a load of one part touches nothing of the others."""
  if env.allow_symlinks():
    return
  part_dir = ckpt.part_dir(name)
  links = storage.backend_for(ckpt.path).outside_links(os.fspath(part_dir),
                                                       os.fspath(ckpt.path))
  if links:
    raise errors.FormatError(
        f"{links[0]} is a symlink that resolves outside the checkpoint {ckpt.path} "
        f"({len(links)} such link(s)); a crafted checkpoint could make a load read any "
        f"file. If this layout is trusted (e.g. a cache of symlinked blobs), set "
        f"{env.ALLOW_SYMLINKS}=1.")


def _explain_missing(backend: storage.StorageBackend, final: epath.Path) -> Exception:
  """Why there is no flax_ckpt checkpoint at ``final``: a clear word for an Orbax one."""
  marker = orbax_layout.orbax_marker(backend, os.fspath(final))
  if marker is not None:
    return errors.ForeignCheckpointError(
        f"{final} is a checkpoint written by Orbax (it has {marker}), not by flax_ckpt: "
        "flax_ckpt.load, flax_ckpt.load_checkpointables and CheckpointManager.restore read "
        "it; this function reads flax_ckpt checkpoints only. "
        "(flax_ckpt.is_orbax_checkpoint(path) tells them apart.)",
        os.fspath(final), marker)
  if backend.is_dir(os.fspath(final)):
    err = orbax_layout.orbax_unreadable(backend, os.fspath(final))
    if err is not None:
      return err
  return backend.explain_missing(os.fspath(final))


def read_committed(path: paths.PathLike, read: Callable[[CommittedCheckpoint], _T]) -> _T:
  """Runs ``read`` on the committed checkpoint at ``path``, again if it was replaced.

  Raises:
    CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.
    FormatError: the commit marker is damaged or of an unknown version.
    CheckpointReplacedError: overwritten on every one of several attempts.
  """
  final = paths.to_path(path)
  backend = storage.backend_for(final)
  for attempt in range(_ATTEMPTS):
    last = attempt == _ATTEMPTS - 1
    try:
      root = backend.open_dir(os.fspath(final))
    except (FileNotFoundError, NotADirectoryError):
      if not backend.is_dir(os.fspath(final)):
        raise backend.explain_missing(os.fspath(final)) from None
      continue  # it appeared meanwhile: look again
    try:
      manifest = _manifest(root, final, backend)
      if manifest is None:
        continue
      try:
        with gc_pause.paused():  # an index of many leaves is many small objects: gc_pause.py
          out = read(CommittedCheckpoint(final, manifest))
      except errors.CheckpointReplacedError:
        if last:
          raise
        continue
      except (OSError, errors.FormatError):  # incl. CorruptCheckpointError
        # files read by path (checksummed files, custom handlers) may belong to the
        # checkpoint that replaced this one: look again
        if root.is_gone() and not last:
          continue
        raise
      if not root.is_gone():
        return out
    finally:
      root.close()
  raise errors.CheckpointReplacedError(
      f"{final} was replaced by overwrites {_ATTEMPTS} times while loading; load it again "
      "once the writer is done.")


def part_files(ckpt: CommittedCheckpoint, name: str) -> dict[str, str]:
  """``{path in the checkpoint: checksum}`` of the files of part ``name`` the marker lists
  (all of them for a part in the checkpoint directory itself: it is the only part)."""
  sums = ckpt.manifest.checksums or {}
  d = ckpt.manifest.parts[name].directory(name, where=os.fspath(ckpt.path))
  if d == ROOT_DIR:
    return dict(sums)
  return {k: v for k, v in sums.items() if k.startswith(d + "/")}


def verify_part_files(ckpt: CommittedCheckpoint, name: str) -> None:
  """Checks the files of part ``name`` (all but its data files, whose chunks are checked
  as they are read) against the marker's checksums, before the part is read.

  Raises:
    CorruptCheckpointError: naming the first file that is missing or differs.
  """
  want = part_files(ckpt, name)
  if not want:
    return
  base = ckpt.path if ckpt.manifest.generation is None else ckpt.path / ckpt.manifest.generation
  backend = storage.backend_for(base)
  got = backend.file_digests(os.fspath(base), list(want))
  for rel, digest in want.items():
    if got[rel] != digest:
      raise errors.CorruptCheckpointError(
          "the file is missing" if got[rel] is None else "its bytes do not match their checksum",
          checkpoint=os.fspath(ckpt.path), part=name, file=os.fspath(base / rel))


def _check_requested(ckpt: CommittedCheckpoint, names: list[str]) -> None:
  parts = ckpt.manifest.parts
  missing = [n for n in names if n not in parts]
  if missing:
    hint = (" (flax_ckpt.load reads the part 'state'; use load_checkpointables, or "
            "load(..., checkpointable_name=...), for named parts)"
            if DEFAULT_CHECKPOINTABLE in missing else "")
    raise errors.StructureMismatchError(
        f"{ckpt.path} has no part {', '.join(map(repr, missing))}; its parts are "
        f"{', '.join(map(repr, parts))}{hint}.")


def restore_part(ckpt: CommittedCheckpoint, name: str, restore: Callable[[], _T]) -> _T:
  """Runs ``restore`` of part ``name``, first verifying its files when loads verify; a
  CorruptCheckpointError names the checkpoint and the part."""
  try:
    refuse_outside_links(ckpt, name)
    if storage.verifying():
      verify_part_files(ckpt, name)
    return restore()
  except errors.CorruptCheckpointError as e:
    e.checkpoint = e.checkpoint or os.fspath(ckpt.path)
    e.part = e.part or name
    raise


def load_parts(path: paths.PathLike, abstract: Mapping[str, Any] | None, *,
               partial: bool = False, restore_type: type | None = None,
               verify: bool = True) -> dict[str, Any]:
  """``load_checkpointables``' engine: the requested parts, each by its kind."""
  kinds = part_kinds()

  def read(ckpt: CommittedCheckpoint) -> dict[str, Any]:
    parts = ckpt.manifest.parts
    names = list(parts) if abstract is None else list(abstract)
    _check_requested(ckpt, names)
    names = [n for n in parts if n in names]  # saved order
    found = {n: kinds.get(parts[n], n, os.fspath(ckpt.path)) for n in names}
    out = {}
    # kinds that change the caller's objects (set_state) go last, so a failed load leaves
    # those objects untouched
    for n in sorted(names, key=lambda n: found[n].restore_last):
      request = RestoreRequest(n, os.fspath(ckpt.path),
                               None if abstract is None else abstract[n], partial,
                               restore_type)
      out[n] = restore_part(ckpt, n, lambda n=n, request=request: found[n].restore(
          ckpt.part_dir(n), parts[n], request))
    return {n: out[n] for n in names}

  what = f"load of {paths.to_path(path)}"
  # bytes read: the process-wide read counter (reads run on pool threads); bytes to read:
  # the boxes the chunk readers of this load plan, as they plan them
  counter, first = observe.Counter(), storage.READ_STATS.bytes
  t0 = time.monotonic()

  def progress_line(secs: float) -> str:
    done = storage.READ_STATS.bytes - first
    return f"{what} still running after {secs:.0f} s: " + observe.progress_text(
        done, max(counter.planned, done), secs)

  with observe.Progress(_log, progress_line), observe.counting(counter), \
      storage.verify_reads(verify):
    out = read_committed(path, read)  # (the collector is paused in there)
  log_loaded(what, list(out), storage.READ_STATS.bytes - first, time.monotonic() - t0)
  return out


def log_loaded(what: str, names: list[str], nbytes: int, secs: float) -> None:
  """A load's one INFO line, and its metrics (every reader's: native, Checkpointer,
  Orbax)."""
  observe.record_duration(observe.LOAD_DURATION, secs)
  observe.record_scalar(observe.LOAD_BYTES, nbytes)
  if _log.isEnabledFor(logging.INFO):
    _log.info("%s done: %d bytes (%s) in %d part(s) [%s], %.3f s, %s", what, nbytes,
              observe.mib(nbytes), len(names), ", ".join(names), secs,
              observe.rate(nbytes, secs))


@dataclasses.dataclass
class CheckpointMetadata:
  """What :func:`flax_ckpt.metadata` returns.

  Attributes:
    tree: the saved structure of the ``state`` part (the one :func:`flax_ckpt.save`
      writes; for a checkpoint of a single part, that part) with one metadata object per
      leaf (:class:`ArrayMetadata`, :class:`ValueMetadata` or a custom handler's class);
      None when there is no such PyTree part.
    custom_metadata: the dict passed as ``custom_metadata=`` when saving.
    format_version: on-disk format version.
    checkpointables: each part's name and kind, as recorded in the commit marker:
      ``{'params': {'kind': 'pytree'}, 'dataset': {'kind': 'stateful', ...},
      'extra': {'kind': 'handler', 'handler': 'module.MyHandler'}}``.
    created_at: UNIX time of the commit.
    parts: each part's own metadata: the leaf metadata tree of a PyTree part, a
      :class:`StatefulMetadata` for a stateful part, and ``handler.metadata(directory)``
      for a part of a custom handler registered in this process (None if it is not).
  """

  tree: Any
  custom_metadata: dict | None
  format_version: int
  checkpointables: dict
  created_at: float | None = None
  parts: dict = dataclasses.field(default_factory=dict)

  def __getitem__(self, key: Any) -> Any:
    if self.tree is None:
      raise KeyError(f"{key!r}: this checkpoint has no single PyTree part to index; see "
                     f".parts (parts: {', '.join(self.checkpointables)})")
    return self.tree[key]


def _part_metadata(kinds: Any, ckpt: CommittedCheckpoint, name: str) -> Any:
  entry = ckpt.manifest.parts[name]
  try:
    kind = kinds.get(entry, name, os.fspath(ckpt.path))
  except errors.FormatError:
    return None  # a kind of a newer flax_ckpt: still list the part
  refuse_outside_links(ckpt, name)
  return kind.metadata(ckpt.part_dir(name), entry)


def checkpoint_metadata(path: paths.PathLike) -> CheckpointMetadata:
  """``flax_ckpt.metadata``'s engine: the manifest plus each part kind's metadata."""
  kinds = part_kinds()

  def read(ckpt: CommittedCheckpoint) -> CheckpointMetadata:
    entries = ckpt.manifest.parts
    parts = {n: _part_metadata(kinds, ckpt, n) for n in entries}
    tree = None
    if DEFAULT_CHECKPOINTABLE in entries:
      if entries[DEFAULT_CHECKPOINTABLE].kind == KIND_PYTREE:
        tree = parts[DEFAULT_CHECKPOINTABLE]
    elif len(entries) == 1 and next(iter(entries.values())).kind == KIND_PYTREE:
      tree = next(iter(parts.values()))
    return CheckpointMetadata(
        tree=tree, custom_metadata=ckpt.manifest.custom_metadata,
        format_version=ckpt.manifest.version, checkpointables=ckpt.manifest.checkpointables(),
        created_at=ckpt.manifest.created_at, parts=parts)

  return read_committed(path, read)
