"""Objects with ``get_state()`` / ``set_state(state)``: data iterators and the like.

Every process saves its own object's state in ``process_<i>-of-<n>.json`` (plain JSON
data), ``.typed.json`` (tagged JSON for tuples, int keys, numpy values, ...) or ``.bin``
(bytes), because a data iterator's position is per process.
grain's ``DatasetIterator`` and ``DataLoaderIterator`` follow this protocol unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import jsontags
from flax_ckpt._src.format import (
  KIND_STATEFUL,
  STATE_FILE_RE,
  PartEntry,
  dump_json_bytes,
  load_json_bytes,
  state_file,
)
from flax_ckpt._src.io import multihost, storage
from flax_ckpt._src.parts.handlers import CheckpointArgs, CheckpointHandler
from flax_ckpt._src.parts.protocol import (
  JsonValue,
  PartFinish,
  RestoreRequest,
  native_handler_save,
)


def is_stateful(obj: Any) -> bool:
  """Whether ``obj`` follows the stateful protocol (callable get_state and set_state)."""
  return (not isinstance(obj, type) and callable(getattr(obj, "get_state", None))
          and callable(getattr(obj, "set_state", None)))



def _not_json(v: Any, where: str) -> str | None:
  """Where ``v`` stops being plain JSON data (so it would not come back as it is)."""
  if v is None or type(v) in (str, bool, int):
    return None
  if type(v) is float:
    return None if math.isfinite(v) else f"{where} is {v!r} (not representable in JSON)"
  if type(v) is list:
    for i, x in enumerate(v):
      bad = _not_json(x, f"{where}[{i}]")
      if bad:
        return bad
    return None
  if type(v) is dict:
    for k, x in v.items():
      if type(k) is not str:
        return f"{where} has the non-str key {k!r}"
      bad = _not_json(x, f"{where}[{k!r}]")
      if bad:
        return bad
    return None
  return f"{where} is a {type(v).__qualname__}"


def encode_state(state: Any, what: str) -> tuple[str, bytes]:
  """``(extension, file bytes)`` for a ``get_state()`` result.

  bytes are stored as they are (``.bin``), plain JSON data as plain JSON (``.json``), and
  anything else built from tuples, dicts with non-str keys, numpy scalars/arrays, NaN, big
  ints or bytes as tagged JSON (``.typed.json``) so it comes back with the same types.
  """
  if isinstance(state, (bytes, bytearray, memoryview)):
    return "bin", bytes(state)
  try:
    plain = _not_json(state, "state") is None
    doc = state if plain else {"flax_ckpt_typed_state": 1, "v": jsontags.encode(state, "state")}
    data = dump_json_bytes(doc, compact=False)
  except (jsontags.Unencodable, RecursionError, ValueError) as e:
    raise errors.UnsupportedLeafError(
        f"{what}: get_state() must return bytes or data built from dict, list, tuple, str, "
        f"int, float, bool, None, bytes and numpy scalars/arrays, so that set_state() gets "
        f"back exactly what was saved, but {e}. Convert it or serialize the state to bytes "
        "yourself. Nothing was written.") from e
  return ("json" if plain else "typed.json"), data


def decode_state(ext: str, raw: bytes, where: str = "state file") -> Any:
  """A state file's value (``where`` names the file in a FormatError)."""
  if ext == "bin":
    return raw
  try:
    doc = load_json_bytes(raw)
    return jsontags.decode(doc["v"]) if ext == "typed.json" else doc
  except (ValueError, RecursionError, KeyError, TypeError, IndexError) as e:
    raise errors.FormatError(f"{where} is not a valid state file ({type(e).__name__}: "
                             f"{str(e)[:200]}); the checkpoint is damaged, load an earlier "
                             "one.") from None


@dataclasses.dataclass
class StatefulSave(CheckpointArgs):
  """Save args for an object with ``get_state()`` / ``set_state()``.

  Attributes:
    item: the object; ``item.get_state()`` is called once, when the save starts.
  """

  item: Any


