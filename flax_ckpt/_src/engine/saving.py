"""The save transaction: every part written into one temporary directory, one commit.

``PendingSave.start(path, parts, options)`` validates every part, claims the destination,
makes the temporary directory (the storage backend's ``begin``: a sibling directory
locally, a new generation prefix on an object store) and starts each part's writer; when
it returns, nothing of the caller's is read any more. ``commit()`` finishes the writing,
waits for every process and commits with the backend's protocol: the commit marker last,
then a rename locally (``docs/format.md``, "Commit protocol"); ``abort()`` gives the save
up. Either way the parts are closed and the
destination released. An async save runs ``commit`` in a background thread.

Example:
  >>> import numpy as np, tempfile, os
  >>> from flax_ckpt._src.engine.saving import PendingSave, SaveOptions, parts_from
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> PendingSave.start(path, parts_from({'state': {'w': np.ones(2)}}), SaveOptions()).commit()
  >>> sorted(os.listdir(path))
  ['_CHECKPOINT', 'state']
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.engine import loading
from flax_ckpt._src.format import (
  COMMIT_MARKER,
  DATA_FILE_RE,
  DEFAULT_CHECKPOINTABLE,
  KIND_PYTREE,
  PART_NAME_RE,
  REUSED_FILE_RE,
  ROOT_DIR,
  Manifest,
  PartEntry,
)
from flax_ckpt._src.io import multihost, observe, paths, storage
from flax_ckpt._src.leaves.reuse import PreviousChunks
from flax_ckpt._src.parts import pytree_io
from flax_ckpt._src.parts.protocol import PartFinish, PartWriter, part_kinds
from flax_ckpt._src.parts.pytree import PyTreeWriter

_log = observe.child("save")


@dataclasses.dataclass(frozen=True)
class SaveOptions:
  """How one save runs (the public functions' keyword arguments, as one value).

  Attributes:
    overwrite: replace an existing checkpoint (kept intact until the new one commits).
    fsync: make the data durable before committing.
    is_async: the parts' writers may finish in a background thread.
    barrier_timeout_s: multi-process only: how long each process waits for the others.
    custom_metadata: the caller's JSON dict for the manifest.
    overwrite_flag: the caller's name for ``overwrite``, for the error when the
      destination exists (``Checkpointer.save`` calls it ``force``).
    manager: a CheckpointManager's ``{"step", "time", "metrics"}`` manifest record.
    before_commit: called by process 0 right before the commit marker is written; an
      exception it raises aborts the save (a manager checks that it still owns its
      directory).
    reuse_unchanged: array chunks whose bytes equal the same chunk of ``reuse_from``
      are hard-linked from it instead of written again (docs/format.md, "Reused
      bytes"); without ``reuse_from`` (a manager's first save) the save only notes the
      checksums of the jax arrays it writes, so the next save of the same arrays hashes
      nothing. Ignored where the storage has no hard links.
    reuse_from: a committed checkpoint on the same local filesystem (a manager's
      previous step); one that cannot be read only means nothing is reused.
  """

  overwrite: bool = False
  fsync: bool = True
  is_async: bool = False
  barrier_timeout_s: float | None = None
  custom_metadata: dict | None = None
  overwrite_flag: str = "overwrite"
  manager: dict | None = None
  before_commit: Callable[[], None] | None = None
  reuse_unchanged: bool = False
  reuse_from: str | None = None


@dataclasses.dataclass
class Part:
  """One part of a save: its name, its directory in the checkpoint and its writer."""

  name: str
  writer: PartWriter
  dir: str = ""  # default: the name; ROOT_DIR: the checkpoint directory itself

  def __post_init__(self) -> None:
    self.dir = self.dir or self.name


def check_name(name: Any) -> str:
  if not isinstance(name, str) or not PART_NAME_RE.fullmatch(name):
    raise ValueError(
        f"checkpointable name {name!r} is not allowed: use 1-128 characters from "
        "[A-Za-z0-9_.-], starting with a letter or digit (it becomes a directory name).")
  return name


def check_custom_metadata(custom_metadata: Any) -> None:
  if custom_metadata is None:
    return
  if not isinstance(custom_metadata, dict):
    raise TypeError("custom_metadata must be a dict of JSON-serializable values")
  try:
    json.dumps(custom_metadata, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"custom_metadata is not JSON-serializable ({e}); convert arrays with .tolist() and "
        "other objects to str/int/float/bool/list/dict. Nothing was written.") from e


def parts_from(checkpointables: Mapping[str, Any]) -> list[Part]:
  """One part per ``{name: value}``, each with the writer of the first kind that takes it."""
  if not isinstance(checkpointables, Mapping) or not checkpointables:
    raise TypeError("checkpointables must be a non-empty dict {name: object}; nothing was "
                    "written.")
  kinds = part_kinds()
  return [Part(check_name(name), kinds.writer_for(name, value))
          for name, value in checkpointables.items()]


class _Claims:
  """The saves in flight in this process, by destination, in call order.

  Without overwrite a second concurrent save to one path is an error; with it, a save
  commits only after the earlier ones to the same path finished, so the last call wins.
  """

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._in_flight: dict[str, list[threading.Event]] = {}

  def claim(self, final: epath.Path, overwrite: bool) -> tuple[str, threading.Event, list]:
    key = paths.canonical(final)  # one key however the path is spelled
    with self._lock:
      earlier = self._in_flight.get(key, [])
      if earlier and not overwrite:
        raise errors.CheckpointExistsError(
            f"a save to {key} is already in progress in this process; wait for it "
            "(AsyncResponse.result()) or pass overwrite=True. Nothing was written.")
      ticket = threading.Event()
      self._in_flight[key] = [*earlier, ticket]
    return key, ticket, list(earlier)

  def release(self, key: str, ticket: threading.Event) -> None:
    with self._lock:
      rest = [t for t in self._in_flight.get(key, []) if t is not ticket]
      if rest:
        self._in_flight[key] = rest
      else:
        self._in_flight.pop(key, None)
    ticket.set()


_CLAIMS = _Claims()


class PendingSave:
  """One save between ``start`` and ``commit()``/``abort()`` (see the module docstring)."""

  def __init__(self, path: Any, parts: list[Part], options: SaveOptions):
    self.final = paths.to_path(path)
    self.backend: storage.StorageBackend = storage.backend_for(self.final)  # chosen once
    self.parts, self.options = parts, options
    self.nproc, self.pid = multihost.process_count(), multihost.process_index()
    self.primary = self.pid == 0
    # Numbered before any check that could fail in one process only, and named after the
    # path: processes that disagree about a save time out instead of pairing different saves.
    self.op = (multihost.next_operation_id(os.fspath(self.final)) if self.nproc > 1 else "")
    self.timeout = multihost.timeout_s(options.barrier_timeout_s)
    self.tmp: epath.Path | None = None
    self._created: list[str] = []
    self._finishes: list[PartFinish] = []
    self._claim: tuple[str, threading.Event, list] | None = None
    # observability: the bytes the parts' data writers place and write (counted by the
    # writers themselves), and a progress line while the save runs long
    self.counter = observe.Counter()
    self._progress = observe.Progress(_log, self._progress_line)

  @classmethod
  def start(cls, path: Any, parts: list[Part], options: SaveOptions) -> PendingSave:
    """Validates, claims ``path`` and starts every part; the caller's objects are free."""
    save = cls(path, parts, options)
    try:
      save._validate()
    except BaseException:
      save._close_parts()
      raise
    save._progress.start()
    try:
      with observe.counting(save.counter):
        save._begin()
    except BaseException:
      save._give_up()
      raise
    save._log_started()
    return save

  def _begin(self) -> None:
    """``start``'s steps once validated: plan every part, make the temporary directory
    and start every part's writer (the data writers count into ``self.counter``)."""
    if self.primary:
      removed = self.backend.cleanup_stale(os.fspath(self.final))
      if removed:
        _log.info("removed %d leftover(s) of dead saves to %s: %s", len(removed), self.final,
                  ", ".join(map(str, removed[:5])))
    with observe.phase(_log, self._what(), "plan"):
      self._each_part(lambda p: p.writer.plan(f"checkpointable {p.name!r}"))
    shared = self._make_tmp_dir()
    if self.options.reuse_unchanged and self.backend.has_links:
      previous = self._previous_parts()
      for p in self.parts:
        if isinstance(p.writer, PyTreeWriter):
          p.writer.previous = previous.get(p.name) or PreviousChunks()
    with observe.phase(_log, self._what(), "write (start)"):
      self._each_part(lambda p: self._finishes.append(
          p.writer.start(self._part_dir(p), shared.get(p.name), self.options.is_async)))

  def _previous_parts(self) -> dict[str, PreviousChunks]:
    """The reusable chunks of ``reuse_from``'s PyTree parts that this save also has; an
    unreadable or damaged earlier checkpoint only means nothing is reused."""
    src = self.options.reuse_from
    if src is None or not any(isinstance(p.writer, PyTreeWriter) for p in self.parts):
      return {}

    def read(ckpt: loading.CommittedCheckpoint) -> dict[str, PreviousChunks]:
      out = {}
      for p in self.parts:
        entry = ckpt.manifest.parts.get(p.name)
        if entry is None or entry.kind != KIND_PYTREE or not isinstance(p.writer,
                                                                        PyTreeWriter):
          continue
        loading.verify_part_files(ckpt, p.name)  # the index it trusts is the one saved
        found = pytree_io.previous_chunks(ckpt.part_dir(p.name))
        if found is not None:
          out[p.name] = found
      return out

    try:
      with observe.phase(_log, self._what(), "read the previous checkpoint's index"):
        return loading.read_committed(src, read)
    except (OSError, errors.CheckpointError) as e:
      _log.info("%s: not reusing the bytes of %s (%s)", self._what(), src, e)
      return {}

  def commit(self) -> None:
    """Finishes writing, commits with one rename, and waits for every process."""
    what = self._what()
    try:
      try:
        with observe.phase(_log, what, "write and fsync"):
          self._finish_parts()
        with observe.phase(_log, what, "barrier (written)"):
          multihost.barrier(f"{self.op}/written", self.timeout, "finished writing its part")
        if self.primary:
          with observe.phase(_log, what, "commit"):
            self._commit()
      except BaseException:
        self._give_up(release=False)
        raise
      with observe.phase(_log, what, "barrier (committed)"):
        multihost.barrier(f"{self.op}/committed", self.timeout, "saw the commit",
                          committed=True)
    finally:
      self._progress.stop()
      self._close_parts()
      self._release()
    self._log_committed()

  def abort(self) -> None:
    """Gives the save up: stops the writers and removes the temporary directory."""
    self._give_up()

  # --- steps ------------------------------------------------------------------------

  def _validate(self) -> None:
    """Everything that can fail before the disk is touched."""
    self.backend.check_destination(os.fspath(self.final), self.options.overwrite,
                                   self.options.overwrite_flag)
    check_custom_metadata(self.options.custom_metadata)
    self._claim = _CLAIMS.claim(self.final, self.options.overwrite)

  def _make_tmp_dir(self) -> dict[str, Any]:
    """Process 0 makes the temporary directory and tells the others its name, plus what
    each part needs them to know; every process writes its share into that directory."""
    local = {p.name: p.writer.share() for p in self.parts} if self.primary else None
    if self.primary:
      tmp, self._created = self.backend.begin(os.fspath(self.final))
      self.tmp = epath.Path(tmp)
      for p in self.parts:
        if p.dir != ROOT_DIR:
          self.backend.makedirs(os.path.join(tmp, p.dir))
    if self.nproc > 1:
      info = json.loads(multihost.share(
          f"{self.op}/start", json.dumps({"tmp": os.fspath(self.tmp or ""), "local": local})
          if self.primary else None, self.timeout))
      self.tmp, local = epath.Path(info["tmp"]), info["local"]
    assert self.tmp is not None and local is not None
    return local

  def _part_dir(self, part: Part) -> epath.Path:
    assert self.tmp is not None
    return self.tmp if part.dir == ROOT_DIR else self.tmp / part.dir

  def _finish_parts(self) -> None:
    try:
      for p, fin in zip(self.parts, self._finishes):
        self._annotated(p, lambda fin=fin: fin.finish(self.options.fsync))
    except OSError as e:
      if self.primary:
        raise
      raise errors.CheckpointError(
          f"process {self.pid} could not write its part of {self.final} ({e}); if process 0 "
          "failed first, its error says why. Nothing was committed.") from e

  def _commit(self) -> None:
    """Writes the commit marker last, after earlier saves to this path (the backend's
    commit protocol, docs/format.md)."""
    assert self._claim is not None and self.tmp is not None
    for t in self._claim[2]:  # earlier saves to this path commit (or fail) first
      t.wait()
    entries = {p.name: dataclasses.replace(p.writer.entry(),
                                           dir=None if p.dir == p.name else p.dir)
               for p in self.parts}
    sums, reuses = self._file_checksums(entries)
    if self.options.before_commit is not None:
      self.options.before_commit()
    manifest = Manifest(
        parts=entries, custom_metadata=self.options.custom_metadata, created_at=time.time(),
        process_count=self.nproc, manager=self.options.manager, checksums=sums,
        reuses=reuses)
    self.backend.commit(os.fspath(self.tmp), os.fspath(self.final), manifest,
                        overwrite=self.options.overwrite, fsync=self.options.fsync)

  def _file_checksums(self, entries: dict[str, PartEntry]) -> tuple[dict[str, str], bool]:
    """The checksum of every file of the save but the commit marker and the PyTree parts'
    data files (their chunks carry their own), read back once every process has written
    its files: so the files of other processes and of custom handlers are covered too.
    Also whether any process reused an earlier data file (the format version says so)."""
    assert self.tmp is not None
    tmp = os.fspath(self.tmp)
    data_dirs = {"" if p.dir == ROOT_DIR else p.dir for p in self.parts
                 if entries[p.name].kind == KIND_PYTREE}
    listed = self.backend.list_files(tmp)
    data = {n for n in listed if DATA_FILE_RE.fullmatch(posixpath.basename(n))
            and posixpath.dirname(n) in data_dirs}
    reuses = any(REUSED_FILE_RE.fullmatch(posixpath.basename(n)) for n in data)
    names = [n for n in listed if n != COMMIT_MARKER and n not in data]
    sums = self.backend.file_digests(tmp, names)
    missing = [n for n, d in sums.items() if d is None]
    if missing:
      raise errors.CheckpointError(
          f"files of the save to {self.final} vanished before the commit ({missing[:5]}); "
          "something else writes into its temporary directory. Nothing was committed.")
    return {n: d for n, d in sums.items() if d is not None}, reuses

  # --- observability ---------------------------------------------------------------

  def _what(self) -> str:
    step = (self.options.manager or {}).get("step")
    return f"save to {self.final}" + ("" if step is None else f" (step {step})")

  def _progress_line(self, secs: float) -> str:
    return (f"{self._what()} still running after {secs:.0f} s: "
            f"{observe.progress_text(self.counter.done, self.counter.planned, secs)}")

  def _log_started(self) -> None:
    """An async save: how long the caller was blocked (snapshot and writers started)."""
    if not self.options.is_async:
      return
    blocked = time.monotonic() - self._progress.start_time
    observe.record_duration(observe.SAVE_BLOCKING, blocked)
    _log.info("async %s started: training blocked %.3f s; %s to write in the background",
              self._what(), blocked, observe.mib(self.counter.planned))

  def _log_committed(self) -> None:
    """The save's one INFO line, and its metrics."""
    secs = time.monotonic() - self._progress.start_time
    nbytes = self.counter.planned
    observe.record_duration(observe.SAVE_DURATION, secs)
    observe.record_scalar(observe.SAVE_BYTES, nbytes)
    if not _log.isEnabledFor(logging.INFO):
      return
    names = ", ".join(p.name for p in self.parts)
    landed = time.strftime("%H:%M:%S", time.localtime())
    _log.info("%s%s committed at %s: %d bytes (%s) in %d part(s) [%s], %.3f s, %s",
              "async " if self.options.is_async else "", self._what(), landed, nbytes,
              observe.mib(nbytes), len(self.parts), names, secs, observe.rate(nbytes, secs))

  # --- failure and cleanup -----------------------------------------------------------

  def _each_part(self, step: Any) -> None:
    for p in self.parts:
      self._annotated(p, lambda p=p: step(p))

  def _annotated(self, part: Part, fn: Any) -> None:
    try:
      fn()
    except BaseException as e:
      add_note = getattr(e, "add_note", None)  # Python >= 3.11
      if (len(self.parts) > 1 or part.name != DEFAULT_CHECKPOINTABLE) and add_note:
        add_note(f"flax_ckpt: while saving checkpointable {part.name!r}")
      raise

  def _give_up(self, release: bool = True) -> None:
    """Waits until no part writes any more, then removes what this save made."""
    self._progress.stop()
    for fin in self._finishes:
      try:
        fin.abort()
      except Exception:  # noqa: BLE001,S110 - already failing
        pass
    if self.primary:
      self.backend.abort(None if self.tmp is None else os.fspath(self.tmp), self._created)
    if release:
      self._close_parts()
      self._release()

  def _close_parts(self) -> None:
    for p in self.parts:
      try:
        p.writer.close()
      except Exception:  # noqa: BLE001,S110 - closing must not hide the real outcome
        pass

  def _release(self) -> None:
    if self._claim is not None:
      key, ticket, _ = self._claim
      self._claim = None
      _CLAIMS.release(key, ticket)
