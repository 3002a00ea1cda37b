"""Built-in array TypeHandlers: ``jax.Array`` (any sharding), ``np.ndarray``, PRNG keys.

Array bytes go into the checkpoint's packed data file (one per process), through the
writer of the save's :class:`~flax_ckpt._src.leaves.type_handlers.SaveContext`; loads read
only each device's box, through a :class:`~flax_ckpt._src.leaves.chunk_reads.ReadPlan`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes, sharding_desc
from flax_ckpt._src.io import storage
from flax_ckpt._src.leaves import devput
from flax_ckpt._src.leaves import type_handlers as th
from flax_ckpt._src.leaves.chunk_reads import ReadPlan, chunks_tile
from flax_ckpt._src.leaves.registry import BuiltinHandler

# ----------------------------------------------------------------------------- saving


_CPU_ONLY: bool | None = None


def cpu_only() -> bool:
  """Whether this process has no accelerators (host views are then zero-copy)."""
  global _CPU_ONLY
  if _CPU_ONLY is None:
    _CPU_ONLY = all(d.platform == "cpu" for d in jax.local_devices())
  return _CPU_ONLY


def start_host_copies(values: Sequence[Any]) -> None:
  """Starts every device->host copy of accelerator arrays before any is waited on."""
  for value in values:
    if not isinstance(value, jax.Array):
      continue
    for s in value.addressable_shards:
      if s.replica_id != 0:
        continue
      if s.device.platform == "cpu":
        break  # host memory already: np.asarray is a zero-copy view
      try:
        s.data.copy_to_host_async()
      except Exception:  # noqa: BLE001 - not supported everywhere; np.asarray copies anyway
        break


def host_chunks(value: Any, copy: bool) -> list[tuple[tuple[int, ...], np.ndarray]]:
  """(start index, host buffer) of every distinct shard this process must write."""
  if isinstance(value, np.ndarray):
    host = np.array(value, copy=True, order="C") if copy else np.ascontiguousarray(value)
    return [((0,) * value.ndim, host.reshape(value.shape))]  # ascontiguousarray makes 0-d 1-d
  sharding = value.sharding
  if isinstance(sharding, jax.sharding.SingleDeviceSharding) and value.is_fully_addressable:
    # On CPU this is a zero-copy, read-only view that pins the device buffer: a later
    # donation or delete() of the array cannot change or free the bytes we write.
    host = np.asarray(value)
    return [((0,) * value.ndim, host if host.flags.c_contiguous else np.ascontiguousarray(host))]
  out = []
  for s in value.addressable_shards:
    if s.replica_id != 0:
      continue
    host = np.asarray(s.data)
    if not host.flags.c_contiguous:
      host = np.ascontiguousarray(host)
    start = tuple(0 if sl.start is None else int(sl.start) for sl in s.index)
    out.append((start, host))
  return out


def checked_dtype_name(dtype: Any, info: th.ParamInfo) -> str:
  """The stored name of ``dtype``; UnsupportedLeafError naming the leaf if it has none."""
  try:
    return dtypes.dtype_name(dtype)
  except TypeError as e:
    raise errors.UnsupportedLeafError(
        f"leaf {info.name}: {e}. Convert it (e.g. strings to a list of str, datetimes to "
        "int64) or register a TypeHandler for it. Nothing was written.") from None


def _record_array(value: Any, info: th.ParamInfo, dtype: np.dtype, kind: str) -> None:
  """Fills the leaf's record: kind, dtype, shape, sharding, nbytes, weak type."""
  shape = tuple(int(d) for d in value.shape)
  rec = info.record
  rec["kind"] = kind
  rec["dtype"] = checked_dtype_name(dtype, info)
  rec["shape"] = list(shape)
  rec["sharding"] = sharding_desc.describe(getattr(value, "sharding", None))
  rec["nbytes"] = math.prod(shape) * dtype.itemsize
  if isinstance(value, jax.Array) and value.weak_type:
    rec["weak_type"] = True  # e.g. a step counter made from a Python int


def check_alive(value: Any, name: Callable[[], str]) -> None:
  if isinstance(value, jax.Array) and value.is_deleted():
    raise errors.UnsupportedLeafError(
        f"leaf {name()}: this jax.Array was deleted or donated before save was called; "
        "save the state before a step that donates it (or save the step's output). Nothing "
        "was written.")