@dataclasses.dataclass
class StatefulRestore(CheckpointArgs):
  """Restore args for an object with ``get_state()`` / ``set_state()``.

  Attributes:
    item: the object to restore into (``item.set_state(state)`` is called and ``item`` is
      returned); None returns the saved state itself (a dict/list/... or bytes).
    process_mapping: for a job with another process count than the one that saved: which
      saved process's state each process takes, as ``{process_index: saved_index}`` or a
      function ``process_index -> saved_index``. Without it a different process count is
      an error, because iterator positions of one process layout rarely fit another.
  """

  item: Any = None
  process_mapping: Mapping[int, int] | Callable[[int], int] | None = None


@dataclasses.dataclass(frozen=True)
class StatefulMetadata:
  """What a stateful part holds: how many processes saved it and in which formats."""

  process_count: int
  formats: tuple[str, ...]


class StatefulCheckpointHandler(CheckpointHandler[StatefulSave, StatefulRestore]):
  """Saves ``get_state()`` per process; restores with ``set_state()``.

  Example:
    >>> import flax_ckpt, tempfile, os
    >>> class Counter:
    ...   def __init__(self): self.n = 0
    ...   def get_state(self): return {'n': self.n}
    ...   def set_state(self, state): self.n = state['n']
    >>> c = Counter(); c.n = 7
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save_checkpointables(path, {'counter': c})
    >>> flax_ckpt.load_checkpointables(path, {'counter': Counter()})['counter'].n
    7
  """

  save_on_all_processes = True

  def save(self, directory: epath.Path, args: StatefulSave) -> None:
    native_handler_save(self.part_writer(args), directory, "stateful object")

  def restore(self, directory: epath.Path, args: StatefulRestore | None = None) -> Any:
    args = args if args is not None else StatefulRestore()
    if not isinstance(args, StatefulRestore):
      raise TypeError(f"StatefulCheckpointHandler.restore takes StatefulRestore args, not "
                      f"{type(args).__qualname__}")
    if args.item is not None and not is_stateful(args.item):
      raise TypeError(
          f"cannot restore into a {type(args.item).__qualname__}: it has no get_state()/"
          "set_state(); pass the object to restore into (e.g. a fresh data iterator), or "
          "None to get the saved state itself.")
    saved = _saved_files(directory)
    counts = {n for n, _ in saved}
    if len(counts) != 1:
      raise errors.FormatError(f"{directory}: stateful part has files of several process "
                               f"counts {sorted(counts)}; the checkpoint is damaged.")
    (n,) = counts
    me, now = multihost.process_index(), multihost.process_count()
    src = me
    if args.process_mapping is not None:
      m = args.process_mapping
      src = m(me) if callable(m) else m.get(me, None)
      if src is None:
        raise errors.StructureMismatchError(
            f"{directory}: process_mapping has no entry for process {me}")
    elif n != now:
      raise errors.StructureMismatchError(
          f"{directory}: the state was saved by {n} processes, this job has {now}. Each "
          "process's iterator position belongs to its own process; pass "
          "StatefulRestore(item, process_mapping={this_index: saved_index, ...}) (or a "
          "function) to say which saved state each process takes, or start the iterator "
          "fresh.")
    if not 0 <= int(src) < n:
      raise errors.StructureMismatchError(
          f"{directory}: process_mapping sends process {me} to saved process {src}, but the "
          f"state was saved by processes 0..{n - 1}")
    ext = saved.get((n, int(src)))
    if ext is None:
      raise errors.FormatError(
          f"{directory}: the state of saved process {src} (process_{src}-of-{n}) is missing; "
          "the checkpoint is damaged.")
    name = os.path.join(os.fspath(directory), state_file(int(src), n, ext))
    state = decode_state(ext, storage.backend_for(directory).read_bytes(name), name)
    if args.item is None:
      return state
    args.item.set_state(state)
    start = getattr(args.item, "start_prefetch", None)
    if callable(start):  # grain iterators: begin filling buffers from the new position
      start()
    return args.item

  def metadata(self, directory: epath.Path) -> StatefulMetadata:
    saved = _saved_files(directory)
    n = max((c for c, _ in saved), default=0)
    return StatefulMetadata(n, tuple(saved[k] for k in sorted(saved)))

  def part_writer(self, args: Any) -> StatefulWriter:
    """The writer of this handler's save (the engine's fast path)."""
    if not isinstance(args, StatefulSave):
      raise TypeError(f"StatefulCheckpointHandler.save takes StatefulSave args, not "
                      f"{type(args).__qualname__}")
    return StatefulWriter(args.item)


