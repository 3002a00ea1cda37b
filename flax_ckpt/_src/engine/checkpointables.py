"""Checkpoints made of named parts ("checkpointables"), written with one atomic commit.

``save_checkpointables(path, {'params': tree, 'dataset': iterator, ...})`` picks a handler
per part by its type, writes every part into its own sub-directory of one temporary
directory, and commits them all with a single rename. ``load_checkpointables`` reads the
parts asked for and opens no file of any other part.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import (
    COMMIT_MARKER,
    DEFAULT_CHECKPOINTABLE,
    FORMAT_VERSION,
    PART_NAME_RE,
    ROOT_DIR,
)
from flax_ckpt._src.io import background, multihost, paths, storage
from flax_ckpt._src.parts import handlers, pytree_io
from flax_ckpt._src.parts.handler_api import call_with_args
from flax_ckpt._src.parts.handlers import CheckpointArgs
from flax_ckpt._src.parts.pytree import (
  PyTreeCheckpointHandler,
  PyTreeRestore,
  _PyTreeDriver,
  check_restore_type,
)
from flax_ckpt._src.parts.stateful import (
  StatefulCheckpointHandler,
  StatefulRestore,
  _StatefulDriver,
  is_stateful,
)

_ATTEMPTS = 5  # reads retried when an overwrite replaces the checkpoint mid-read


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


def check_name(name: Any) -> str:
  if not isinstance(name, str) or not PART_NAME_RE.fullmatch(name):
    raise ValueError(
        f"checkpointable name {name!r} is not allowed: use 1-128 characters from "
        "[A-Za-z0-9_.-], starting with a letter or digit (it becomes a directory name).")
  return name


# ---------------------------------------------------------------------------------------
# Choosing how each part is saved


class _CustomDriver:
  """The save of one part by a user's CheckpointHandler."""

  kind = "handler"

  def __init__(self, handler: Any, args: Any, owned: bool):
    self.handler, self.args, self.owned = handler, args, owned
    self.futures: list = []

  def plan(self, what: str = "") -> None:
    for m in ("save", "restore"):
      if not callable(getattr(self.handler, m, None)):
        raise TypeError(f"{what}: {type(self.handler).__qualname__} has no {m}() method; a "
                        "CheckpointHandler needs save(directory, args) and restore(directory, "
                        "args)")

  def share(self) -> Any:
    return None

  def start(self, directory: epath.Path, shared: Any,
            is_async: bool) -> Callable[[bool], None]:
    if (multihost.process_index() != 0
        and not getattr(self.handler, "save_on_all_processes", False)):
      return lambda fsync: None
    if is_async and callable(getattr(self.handler, "async_save", None)):
      r = call_with_args(self.handler.async_save, directory, self.args)
      if inspect.isawaitable(r):
        # on flax_ckpt's long-lived loop: tasks the handler starts keep running after this
        async def _await(x=r):
          return await x
        r = background.run_on_background_loop(_await())
      self.futures = list(r or [])
    else:
      call_with_args(self.handler.save, directory, self.args)
    futures = self.futures

    def finish(fsync: bool) -> None:
      background.wait_futures(futures)
      if fsync:
        paths.fsync_tree(directory)

    return finish

  def entry(self) -> dict:
    return {"kind": "handler", "handler": handlers.handler_name(type(self.handler))}

  def abort(self) -> None:
    background.wait_futures(self.futures, quiet=True)  # nothing may write after cleanup

  def close(self) -> None:
    if self.owned and callable(getattr(self.handler, "close", None)):
      self.handler.close()


def driver_for_handler(handler: Any, args: Any, *, owned: bool) -> Any:
  # the built-in handlers' fast path, unless a subclass changed how they save
  for base in (PyTreeCheckpointHandler, StatefulCheckpointHandler):
    if isinstance(handler, base) and type(handler).save is base.save:
      return base._flax_ckpt_driver(handler, args)
  return _CustomDriver(handler, args, owned)


