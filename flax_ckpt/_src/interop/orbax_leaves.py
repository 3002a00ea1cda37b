"""Reading the arrays of an Orbax PyTree item with tensorstore (zarr / zarr3 on OCDBT, on a
kvstack of unmerged per-process OCDBT databases, or on plain files), into what a template
leaf asks for: the shards this process addresses, numpy, a Python scalar or a typed key.

All leaves are opened, then all reads are started, then the results are collected, so
tensorstore reads every chunk concurrently (one shared ``ts.Context`` caches OCDBT's
B-tree nodes). A template with a sharding reads only the slices of this process's devices.

Example:
  >>> import numpy as np
  >>> Target.host(np.dtype('float32')).kind
  'host'
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes
from flax_ckpt._src.interop.orbax_tree import Entry
from flax_ckpt._src.io import storage
from flax_ckpt._src.leaves import devput
from flax_ckpt._src.leaves.arrays import weakly_typed

OCDBT_MANIFEST = "manifest.ocdbt"
OCDBT_PROCESS_PREFIX = "ocdbt.process_"


@dataclasses.dataclass(frozen=True)
class Target:
  """What one leaf becomes: ``host`` (numpy), ``jax`` (with ``sharding``, or the default
  device when None), ``key`` (a typed PRNG key of ``dtype``) or ``item`` (a Python/numpy
  scalar made by ``convert``)."""

  kind: str
  dtype: Any = None  # cast to this (None: as stored)
  sharding: Any = None
  shape: tuple[int, ...] | None = None  # required shape (None: as stored)
  convert: Callable[[np.ndarray], Any] | None = None
  committed: bool = True
  weak: bool = False  # the template is weakly typed (eval_shape of a Python scalar)

  @staticmethod
  def host(dtype: Any = None, shape: tuple[int, ...] | None = None) -> Target:
    return Target("host", dtype, shape=shape)


def physical_memory() -> int:
  """Bytes of RAM: a bound on any one leaf a checkpoint may claim (validate before
  allocating: a crafted zarr header can claim any shape)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 1 << 40


def _safe_name(name: str, where: str) -> str:
  """A leaf name as a relative key: a crafted name must not reach outside the item."""
  parts = name.split("/")
  if any(p in ("", ".", "..") for p in parts) or "\x00" in name or "\\" in name:
    raise errors.FormatError(f"{where}: leaf name {name!r} is not a plain relative key")
  return name


class KvStores:
  """The kvstore spec of each leaf of one item, chosen once from the item's files."""

  def __init__(self, backend: storage.StorageBackend, item: str, use_ocdbt: bool | None,
               names: set[str]):
    self._backend, self._item = backend, item.rstrip("/")
    self._base = backend.kvstore_spec(self._item)
    procs = sorted(n for n in names if n.startswith(OCDBT_PROCESS_PREFIX))
    ocdbt = use_ocdbt if use_ocdbt is not None else bool(OCDBT_MANIFEST in names or procs)
    self.mode = "file"
    self._layers: list[dict] | None = None
    if ocdbt:
      if OCDBT_MANIFEST in names:
        self.mode = "ocdbt"
      elif procs:
        self.mode = "kvstack"
        self._procs = procs
      else:
        raise errors.FormatError(
            f"{item}: _METADATA says OCDBT but there is neither {OCDBT_MANIFEST} nor an "
            f"{OCDBT_PROCESS_PREFIX}* database: the checkpoint is incomplete or damaged")

  def spec(self, name: str) -> dict:
    name = _safe_name(name, self._item)
    if self.mode == "ocdbt":
      return {"driver": "ocdbt", "base": self._base, "path": name + "/"}
    if self.mode == "kvstack":
      return {"driver": "kvstack", "layers": self._kvstack_layers(), "path": name + "/"}
    return self._backend.kvstore_spec(f"{self._item}/{name}")

  def _kvstack_layers(self) -> list[dict]:
    """The unmerged per-process databases as one kvstore: each key from the database that
    holds it (docs/orbax_format.md §3.3; the merge step of that save did not run)."""
    if self._layers is None:
      import tensorstore as ts

      layers = []
      for p in self._procs:
        base = {"driver": "ocdbt", "base": self._backend.kvstore_spec(f"{self._item}/{p}")}
        for k in ts.KvStore.open(base).result().list().result():
          key = k.decode()
          layers.append({"base": {**base, "path": key}, "exact": key})
      self._layers = layers
    return self._layers


def ts_context() -> Any:
  import tensorstore as ts

  return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
                     "file_io_concurrency": {"limit": 128}})


def _index_key(idx: tuple) -> tuple:
  return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)


class _Read:
  """One slice of a stored array read into a new 64-byte aligned buffer: on CPU the
  device array then takes the buffer as it is (measured on 1 GiB in 8 arrays: 8% faster
  than ``store.read()``, whose result the device put has to copy)."""

  __slots__ = ("buf", "future")

  def __init__(self, store: Any):
    import tensorstore as ts

    dt = np.dtype(store.dtype.numpy_dtype)
    shape = tuple(store.shape)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes == 0:
      self.buf, self.future = None, store.read()
      return
    self.buf = storage.aligned_empty(nbytes).view(dt).reshape(shape)
    dst = ts.array(self.buf, copy=False)[ts.d[:].translate_to[tuple(store.origin)]]
    self.future = dst.write(store)

  def result(self) -> np.ndarray:
    got = self.future.result()
    return got if self.buf is None else self.buf


