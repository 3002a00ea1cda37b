"""Reading flax.serialization msgpack files without flax's decoder (and without pickle).

``flax.serialization.to_bytes`` and the legacy ``flax.training.checkpoints`` files
(``checkpoint_<step>``) hold one msgpack document: the state dict, a tree of maps with
str keys. Its leaves are msgpack scalars (nil, bool, int, float, str, bin) and three
extension types (flax/serialization.py, ``_MsgpackExtType``):

- 1, ndarray: a msgpack ``[shape, dtype name, C-order bytes]``;
- 2, native complex: a msgpack ``[real, imag]``;
- 3, numpy scalar: an ndarray payload of shape ``()``.

Arrays above ``flax.serialization.MAX_CHUNK_SIZE`` bytes are stored as the map
``{'__msgpack_chunked_array__': True, 'shape': {'0': d0, ...}, 'chunks': {'0': piece, ...}}``
of flat pieces.

Every byte is hostile. msgpack itself bounds each container by the document's length and
its nesting by its C stack; the walk here keeps extension payloads raw until it knows the
leaf path, then checks each one (dtype from the allowlist of ``encoding/dtypes.py``,
``shape`` product times item size equal to the buffer's length, at most
:data:`MAX_DEPTH` levels) before building anything from it. Errors are
:class:`~flax_ckpt.FormatError` naming the file and the leaf.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes
from flax_ckpt._src.tree import treespec

MAX_DEPTH = 100  # flax state dicts are a few levels deep; this bounds the recursive walk
_MAX_NDIM = 64  # numpy's own limit
_MAX_DIM = 1 << 62
_CHUNKED = "__msgpack_chunked_array__"
_NDARRAY, _COMPLEX, _NPSCALAR = 1, 2, 3
# what flax.training.checkpoints.save_checkpoint_multiprocess stores in place of an array it
# wrote to a separate directory
_MULTIPROCESS_PLACEHOLDER = "//GDAPlaceholder:"


class _Ext:
  """An extension object as read: decoded later, when its leaf path is known."""

  __slots__ = ("code", "data")

  def __init__(self, code: int, data: bytes):
    self.code, self.data = code, data


class _Bad(Exception):
  """A malformed value; :class:`_Walk` adds the file and the leaf path."""


def read_state_dict(path: str) -> Any:
  """The state dict in the flax msgpack file ``path``, as ``flax.serialization.msgpack_restore``
  would return it: nested dicts (lists where the writer stored lists) of numpy arrays,
  numpy scalars and Python scalars.

  Raises:
    FormatError: the file is not a well-formed flax msgpack file (naming file and leaf).

  Example:
    >>> import numpy as np, flax, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'params.msgpack')
    >>> with open(path, 'wb') as f:
    ...   _ = f.write(flax.serialization.to_bytes({'w': np.arange(3.0)}))
    >>> read_state_dict(path)
    {'w': array([0., 1., 2.])}
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    # ext_hook keeps the payloads raw; timestamps (ext -1) come back as msgpack.Timestamp,
    # which the walk rejects like any other unexpected value.
    tree = msgpack.unpackb(data, ext_hook=_Ext, raw=False, strict_map_key=False,
                           use_list=True)
  except (ValueError, msgpack.UnpackException) as e:  # incl. StackError, UnicodeDecodeError
    raise errors.FormatError(
        f"{path}: not a readable flax msgpack file ({type(e).__name__}: {str(e)[:200]}); it "
        "is truncated, damaged or another format. Re-export it with "
        "flax.serialization.to_bytes, or load the checkpoint directory it came from."
    ) from None
  del data  # the walk copies each array out of its payload
  return _Walk(path).value(tree, (), 0)