def _saved_files(directory: epath.Path) -> dict[tuple[int, int], str]:
  """``{(process_count, process_index): extension}`` of the state files present."""
  out = {}
  names = storage.backend_for(directory).listdir(os.fspath(directory))
  if not names:
    raise errors.FormatError(f"{directory} is missing or empty; the checkpoint is damaged.")
  for name in names:
    m = STATE_FILE_RE.fullmatch(name)
    if m:
      out[(int(m.group(2)), int(m.group(1)))] = m.group(3)
  if not out:
    raise errors.FormatError(f"{directory} holds no process_<i>-of-<n> state file; the "
                             "checkpoint is damaged.")
  return out


class StatefulWriter:
  """The save of one stateful object, in the steps the save transaction drives."""

  def __init__(self, item: Any):
    self._item = item
    self._ext = ""
    self._data = b""

  def plan(self, what: str) -> None:
    if not is_stateful(self._item):
      raise TypeError(f"{what}: {type(self._item).__qualname__} has no get_state()/set_state()")
    self._ext, self._data = encode_state(self._item.get_state(), what)  # state as of now

  def share(self) -> JsonValue:
    return None

  def start(self, directory: epath.Path, shared: JsonValue, is_async: bool) -> PartFinish:
    i, n = multihost.process_index(), multihost.process_count()
    return _StateFile(directory, state_file(i, n, self._ext), self._data)

  def entry(self) -> PartEntry:
    t = type(self._item)
    return PartEntry(KIND_STATEFUL, fields={"process_count": multihost.process_count(),
                                            "type": f"{t.__module__}.{t.__qualname__}"})

  def close(self) -> None:
    pass


class _StateFile:
  """Writes one process's state file when the save finishes."""

  def __init__(self, directory: epath.Path, name: str, data: bytes):
    self._directory, self._name, self._data = directory, name, data

  def finish(self, fsync: bool) -> None:
    backend = storage.backend_for(self._directory)
    backend.write_bytes(os.path.join(os.fspath(self._directory), self._name), self._data,
                        fsync=fsync)
    if fsync:
      backend.sync_dir(os.fspath(self._directory))

  def abort(self) -> None:
    pass


class StatefulKind:
  """The ``stateful`` part kind: objects with ``get_state()`` / ``set_state()``.

  Restored last: ``set_state`` changes the caller's objects, so only once every other part
  has loaded.
  """

  name = KIND_STATEFUL
  restore_last = True

  def writer_for(self, name: str, value: Any) -> StatefulWriter | None:
    return StatefulWriter(value) if is_stateful(value) else None

  def restore(self, directory: epath.Path, entry: PartEntry, request: RestoreRequest) -> Any:
    args = request.abstract
    if not isinstance(args, StatefulRestore):
      if isinstance(args, CheckpointArgs):
        raise TypeError(f"part {request.name!r} holds get_state() data; restore it into an "
                        "object with set_state() or StatefulRestore, not "
                        f"{type(args).__qualname__}")
      args = StatefulRestore(args)
    return StatefulCheckpointHandler().restore(directory, args)

  def metadata(self, directory: epath.Path, entry: PartEntry) -> StatefulMetadata:
    return StatefulCheckpointHandler().metadata(directory)

  def saved_by(self, entry: PartEntry, handler: Any) -> str | None:
    if isinstance(handler, StatefulCheckpointHandler):
      return None
    return f"flax_ckpt's stateful handler ({StatefulCheckpointHandler.__name__})"
