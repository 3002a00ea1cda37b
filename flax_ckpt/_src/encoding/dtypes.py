"""Dtype names on disk <-> numpy dtypes, from a fixed whitelist (nothing is imported by name)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_dtypes
import numpy as np

_NUMPY_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)
_ML_DTYPES_NAMES = (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn",
    "float6_e2m3fn", "float6_e3m2fn", "int4", "uint4", "int2", "uint2", "int1", "uint1",
)

_BY_NAME: dict[str, np.dtype] = {n: np.dtype(n) for n in _NUMPY_NAMES}
for _n in _ML_DTYPES_NAMES:
  if hasattr(ml_dtypes, _n):
    _BY_NAME[_n] = np.dtype(getattr(ml_dtypes, _n))


_NAME_CACHE: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
  """The on-disk name of a dtype; raises TypeError for dtypes we cannot store."""
  cached = _NAME_CACHE.get(dtype)
  if cached is not None:
    return cached
  dtype = np.dtype(dtype)
  if dtype.byteorder == ">":
    dtype = dtype.newbyteorder("<")  # stored little-endian; little_endian() converts data
  name = dtype.name
  if name not in _BY_NAME or _BY_NAME[name] != dtype:
    raise TypeError(
        f"dtype {dtype!r} cannot be stored; supported dtypes: {sorted(_BY_NAME)}"
    )
  _NAME_CACHE[dtype] = name
  return name


def known_names() -> Mapping[str, np.dtype]:
  """Every dtype name a checkpoint may hold (docs/format.md), with its dtype."""
  return _BY_NAME


def dtype_from_name(name: str) -> np.dtype:
  """The numpy dtype for an on-disk dtype name."""
  try:
    return _BY_NAME[name]
  except KeyError:
    raise TypeError(
        f"unknown dtype {name!r} in checkpoint; this flax_ckpt/ml_dtypes version knows "
        f"{sorted(_BY_NAME)}. Upgrade ml_dtypes or flax_ckpt to read it."
    ) from None


def little_endian(arr: np.ndarray) -> np.ndarray:
  """``arr`` with little-endian byte order (a no-op on little-endian hosts)."""
  if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
    return arr.astype(arr.dtype.newbyteorder("<"))
  return arr
