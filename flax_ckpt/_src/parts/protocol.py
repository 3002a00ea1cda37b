"""The part contracts: how one part of a checkpoint is written, read and described.

A checkpoint is made of named parts ("checkpointables"). Each part has a *kind* (recorded
in the commit marker: ``pytree``, ``stateful``, ``handler``), and a kind is one class
implementing :class:`PartKind`. Saving a part goes through a :class:`PartWriter`, the
two-phase writer the save transaction (``engine/saving.py``) drives in these steps:

1. ``plan(what)``: validate and snapshot what the caller may change; no disk access, so a
   part that cannot be saved fails before anything is written;
2. ``share()``: process 0's JSON for the other processes (e.g. which leaves it writes);
3. ``start(directory, shared, is_async)``: begin writing into the part's directory inside
   the temporary checkpoint and return a :class:`PartFinish`; once it returns, the caller
   may change its objects;
4. ``PartFinish.finish(fsync)``: complete the writing (in the background for async saves);
5. ``entry()``: the part's record in the manifest;
6. ``abort()`` stops writing before a failed save is removed; ``close()`` releases.

The engine imports only this module: the built-in kinds are registered in
``_src/registration.py``, and a new kind (say, a reader of another library's format) is
one more class.

Example:
  >>> from flax_ckpt._src.parts.protocol import part_kinds
  >>> sorted(k.name for k in part_kinds().kinds())
  ['handler', 'pytree', 'stateful']
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Protocol, runtime_checkable

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import PartEntry

JsonValue = Any  # what json.dumps accepts


class PartFinish(Protocol):
  """The rest of one part's write, after ``start`` returned."""

  def finish(self, fsync: bool) -> None:
    """Writes what is left and makes it durable when ``fsync``."""
    ...

  def abort(self) -> None:
    """Waits until nothing of this part writes any more (before the save is removed)."""
    ...


@runtime_checkable
class PartWriter(Protocol):
  """The save of one part, in the steps the save transaction drives (module docstring)."""

  def plan(self, what: str) -> None:
    """Validates and snapshots; ``what`` names the part in errors."""
    ...

  def share(self) -> JsonValue:
    """What process 0 tells the others before anyone writes (JSON), or None."""
    ...

  def start(self, directory: epath.Path, shared: JsonValue, is_async: bool) -> PartFinish:
    """Starts writing into ``directory``; afterwards the caller may change its objects."""
    ...

  def entry(self) -> PartEntry:
    """The part's manifest entry."""
    ...

  def close(self) -> None:
    """Releases what the writer owns (e.g. a handler it constructed)."""
    ...


@dataclasses.dataclass(frozen=True)
class RestoreRequest:
  """What a caller asked of one part when loading.

  Attributes:
    name: the part's name.
    where: the checkpoint's path, for errors.
    abstract: the part's template, restore args, object to restore into, or None.
    partial: PyTree templates may be subsets of what was saved.
    restore_type: the array type of PyTree leaves loaded without a template leaf.
  """

  name: str
  where: str
  abstract: Any = None
  partial: bool = False
  restore_type: type | None = None


@runtime_checkable
class PartKind(Protocol):
  """One kind of part: how it is recognised when saving, and how it is read.

  Attributes:
    name: the ``kind`` the manifest records.
    restore_last: restore after every other part (a kind that changes the caller's
      objects in place, so a failed load leaves them untouched).
  """

  name: str
  restore_last: bool

  def writer_for(self, name: str, value: Any) -> PartWriter | None:
    """The writer saving ``value`` as part ``name``, or None if this kind does not."""
    ...

  def restore(self, directory: epath.Path, entry: PartEntry, request: RestoreRequest) -> Any:
    """Reads the part in ``directory``."""
    ...

  def metadata(self, directory: epath.Path, entry: PartEntry) -> Any:
    """Describes the part cheaply (no array bytes)."""
    ...

  def saved_by(self, entry: PartEntry, handler: Any) -> str | None:
    """None if ``handler`` can restore this part; else what saved it (for the error)."""
    ...


def native_handler_save(writer: PartWriter, directory: epath.Path, what: str) -> None:
  """A built-in handler's ``save``: its part writer, run to the end in this thread.

  Built-in handlers (``PyTreeCheckpointHandler``, ``StatefulCheckpointHandler``) define
  ``part_writer(args)``; the engine uses that writer directly, unless a subclass replaced
  ``save``. Called through ``save`` (e.g. by a user's composite handler), it runs here.
  """
  writer.plan(what)
  writer.start(directory, writer.share(), False).finish(True)


def native_writer(handler: Any, args: Any) -> PartWriter | None:
  """The built-in writer behind ``handler.save(directory, args)``, or None.

  None when the handler has no ``part_writer`` or when a subclass changed ``save``: then
  its own ``save`` must run.
  """
  for cls in type(handler).__mro__:
    if "part_writer" in vars(cls):
      if type(handler).save is vars(cls).get("save"):
        return handler.part_writer(args)
      return None
  return None


class PartKindRegistry:
  """The part kinds a process knows, in the order they are tried when saving.

  The first kind whose ``writer_for`` returns a writer saves the value, so the catch-all
  kind (PyTrees) is registered last.
  """

  def __init__(self) -> None:
    self._kinds: dict[str, PartKind] = {}
    self._lock = threading.Lock()

  def register(self, kind: PartKind) -> None:
    with self._lock:
      self._kinds[kind.name] = kind

  def kinds(self) -> list[PartKind]:
    with self._lock:
      return list(self._kinds.values())

  def writer_for(self, name: str, value: Any) -> PartWriter:
    for kind in self.kinds():
      writer = kind.writer_for(name, value)
      if writer is not None:
        return writer
    raise errors.UnsupportedLeafError(
        f"checkpointable {name!r}: no part kind saves a {type(value).__qualname__}. "
        f"{errors.SUPPORTED_KINDS}. Nothing was written.")

  def get(self, entry: PartEntry, name: str, where: str) -> PartKind:
    with self._lock:
      kind = self._kinds.get(entry.kind)
    if kind is None:
      raise errors.FormatError(f"{where}: part {name!r} has unknown kind {entry.kind!r}; "
                               "upgrade flax_ckpt.")
    return kind


_DEFAULT = PartKindRegistry()


def part_kinds() -> PartKindRegistry:
  """The process-wide registry (the built-ins are added by ``_src/registration.py``)."""
  return _DEFAULT