def save_array(value: Any, info: th.ParamInfo, arg: th.SaveArgs | None, kind: str) -> None:
  """Records one array leaf and adds the chunks this process writes to the data file."""
  check_alive(value, lambda: info.name)
  dtype = np.dtype(value.dtype)
  if arg is not None and arg.dtype is not None:
    dtype = np.dtype(arg.dtype)
  _record_array(value, info, dtype, kind)
  ctx = cast(th.SaveContext, info.context)
  if ctx.process_index != 0 and (
      not isinstance(value, jax.Array) or info.index in ctx.primary_local):
    return  # process-local values (numpy, arrays process 0 holds whole): process 0 writes
  # otherwise every process writes the shards whose replica 0 it holds (possibly all of
  # them, for an array on a sub-mesh of this process's devices)
  reuse = ctx.reuse
  for start, host in host_chunks(value, copy=info.is_async and kind == "numpy"):
    if host.dtype != dtype:
      host = host.astype(dtype)
    host = dtypes.little_endian(host)
    if reuse is not None:  # the same bytes as in the previous checkpoint: refer to them
      same = reuse.reuse(value, info.keypath, info.record["dtype"], start, host)
      if same is not None:
        info.chunks.append(same)
        continue
    off, n = ctx.writer.add(host)
    info.chunks.append({"s": list(start), "h": list(host.shape), "o": off, "n": n,
                        "p": ctx.process_index})
    if reuse is not None:
      reuse.note(value, (info.record["dtype"], tuple(start), tuple(host.shape)),
                 info.chunks[-1])


class ArrayHandler(BuiltinHandler):
  """``jax.Array`` (any sharding) and ``np.ndarray`` leaves, of every jax dtype."""

  def __init__(self, kind: str = "jax"):
    self._kind = kind

  def typestr(self) -> str:
    return "jax.Array" if self._kind == "jax" else "np.ndarray"

  async def serialize(self, values, infos, args=None):
    # Accelerator arrays: start all device->host copies before waiting on any. On CPU the
    # host views are taken leaf by leaf, so the writer thread streams from the first leaf on.
    if self._kind == "jax" and not cpu_only():
      start_host_copies(values)
    for i, (v, info) in enumerate(zip(values, infos)):
      save_array(v, info, args[i] if args else None, self._kind)
    return []

  async def deserialize(self, infos, args=None):
    return load_arrays(infos, args, default_kind=self._kind)

  async def metadata(self, infos):
    return [_array_metadata(info) for info in infos]


_MAX_DIM = 1 << 62  # no real dimension comes near; larger ones could overflow offsets


def checked_record(info: th.ParamInfo, key: bool = False) -> dict:
  """``info``'s record, checked by :func:`check_array_record` (names made only on error:
  this runs once per leaf of every load)."""
  return check_array_record(info.record, info, "", key)


ARRAY_TYPESTRS = {"jax.Array": False, "np.ndarray": False, "jax.PRNGKey": True}  # -> key


def check_array_record(r: dict, name: Any, where: str, key: bool = False) -> dict:
  """An array leaf's record (hostile input), checked before any of it is used: ``dtype``
  a known dtype name, ``shape`` a list of non-negative ints, ``nbytes`` their size (and for
  a PRNG key, ``impl`` a string and ``key_shape`` a leading part of ``shape``).

  Raises:
    FormatError: naming the leaf and what is wrong.
  """
  shape, dtype, nbytes = r.get("shape"), r.get("dtype"), r.get("nbytes")
  problem = ""
  if type(dtype) is not str or dtype not in dtypes.known_names():
    problem = f"dtype {dtype!r} is not a dtype this flax_ckpt knows"
  elif type(shape) is not list or any(type(n) is not int or not 0 <= n < _MAX_DIM
                                      for n in shape):
    problem = f"shape {shape!r} is not a list of non-negative ints"
  elif type(nbytes) is not int or nbytes != math.prod(shape) * dtypes.dtype_from_name(
      dtype).itemsize:
    problem = f"nbytes {nbytes!r} does not match shape {shape} and dtype {dtype}"
  elif key and (not isinstance(r.get("impl"), str) or not isinstance(r.get("key_shape"), list)
                or r["key_shape"] != shape[:len(r["key_shape"])]):
    problem = f"impl {r.get('impl')!r} / key_shape {r.get('key_shape')!r} are malformed"
  if problem:
    if not isinstance(name, str):  # a ParamInfo: its names are made only now
      name, where = name.name, os.fspath(name.parent_dir)
    raise errors.FormatError(
        f"leaf {name}: its record in {where}/_TREE.json is malformed "
        f"({problem}); the checkpoint is damaged or crafted.")
  return r