def construct_handler(hcls: type, what: str) -> Any:
  """``hcls()``, or a clear error when the handler needs constructor arguments."""
  try:
    return hcls()
  except TypeError as e:
    raise TypeError(
        f"{what}: flax_ckpt has to construct {handlers.handler_name(hcls)} without "
        f"arguments, which failed ({e}). Give the class defaults for its constructor "
        "arguments, or use flax_ckpt.Checkpointer(handler_instance) for this object.") from e


def driver_for_value(name: str, value: Any) -> Any:
  """How the checkpointable ``value`` is saved: by its args, its type, its protocol."""
  if isinstance(value, CheckpointArgs):
    hcls = handlers.save_handler_for(value)
    if hcls is None:
      raise handlers.RegistrationError(
          f"checkpointable {name!r}: {type(value).__qualname__} is not registered for saving "
          "with any CheckpointHandler; decorate it with "
          "@flax_ckpt.args.register_with_handler(MyHandler, for_save=True). Nothing was "
          "written.")
    return driver_for_handler(construct_handler(hcls, f"checkpointable {name!r}"), value,
                              owned=True)
  hcls = handlers.type_handler_for(value)
  if hcls is not None:
    args_cls = handlers.registered_args_cls(hcls, for_save=True)
    if args_cls is None:
      raise handlers.RegistrationError(
          f"checkpointable {name!r}: {type(value).__qualname__} is saved by "
          f"{hcls.__qualname__}, which has no save args class; register one with "
          f"@flax_ckpt.args.register_with_handler({hcls.__qualname__}, for_save=True). "
          "Nothing was written.")
    return driver_for_handler(construct_handler(hcls, f"checkpointable {name!r}"),
                              args_cls(value), owned=True)
  if is_stateful(value):
    return _StatefulDriver(value)
  return _PyTreeDriver(value)


# ---------------------------------------------------------------------------------------
# Saving


_in_flight: dict[str, list[threading.Event]] = {}  # destination -> saves in call order
_in_flight_lock = threading.Lock()


def _claim(final: epath.Path, overwrite: bool) -> tuple[str, threading.Event, list]:
  """Registers a save to ``final``; without overwrite, a second concurrent one is an error.

  Returns the key, this save's ticket, and the tickets of earlier saves to the same path in
  this process: this save commits only after those finished, so the last call wins.
  """
  key = os.path.realpath(final)  # one key however the path is spelled
  with _in_flight_lock:
    earlier = _in_flight.get(key, [])
    if earlier and not overwrite:
      raise errors.CheckpointExistsError(
          f"a save to {key} is already in progress in this process; wait for it "
          "(AsyncResponse.result()) or pass overwrite=True. Nothing was written.")
    ticket = threading.Event()
    _in_flight[key] = [*earlier, ticket]
  return key, ticket, list(earlier)


def _release(key: str, ticket: threading.Event) -> None:
  with _in_flight_lock:
    rest = [t for t in _in_flight.get(key, []) if t is not ticket]
    if rest:
      _in_flight[key] = rest
    else:
      _in_flight.pop(key, None)
  ticket.set()


@dataclasses.dataclass
class Part:
  name: str
  dir: str
  driver: Any


def _annotate(e: BaseException, parts: list[Part], name: str) -> None:
  if (len(parts) > 1 or name != DEFAULT_CHECKPOINTABLE) and hasattr(e, "add_note"):
    e.add_note(f"flax_ckpt: while saving checkpointable {name!r}")


