"""safetensors export and import (the optional extra ``flax_ckpt[safetensors]``).

Export (:func:`export_safetensors`) writes through the ``safetensors`` package, imported
lazily. Reading (:func:`read_entries`, :func:`read_index`) parses the format itself, so
loading a ``.safetensors`` file needs no extra: an 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}``, then the data. The file is hostile: the header length, every dtype, shape and
offset is checked against the file's size before a byte of data is read or allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes
from flax_ckpt._src.engine.loading import checkpoint_metadata, load_parts
from flax_ckpt._src.format import DEFAULT_CHECKPOINTABLE
from flax_ckpt._src.interop import msgpack_io, orbax_reading
from flax_ckpt._src.io import multihost, paths
from flax_ckpt._src.tree import treespec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER = 100 << 20  # what the safetensors package itself accepts
_MAX_INDEX = 64 << 20
_INSTALL = "pip install 'flax_ckpt[safetensors]'"

# safetensors dtype codes <-> the numpy (ml_dtypes) names encoding/dtypes.py allows
_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
          "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
          "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
          "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
          "F8_E8M0": "float8_e8m0fnu"}
_EXPORTABLE = frozenset(n for n in _CODES.values() if n in dtypes.known_names())


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """One tensor of a safetensors file, checked against the file; :meth:`read` reads it."""

  file: str
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # from the start of the file
  nbytes: int

  def read(self) -> np.ndarray:
    """The tensor as a (writable) numpy array."""
    out = np.empty(self.shape, self.dtype)
    with open(self.file, "rb") as f:
      f.seek(self.offset)
      got = f.readinto(out.reshape(-1).view(np.uint8).data)
    if got != self.nbytes:  # the file shrank since its header was checked
      raise errors.FormatError(f"{self.file}: tensor {self.name!r} is truncated; the file "
                               "changed while it was read.")
    return out


def _bad(file: str, why: str) -> errors.FormatError:
  return errors.FormatError(f"{file}: {why}. It is not a valid safetensors file (truncated, "
                            "damaged or another format); export it again.")


def read_entries(file: str) -> dict[str, TensorEntry]:
  """The tensors of the safetensors file ``file``, by name, after checking its header.

  Raises:
    FormatError: the header is malformed, or a tensor's dtype, shape or offsets do not fit.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> flax_ckpt.export_safetensors({'w': np.ones((2, 3), np.float32)}, d)
    ['model.safetensors']
    >>> e = read_entries(d + '/model.safetensors')['w']
    >>> e.shape, e.dtype, e.read().sum()
    ((2, 3), dtype('float32'), np.float32(6.0))
  """
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise _bad(file, "shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
      raise _bad(file, f"header length {n} exceeds the file ({size} bytes) or "
                 f"{_MAX_HEADER} bytes")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (ValueError, RecursionError):  # incl. UnicodeDecodeError
    raise _bad(file, "the header is not JSON") from None
  if not isinstance(header, dict):
    raise _bad(file, "the header is not a JSON object")
  header.pop("__metadata__", None)
  entries = {name: _entry(file, name, spec, 8 + n, size - 8 - n)
             for name, spec in header.items()}
  spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries.values())
  for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
    if begin < end:
      raise _bad(file, f"tensors {a!r} and {b!r} overlap")
  return entries


def _entry(file: str, name: str, spec: Any, start: int, data_len: int) -> TensorEntry:
  """One header entry, checked (see :func:`read_entries`)."""
  if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
    raise _bad(file, f"tensor {name[:200]!r}: expected dtype, shape and data_offsets")
  dtype_name = _CODES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
  if dtype_name is None or dtype_name not in dtypes.known_names():
    raise _bad(file, f"tensor {name[:200]!r}: dtype {str(spec['dtype'])[:20]!r} is not "
               f"one flax_ckpt reads ({', '.join(sorted(_CODES))})")
  dtype = dtypes.dtype_from_name(dtype_name)
  shape, offs = spec["shape"], spec["data_offsets"]
  if not isinstance(shape, list) or len(shape) > 64 or not all(
      type(d) is int and 0 <= d < (1 << 62) for d in shape):
    raise _bad(file, f"tensor {name[:200]!r}: invalid shape {str(shape)[:100]}")
  if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
          and 0 <= offs[0] <= offs[1] <= data_len):
    raise _bad(file, f"tensor {name[:200]!r}: data_offsets {str(offs)[:100]} outside the "
               f"data ({data_len} bytes)")
  nbytes = math.prod(shape) * dtype.itemsize
  if offs[1] - offs[0] != nbytes:
    raise _bad(file, f"tensor {name[:200]!r}: shape {shape} of {dtype.name} needs {nbytes} "
               f"bytes, its offsets span {offs[1] - offs[0]}")
  return TensorEntry(file, name, dtype, tuple(shape), start + offs[0], nbytes)


def read_index(index_file: str) -> dict[str, TensorEntry]:
  """The tensors of a sharded export, by name, from its ``model.safetensors.index.json``.

  Shard names must be plain file names next to the index (no directories).

  Raises:
    FormatError: the index is malformed, names a shard elsewhere, or a listed tensor is not
      in its shard.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> names = flax_ckpt.export_safetensors(
    ...     {'a': np.ones(4, np.float32), 'b': np.zeros(4, np.float32)}, d, max_shard_bytes=16)
    >>> names[-1], len(names)
    ('model.safetensors.index.json', 3)
    >>> sorted(read_index(d + '/' + names[-1]))
    ['a', 'b']
  """
  if os.path.getsize(index_file) > _MAX_INDEX:
    raise _bad(index_file, f"the index is over {_MAX_INDEX} bytes")
  with open(index_file, "rb") as f:
    try:
      doc = json.loads(f.read())
    except (ValueError, RecursionError):
      raise _bad(index_file, "not JSON") from None
  weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) and v == os.path.basename(v) and v not in ("", ".", "..")
      for v in weight_map.values()):
    raise _bad(index_file, "expected {'weight_map': {tensor: shard file name}} with shard "
               "files in the index's directory")
  folder = os.path.dirname(index_file)
  missing = sorted(s for s in set(weight_map.values())
                   if not os.path.isfile(os.path.join(folder, s)))
  if missing:
    raise _bad(index_file, f"its shards {', '.join(missing[:5])} are missing")
  shards = {s: read_entries(os.path.join(folder, s)) for s in sorted(set(weight_map.values()))}
  out = {}
  for name, shard in weight_map.items():
    if name not in shards[shard]:
      raise _bad(index_file, f"tensor {name[:200]!r} is not in its shard {shard}")
    out[name] = shards[shard][name]
  return out


def _import_safetensors() -> Any:
  try:
    import safetensors.numpy
  except ImportError as e:
    raise ImportError(f"exporting safetensors files needs the safetensors package: {_INSTALL}"
                      ) from e
  return safetensors.numpy


def _part_of_checkpoint(path: paths.PathLike, part: str) -> Any:
  """The part ``part`` of a checkpoint, or the entry ``part`` of its only part ``state``
  (of an Orbax checkpoint: the entry ``part`` of the tree ``flax_ckpt.load`` reads)."""
  try:
    parts = list(checkpoint_metadata(path).checkpointables)
  except errors.ForeignCheckpointError:
    return orbax_reading.load(path, {part: None}, partial=True, restore_type=np.ndarray,
                              item=None)[part]
  if part in parts:
    return load_parts(path, {part: None}, partial=False, restore_type=np.ndarray,
                      verify=True)[part]
  if DEFAULT_CHECKPOINTABLE in parts:
    try:
      state = load_parts(path, {DEFAULT_CHECKPOINTABLE: {part: None}}, partial=True,
                         restore_type=np.ndarray, verify=True)[DEFAULT_CHECKPOINTABLE]
      return state[part] if isinstance(state, Mapping) else getattr(state, part)
    except errors.StructureMismatchError:
      pass  # no entry `part`: say so below
  raise errors.StructureMismatchError(
      f"{os.fspath(path)} has no part {part!r} (its parts: {', '.join(parts)}) and no part "
      f"{DEFAULT_CHECKPOINTABLE!r} with an entry {part!r}; pass part= the part to export "
      f"(part={DEFAULT_CHECKPOINTABLE!r} exports everything flax_ckpt.save wrote)")


def _select(src: Any, part: str) -> Any:
  """What to export of ``src``: see :func:`export_safetensors`."""
  if isinstance(src, (str, os.PathLike)):
    local = os.fspath(paths.to_path(src))
    if "://" in local or not os.path.isfile(local):
      return _part_of_checkpoint(src, part)
    src = msgpack_io.read_state_dict(local)  # a flax msgpack file: its state dict
  if isinstance(src, Mapping) and part in src:
    return src[part]
  if dataclasses.is_dataclass(src) and not isinstance(src, type) and part in {
      f.name for f in dataclasses.fields(src)}:
    return getattr(src, part)
  return src


def default_name(keypath: tuple) -> str:
  """The tensor name of a leaf: its key path's entries (dict key, sequence index,
  attribute name) joined by ``/``.

  Example:
    >>> import jax
    >>> (kp, _), = jax.tree_util.tree_flatten_with_path({'dense': [{'kernel': 1}]})[0]
    >>> default_name(kp)
    'dense/0/kernel'
  """
  return "/".join(treespec.key_strings(keypath))


def _named_arrays(tree: Any, name_fn: Callable[[tuple], str] | None) -> list[tuple[str, Any]]:
  """(name, array) per leaf; raises before anything is written (see export_safetensors)."""
  from flax.core import meta  # flax boxes (nn.Partitioned) export as the arrays they hold

  flat = jax.tree_util.tree_flatten_with_path(meta.unbox(tree))[0]
  out, bad, seen = [], [], {}
  for kp, x in flat:
    where = jax.tree_util.keystr(kp) or "<root>"
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
      bad.append(f"{where}: a {type(x).__name__}, not an array")
    elif getattr(x.dtype, "name", None) not in _EXPORTABLE:
      bad.append(f"{where}: dtype {x.dtype} (safetensors holds {', '.join(sorted(_CODES))})")
    elif isinstance(x, jax.Array) and not x.is_fully_addressable:
      bad.append(f"{where}: not fully addressable by this process; gather it first (e.g. "
                 "jax.experimental.multihost_utils.process_allgather)")
    name = (name_fn or default_name)(kp)
    if not isinstance(name, str) or not name:
      bad.append(f"{where}: the name {name!r} is not a non-empty str")
    elif name in seen:
      bad.append(f"{where}: the name {name!r} is also {seen[name]}'s")
    seen[name] = where
    out.append((name, x))
  if bad:
    raise errors.UnsupportedLeafError(
        "cannot export these leaves as safetensors tensors:\n  " + "\n  ".join(bad)
        + "\nExport only the arrays (part=, or a sub-tree), cast unsupported dtypes, and "
        "give every leaf a distinct name (name_fn=).")
  return out


def _plan_shards(named: list[tuple[str, Any]], max_bytes: int) -> list[list[tuple[str, Any]]]:
  """Consecutive leaves, a new shard whenever the next would pass ``max_bytes`` (an array
  larger than that gets a shard of its own), as Hugging Face shards."""
  shards: list[list[tuple[str, Any]]] = [[]]
  size = 0
  for name, x in named:
    if shards[-1] and size + x.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, x))
    size += x.nbytes
  return shards


def _shard_names(n: int) -> list[str]:
  return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors"
                                       for i in range(1, n + 1)]


def _remove_file(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass  # already gone (renamed into place, or removed by another export)


def _write_shards(folder: str, shards: list[list[tuple[str, Any]]], names: list[str]) -> None:
  """Writes every shard under a temporary name, then renames them all into place, so no
  final name ever holds a half-written file."""
  st = _import_safetensors()
  tmps: list[str] = []
  try:
    for shard, name in zip(shards, names):
      tmp = os.path.join(folder, f".{name}.tmp-{paths.unique_tag()}")
      tmps.append(tmp)
      # host copies of one shard at a time; safetensors needs C-contiguous buffers
      tensors = {n: np.ascontiguousarray(np.asarray(x)) for n, x in shard}
      st.save_file(tensors, tmp, metadata={"format": "flax"})
      del tensors
      paths.fsync_path(tmp)
    for tmp, name in zip(tmps, names):
      os.replace(tmp, os.path.join(folder, name))
  finally:
    for tmp in tmps:
      _remove_file(tmp)


def export_safetensors(src: Any, dst: paths.PathLike, *, part: str = "params",
                       name_fn: Callable[[tuple], str] | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes the params of a checkpoint (or an in-memory PyTree) as safetensors files.

  What is exported:

  - ``src`` a checkpoint directory (``flax_ckpt.save``/``save_checkpointables``, or a step
    of a :class:`CheckpointManager`, whose parts are ``params``, ``opt_state``, ``extra``):
    its part ``part`` if there is one; otherwise, for a checkpoint whose part ``state``
    (what :func:`flax_ckpt.save` writes) has an entry ``part`` (a dict key or a field of a
    ``TrainState``), that entry. Nothing else is read. ``part='state'`` exports the whole
    tree :func:`flax_ckpt.save` wrote.
  - ``src`` a flax msgpack file (``flax.serialization.to_bytes`` output, a legacy
    ``flax.training.checkpoints`` ``checkpoint_<step>`` file): its state dict, as a tree.
  - ``src`` an in-memory PyTree: ``src[part]`` if it is a dict with that key,
    ``getattr(src, part)`` if it is a dataclass (``TrainState``) with that field, else
    all of ``src``.

  Each array leaf becomes one tensor named by its key path: dict keys, sequence indexes
  and attribute names joined by ``/`` (``'params/Dense_0/kernel'``), or
  ``name_fn(keypath)`` (the leaf's JAX key path tuple). Flax ``nn.Partitioned`` boxes are
  unwrapped; ``None`` leaves (empty subtrees) are skipped; any other non-array leaf is an
  error, as are dtypes safetensors lacks (int4, complex128, ...). bfloat16 and float8 are
  stored as ``BF16``/``F8_*``. The header's ``__metadata__`` is ``{"format": "flax"}``:
  the arrays keep Flax's layout (a Dense kernel is ``(in, out)``).

  Up to ``max_shard_bytes`` of data go into ``dst/model.safetensors``. Beyond that, leaves
  are split in order into ``model-00001-of-0000N.safetensors`` ... (a leaf larger than the
  limit gets a file of its own) plus the Hugging Face index
  ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
  "weight_map": {name: file}}``). Each file is written under a temporary name, made
  durable and renamed into place; files left in ``dst`` by an earlier export with
  another sharding (``model.safetensors``, ``model-*-of-*.safetensors``, the index) are
  removed after the new ones are in place. Other files in ``dst`` are kept.

  Arrays must be fully addressable (gather sharded multi-process arrays first). In a
  multi-process job every process may call it; only process 0 writes.

  Read the files back with :func:`flax_ckpt.load` (a ``.safetensors`` file or the index
  file, with or without a template), ``safetensors.numpy.load_file`` or Hugging Face
  loaders.

  Args:
    src: a checkpoint directory, a flax msgpack file, or a PyTree of arrays.
    dst: the directory to write into (created if missing).
    part: which part (or entry) to export; see above.
    name_fn: ``fn(keypath) -> str``, each leaf's tensor name (names must be distinct).
    max_shard_bytes: the most bytes of tensor data in one file.

  Returns:
    The names of the files written in ``dst``, the index last when there is one.

  Raises:
    ImportError: the safetensors package is missing (``pip install
      'flax_ckpt[safetensors]'``).
    UnsupportedLeafError: a leaf is not an exportable array, or two leaves have one name
      (nothing is written).
    StructureMismatchError: the checkpoint has no such part or entry.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> state = {'params': {'dense': {'kernel': np.ones((2, 3), np.float32)}}, 'step': 1}
    >>> flax_ckpt.export_safetensors(state, d)
    ['model.safetensors']
    >>> flax_ckpt.load(os.path.join(d, 'model.safetensors'))['dense']['kernel'].shape
    (2, 3)
  """
  if type(max_shard_bytes) is not int or max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
  named = _named_arrays(_select(src, part), name_fn)
  _import_safetensors()  # before anything is written
  shards = _plan_shards(named, max_shard_bytes)
  names = _shard_names(len(shards))
  written = names + ([INDEX_FILE] if len(names) > 1 else [])
  if multihost.process_index() != 0:
    return written
  folder = os.fspath(paths.to_path(dst))
  os.makedirs(folder, exist_ok=True)
  _write_shards(folder, shards, names)
  if len(names) > 1:
    index = {"metadata": {"total_size": sum(x.nbytes for _, x in named)},
             "weight_map": {n: f for shard, f in zip(shards, names) for n, _ in shard}}
    tmp = os.path.join(folder, f".{INDEX_FILE}.tmp-{paths.unique_tag()}")
    paths.write_file(tmp, json.dumps(index, indent=2).encode(), fsync=True)
    os.replace(tmp, os.path.join(folder, INDEX_FILE))
  for stale in os.listdir(folder):  # an earlier export's files, now unreferenced
    if stale not in written and (stale in (SINGLE_FILE, INDEX_FILE)
                                 or _SHARD_RE.fullmatch(stale)):
      _remove_file(os.path.join(folder, stale))
  paths.fsync_path(folder)
  return written
