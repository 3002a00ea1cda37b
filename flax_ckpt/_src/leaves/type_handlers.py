"""The leaf ``TypeHandler`` extension point: protocol, per-leaf info, args and metadata.

Handlers are batched: all leaves handled by one handler go to one ``serialize`` /
``deserialize`` / ``metadata`` call per save or load.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from etils import epath

from flax_ckpt._src.format import LEAVES_DIR
from flax_ckpt._src.io import storage


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


class _LazyTsContext:
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

  def __init__(self, keypaths: Sequence[tuple], path_str, dirnames_fn):
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
  _index: int = dataclasses.field(default=0, repr=False)
  _naming: Any = dataclasses.field(default=None, repr=False)
  _ts_context: Any = dataclasses.field(default=None, repr=False)
  _io: Any = dataclasses.field(default=None, repr=False)
  _files: Any = dataclasses.field(default=None, repr=False)  # storage.CheckpointFiles on load

  @property
  def name(self) -> str:
    return self._naming.name(self._index)

  @property
  def dirname(self) -> str:
    return self._naming.dirname(self._index)

  @property
  def path(self) -> epath.Path:
    """This leaf's own directory, ``<parent_dir>/leaves/<dirname>``."""
    return self.parent_dir / LEAVES_DIR / self.dirname

  @property
  def kvstore_spec(self) -> dict:
    """The tensorstore kvstore spec of this leaf's own directory (see ``path``)."""
    return storage.kvstore_spec(self.path)

  @property
  def ts_context(self):
    """A ``tensorstore.Context`` shared by all leaves of this save or load."""
    return self._ts_context.get() if self._ts_context is not None else None


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


_LOCK = threading.RLock()
_BY_TYPE: dict[type, TypeHandler] = {}
_ORDER: list[type] = []  # registration order, for isinstance lookups (newest first)
_BY_TYPESTR: dict[str, TypeHandler] = {}
_BUILTIN_TYPES: set[type] = set()


def register_type_handler(ty: type, handler: TypeHandler, override: bool = False) -> None:
  """Registers ``handler`` for leaves of type ``ty`` (and its subclasses).

  Args:
    ty: the leaf type.
    handler: an object implementing :class:`TypeHandler`.
    override: replace an existing registration for ``ty``; without it a second
      registration is an error.

  Example:
    >>> import flax_ckpt
    >>> class Celsius(float): ...
    >>> class CelsiusHandler(flax_ckpt.ScalarHandler):
    ...   def typestr(self): return 'Celsius'
    >>> flax_ckpt.register_type_handler(Celsius, CelsiusHandler(Celsius), override=True)
  """
  if not isinstance(ty, type):
    raise TypeError(f"register_type_handler expects a type, got {ty!r}")
  for m in ("typestr", "serialize", "deserialize", "metadata"):
    if not callable(getattr(handler, m, None)):
      raise TypeError(f"{handler!r} is not a TypeHandler: it has no {m}() method")
  with _LOCK:
    if ty in _BY_TYPE and not override:
      raise ValueError(
          f"a TypeHandler is already registered for {ty.__module__}.{ty.__qualname__} "
          f"({_BY_TYPE[ty]!r}); pass override=True to replace it."
      )
    _BY_TYPE[ty] = handler
    if ty in _ORDER:
      _ORDER.remove(ty)
    _ORDER.append(ty)
    _BY_TYPESTR[handler.typestr()] = handler


def _register_builtin(ty: type, handler: TypeHandler) -> None:
  register_type_handler(ty, handler, override=True)
  _BUILTIN_TYPES.add(ty)


def has_type_handler(ty: type) -> bool:
  """Whether leaves of type ``ty`` can be saved (a handler is registered for it or a base)."""
  with _LOCK:
    return _lookup(ty) is not None


def _lookup(ty: type) -> TypeHandler | None:
  # the most specific registered class in the MRO wins (np.float64 -> np.generic, not
  # float); then virtual bases such as jax.Array, newest registration first
  for t in ty.__mro__:
    h = _BY_TYPE.get(t)
    if h is not None:
      return h
  for t in reversed(_ORDER):
    if issubclass(ty, t):
      return _BY_TYPE[t]
  return None


def get_type_handler(ty: type) -> TypeHandler:
  """The handler used for leaves of type ``ty``; raises ValueError if there is none."""
  with _LOCK:
    h = _lookup(ty)
  if h is None:
    raise ValueError(f"no TypeHandler registered for {ty.__module__}.{ty.__qualname__}")
  return h


_SPECIAL: list = []  # (predicate, handler) checked before type lookup (e.g. PRNG keys)


def handler_for_value(x: Any) -> TypeHandler | None:
  for pred, h in _SPECIAL:
    if pred(x):
      return h
  with _LOCK:
    return _lookup(type(x))


def handler_for_typestr(typestr: str) -> TypeHandler | None:
  with _LOCK:
    return _BY_TYPESTR.get(typestr)


def custom_types() -> frozenset:
  """Types registered by users (not built in)."""
  with _LOCK:
    return frozenset(t for t in _BY_TYPE if t not in _BUILTIN_TYPES)


def is_builtin(handler: TypeHandler) -> bool:
  return getattr(handler, "_flax_ckpt_builtin", False)


def np_dtype_or_none(dtype: Any) -> np.dtype | None:
  return None if dtype is None else np.dtype(dtype)