def start_save(path: paths.PathLike, parts: list[Part], *, overwrite: bool,
               custom_metadata: Any, is_async: bool, fsync: bool,
               barrier_timeout_s: float | None = None, overwrite_flag: str = "overwrite",
               manifest_extra: dict | None = None
               ) -> tuple[epath.Path, Callable[[], None]]:
  """Snapshots every part into a temporary directory; returns ``finish()`` that commits.

  Everything that reads the caller's objects happens before this returns.
  """
  nproc, pid = multihost.process_count(), multihost.process_index()
  primary = pid == 0
  final = paths.to_path(path)
  # Numbered before any check that could fail in one process only, and named after the
  # path: processes that disagree about a save time out instead of pairing different saves.
  op = multihost.next_operation_id(os.fspath(final)) if nproc > 1 else ""
  timeout = multihost.timeout_s(barrier_timeout_s)

  def close_all() -> None:
    for p in parts:
      try:
        p.driver.close()
      except Exception:  # noqa: BLE001,S110 - closing must not hide the real outcome
        pass

  def abort_all() -> None:
    """Waits until no part is writing any more (before a failed save is removed)."""
    for p in parts:
      try:
        p.driver.abort()
      except Exception:  # noqa: BLE001,S110 - already failing
        pass

  try:
    storage.backend_name()  # a bad FLAX_CKPT_STORAGE fails before anything is written
    paths.check_destination(final, overwrite, overwrite_flag)
    check_custom_metadata(custom_metadata)
    key, ticket, earlier = _claim(final, overwrite)
  except BaseException:
    close_all()
    raise
  created: list[str] = []
  tmp: epath.Path | None = None
  try:
    if primary:
      paths.cleanup_stale_tmp(final)
    for p in parts:  # every part is validated before the disk is touched
      try:
        p.driver.plan(f"checkpointable {p.name!r}")
      except BaseException as e:
        _annotate(e, parts, p.name)
        raise
    # The primary makes the temporary directory and shares its name and what each part
    # needs the others to know; every process writes its share into that directory.
    local = {p.name: p.driver.share() for p in parts} if primary else None
    if primary:
      tmp, created = paths.make_tmp_dir(final)
      for p in parts:
        if p.dir != ROOT_DIR:
          os.mkdir(os.path.join(tmp, p.dir))
    if nproc > 1:
      info = json.loads(multihost.share(
          f"{op}/start", json.dumps({"tmp": os.fspath(tmp), "local": local})
          if primary else None, timeout))
      tmp, local = epath.Path(info["tmp"]), info["local"]
    assert tmp is not None and local is not None
    finishers = []
    for p in parts:
      try:
        finishers.append(p.driver.start(tmp / p.dir if p.dir != ROOT_DIR else tmp,
                                        local.get(p.name), is_async))
      except BaseException as e:
        _annotate(e, parts, p.name)
        raise
  except BaseException:
    abort_all()
    if primary and tmp is not None:
      pytree_io.remove_quietly(tmp)
    if primary:
      paths.remove_created(created)
    close_all()
    _release(key, ticket)
    raise
  entries = {}
  for p in parts:
    entries[p.name] = dict(p.driver.entry(), **({"dir": p.dir} if p.dir != p.name else {}))

  def finish() -> None:
    try:
      _finish()
    finally:
      close_all()
      _release(key, ticket)

  def _finish() -> None:
    try:
      try:
        for p, fin in zip(parts, finishers):
          try:
            fin(fsync)
          except BaseException as e:
            _annotate(e, parts, p.name)
            raise
      except OSError as e:
        if primary:
          raise
        raise errors.CheckpointError(
            f"process {pid} could not write its part of {final} ({e}); if process 0 failed "
            "first, its error says why. Nothing was committed.") from e
      multihost.barrier(f"{op}/written", timeout, "finished writing its part")
      if primary:
        manifest = {
            "format": "flax_ckpt", "version": FORMAT_VERSION, "checkpointables": entries,
            "custom_metadata": custom_metadata, "created_at": time.time(),
            "process_count": nproc, **(manifest_extra or {}),
        }
        paths.write_json(tmp / COMMIT_MARKER, manifest, fsync=fsync)
        if fsync:
          paths.fsync_path(tmp)
        for t in earlier:  # earlier saves to this path commit (or fail) first
          t.wait()
        paths.commit(tmp, final, overwrite=overwrite, fsync=fsync)
    except BaseException:
      abort_all()
      if primary:
        pytree_io.remove_quietly(tmp)
        paths.remove_created(created)
      raise
    multihost.barrier(f"{op}/committed", timeout, "saw the commit", committed=True)

  return final, finish