class _Pending:
  """One leaf's reads in flight and how to finish it."""

  def __init__(self, entry: Entry, target: Target, store: Any, where: str):
    self.entry, self.target, self.where = entry, target, where
    shape = tuple(store.shape)
    self.shape = shape
    self.devices: list[Any] = []
    self.which: list[tuple] = []
    self.reads: dict[tuple, Any] = {}
    if target.kind == "jax" and target.sharding is not None:
      for d, idx in target.sharding.addressable_devices_indices_map(shape).items():
        key = _index_key(idx)
        self.devices.append(d)
        self.which.append(key)
        if key not in self.reads:
          self.reads[key] = _Read(store[idx] if idx else store)
    else:
      self.reads[()] = _Read(store)

  def finish(self) -> Any:
    out = self._finish()
    # as the template says (eval_shape's step counter): jit does not compile again
    return weakly_typed(out) if self.target.weak and isinstance(out, jax.Array) else out

  def _finish(self) -> Any:
    try:
      got = {k: f.result() for k, f in self.reads.items()}
    except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/OSError kinds
      raise errors.FormatError(
          f"{self.where}: the data of leaf {self.entry.shown} cannot be read (damaged or "
          f"truncated?): {e}") from e
    t = self.target
    if t.kind == "jax" and t.sharding is not None:
      bufs = [_cast(got[k], t.dtype) for k in self.which]
      dtype = bufs[0].dtype if bufs else np.dtype(t.dtype)
      return devput.put(self.shape, dtype, t.sharding, self.devices, bufs, committed=True)
    host = _cast(got[()], t.dtype)
    if t.kind == "host":
      return host
    if t.kind == "jax":
      return _put_default(host)
    if t.kind == "key":
      keys = jax.random.wrap_key_data(jnp.asarray(host), impl=t.dtype._impl)
      return jax.device_put(keys, t.sharding) if t.sharding is not None else keys
    assert t.convert is not None
    return t.convert(host)


def _put_default(host: np.ndarray) -> jax.Array:
  """An uncommitted array on the default device, taking the aligned buffer as it is."""
  config: Any = jax.config  # its stubs do not declare jax_default_device
  if config.jax_default_device is not None:
    return jax.device_put(host)  # that setting decides the device
  dev = jax.local_devices()[0]
  return devput.put(host.shape, host.dtype, jax.sharding.SingleDeviceSharding(dev), [dev],
                    [host], committed=False)


def _cast(a: np.ndarray, dtype: Any) -> np.ndarray:
  if dtype is None or jnp.issubdtype(dtype, jax.dtypes.prng_key) or a.dtype == dtype:
    return a
  return a.astype(dtype)


def _check_store(store: Any, e: Entry, target: Target, where: str) -> None:
  """The stored array is a numeric one of a shape the target accepts and RAM can hold."""
  try:
    dt = np.dtype(store.dtype.numpy_dtype)
    dtypes.dtype_name(dt)
  except (TypeError, ValueError):
    raise errors.FormatError(f"{where}: leaf {e.shown} has dtype {store.dtype}, which "
                             "flax_ckpt does not load (numeric and bool dtypes only)") from None
  shape = tuple(store.shape)
  if target.kind == "key":
    data = jax.eval_shape(jax.random.key_data,
                          jax.ShapeDtypeStruct(target.shape or (), target.dtype))
    want = tuple(data.shape)
    if dt != np.uint32 or shape != want:
      raise errors.StructureMismatchError(
          f"{where}: leaf {e.shown} holds {dt}{list(shape)}, the template asks for a typed "
          f"key {target.dtype}{list(target.shape or ())} (key data {want} uint32)")
  elif target.shape is not None and shape != tuple(target.shape):
    raise errors.StructureMismatchError(
        f"{where}: leaf {e.shown} has shape {shape} in the checkpoint, the template asks "
        f"for {tuple(target.shape)}")
  if math.prod(shape) * dt.itemsize > physical_memory():
    raise errors.FormatError(
        f"{where}: leaf {e.shown} claims shape {shape} of {dt}, more bytes than this "
        "machine's memory; the checkpoint is damaged or crafted")


def read_leaves(kv: KvStores, use_zarr3: bool, requests: Sequence[tuple[Entry, Target]],
                where: str) -> list[Any]:
  """The value of each requested leaf, read concurrently."""
  import tensorstore as ts

  ctx = ts_context()
  driver = "zarr3" if use_zarr3 else "zarr"
  opened = []
  for e, _ in requests:
    spec = {"driver": driver, "kvstore": kv.spec(e.name)}
    if kv.mode == "ocdbt":
      spec["kvstore"]["cache_pool"] = "cache_pool#ocdbt"
    opened.append(ts.open(spec, open=True, read=True, context=ctx))
  pending: list[_Pending] = []
  casts: list[tuple[str, Any, Any, bool]] = []  # (leaf, saved dtype, target dtype)
  for (e, target), fut in zip(requests, opened):
    try:
      store = fut.result()
    except Exception as err:  # noqa: BLE001 - tensorstore's errors are ValueError kinds
      raise errors.FormatError(
          f"{where}: leaf {e.shown} (data {e.name!r}, {driver}, {kv.mode} kvstore) cannot be "
          f"opened: {err}. If the checkpoint came from a newer Orbax, this flax_ckpt may not "
          "read its layout yet (docs/orbax_format.md lists what it reads).") from err
    _check_store(store, e, target, where)
    if target.kind != "key":
      casts.append((e.shown, np.dtype(store.dtype.numpy_dtype), target.dtype,
                    target.kind == "jax"))
    pending.append(_Pending(e, target, store, where))
  errors.warn_lossy_casts(errors.lossy_casts(casts))  # one warning naming every such leaf
  return [p.finish() for p in pending]
