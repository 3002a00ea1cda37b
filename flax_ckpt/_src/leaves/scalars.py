"""Built-in TypeHandlers for small values: numpy scalars, Python scalars, ``str``, ``None``
(stored inline in the leaf's JSON record) and ``bytes`` (inline up to 64 KiB, else in the
packed data file).
"""

from __future__ import annotations

import base64
import struct
from typing import Any, cast

import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes
from flax_ckpt._src.leaves import type_handlers as th
from flax_ckpt._src.leaves.arrays import check_coverage, checked_dtype_name, read_plan_for
from flax_ckpt._src.leaves.registry import BuiltinHandler

_INLINE_BYTES = 64 << 10


class NumpyScalarHandler(BuiltinHandler):
  """numpy scalars (``np.float32(1)``, ``ml_dtypes.bfloat16(2)``...): come back as such."""

  def typestr(self) -> str:
    return "np.generic"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      arr = dtypes.little_endian(np.asarray(v))
      info.record.update(dtype=checked_dtype_name(arr.dtype, info),
                         b64=base64.b64encode(arr.tobytes()).decode())
    return []

  async def deserialize(self, infos, args=None):
    out = []
    for i, info in enumerate(infos):
      v = _decoded(info, lambda info=info: np.frombuffer(
          _b64(info.record["b64"]), dtype=dtypes.dtype_from_name(info.record["dtype"]))[0])
      arg = args[i] if args else None
      if arg is not None and arg.dtype is not None:
        v = np.asarray(v).astype(arg.dtype)[()]
      out.append(v)
    return out

  async def metadata(self, infos):
    dts = [_decoded(info, lambda info=info: dtypes.dtype_from_name(info.record["dtype"]))
           for info in infos]
    return [th.ArrayMetadata(name=info.name, shape=(), dtype=dt, type="np.generic",
                             nbytes=dt.itemsize)
            for info, dt in zip(infos, dts)]


_BAD_RECORD = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


def _decoded(info: th.ParamInfo, fn: Any) -> Any:
  """``fn()``, turning what a malformed record (hostile input) raises into a FormatError
  naming the leaf."""
  try:
    return fn()
  except errors.CheckpointError:
    raise
  except _BAD_RECORD as e:  # incl. binascii.Error (a ValueError)
    raise errors.FormatError(
        f"leaf {info.name}: its record in {info.parent_dir}/_TREE.json is malformed "
        f"({type(e).__name__}: {str(e)[:200]}); the checkpoint is damaged or crafted.") from None


def _b64(s: Any) -> bytes:
  return base64.b64decode(s, validate=True)


def _enc_float(x: float) -> str:
  """Exact text for a float: ``float.hex`` or, for NaN, its 64 bits (sign and payload)."""
  if x != x:
    return "nan:" + struct.pack("<d", x).hex()
  return float(x).hex()


def _dec_float(s: str) -> float:
  if s.startswith("nan:"):
    return struct.unpack("<d", bytes.fromhex(s[4:]))[0]
  return float.fromhex(s)


class ScalarHandler(BuiltinHandler):
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
    return [_decoded(info, lambda info=info: self._dec(info.record.get("v"))) for info in infos]

  async def metadata(self, infos):
    out = []
    for info in infos:
      v = info.record.get("v")
      n = len(v.encode("utf-8", "surrogatepass")) if self._ty is str and isinstance(
          v, str) else (0 if v is None else 8)
      out.append(th.ValueMetadata(name=info.name, type=self.typestr(), nbytes=n))
    return out


class BytesHandler(BuiltinHandler):
  """``bytes``: inline up to 64 KiB, else in the data file."""

  def typestr(self) -> str:
    return "bytes"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos):
      info.record["nbytes"] = len(v)
      ctx = cast(th.SaveContext, info.context)
      if len(v) <= _INLINE_BYTES:
        info.record["b64"] = base64.b64encode(v).decode()
      elif ctx.process_index == 0:  # process-local: the primary writes it
        off, n = ctx.writer.add(np.frombuffer(v, np.uint8))
        info.chunks.append({"s": [0], "h": [n], "o": off, "n": n, "p": ctx.process_index})
    return []

  async def deserialize(self, infos, args=None):
    out: list[Any] = [None] * len(infos)
    big = []
    for i, info in enumerate(infos):
      n = info.record.get("nbytes")
      if type(n) is not int or n < 0:
        raise errors.FormatError(f"leaf {info.name}: its record in {info.parent_dir}/"
                                 f"_TREE.json has no valid nbytes ({n!r}); the checkpoint is "
                                 "damaged or crafted.")
      if "b64" in info.record:
        out[i] = _decoded(info, lambda info=info: _b64(info.record["b64"]))
        if len(out[i]) != n:
          raise errors.FormatError(f"leaf {info.name}: {len(out[i])} bytes, but its record "
                                   f"says {n}; the checkpoint is damaged or crafted.")
      else:
        big.append(i)
    for i in big:
      check_coverage(infos[i], (infos[i].record["nbytes"],))
    if big:
      plan = read_plan_for(infos)
      plan.check_extents([(infos[i].name, infos[i].record, infos[i].chunks) for i in big])
      bufs = [plan.box(infos[i].chunks, np.dtype(np.uint8), (0,), (infos[i].record["nbytes"],))
              for i in big]
      plan.execute()
      for i, b in zip(big, bufs):
        out[i] = b.tobytes()
    return out

  async def metadata(self, infos):
    return [th.ValueMetadata(name=i.name, type="bytes", nbytes=i.record["nbytes"])
            for i in infos]