def parts_from(checkpointables: Mapping[str, Any]) -> list[Part]:
  if not isinstance(checkpointables, Mapping) or not checkpointables:
    raise TypeError("checkpointables must be a non-empty dict {name: object}; nothing was "
                    "written.")
  parts = []
  for name, value in checkpointables.items():
    check_name(name)
    parts.append(Part(name, name, driver_for_value(name, value)))
  return parts


def save_checkpointables(path: paths.PathLike, checkpointables: Mapping[str, Any], *,
                         overwrite: bool = False, custom_metadata: dict | None = None,
                         fsync: bool = True, barrier_timeout_s: float | None = None) -> None:
  """Saves several named parts as one checkpoint, committed atomically together.

  Each part is saved by a handler chosen by its type: a ``CheckpointArgs`` object by the
  handler it is registered with; an object of a type registered with
  :func:`register_checkpointable_handler` by that handler; an object with ``get_state()``
  and ``set_state()`` (grain's ``DatasetIterator``, your own iterators) by the stateful
  handler, each process saving its own state; anything else as a PyTree.

  Args:
    path: destination directory.
    checkpointables: ``{name: object}``; names become directory names
      (``[A-Za-z0-9_.-]``, not starting with ``.`` or ``_``).
    overwrite: replace an existing checkpoint (kept intact until the new one commits).
    custom_metadata: a JSON-serializable dict stored with the checkpoint.
    fsync: make the data durable before committing.
    barrier_timeout_s: multi-process only: how long each process waits for the others.

  Raises:
    CheckpointExistsError: ``path`` exists and ``overwrite`` is False.
    UnsupportedLeafError: a part (or a leaf of a PyTree part) cannot be saved; nothing is
      written.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save_checkpointables(
    ...     path, {'params': {'w': np.ones(3)}, 'opt_state': {'mu': np.zeros(3)}})
    >>> sorted(flax_ckpt.load_checkpointables(path))
    ['opt_state', 'params']
    >>> flax_ckpt.load_checkpointables(path, {'params': None})['params']['w']
    array([1., 1., 1.])
  """
  _, finish = start_save(path, parts_from(checkpointables), overwrite=overwrite,
                         custom_metadata=custom_metadata, is_async=False, fsync=fsync,
                         barrier_timeout_s=barrier_timeout_s)
  finish()


def save_checkpointables_async(path: paths.PathLike, checkpointables: Mapping[str, Any], *,
                               overwrite: bool = False, custom_metadata: dict | None = None,
                               fsync: bool = True, barrier_timeout_s: float | None = None
                               ) -> background.AsyncResponse:
  """Like :func:`save_checkpointables`, but returns once the parts are snapshotted.

  On return, array data is held in a form the caller can no longer change, each stateful
  object's ``get_state()`` has been taken, and each custom async handler's ``async_save``
  has returned; writing and the single commit continue in the background.

  Returns:
    An :class:`AsyncResponse`; ``result()`` blocks until committed and re-raises failures.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> r = flax_ckpt.save_checkpointables_async(path, {'params': {'w': np.ones(3)}})
    >>> r.result()
  """
  final, finish = start_save(path, parts_from(checkpointables), overwrite=overwrite,
                             custom_metadata=custom_metadata, is_async=True, fsync=fsync,
                             barrier_timeout_s=barrier_timeout_s)
  return background.start_background(finish, os.fspath(final))


# ---------------------------------------------------------------------------------------
# Loading


