"""Built-in TypeHandlers: jax.Array, np.ndarray, numpy scalars, PRNG keys, Python scalars,
str, bytes and None.

Array bytes go into the checkpoint's packed data file (one per process); everything small
is stored inline in the leaf's JSON record.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes, sharding_desc
from flax_ckpt._src.format import data_file
from flax_ckpt._src.io import storage
from flax_ckpt._src.leaves import devput
from flax_ckpt._src.leaves import type_handlers as th

_INLINE_BYTES = 64 << 10



# ----------------------------------------------------------------------------- saving


_CPU_ONLY: bool | None = None


def _cpu_only() -> bool:
  """Whether this process has no accelerators (host views are then zero-copy)."""
  global _CPU_ONLY
  if _CPU_ONLY is None:
    _CPU_ONLY = all(d.platform == "cpu" for d in jax.local_devices())
  return _CPU_ONLY


def _start_host_copies(values: Sequence[Any]) -> None:
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


def _host_chunks(value: Any, copy: bool) -> list[tuple[tuple[int, ...], np.ndarray]]:
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


def _checked_dtype_name(dtype: Any, info: th.ParamInfo) -> str:
  try:
    return dtypes.dtype_name(dtype)
  except TypeError as e:
    raise errors.UnsupportedLeafError(
        f"leaf {info.name}: {e}. Convert it (e.g. strings to a list of str, datetimes to "
        "int64) or register a TypeHandler for it. Nothing was written.") from None


def _save_array(value: Any, info: th.ParamInfo, arg: th.SaveArgs | None, kind: str) -> None:
  if isinstance(value, jax.Array) and value.is_deleted():
    raise errors.UnsupportedLeafError(
        f"leaf {info.name}: this jax.Array was deleted or donated before save was called; "
        "save the state before a step that donates it (or save the step's output). Nothing "
        "was written.")
  dtype = np.dtype(value.dtype)
  if arg is not None and arg.dtype is not None:
    dtype = np.dtype(arg.dtype)
  shape = tuple(int(d) for d in value.shape)
  rec = info.record
  rec["kind"] = kind
  rec["dtype"] = _checked_dtype_name(dtype, info)
  rec["shape"] = list(shape)
  rec["sharding"] = sharding_desc.describe(getattr(value, "sharding", None))
  rec["nbytes"] = math.prod(shape) * dtype.itemsize
  if isinstance(value, jax.Array) and value.weak_type:
    rec["weak_type"] = True  # e.g. a step counter made from a Python int
  writer = info._io.writer
  if info._io.process_index != 0 and (
      not isinstance(value, jax.Array) or info._index in info._io.primary_local):
    return  # process-local values (numpy, arrays process 0 holds whole): process 0 writes
  # otherwise every process writes the shards whose replica 0 it holds (possibly all of
  # them, for an array on a sub-mesh of this process's devices)
  for start, host in _host_chunks(value, copy=info.is_async and kind == "numpy"):
    if host.dtype != dtype:
      host = host.astype(dtype)
    host = dtypes.little_endian(host)
    off, n = writer.add(host)
    info.chunks.append({"s": list(start), "h": list(host.shape), "o": off, "n": n,
                        "p": info._io.process_index})


class _Builtin:
  _flax_ckpt_builtin = True

  def __repr__(self):
    return f"{type(self).__name__}({self.typestr()!r})"


class ArrayHandler(_Builtin):
  """``jax.Array`` (any sharding) and ``np.ndarray`` leaves, of every jax dtype."""

  def __init__(self, kind: str = "jax"):
    self._kind = kind

  def typestr(self) -> str:
    return "jax.Array" if self._kind == "jax" else "np.ndarray"

  async def serialize(self, values, infos, args=None):
    # Accelerator arrays: start all device->host copies before waiting on any. On CPU the
    # host views are taken leaf by leaf, so the writer thread streams from the first leaf on.
    if self._kind == "jax" and not _cpu_only():
      _start_host_copies(values)
    for i, (v, info) in enumerate(zip(values, infos)):
      _save_array(v, info, args[i] if args else None, self._kind)
    return []

  async def deserialize(self, infos, args=None):
    return load_arrays(infos, args, default_kind=self._kind)

  async def metadata(self, infos):
    return [_array_metadata(info) for info in infos]


def _array_metadata(info: th.ParamInfo) -> th.ArrayMetadata:
  r = info.record
  typ = {"jax": "jax.Array", "numpy": "np.ndarray"}.get(r.get("kind"), r.get("kind", ""))
  return th.ArrayMetadata(
      name=info.name, directory=None, shape=tuple(r["shape"]),
      dtype=dtypes.dtype_from_name(r["dtype"]), type=typ, nbytes=r["nbytes"],
      sharding=r.get("sharding"),
  )


# ----------------------------------------------------------------------------- loading


def _contiguous(sub: Sequence[int], full: Sequence[int]) -> bool:
  """Whether a box of shape ``sub`` is one contiguous run inside C-order ``full``."""
  k = 0
  while k < len(sub) and sub[k] == 1:
    k += 1
  return all(sub[j] == full[j] for j in range(k + 1, len(sub)))


def _flat(idx: Sequence[int], shape: Sequence[int]) -> int:
  f = 0
  for i, n in zip(idx, shape):
    f = f * n + i
  return f


_MIN_RUN = 512  # contiguous runs shorter than this are staged instead of read one by one


def staging_bytes() -> int:
  """Host memory a load may use beyond its results (``$FLAX_CKPT_STAGING_BYTES``, 64 MiB)."""
  return int(os.environ.get("FLAX_CKPT_STAGING_BYTES", 64 << 20))


def _flat_off(idx: Sequence[int], strides: Sequence[int]) -> int:
  return sum(i * st for i, st in zip(idx, strides))


def _strides(shape: Sequence[int]) -> list[int]:
  out, acc = [], 1
  for n in reversed(shape):
    out.append(acc)
    acc *= n
  return out[::-1]


class _ReadPlan:
  """Collects reads for many destination boxes, then executes them in one pass.

  Every byte goes straight from the data file into its destination buffer when the part of a
  saved chunk a box needs is one contiguous run, or a set of runs of at least ``_MIN_RUN``
  bytes (resharding: e.g. columns of row-sharded chunks). Only tiny strided runs go through a
  scratch buffer, filled slab by slab within :func:`staging_bytes`, so a load never holds
  more than its results plus that budget.
  """

  def __init__(self, state_dir: str, files: storage.CheckpointFiles | None = None):
    self.state_dir = state_dir
    self.files = files
    self.requests: dict[int, list[tuple[int, memoryview]]] = {}
    self.staged: list[tuple[dict, np.ndarray, list[int], list[int], list[int]]] = []

  def box(self, chunks: list[dict], dtype: np.dtype, start: Sequence[int],
          shape: Sequence[int]) -> np.ndarray:
    """A host buffer of ``shape`` at ``start`` that will hold the saved values."""
    item = dtype.itemsize
    nbytes = math.prod(shape) * item
    dest = storage.aligned_empty(nbytes)
    out = dest.view(dtype).reshape(tuple(shape))
    if len(chunks) == 1 and chunks[0]["n"] == nbytes and not any(start) and (
        chunks[0]["h"] == list(shape)):  # the common case: one chunk is the whole box
      if nbytes:
        self.requests.setdefault(chunks[0]["p"], []).append((chunks[0]["o"], memoryview(dest)))
      return out
    dview = memoryview(dest)
    stop = [a + n for a, n in zip(start, shape)]
    for c in chunks:
      cs, ch = c["s"], c["h"]
      lo = [max(a, b) for a, b in zip(start, cs)]
      hi = [min(a, b + n) for a, b, n in zip(stop, cs, ch)]
      sub = [h - lo_ for lo_, h in zip(lo, hi)]
      if any(n <= 0 for n in sub):
        continue
      a_chunk = [x - s for x, s in zip(lo, cs)]
      a_dest = [x - s for x, s in zip(lo, start)]
      if _contiguous(sub, ch) and _contiguous(sub, shape):
        n = math.prod(sub) * item
        foff = c["o"] + _flat(a_chunk, ch) * item
        doff = _flat(a_dest, shape) * item
        self.requests.setdefault(c["p"], []).append((foff, dview[doff:doff + n]))
      else:
        self._strided(c, item, sub, a_chunk, a_dest, list(shape), dview, out)
    return out

  def _strided(self, c: dict, item: int, sub: list[int], a_chunk: list[int],
               a_dest: list[int], shape: list[int], dview: memoryview, out: np.ndarray) -> None:
    """Reads a box that is not one contiguous run of the chunk as several runs."""
    ch = c["h"]
    k = len(sub) - 1  # runs span dims k.. (the dims after k are whole in chunk and box)
    while k > 0 and sub[k] == ch[k] == shape[k]:
      k -= 1
    run = math.prod(sub[k:]) * item
    if run < _MIN_RUN:
      self.staged.append((c, out, a_chunk, a_dest, sub))
      return
    cst, dst = _strides(ch), _strides(shape)
    f0 = c["o"] + item * sum(a * s for a, s in zip(a_chunk, cst))
    d0 = item * sum(a * s for a, s in zip(a_dest, dst))
    if k:
      idx = np.indices(sub[:k]).reshape(k, -1).astype(np.int64)
      fo = (f0 + item * (idx * np.asarray(cst[:k], np.int64)[:, None]).sum(0)).tolist()
      do = (d0 + item * (idx * np.asarray(dst[:k], np.int64)[:, None]).sum(0)).tolist()
    else:
      fo, do = [f0], [d0]
    reqs = self.requests.setdefault(c["p"], [])
    for f, d in zip(fo, do):
      reqs.append((f, dview[d:d + run]))

  def _run_staged(self) -> None:
    """Serves tiny strided runs through one scratch buffer, a slab of chunk rows at a time.

    Items are grouped by chunk, so each chunk row is read once for all boxes that need it,
    and of each row only the span from the first to the last byte any of them needs.
    """
    budget = staging_bytes()
    by_chunk: dict[tuple[int, int], list] = {}
    for c, out, a_chunk, a_dest, sub in self.staged:
      by_chunk.setdefault((c["p"], c["o"]), [c, []])[1].append((out, a_chunk, a_dest, sub))
    scratch = None
    for c, items in by_chunk.values():
      ch = c["h"]
      dtype = items[0][0].dtype
      item = dtype.itemsize
      row = math.prod(ch[1:]) * item  # bytes of one index of dim 0 of the chunk
      inner = _strides(ch[1:])
      lo = min(_flat_off(a[1:], inner) for _, a, _, _ in items) * item
      hi = max(_flat_off([x + n - 1 for x, n in zip(a[1:], sb[1:])], inner) + 1
               for _, a, _, sb in items) * item
      first = min(a[0] for _, a, _, _ in items)
      last = max(a[0] + sb[0] for _, a, _, sb in items)
      per = max(1, budget // max(row, 1))
      path = os.path.join(self.state_dir, data_file(c["p"]))
      for r0 in range(first, last, per):
        r1 = min(last, r0 + per)
        if scratch is None or scratch.nbytes < (r1 - r0) * row:
          scratch = storage.aligned_empty(max(min(budget, (last - first) * row), row))
        view = memoryview(scratch)
        if lo == 0 and hi == row:  # whole rows: one contiguous read for the slab
          reqs = [(c["o"] + r0 * row, view[:(r1 - r0) * row])]
        else:
          reqs = [(c["o"] + r * row + lo, view[(r - r0) * row + lo:(r - r0) * row + hi])
                  for r in range(r0, r1)]
        storage.backend_for(path).read_into(path, reqs, self.files)
        src = scratch[:(r1 - r0) * row].view(dtype).reshape((r1 - r0, *ch[1:]))
        for out, a_chunk, a_dest, sub in items:
          s0, s1 = max(r0, a_chunk[0]), min(r1, a_chunk[0] + sub[0])
          if s0 >= s1:
            continue
          d0 = a_dest[0] + (s0 - a_chunk[0])
          out[(slice(d0, d0 + s1 - s0),
               *(slice(a, a + n) for a, n in zip(a_dest[1:], sub[1:])))] = src[
              (slice(s0 - r0, s1 - r0), *(slice(a, a + n) for a, n in zip(a_chunk[1:],
                                                                          sub[1:])))]

  def execute(self) -> None:
    for p, reqs in self.requests.items():
      path = os.path.join(self.state_dir, data_file(p))
      storage.backend_for(path).read_into(path, reqs, self.files)
    self.requests.clear()
    if self.staged:
      self._run_staged()
      self.staged.clear()


def _chunks_tile(chunks: list[dict], shape: Sequence[int]) -> bool:
  """Whether the chunk boxes lie inside ``shape``, do not overlap, and cover it."""
  if sum(math.prod(c["h"]) for c in chunks) != math.prod(shape):
    return False
  if len(chunks) < 2:  # one chunk: the whole array (0-d arrays may have a [1] chunk)
    return all(not any(c["s"]) and (list(c["h"]) == list(shape) or not shape)
               for c in chunks)
  lo = np.array([c["s"] for c in chunks], np.int64).reshape(len(chunks), len(shape))
  hi = lo + np.array([c["h"] for c in chunks], np.int64).reshape(len(chunks), len(shape))
  if (lo < 0).any() or (hi > np.asarray(shape, np.int64)).any():
    return False
  # boxes i != j overlap when they intersect in every dimension
  inter = (lo[:, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[:, None, :])
  overlap = inter.all(axis=2)
  np.fill_diagonal(overlap, False)
  return not overlap.any()  # no overlaps + total volume == array volume: exact cover


def _check_coverage(info: th.ParamInfo, shape: Sequence[int]) -> None:
  """The saved chunks of a leaf must cover it exactly (else a data file or index is lost)."""
  if not _chunks_tile(info.chunks, shape):
    have = sum(math.prod(c["h"]) for c in info.chunks)
    raise errors.FormatError(
        f"leaf {info.name}: the checkpoint's chunks ({have} of {math.prod(shape)} elements) "
        "do not tile the array (a _CHUNKS.p<i>.json or data file of some process is missing, "
        "damaged or from another save); the checkpoint is damaged, load an earlier one.")


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


def _plan_device_boxes(plan: _ReadPlan, info: th.ParamInfo, dtype: np.dtype, sharding: Any,
                       shape: tuple[int, ...], tail: Sequence[int] = ()):
  """Plans one host buffer per distinct device box of ``sharding`` over ``shape`` (+ whole
  ``tail`` dims); returns (devices, box index per device, buffers)."""
  devices, which, boxes = _boxes_for(sharding, shape)
  hosts = [plan.box(info.chunks, dtype, [b[0] for b in box] + [0] * len(tail),
                    [b[1] - b[0] for b in box] + list(tail)) for box in boxes]
  return devices, which, hosts


def load_arrays(infos: Sequence[th.ParamInfo], args: Sequence[th.RestoreArgs] | None,
                default_kind: str) -> list[Any]:
  """Reads array leaves described by ``infos``; batches all reads and device puts."""
  if not infos:
    return []
  plan = _ReadPlan(os.fspath(infos[0].parent_dir), infos[0]._files)
  pending = []
  for i, info in enumerate(infos):
    r = info.record
    arg = args[i] if args else None
    sdtype = dtypes.dtype_from_name(r["dtype"])
    shape = tuple(r["shape"])
    _check_coverage(info, shape)
    kind = r.get("kind", default_kind)
    if arg is not None and arg.restore_type is not None:
      kind = "numpy" if arg.restore_type is np.ndarray else "jax"
    sharding = arg.sharding if arg is not None else None
    tdtype = np.dtype(arg.dtype) if arg is not None and arg.dtype is not None else sdtype
    if kind != "numpy":  # jax arrays hold canonical dtypes (int64 -> int32 without x64)
      tdtype = np.dtype(jax.dtypes.canonicalize_dtype(tdtype))
    weak = arg.weak_type if arg is not None and arg.weak_type is not None else bool(
        r.get("weak_type", False))
    if kind == "numpy" or sharding is None:
      host = plan.box(info.chunks, sdtype, (0,) * len(shape), shape)
      pending.append((kind, host, None, tdtype, weak))
    else:
      devices, which, hosts = _plan_device_boxes(plan, info, sdtype, sharding, shape)
      pending.append((kind, hosts, (shape, sharding, devices, which), tdtype, weak))
  plan.execute()
  out = []
  default_dev = (None if jax.config.jax_default_device is not None
                 else jax.local_devices()[0])
  for kind, host, target, tdtype, weak in pending:
    v = _put_one(kind, host, target, tdtype, default_dev)
    out.append(_weakly_typed(v) if weak and kind != "numpy" else v)
  return out


def _put_one(kind: str, host: Any, target: Any, tdtype: np.dtype, dev: Any) -> Any:
  """One loaded array as numpy or on its devices (``dev``: the default device, None when
  a ``jax.default_device`` setting decides), in the target dtype."""
  if target is None:
    if host.dtype != tdtype:
      host = _aligned_copy(host.astype(tdtype))
    if kind == "numpy":
      return host
    if dev is None:
      return jax.device_put(host)
    sh = jax.sharding.SingleDeviceSharding(dev)
    return devput.put(host.shape, host.dtype, sh, [dev], [host], committed=False)
  shape, sharding, devices, which = target
  hosts = host
  if hosts and hosts[0].dtype != tdtype:
    hosts = [_aligned_copy(h.astype(tdtype)) for h in hosts]
  return devput.put(shape, tdtype, sharding, devices, [hosts[w] for w in which],
                    committed=True)


def _weakly_typed(x: jax.Array) -> jax.Array:
  """``x`` marked weakly typed (as Python scalars are), same dtype and sharding."""
  try:
    from jax._src.lax import lax as _lax

    return _lax._convert_element_type(x, x.dtype, weak_type=True)
  except Exception:  # noqa: BLE001 - a jax without it: strongly typed, same values
    return x


def _aligned_copy(a: np.ndarray) -> np.ndarray:
  b = storage.aligned_empty(a.nbytes).view(a.dtype).reshape(a.shape)
  b[...] = a
  return b


# ----------------------------------------------------------------------- numpy scalars


class NumpyScalarHandler(_Builtin):
  """numpy scalars (``np.float32(1)``, ``ml_dtypes.bfloat16(2)``...): come back as such."""

  def typestr(self) -> str:
    return "np.generic"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      arr = dtypes.little_endian(np.asarray(v))
      info.record.update(dtype=_checked_dtype_name(arr.dtype, info),
                         b64=base64.b64encode(arr.tobytes()).decode())
    return []

  async def deserialize(self, infos, args=None):
    out = []
    for i, info in enumerate(infos):
      dt = dtypes.dtype_from_name(info.record["dtype"])
      v = np.frombuffer(base64.b64decode(info.record["b64"]), dtype=dt)[0]
      arg = args[i] if args else None
      if arg is not None and arg.dtype is not None:
        v = np.asarray(v).astype(arg.dtype)[()]
      out.append(v)
    return out

  async def metadata(self, infos):
    return [th.ArrayMetadata(name=info.name, shape=(),
                             dtype=dtypes.dtype_from_name(info.record["dtype"]),
                             type="np.generic",
                             nbytes=dtypes.dtype_from_name(info.record["dtype"]).itemsize)
            for info in infos]


# -------------------------------------------------------------------------- PRNG keys


def is_prng_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@functools.cache
def key_dtype(impl: str) -> Any:
  """The typed-key dtype of ``impl`` (e.g. ``key<fry>``); its name if this jax lacks it."""
  try:
    return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype
  except Exception:  # noqa: BLE001 - an impl unknown here: metadata must still work
    return f"key<{impl}>"


class PRNGKeyHandler(_Builtin):
  """Typed PRNG keys (``jax.random.key``): key data plus the impl name."""

  def typestr(self) -> str:
    return "jax.PRNGKey"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      data = jax.random.key_data(v)
      _save_array(data, info, None, "jax")
      info.record["impl"] = str(jax.random.key_impl(v))
      info.record["key_shape"] = [int(d) for d in v.shape]
      info.record["sharding"] = sharding_desc.describe(getattr(v, "sharding", None))
    return []

  async def deserialize(self, infos, args=None):
    """Reads key data, only each device's slice when the template gives a sharding."""
    if not infos:
      return []
    plan = _ReadPlan(os.fspath(infos[0].parent_dir), infos[0]._files)
    pending = []
    for i, info in enumerate(infos):
      r = info.record
      impl = r["impl"]
      if isinstance(key_dtype(impl), str):  # this jax cannot make keys of that impl
        raise ValueError(f"leaf {info.name}: PRNG impl {impl!r} is not known to this jax "
                         "version; load with a jax that has it.")
      dtype, shape = dtypes.dtype_from_name(r["dtype"]), tuple(r["shape"])
      _check_coverage(info, shape)
      key_shape = tuple(r["key_shape"])
      arg = args[i] if args else None
      sharding = arg.sharding if arg is not None else None
      if sharding is None:
        pending.append((impl, None, plan.box(info.chunks, dtype, (0,) * len(shape), shape)))
        continue
      devices, which, hosts = _plan_device_boxes(  # the impl's own dims are never split
          plan, info, dtype, sharding, key_shape, tail=shape[len(key_shape):])
      pending.append((impl, (key_shape, sharding, devices, which), hosts))
    plan.execute()
    out = []
    for impl, target, host in pending:
      if target is None:
        out.append(jax.random.wrap_key_data(host, impl=impl))
        continue
      key_shape, sharding, devices, which = target
      parts = [jax.random.wrap_key_data(jax.device_put(host[w], d), impl=impl)
               for d, w in zip(devices, which)]
      out.append(jax.make_array_from_single_device_arrays(key_shape, sharding, parts))
    return out

  async def metadata(self, infos):
    return [th.ArrayMetadata(name=info.name, shape=tuple(info.record["key_shape"]),
                             dtype=key_dtype(info.record["impl"]), type="jax.PRNGKey",
                             nbytes=info.record["nbytes"], sharding=info.record.get("sharding"))
            for info in infos]