def _array_metadata(info: th.ParamInfo) -> th.ArrayMetadata:
  r = checked_record(info)
  typestrs: dict[Any, Any] = {"jax": "jax.Array", "numpy": "np.ndarray"}
  typ = typestrs.get(r.get("kind"), r.get("kind", ""))
  return th.ArrayMetadata(
      name=info.name, directory=None, shape=tuple(r["shape"]),
      dtype=dtypes.dtype_from_name(r["dtype"]), type=typ, nbytes=r["nbytes"],
      sharding=r.get("sharding"),
  )


# ----------------------------------------------------------------------------- loading


def check_coverage(info: th.ParamInfo, shape: Sequence[int]) -> None:
  """The saved chunks of a leaf must cover it exactly (else a data file or index is lost)."""
  chunks = info.chunks
  if len(chunks) == 1 and chunks[0]["h"] == list(shape) and shape and not any(
      chunks[0]["s"]):
    return  # one chunk, the whole array (most leaves; the rest go to chunks_tile)
  if not chunks_tile(chunks, shape):
    have = sum(math.prod(c["h"]) for c in info.chunks)
    raise errors.FormatError(
        f"leaf {info.name}: the checkpoint's chunks ({have} of {math.prod(shape)} elements) "
        "do not tile the array (a _CHUNKS.p<i>.json or data file of some process is missing, "
        "damaged or from another save); the checkpoint is damaged, load an earlier one.")


def read_plan_for(infos: Sequence[th.ParamInfo]) -> ReadPlan:
  """A read plan over the data files of the load ``infos`` belong to."""
  ctx = infos[0].context
  files = getattr(ctx, "files", None)
  backend = ctx.backend if ctx is not None else None
  return ReadPlan(os.fspath(infos[0].parent_dir), files, backend,
                  getattr(ctx, "segments", None), verify=getattr(ctx, "verify", True))


_BATCH_LEAVES = 256  # a load plans this many leaves while the previous ones are read


def read_batched(infos: Sequence[th.ParamInfo], plan_leaf: Callable[[ReadPlan, int], Any],
                 finish_leaf: Callable[[Any], Any]) -> list[Any]:
  """Plans every leaf's reads (``plan_leaf(plan, i)``), reads them, then turns each planned
  leaf into its value (``finish_leaf``).

  Why in batches: planning and placing a leaf is Python work on this thread, the reads and
  checksums run on the pool, so with many small leaves batch k is read while batch k+1 is
  planned and batch k-1 placed (5000 leaves: about a third less time)."""
  if not infos:
    return []
  plan = read_plan_for(infos)
  plan.check_extents([(info, info.record, info.chunks) for info in infos])
  out: list[Any] = []
  waiting: list[tuple[list, Callable[[], None]]] = []  # batches being read, oldest first
  try:
    for b in range(0, len(infos), _BATCH_LEAVES):
      pending = [plan_leaf(plan, i) for i in range(b, min(b + _BATCH_LEAVES, len(infos)))]
      waiting.append((pending, plan.start()))
      if len(waiting) > 1:
        done, wait = waiting.pop(0)
        wait()
        out.extend(finish_leaf(p) for p in done)
    while waiting:
      done, wait = waiting.pop(0)
      wait()
      out.extend(finish_leaf(p) for p in done)
  except BaseException:
    for _, wait in waiting:  # no read may still fill a buffer once this raises
      try:
        wait()
      except Exception:  # noqa: BLE001,S110 - the first error is the one to report
        pass
    raise
  return out