class _Walk:
  """Checks and decodes a raw document into the state dict (see the module docstring)."""

  def __init__(self, path: str):
    self.path = path

  def fail(self, leaf: tuple, why: str) -> errors.FormatError:
    where = treespec.path_str([("d", k) for k in leaf])
    return errors.FormatError(
        f"{self.path}: leaf {where}: {why}. The file is damaged or was not written by "
        "flax.serialization; re-export it from the model, or load an earlier file.")

  def value(self, x: Any, leaf: tuple, depth: int) -> Any:
    if depth > MAX_DEPTH:
      raise self.fail(leaf, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(x, dict):
      if _CHUNKED in x:
        return self.unchunk(x, leaf)
      out = {}
      for k, v in x.items():
        if type(k) not in (str, int):
          raise self.fail(leaf, f"a map key of type {type(k).__name__} (expected str)")
        out[k] = self.value(v, (*leaf, k), depth + 1)
      return out
    if isinstance(x, list):
      return [self.value(v, (*leaf, i), depth + 1) for i, v in enumerate(x)]
    if isinstance(x, _Ext):
      try:
        return _decode_ext(x)
      except _Bad as e:
        raise self.fail(leaf, str(e)) from None
    if isinstance(x, str) and x.startswith(_MULTIPROCESS_PLACEHOLDER):
      raise errors.FormatError(
          f"{self.path}: leaf {treespec.path_str([('d', k) for k in leaf])} is stored in a "
          "separate directory (flax.training.checkpoints.save_checkpoint_multiprocess); "
          "flax_ckpt reads single files only. Restore it with flax's restore_checkpoint "
          "and save it with flax_ckpt.save.")
    if x is None or type(x) in (bool, int, float, str, bytes):
      return x
    raise self.fail(leaf, f"a value of type {type(x).__name__}")

  def unchunk(self, x: dict, leaf: tuple) -> np.ndarray:
    """A chunked array: the flat pieces, checked to add up to ``shape``, joined."""
    try:
      if set(x) != {_CHUNKED, "shape", "chunks"} or x[_CHUNKED] is not True:
        raise _Bad(f"a chunked array needs exactly {_CHUNKED}=True, 'shape' and 'chunks'")
      shape = _check_shape(_sequence(x["shape"], "shape"))
      pieces = []
      for c in _sequence(x["chunks"], "chunks"):
        if not isinstance(c, _Ext) or c.code != _NDARRAY:
          raise _Bad("a piece of a chunked array is not an array")
        pieces.append(_decode_array(c.data, copy=False))
      if not pieces or any(p.ndim != 1 or p.dtype != pieces[0].dtype for p in pieces):
        raise _Bad("a chunked array needs one or more flat pieces of one dtype")
      if sum(p.size for p in pieces) != math.prod(shape):
        raise _Bad(f"the pieces hold {sum(p.size for p in pieces)} elements, the shape "
                   f"{shape} needs {math.prod(shape)}")
    except _Bad as e:
      raise self.fail(leaf, str(e)) from None
    return np.concatenate(pieces).reshape(shape)


def _sequence(x: Any, what: str) -> list:
  """A flax tuple-as-dict ``{'0': a, '1': b, ...}`` (or a list) as a list."""
  if isinstance(x, list):
    return x
  if not isinstance(x, dict) or set(x) != {str(i) for i in range(len(x))}:
    raise _Bad(f"a chunked array's {what!r} is not a map with keys '0'..'n-1'")
  return [x[str(i)] for i in range(len(x))]


def _check_shape(shape: Any) -> tuple[int, ...]:
  if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_NDIM or not all(
      type(d) is int and 0 <= d < _MAX_DIM for d in shape):
    raise _Bad(f"invalid array shape {str(shape)[:100]}")
  return tuple(shape)


def _decode_ext(x: _Ext) -> Any:
  if x.code == _NDARRAY:
    return _decode_array(x.data, copy=True)
  if x.code == _NPSCALAR:
    arr = _decode_array(x.data, copy=True)
    if arr.shape != ():
      raise _Bad(f"a numpy scalar of shape {arr.shape}")
    return arr[()]
  if x.code == _COMPLEX:
    parts = _unpack_payload(x.data)
    if not (isinstance(parts, list) and len(parts) == 2
            and all(type(p) in (int, float) for p in parts)):
      raise _Bad("a complex number is not [real, imag]")
    return complex(parts[0], parts[1])
  raise _Bad(f"unknown msgpack extension type {x.code} (flax writes 1, 2 and 3)")


def _unpack_payload(data: bytes) -> Any:
  try:  # no ext_hook: a nested extension comes back as an ExtType and fails the checks
    return msgpack.unpackb(data, raw=True, strict_map_key=False, use_list=True)
  except (ValueError, msgpack.UnpackException) as e:
    raise _Bad(f"an unreadable extension payload ({type(e).__name__})") from None


def _decode_array(data: bytes, *, copy: bool) -> np.ndarray:
  """An ndarray payload ``[shape, dtype name, bytes]``, checked before it is used."""
  parts = _unpack_payload(data)
  if not (isinstance(parts, list) and len(parts) == 3 and isinstance(parts[1], bytes)
          and isinstance(parts[2], bytes)):
    raise _Bad("an array is not [shape, dtype name, bytes]")
  shape = _check_shape(parts[0])
  try:
    dtype = dtypes.dtype_from_name(parts[1].decode("ascii"))
  except (UnicodeDecodeError, TypeError):
    raise _Bad(f"dtype {parts[1][:40]!r} is not one flax_ckpt reads (it reads numeric, bool "
               f"and ml_dtypes types: {', '.join(sorted(dtypes.known_names()))})") from None
  buf = parts[2]
  if math.prod(shape) * dtype.itemsize != len(buf):
    raise _Bad(f"shape {shape} of {dtype.name} needs {math.prod(shape) * dtype.itemsize} "
               f"bytes, the file holds {len(buf)}")
  arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
  return arr.copy() if copy else arr  # a copy is writable, as loaded arrays are