# ------------------------------------------------------------------- Python scalars etc.


def _enc_float(x: float) -> str:
  """Exact text for a float: ``float.hex`` or, for NaN, its 64 bits (sign and payload)."""
  if x != x:
    return "nan:" + struct.pack("<d", x).hex()
  return float(x).hex()


def _dec_float(s: str) -> float:
  if s.startswith("nan:"):
    return struct.unpack("<d", bytes.fromhex(s[4:]))[0]
  return float.fromhex(s)


class ScalarHandler(_Builtin):
  """``int``, ``float``, ``bool``, ``complex``, ``str`` and ``None``, stored inline."""

  def __init__(self, ty: type):
    self._ty = ty

  def typestr(self) -> str:
    return "None" if self._ty is type(None) else self._ty.__name__

  def _enc(self, v):
    t = self._ty
    if t is float:
      return _enc_float(v)
    if t is complex:
      return [_enc_float(v.real), _enc_float(v.imag)]
    if t is type(None):
      return None
    if t is int and not -(2**53) < v < 2**53:
      return hex(v)  # exact, any size, and safe for JSON readers limited to doubles
    return t(v)

  def _dec(self, e):
    t = self._ty
    if t is float:
      return _dec_float(e)
    if t is complex:
      return complex(_dec_float(e[0]), _dec_float(e[1]))
    if t is type(None):
      return None
    if t is int and isinstance(e, str):
      return int(e, 16)
    return t(e)

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      info.record["v"] = self._enc(v)
    return []

  async def deserialize(self, infos, args=None):
    return [self._dec(info.record.get("v")) for info in infos]

  async def metadata(self, infos):
    out = []
    for info in infos:
      v = info.record.get("v")
      n = len(v.encode("utf-8", "surrogatepass")) if self._ty is str else (
          0 if v is None else 8)
      out.append(th.ValueMetadata(name=info.name, type=self.typestr(), nbytes=n))
    return out