def _boxes_for(sharding: Any, shape: tuple[int, ...]):
  """(devices, per-device box index, distinct boxes) for a target sharding."""
  idx_map = sharding.addressable_devices_indices_map(shape)
  devices, which, boxes, seen = [], [], [], {}
  for d, idx in idx_map.items():
    box = tuple((0 if s.start is None else s.start, n if s.stop is None else s.stop)
                for s, n in zip(idx, shape))
    if box not in seen:
      seen[box] = len(boxes)
      boxes.append(box)
    devices.append(d)
    which.append(seen[box])
  return devices, which, boxes


def _plan_device_boxes(plan: ReadPlan, info: th.ParamInfo, dtype: np.dtype, sharding: Any,
                       shape: tuple[int, ...], tail: Sequence[int] = ()):
  """Plans one host buffer per distinct device box of ``sharding`` over ``shape`` (+ whole
  ``tail`` dims); returns (devices, box index per device, buffers)."""
  devices, which, boxes = _boxes_for(sharding, shape)
  hosts = [plan.box(info.chunks, dtype, [b[0] for b in box] + [0] * len(tail),
                    [b[1] - b[0] for b in box] + list(tail)) for box in boxes]
  return devices, which, hosts


def _plan_array(plan: ReadPlan, info: th.ParamInfo, arg: th.RestoreArgs | None,
                default_kind: str) -> tuple:
  """Plans one array leaf's reads; returns (kind, host buffer(s), target, dtype, weak)."""
  r = info.record  # checked by load_arrays
  saved_dtype = dtypes.dtype_from_name(r["dtype"])
  shape = tuple(r["shape"])
  check_coverage(info, shape)
  kind = r.get("kind", default_kind)
  if arg is not None and arg.restore_type is not None:
    kind = "numpy" if arg.restore_type is np.ndarray else "jax"
  sharding = arg.sharding if arg is not None else None
  dtype = np.dtype(arg.dtype) if arg is not None and arg.dtype is not None else saved_dtype
  if kind != "numpy":  # jax arrays hold canonical dtypes (int64 -> int32 without x64)
    dtype = _canonical(dtype, jax.config.jax_enable_x64)  # pyright: ignore[reportAttributeAccessIssue]  # set at runtime by jax's config
  weak = arg.weak_type if arg is not None and arg.weak_type is not None else bool(
      r.get("weak_type", False))
  if kind == "numpy" or sharding is None:
    host = plan.box(info.chunks, saved_dtype, (0,) * len(shape), shape)
    return kind, host, None, dtype, weak
  devices, which, hosts = _plan_device_boxes(plan, info, saved_dtype, sharding, shape)
  return kind, hosts, (shape, sharding, devices, which), dtype, weak


@functools.lru_cache(maxsize=256)
def _canonical(dtype: np.dtype, x64: bool) -> np.dtype:
  """``dtype`` as jax arrays hold it (cached: ~0.7 us a leaf; ``x64`` is the key's part
  that can change it)."""
  del x64
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def load_arrays(infos: Sequence[th.ParamInfo], args: Sequence[th.RestoreArgs] | None,
                default_kind: str) -> list[Any]:
  """Reads array leaves described by ``infos``; batches all reads and device puts."""
  for info in infos:  # before anything is planned or read
    checked_record(info)
  config: Any = jax.config  # its stubs do not declare options such as jax_default_device
  default_dev = (None if config.jax_default_device is not None
                 else jax.local_devices()[0])
  # one sharding object for every unsharded leaf (building one per leaf cost ~1 us each)
  default_sh = None if default_dev is None else jax.sharding.SingleDeviceSharding(default_dev)

  def finish(pending: tuple) -> Any:
    kind, host, target, dtype, weak = pending
    v = _put_one(kind, host, target, dtype, default_dev, default_sh)
    return weakly_typed(v) if weak and kind != "numpy" else v

  return read_batched(
      infos, lambda plan, i: _plan_array(plan, infos[i], args[i] if args else None,
                                         default_kind), finish)


