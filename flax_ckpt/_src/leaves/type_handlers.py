"""The leaf ``TypeHandler`` contract: protocol, per-leaf info, per-call context, args and
metadata. The registry of handlers is ``registry.py``; the built-in handlers are
``arrays.py`` and ``scalars.py``.

Handlers are batched: all leaves handled by one handler go to one ``serialize`` /
``deserialize`` / ``metadata`` call per save or load. Each gets one :class:`ParamInfo` per
leaf (Orbax v1's ``SerializationParam``) whose ``context`` is shared by all leaves of the
call (Orbax v1's ``SerializationContext``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from etils import epath

from flax_ckpt._src.format import LEAVES_DIR
from flax_ckpt._src.io import storage
from flax_ckpt._src.tree import treespec


@dataclasses.dataclass(kw_only=True)
class Metadata:
  """Per-leaf metadata returned by :func:`flax_ckpt.metadata`.

  Custom handlers may return subclasses carrying more fields::

    @dataclasses.dataclass
    class MyStateMetadata(flax_ckpt.Metadata):
      a_shape: tuple
      b_shape: tuple

  Attributes:
    name: the leaf's key path, e.g. ``['params']['w']``.
    directory: the leaf's own directory (only handlers that write files use it).
  """

  name: str = ""
  directory: epath.Path | None = None


@dataclasses.dataclass(kw_only=True)
class ArrayMetadata(Metadata):
  """Metadata of an array leaf (``jax.Array``, ``np.ndarray``, numpy scalar, PRNG key).

  Attributes:
    shape: the global shape.
    dtype: the logical dtype (``bfloat16``, ``int4``, ``key<fry>`` ...).
    type: what was saved: ``jax.Array``, ``np.ndarray``, ``np.generic`` or ``jax.PRNGKey``.
    nbytes: bytes of array data on disk.
    sharding: JSON description of the saved sharding (None for host arrays).
  """

  shape: tuple[int, ...] = ()
  dtype: Any = None
  type: str = ""
  nbytes: int = 0
  sharding: dict | None = None


@dataclasses.dataclass(kw_only=True)
class ValueMetadata(Metadata):
  """Metadata of a non-array leaf (Python scalars, ``str``, ``bytes``, ``None``).

  Attributes:
    type: the Python type name.
    nbytes: bytes of payload.
  """

  type: str = ""
  nbytes: int = 0


@dataclasses.dataclass
class SaveArgs:
  """Per-leaf save options.

  Attributes:
    dtype: cast arrays to this dtype before saving (None keeps the dtype).
  """

  dtype: Any = None


@dataclasses.dataclass
class RestoreArgs:
  """Per-leaf restore options, derived from the template leaf by :func:`flax_ckpt.load`.

  Attributes:
    restore_type: ``jax.Array``, ``np.ndarray`` or None (as saved).
    dtype: cast to this dtype after reading (None keeps the saved dtype).
    sharding: target ``jax.sharding.Sharding`` for jax arrays (None: default device).
    shape: expected global shape (checked before reading).
    weak_type: for jax arrays: make the result weakly typed (True), strongly typed
      (False), or as saved (None). Templates from ``jax.eval_shape`` carry it; matching it
      means a jitted step does not compile again after a restore.
  """

  restore_type: Any = None
  dtype: Any = None
  sharding: Any = None
  shape: tuple[int, ...] | None = None
  weak_type: bool | None = None


ArrayRestoreArgs = RestoreArgs


class LazyTsContext:
  """A ``tensorstore.Context`` made on first use (most saves and loads never need one)."""

  def __init__(self):
    self._ctx = None
    self._lock = threading.Lock()

  def get(self):
    with self._lock:
      if self._ctx is None:
        import tensorstore as ts

        self._ctx = ts.Context()
      return self._ctx


class LeafNaming:
  """Names and directory names of all leaves of one tree, computed only when asked for."""

  def __init__(self, keypaths: Sequence[tuple], path_str,
               dirnames_fn: Callable[[list[str]], list[str]]):
    self._keypaths = keypaths
    self._path_str = path_str
    self._dirnames_fn = dirnames_fn
    self._dirnames: list[str] | None = None

  def name(self, i: int) -> str:
    return self._path_str(self._keypaths[i])

  def dirname(self, i: int) -> str:
    if self._dirnames is None:
      self._dirnames = self._dirnames_fn([self.name(j) for j in range(len(self._keypaths))])
    return self._dirnames[i]


@dataclasses.dataclass(kw_only=True)
class LeafContext:
  """What all leaves of one save or load share (Orbax v1's ``SerializationContext``).

  Attributes:
    parent_dir: the directory of the PyTree being saved or loaded.
    backend: the storage backend of this save or load (``io/storage``).
    naming: the leaves' names and directory names.
    tensorstore: the lazily made ``tensorstore.Context`` of this call.
  """

  parent_dir: epath.Path
  backend: Any
  naming: LeafNaming
  tensorstore: LazyTsContext = dataclasses.field(default_factory=LazyTsContext)

  @property
  def ts_context(self):
    """A ``tensorstore.Context`` shared by all leaves of this save or load."""
    return self.tensorstore.get()


@dataclasses.dataclass(kw_only=True)
class SaveContext(LeafContext):
  """The shared part of a save.

  Attributes:
    writer: the packed data file of this process (``storage.DataWriter``).
    process_index: this process's index.
    primary_local: leaf indexes process 0 writes as process-local (jax arrays held whole
      by each process).
    reuse: the earlier checkpoint's chunks this save may refer to instead of writing
      equal bytes again (``reuse.ChunkReuse``), or None.
  """

  writer: Any
  process_index: int = 0
  primary_local: frozenset = frozenset()
  reuse: Any = None


@dataclasses.dataclass(kw_only=True)
class LoadContext(LeafContext):
  """The shared part of a load.

  Attributes:
    files: the checkpointable directory opened for this load (``storage.CheckpointDir``),
      through which the data files are read; None to open them by path.
    segments: ``{process index: segment bytes}`` for data files stored as segments
      (object stores; ``_CHUNKS.p<i>.json``'s ``segment_bytes``).
    verify: check every byte read from the data files against its recorded checksum.
  """

  files: Any = None
  segments: dict[int, int] = dataclasses.field(default_factory=dict)
  verify: bool = True


@dataclasses.dataclass
class ParamInfo:
  """What a TypeHandler is told about one leaf.

  Attributes:
    keypath: the leaf's path as a tuple of ``(kind, key)`` pairs (kind ``d`` dict key,
      ``a`` attribute, ``i`` sequence index, ``f`` flattened index).
    parent_dir: the directory of the PyTree being saved or loaded.
    record: a JSON-serializable dict stored with the leaf in the tree metadata and given
      back on load, for small per-leaf data (shape, dtype, inline values).
    is_async: True when the save returns before writing, so ``serialize`` must copy any
      mutable data before it returns.
    chunks: for built-in array handlers: chunk records of this leaf (see docs/format.md).
    index: the leaf's position among the tree's leaves.
    context: what all leaves of this save or load share (:class:`SaveContext` or
      :class:`LoadContext`); None for an info made by hand.
    name: (property) the key path as a string, e.g. ``['opt_state'][0].mu``.
    path: (property) a directory this leaf may write its own files into; create it with
      ``info.path.mkdir(exist_ok=True)`` (its parent exists).
    ts_context: (property) a ``tensorstore.Context`` shared by all leaves of this call.
    kvstore_spec: (property) the tensorstore kvstore spec of ``path``, for handlers that
      store their data with tensorstore (``ts.open({'driver': 'zarr3', 'kvstore':
      info.kvstore_spec, ...}, context=info.ts_context)``).
  """

  keypath: tuple
  parent_dir: epath.Path
  record: dict = dataclasses.field(default_factory=dict)
  is_async: bool = False
  chunks: list = dataclasses.field(default_factory=list)
  index: int = dataclasses.field(default=0, repr=False)
  context: SaveContext | LoadContext | None = dataclasses.field(default=None, repr=False)

  @property
  def name(self) -> str:
    if self.context is None:
      return treespec.path_str(self.keypath)
    return self.context.naming.name(self.index)

  @property
  def dirname(self) -> str:
    if self.context is None:
      raise ValueError(f"ParamInfo of {self.name}: no directory outside a save or load")
    return self.context.naming.dirname(self.index)

  @property
  def path(self) -> epath.Path:
    """This leaf's own directory, ``<parent_dir>/leaves/<dirname>``."""
    return self.parent_dir / LEAVES_DIR / self.dirname

  @property
  def kvstore_spec(self) -> dict:
    """The tensorstore kvstore spec of this leaf's own directory (see ``path``)."""
    if self.context is None:
      return storage.kvstore_spec(self.path)
    return self.context.backend.kvstore_spec(self.path)

  @property
  def ts_context(self):
    """A ``tensorstore.Context`` shared by all leaves of this save or load."""
    return self.context.ts_context if self.context is not None else None


@runtime_checkable
class TypeHandler(Protocol):
  """Saves and loads all leaves of one type, in batches.

  ``serialize`` returns once it no longer needs the caller's values (copies of mutable data
  taken); the returned futures complete when its files are written. Loading must never
  execute code read from the checkpoint.
  """

  def typestr(self) -> str:
    """A stable name stored with each leaf; selects this handler on load."""
    ...

  async def serialize(
      self, values: Sequence[Any], infos: Sequence[ParamInfo],
      args: Sequence[SaveArgs] | None = None,
  ) -> list[Any]:
    """Starts saving ``values``; returns futures that complete when they are written."""
    ...

  async def deserialize(
      self, infos: Sequence[ParamInfo], args: Sequence[RestoreArgs] | None = None
  ) -> list[Any]:
    """Loads one value per info."""
    ...

  async def metadata(self, infos: Sequence[ParamInfo]) -> list[Any]:
    """One metadata object per info, without reading array data."""
    ...