class BytesHandler(_Builtin):
  """``bytes``: inline up to 64 KiB, else in the data file."""

  def typestr(self) -> str:
    return "bytes"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      info.record["nbytes"] = len(v)
      if len(v) <= _INLINE_BYTES:
        info.record["b64"] = base64.b64encode(v).decode()
      elif info._io.process_index == 0:  # process-local: the primary writes it
        off, n = info._io.writer.add(np.frombuffer(v, np.uint8))
        info.chunks.append({"s": [0], "h": [n], "o": off, "n": n, "p": info._io.process_index})
    return []

  async def deserialize(self, infos, args=None):
    out: list[Any] = [None] * len(infos)
    big = []
    for i, info in enumerate(infos):
      if "b64" in info.record:
        out[i] = base64.b64decode(info.record["b64"])
      else:
        big.append(i)
    for i in big:
      _check_coverage(infos[i], (infos[i].record["nbytes"],))
    if big:
      plan = _ReadPlan(os.fspath(infos[0].parent_dir), infos[0]._files)
      bufs = [plan.box(infos[i].chunks, np.dtype(np.uint8), (0,), (infos[i].record["nbytes"],))
              for i in big]
      plan.execute()
      for i, b in zip(big, bufs):
        out[i] = b.tobytes()
    return out

  async def metadata(self, infos):
    return [th.ValueMetadata(name=i.name, type="bytes", nbytes=i.record["nbytes"])
            for i in infos]


def register_builtins() -> None:
  th._register_builtin(jax.Array, ArrayHandler("jax"))
  th._register_builtin(np.ndarray, ArrayHandler("numpy"))
  th._register_builtin(np.generic, NumpyScalarHandler())
  for t in (int, float, bool, complex, str, type(None)):
    th._register_builtin(t, ScalarHandler(t))
  th._register_builtin(bytes, BytesHandler())
  key_handler = PRNGKeyHandler()
  th._BY_TYPESTR[key_handler.typestr()] = key_handler
  th._SPECIAL.append((is_prng_key, key_handler))