def _put_one(kind: str, host: Any, target: Any, tdtype: np.dtype, dev: Any,
             single: Any = None) -> Any:
  """One loaded array as numpy or on its devices (``dev``: the default device, None when
  a ``jax.default_device`` setting decides), in the target dtype."""
  if target is None:
    if host.dtype != tdtype:
      host = _aligned_copy(host.astype(tdtype))
    if kind == "numpy":
      return host
    if dev is None:
      return jax.device_put(host)
    sh = single if single is not None else jax.sharding.SingleDeviceSharding(dev)
    return devput.put(host.shape, host.dtype, sh, [dev], [host], committed=False)
  shape, sharding, devices, which = target
  hosts = host
  if hosts and hosts[0].dtype != tdtype:
    hosts = [_aligned_copy(h.astype(tdtype)) for h in hosts]
  return devput.put(shape, tdtype, sharding, devices, [hosts[w] for w in which],
                    committed=True)


def weakly_typed(x: jax.Array) -> jax.Array:
  """``x`` marked weakly typed (as Python scalars are), same dtype and sharding."""
  try:
    from jax._src.lax import lax as _lax

    return _lax._convert_element_type(  # pyright: ignore[reportReturnType]  # an Array for one
        x, x.dtype, weak_type=True)
  except Exception:  # noqa: BLE001 - a jax without it: strongly typed, same values
    return x


def _aligned_copy(a: np.ndarray) -> np.ndarray:
  b = storage.aligned_empty(a.nbytes).view(a.dtype).reshape(a.shape)
  b[...] = a
  return b


# -------------------------------------------------------------------------- PRNG keys


def is_prng_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


@functools.cache
def key_dtype(impl: str) -> Any:
  """The typed-key dtype of ``impl`` (e.g. ``key<fry>``); its name if this jax lacks it."""
  try:
    return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype
  except Exception:  # noqa: BLE001 - an impl unknown here: metadata must still work
    return f"key<{impl}>"


def _plan_key(plan: ReadPlan, info: th.ParamInfo, arg: th.RestoreArgs | None) -> tuple:
  """Plans one key leaf's reads, only each device's slice when the template gives a
  sharding; returns (impl, target, host buffer(s))."""
  r = info.record  # checked by deserialize
  impl = r["impl"]
  if isinstance(key_dtype(impl), str):  # this jax cannot make keys of that impl
    raise ValueError(f"leaf {info.name}: PRNG impl {impl!r} is not known to this jax "
                     "version; load with a jax that has it.")
  dtype, shape = dtypes.dtype_from_name(r["dtype"]), tuple(r["shape"])
  check_coverage(info, shape)
  key_shape = tuple(r["key_shape"])
  sharding = arg.sharding if arg is not None else None
  if sharding is None:
    return impl, None, plan.box(info.chunks, dtype, (0,) * len(shape), shape)
  devices, which, hosts = _plan_device_boxes(  # the impl's own dims are never split
      plan, info, dtype, sharding, key_shape, tail=shape[len(key_shape):])
  return impl, (key_shape, sharding, devices, which), hosts


def _wrap_key(pending: tuple) -> jax.Array:
  impl, target, host = pending
  if target is None:
    return jax.random.wrap_key_data(host, impl=impl)
  key_shape, sharding, devices, which = target
  parts = [jax.random.wrap_key_data(jax.device_put(host[w], d), impl=impl)
           for d, w in zip(devices, which)]
  return jax.make_array_from_single_device_arrays(key_shape, sharding, parts)


class PRNGKeyHandler(BuiltinHandler):
  """Typed PRNG keys (``jax.random.key``): key data plus the impl name."""

  def typestr(self) -> str:
    return "jax.PRNGKey"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      data = jax.random.key_data(v)
      save_array(data, info, None, "jax")
      info.record["impl"] = str(jax.random.key_impl(v))
      info.record["key_shape"] = [int(d) for d in v.shape]
      info.record["sharding"] = sharding_desc.describe(getattr(v, "sharding", None))
    return []

  async def deserialize(self, infos, args=None):
    """Reads key data, only each device's slice when the template gives a sharding."""
    for info in infos:  # before anything is planned or read
      checked_record(info, key=True)
    return read_batched(
        infos, lambda plan, i: _plan_key(plan, infos[i], args[i] if args else None),
        _wrap_key)

  async def metadata(self, infos):
    for info in infos:
      checked_record(info, key=True)
    return [th.ArrayMetadata(name=info.name, shape=tuple(info.record["key_shape"]),
                             dtype=key_dtype(info.record["impl"]), type="jax.PRNGKey",
                             nbytes=info.record["nbytes"], sharding=info.record.get("sharding"))
            for info in infos]