def committed(path: paths.PathLike) -> tuple[epath.Path, dict]:
  final = paths.to_path(path)
  return final, check_manifest(final, paths.require_committed(final))


def check_manifest(final: epath.Path, manifest: Any) -> dict:
  """``manifest`` if this flax_ckpt can read the checkpoint it describes."""
  if not isinstance(manifest, dict) or manifest.get("format") != "flax_ckpt":
    raise errors.FormatError(f"{final / COMMIT_MARKER} is not a flax_ckpt commit marker.")
  if manifest.get("version") != FORMAT_VERSION:
    raise errors.FormatError(
        f"{final}: format version {manifest.get('version')} is not supported (this flax_ckpt "
        f"reads version {FORMAT_VERSION}); upgrade flax_ckpt.")
  parts = manifest.get("checkpointables")
  if not isinstance(parts, dict):
    raise errors.FormatError(f"{final}: the commit marker lists no checkpointables.")
  return manifest


def part_dir(final: epath.Path, name: str, entry: dict) -> epath.Path:
  d = entry.get("dir", name)
  if d == ROOT_DIR:
    return final
  if not isinstance(d, str) or not PART_NAME_RE.fullmatch(d):
    raise errors.FormatError(f"{final}: part {name!r} has an invalid directory {d!r}")
  return final / d


def _default_restore_args(hcls: type) -> Any:
  args_cls = handlers.registered_args_cls(hcls, for_save=False)
  if args_cls is None:
    return None
  try:
    return args_cls()
  except TypeError:  # required fields: the handler gets None and uses its own defaults
    return None


def restorer_for(final: epath.Path, name: str, entry: dict, abstract: Any, *,
                 partial: bool = False, restore_type: Any = None) -> tuple[Any, Any]:
  """The handler instance and restore args for one part."""
  kind = entry.get("kind")
  if kind == "pytree":
    if isinstance(abstract, PyTreeRestore):
      return PyTreeCheckpointHandler(), abstract
    if isinstance(abstract, CheckpointArgs):
      raise TypeError(f"part {name!r} is a PyTree; restore it with a template or "
                      f"PyTreeRestore, not {type(abstract).__qualname__}")
    return PyTreeCheckpointHandler(), PyTreeRestore(abstract, partial=partial,
                                                    restore_type=restore_type)
  if kind == "stateful":
    if isinstance(abstract, StatefulRestore):
      return StatefulCheckpointHandler(), abstract
    if isinstance(abstract, CheckpointArgs):
      raise TypeError(f"part {name!r} holds get_state() data; restore it into an object with "
                      f"set_state() or StatefulRestore, not {type(abstract).__qualname__}")
    return StatefulCheckpointHandler(), StatefulRestore(abstract)
  if kind == "handler":
    saved_by = entry.get("handler", "?")
    what = f"part {name!r}"
    if abstract is not None and not isinstance(abstract, CheckpointArgs):
      hcls = handlers.type_handler_for(abstract)
      if hcls is not None and handlers.handler_name(hcls) == saved_by:
        abstract = None  # an object of the registered type: restore with the defaults
    if abstract is None:
      hcls = handlers.handler_by_name(saved_by)
      if hcls is None:
        raise errors.CheckpointError(
            f"part {name!r} of {final} was saved by the CheckpointHandler {saved_by}, which "
            "is not known in this process (handlers are never imported by name). Import the "
            "module that defines it and registers its args (register_with_handler), or pass "
            f"restore args for {name!r}.")
      return construct_handler(hcls, what), _default_restore_args(hcls)
    if not isinstance(abstract, CheckpointArgs):
      raise TypeError(
          f"part {name!r} was saved by the CheckpointHandler {saved_by}; pass its restore "
          f"args (a CheckpointArgs registered for_restore) or None, not a "
          f"{type(abstract).__qualname__}")
    hcls = handlers.restore_handler_for(abstract)
    if hcls is None:
      raise handlers.RegistrationError(
          f"part {name!r}: {type(abstract).__qualname__} is not registered with any "
          "CheckpointHandler; decorate it with @flax_ckpt.args.register_with_handler("
          "MyHandler, for_restore=True).")
    known = handlers.handler_by_name(saved_by)
    if known is not None and not handlers.related(known, hcls):
      raise TypeError(
          f"part {name!r} was saved by {saved_by}, but {type(abstract).__qualname__} is "
          f"registered with {handlers.handler_name(hcls)}")
    return construct_handler(hcls, what), abstract
  raise errors.FormatError(f"{final}: part {name!r} has unknown kind {kind!r}; upgrade "
                           "flax_ckpt.")


