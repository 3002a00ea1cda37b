"""Tagged JSON: Python values that come back with the same types (one codec for all uses).

Used for PyTree nodes' aux data (e.g. nnx Variable metadata), iterator states that are not
plain JSON, and non-finite metrics. ``None``, ``bool``, ``str``, ints below 2^53 in magnitude
and finite floats are themselves; everything else is a one-key object (docs/format.md):

``{"l": [..]}`` list, ``{"t": [..]}`` tuple, ``{"d": [[key, value], ..]}`` dict (any such
keys, order kept), ``{"i": "0x.."}`` int, ``{"f": "nan"|"inf"|"-inf"}`` float, ``{"b":
base64}`` bytes, ``{"np": [dtype, value]}`` numpy scalar, ``{"a": [dtype, shape, base64]}``
numpy array (little-endian, C order), ``{"P": [..]}`` ``jax.sharding.PartitionSpec``.
"""

from __future__ import annotations

import base64
import math
import sys
from typing import Any

import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes


class Unencodable(Exception):
  """The value (at the path in the message) has no faithful encoding."""


def encode(v: Any, where: str = "value") -> Any:
  """``v`` as tagged JSON; raises :class:`Unencodable` naming the offending path."""
  cls = type(v)
  if v is None or cls in (bool, str):
    return v
  if cls is int:
    return v if abs(v) < 2**53 else {"i": hex(v)}
  if cls is float:
    return v if math.isfinite(v) else {"f": repr(v)}
  if cls is list or cls is tuple:
    return {"l" if cls is list else "t": [encode(x, f"{where}[{i}]") for i, x in enumerate(v)]}
  if cls is dict:
    return {"d": [[encode(k, f"{where} key {k!r}"), encode(x, f"{where}[{k!r}]")]
                  for k, x in v.items()]}
  if cls in (bytes, bytearray):
    return {"b": base64.b64encode(bytes(v)).decode("ascii")}
  if isinstance(v, np.generic) and not isinstance(v, np.void):
    return {"np": [dtypes.dtype_name(v.dtype), encode(v.item(), where)]}
  if cls is np.ndarray and v.dtype.kind in "biufc":
    data = dtypes.little_endian(np.ascontiguousarray(v)).tobytes()
    return {"a": [dtypes.dtype_name(v.dtype), list(v.shape),
                  base64.b64encode(data).decode("ascii")]}
  jax = sys.modules.get("jax")
  if jax is not None and isinstance(v, jax.sharding.PartitionSpec):
    return {"P": [encode(x, f"{where}[{i}]")
                  for i, x in enumerate(v)]}  # pyright: ignore[reportArgumentType]  # a tuple
  raise Unencodable(f"{where} is a {cls.__module__}.{cls.__qualname__}")


def decode(v: Any) -> Any:
  """Inverse of :func:`encode`."""
  if not isinstance(v, dict):
    return v
  ((tag, body),) = v.items()
  if tag == "l":
    return [decode(x) for x in body]
  if tag == "t":
    return tuple(decode(x) for x in body)
  if tag == "d":
    return {decode(k): decode(x) for k, x in body}
  if tag == "i":
    return int(body, 16)
  if tag == "f":
    return float(body)
  if tag == "b":
    return base64.b64decode(body)
  if tag == "np":
    return dtypes.dtype_from_name(body[0]).type(decode(body[1]))
  if tag == "a":
    dtype = dtypes.dtype_from_name(body[0])
    raw = np.frombuffer(base64.b64decode(body[2]), dtype.newbyteorder("<"))
    return raw.astype(dtype).reshape(body[1])
  if tag == "P":
    import jax

    return jax.sharding.PartitionSpec(*(decode(x) for x in body))
  raise errors.FormatError(f"unknown tag {tag!r} in tagged JSON; upgrade flax_ckpt")