def _restore_part(final: epath.Path, name: str, entry: dict, abstract: Any, **kw: Any) -> Any:
  handler, args = restorer_for(final, name, entry, abstract, **kw)
  try:
    return call_with_args(handler.restore, part_dir(final, name, entry), args)
  finally:
    if not isinstance(handler, (PyTreeCheckpointHandler, StatefulCheckpointHandler)):
      close = getattr(handler, "close", None)
      if callable(close):
        close()


def _with_retries(path: paths.PathLike, read: Callable[[epath.Path, dict], Any]) -> Any:
  """Runs ``read(final, manifest)``, again if an overwrite replaced the checkpoint meanwhile.

  The directory is opened once per attempt and its commit marker read through it, so the
  manifest always belongs to the version being read.
  """
  final = paths.to_path(path)
  for attempt in range(_ATTEMPTS):
    try:
      root = storage.CheckpointFiles(os.fspath(final))
    except (FileNotFoundError, NotADirectoryError):
      committed(path)  # the clear error: nothing there, or a file
      continue  # it appeared meanwhile: look again
    try:
      try:
        raw = root.read_bytes(COMMIT_MARKER)
      except FileNotFoundError:
        if not root.is_gone():
          committed(path)  # the clear error: not committed
        continue
      try:
        manifest = json.loads(raw.decode("utf-8", "surrogatepass"))
      except ValueError as e:
        raise errors.FormatError(f"{final / COMMIT_MARKER} is unreadable ({e}); the "
                                 "checkpoint is damaged.") from e
      manifest = check_manifest(final, manifest)
      try:
        out = read(final, manifest)
      except errors.CheckpointReplacedError:
        if attempt == _ATTEMPTS - 1:
          raise
        continue
      except (OSError, errors.FormatError):
        if root.is_gone() and attempt < _ATTEMPTS - 1:
          continue
        raise
      if not root.is_gone():
        return out
    finally:
      root.close()
  raise errors.CheckpointReplacedError(
      f"{final} was replaced by overwrites {_ATTEMPTS} times while loading; load it again "
      "once the writer is done.")


def load_checkpointables(path: paths.PathLike,
                         abstract_checkpointables: Mapping[str, Any] | None = None, *,
                         partial: bool = False, restore_type: type | None = None
                         ) -> dict[str, Any]:
  """Loads all parts of a checkpoint, or only the named ones.

  Parts not named in ``abstract_checkpointables`` are not read at all (not a byte, not a
  file), so ``{'params': template}`` loads parameters for evaluation without touching the
  optimizer state.

  Args:
    path: the checkpoint directory.
    abstract_checkpointables: None loads every part as saved. Otherwise ``{name: spec}``
      for the parts to load, where spec is: for a PyTree part, a template (see
      :func:`flax_ckpt.load`), None (as saved) or :class:`PyTreeRestore`; for a stateful
      part, the object to restore into (``set_state`` is called and the object returned),
      None (the saved state itself) or :class:`StatefulRestore`; for a custom handler's
      part, its restore args or None (the handler's registered restore args with their
      defaults).
    partial: PyTree templates may be subsets of what was saved.
    restore_type: ``numpy.ndarray`` / ``jax.Array`` for PyTree array leaves loaded without
      a template leaf; None keeps the saved kind.

  Returns:
    ``{name: value}`` in the order the parts were saved.

  Raises:
    StructureMismatchError: a requested part does not exist (the error lists the parts).

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save_checkpointables(path, {'params': {'w': np.ones(2)}, 'step': 5})
    >>> flax_ckpt.load_checkpointables(path, {'step': None})
    {'step': 5}
  """
  restore_type = check_restore_type(restore_type)
  if abstract_checkpointables is not None and not isinstance(abstract_checkpointables,
                                                             Mapping):
    raise TypeError("abstract_checkpointables must be a dict {name: template or args} or None")

  def read(final: epath.Path, manifest: dict) -> dict[str, Any]:
    entries = manifest["checkpointables"]
    names = list(entries) if abstract_checkpointables is None else list(
        abstract_checkpointables)
    missing = [n for n in names if n not in entries]
    if missing:
      hint = (" (flax_ckpt.load reads the part 'state'; use load_checkpointables, or "
              "load(..., checkpointable_name=...), for named parts)"
              if DEFAULT_CHECKPOINTABLE in missing else "")
      raise errors.StructureMismatchError(
          f"{final} has no part {', '.join(map(repr, missing))}; its parts are "
          f"{', '.join(map(repr, entries))}{hint}.")
    names = [n for n in entries if n in names]  # saved order
    # stateful parts last: set_state changes the caller's objects, so only once every
    # other part has loaded
    order = sorted(names, key=lambda n: entries[n].get("kind") == "stateful")
    out = {}
    for n in order:
      a = None if abstract_checkpointables is None else abstract_checkpointables[n]
      out[n] = _restore_part(final, n, entries[n], a, partial=partial,
                             restore_type=restore_type)
    return {n: out[n] for n in names}

  with background.no_gc():
    return _with_retries(path, read)


def load_part(path: paths.PathLike, name: str, abstract: Any, **kw: Any) -> Any:
  """Loads one part (``load``'s single-part case)."""
  return load_checkpointables(path, {name: abstract}, **kw)[name]


def _part_metadata(final: epath.Path, name: str, entry: dict) -> Any:
  kind = entry.get("kind")
  d = part_dir(final, name, entry)
  if kind == "pytree":
    return PyTreeCheckpointHandler().metadata(d)
  if kind == "stateful":
    return StatefulCheckpointHandler().metadata(d)
  hcls = handlers.handler_by_name(entry.get("handler", ""))
  if hcls is None:
    return None
  try:
    handler = hcls()
  except TypeError:  # needs constructor arguments: no metadata without an instance
    return None
  try:
    fn = getattr(handler, "metadata", None)
    return fn(d) if callable(fn) else None
  except (NotImplementedError, FileNotFoundError, ValueError, TypeError, KeyError, OSError):
    return None  # one handler's metadata must not hide the list of parts
  finally:
    close = getattr(handler, "close", None)
    if callable(close):
      close()


def checkpoint_metadata(path: paths.PathLike) -> CheckpointMetadata:
  def read(final: epath.Path, manifest: dict) -> CheckpointMetadata:
    entries = manifest["checkpointables"]
    parts = {n: _part_metadata(final, n, e) for n, e in entries.items()}
    tree = None
    if entries.get(DEFAULT_CHECKPOINTABLE, {}).get("kind") == "pytree":
      tree = parts[DEFAULT_CHECKPOINTABLE]
    elif len(entries) == 1 and next(iter(entries.values())).get("kind") == "pytree":
      tree = next(iter(parts.values()))
    return CheckpointMetadata(
        tree=tree, custom_metadata=manifest.get("custom_metadata"),
        format_version=manifest["version"], checkpointables=entries,
        created_at=manifest.get("created_at"), parts=parts)

  return _with_retries(path, read)
