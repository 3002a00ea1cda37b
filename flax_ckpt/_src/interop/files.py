"""Single-file formats ``flax_ckpt.load`` reads besides its own checkpoint directories.

``load(path, template)`` on a *file* (not a directory) comes here: a ``.safetensors``
file, the ``model.safetensors.index.json`` of a sharded export (any ``.json`` file is
read as one), or a flax.serialization msgpack file (``flax.training.checkpoints`` legacy
``checkpoint_<step>`` files and ``to_bytes`` output). A file whose name does not say is
sniffed: a safetensors header, else msgpack. Local files only: ``s3://`` and ``gs://``
paths are always checkpoint directories.

Without a template a msgpack file loads as its state dict (nested dicts of numpy arrays
and scalars, as ``flax.serialization.msgpack_restore`` returns it), a safetensors file as
nested dicts split at the ``/`` of its tensor names. With one, the result has exactly the
template's structure and types: for msgpack the template is matched as
``flax.serialization.from_state_dict`` does (``to_state_dict`` names: dict keys, list
indexes, dataclass and NamedTuple fields); for safetensors each template leaf reads the
tensor named by its ``/``-joined key path, as ``export_safetensors`` names them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.interop import msgpack_io, safetensors_io
from flax_ckpt._src.io import paths
from flax_ckpt._src.leaves import type_handlers as th
from flax_ckpt._src.leaves.arrays import weakly_typed
from flax_ckpt._src.parts.pytree_template import conform
from flax_ckpt._src.tree import treespec

_MISSING = object()
_SCALARS = (int, float, bool, complex)


def is_single_file(path: paths.PathLike) -> bool:
  """Whether ``path`` names a local regular file (not a checkpoint directory).

  Example:
    >>> import tempfile
    >>> is_single_file(tempfile.mkdtemp()), is_single_file('gs://bucket/ckpt')
    (False, False)
  """
  try:
    local = os.fspath(paths.to_path(path))
  except (TypeError, errors.CheckpointError):
    return False  # not a path load can open; its own path handling says why
  return "://" not in local and os.path.isfile(local)


def _is_safetensors(file: str) -> bool:
  """A ``.safetensors`` name, or a plausible safetensors header (length, then ``{``)."""
  if file.endswith(".safetensors"):
    return True
  with open(file, "rb") as f:
    head = f.read(9)
  return (len(head) == 9 and head[8:] == b"{"
          and struct.unpack("<Q", head[:8])[0] <= os.path.getsize(file) - 8)


def _is_msgpack(file: str) -> bool:
  """Whether ``file`` starts like flax's msgpack: a map (a state dict) or an extension
  (``to_bytes`` of a single array)."""
  with open(file, "rb") as f:
    head = f.read(1)
  return bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)
                         or head[0] in (0xC7, 0xC8, 0xC9) or 0xD4 <= head[0] <= 0xD8)


def load_file(path: paths.PathLike, abstract_state: Any, *, partial: bool,
              restore_type: type | None) -> Any:
  """Loads a safetensors or msgpack file (see the module docstring).

  Example:
    >>> import numpy as np, flax, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'checkpoint_7')
    >>> with open(path, 'wb') as f:
    ...   _ = f.write(flax.serialization.to_bytes({'w': np.ones(2, np.float32), 'step': 7}))
    >>> load_file(path, {'w': np.zeros(2, np.float32), 'step': 0}, partial=False,
    ...           restore_type=None)
    {'w': array([1., 1.], dtype=float32), 'step': 7}
  """
  file = os.fspath(paths.to_path(path))
  if file.endswith(".json") or _is_safetensors(file):
    return _load_safetensors(file, abstract_state, partial, restore_type)
  if not _is_msgpack(file):  # neither format: what load said of any file before
    raise errors.CheckpointNotFoundError(
        f"{file} is a file, not a checkpoint directory, and neither a safetensors file nor "
        "a flax msgpack file (whose first byte is a msgpack map or extension type).")
  return _load_msgpack(file, abstract_state, partial, restore_type)


def _load_safetensors(file: str, abstract_state: Any, partial: bool,
                      restore_type: type | None) -> Any:
  """A safetensors file (or a sharded export's index): template leaves by tensor name."""
  entries = (safetensors_io.read_index(file) if file.endswith(".json")
             else safetensors_io.read_entries(file))
  saved = _nest(file, entries)
  if abstract_state is None:
    return _as_saved(saved, restore_type)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state,
                                                       is_leaf=lambda x: x is None)
  # one name part per key path entry, as export_safetensors names tensors
  named = [(tuple(safetensors_io.default_name((k,)) for k in kp), t) for kp, t in flat]
  values = _match(file, saved, named, partial, restore_type,
                  lambda s: f"tensor {'/'.join(s)!r}")
  return jax.tree_util.tree_unflatten(treedef, values)


def _load_msgpack(file: str, abstract_state: Any, partial: bool,
                  restore_type: type | None) -> Any:
  """A flax msgpack file: template leaves by state-dict path, rebuilt by from_state_dict."""
  saved = msgpack_io.read_state_dict(file)
  if abstract_state is None:
    return _as_saved(saved, restore_type)
  from flax import serialization  # (flax is a dependency; only its state-dict walk is used)

  template = serialization.to_state_dict(abstract_state)
  flat = list(_state_dict_leaves(template, ()))
  values = _match(file, saved, flat, partial, restore_type,
                  lambda s: treespec.path_str([("d", k) for k in s]) if s else "<root>")
  try:
    return serialization.from_state_dict(abstract_state, _fill(template, iter(values)))
  except (ValueError, KeyError, TypeError) as e:
    raise errors.StructureMismatchError(
        f"{file}: flax.serialization.from_state_dict could not rebuild the template "
        f"({type(e).__name__}: {e}); fix the template, or load without one to see what "
        "the file holds.") from e


def _nest(file: str, entries: dict[str, Any]) -> dict:
  """Tensors by name as nested dicts, split at ``/``."""
  root: dict = {}
  for name, e in entries.items():
    segs = name.split("/")
    if len(segs) > msgpack_io.MAX_DEPTH:
      raise errors.FormatError(f"{file}: tensor name {name[:200]!r} has more than "
                               f"{msgpack_io.MAX_DEPTH} '/'-separated parts.")
    node = root
    for s in segs[:-1]:
      node = node.setdefault(s, {})
      if not isinstance(node, dict):
        break
    if not isinstance(node, dict) or segs[-1] in node:
      raise errors.FormatError(
          f"{file}: tensor {name[:200]!r} is both a tensor and a prefix of other tensor "
          "names, so the names do not form a tree; read it with "
          "safetensors.numpy.load_file instead.")
    node[segs[-1]] = e
  return root


def _state_dict_leaves(sd: Any, prefix: tuple) -> Iterator[tuple[tuple, Any]]:
  """(path, leaf) of a state dict in iteration order; dicts are nodes, all else leaves."""
  if isinstance(sd, dict):
    for k, v in sd.items():
      yield from _state_dict_leaves(v, (*prefix, str(k)))
  else:
    yield prefix, sd


def _fill(sd: Any, values: Iterator[Any]) -> Any:
  """``sd`` with its leaves replaced by ``values`` (in :func:`_state_dict_leaves` order)."""
  if isinstance(sd, dict):
    return {k: _fill(v, values) for k, v in sd.items()}
  return next(values)


def _find(saved: Any, segs: tuple) -> Any:
  """The saved value at ``segs`` (str keys; int dict keys and list indexes match their
  decimal strings), or ``_MISSING``."""
  node = saved
  for s in segs:
    index = int(s) if s.isascii() and s.isdigit() else None
    if isinstance(node, dict) and s in node:
      node = node[s]
    elif isinstance(node, dict) and index is not None and index in node:
      node = node[index]
    elif isinstance(node, list) and index is not None and index < len(node):
      node = node[index]
    else:
      return _MISSING
  return node


def _saved_leaves(x: Any, prefix: tuple) -> Iterator[tuple]:
  if isinstance(x, dict):
    for k, v in x.items():
      yield from _saved_leaves(v, (*prefix, str(k)))
  elif isinstance(x, list):
    for i, v in enumerate(x):
      yield from _saved_leaves(v, (*prefix, str(i)))
  else:
    yield prefix


def _is_numeric_template(t: Any) -> bool:
  return (isinstance(t, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic))
          or type(t) in _SCALARS)


def _saved_shape(v: Any) -> tuple[int, ...] | None:
  if isinstance(v, (np.ndarray, np.generic, safetensors_io.TensorEntry)):
    return tuple(v.shape)
  return () if type(v) in _SCALARS else None


def _conflict(t: Any, v: Any) -> str | None:
  """Why template leaf ``t`` cannot receive the saved value ``v`` (None if it can)."""
  if t is None:
    return None
  node = isinstance(v, (dict, list))
  if _is_numeric_template(t):
    want = getattr(t, "dtype", None)
    if want is not None and jnp.issubdtype(want, jax.dtypes.prng_key):
      return "a typed PRNG key template: these files hold no keys (use None, then wrap)"
    shape = _saved_shape(v)
    if node or shape is None:
      return (f"the file holds {'a subtree' if node else 'a ' + type(v).__name__}, the "
              "template asks for an array or number (use None to load it as saved)")
    want_shape = tuple(getattr(t, "shape", ()))
    return None if shape == want_shape else (f"file shape {shape}, template shape "
                                              f"{want_shape}")
  if type(t) in (str, bytes):
    return None if type(v) is type(t) else (f"the file holds a {type(v).__name__}, the "
                                            f"template a {type(t).__name__}")
  if node:
    return (f"the template holds a {type(t).__name__}, which flax.serialization does not "
            "know (make it a flax.struct.dataclass or register it with "
            "flax.serialization.register_serialization_state)")
  return None


def _match(file: str, saved: Any, flat: list[tuple[tuple, Any]], partial: bool,
           restore_type: type | None, describe: Callable[[tuple], str]) -> list[Any]:
  """The template leaves' values, after checking (all problems listed at once) that the
  template and the file agree on leaves and shapes."""
  found = [_find(saved, segs) for segs, _ in flat]
  missing = [describe(segs) for (segs, _), v in zip(flat, found) if v is _MISSING]
  problems = [f"{describe(segs)}: {why}" for (segs, t), v in zip(flat, found)
              if v is not _MISSING and (why := _conflict(t, v))]
  extra = []
  if not partial:
    used = {segs for segs, _ in flat}
    subtrees = {segs for (segs, t), v in zip(flat, found) if t is None and v is not _MISSING}
    extra = [describe(p) for p in _saved_leaves(saved, ()) if p not in used
             and not any(p[:n] in subtrees for n in range(len(p)))]
  if missing or extra or problems:
    raise errors.StructureMismatchError(errors.mismatch_summary(
        f"the template does not match {file}", [
            ("missing from the file", "in the template but not in the file: {}", missing),
            ("not in the template", "in the file but not in the template: {} (pass "
             "partial=True to load only the template's leaves)", extra),
            ("that do not fit", "", problems)],
        "Fix the template, or load without one to see what the file holds."))
  errors.warn_lossy_casts(errors.lossy_casts(
      [(describe(segs), getattr(v, "dtype", None), getattr(t, "dtype", None),
        isinstance(t, (jax.ShapeDtypeStruct, jax.Array)))
       for (segs, t), v in zip(flat, found) if t is not None and _is_numeric_template(t)]))
  return [_convert(t, v, restore_type, describe(segs)) for (segs, t), v in zip(flat, found)]


def _args_for(t: Any) -> th.RestoreArgs:
  """The conversion a numeric template leaf asks for (as flax_ckpt's own loads do)."""
  if isinstance(t, (jax.ShapeDtypeStruct, jax.Array)):
    sharding = getattr(t, "sharding", None)
    if isinstance(t, jax.Array) and not getattr(t, "committed", True):
      sharding = None  # an uncommitted template array comes back uncommitted
    return th.RestoreArgs(restore_type=jax.Array, dtype=np.dtype(t.dtype), sharding=sharding,
                          shape=tuple(t.shape))
  if isinstance(t, np.ndarray):
    return th.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype, shape=tuple(t.shape))
  if isinstance(t, np.generic):
    return th.RestoreArgs(restore_type=np.generic, dtype=t.dtype, shape=())
  return th.RestoreArgs(restore_type=type(t), shape=())


def _convert(t: Any, v: Any, restore_type: type | None, where: str) -> Any:
  """The saved value ``v`` as template leaf ``t`` asks (``astype`` casts)."""
  if t is None or not _is_numeric_template(t):
    return _as_saved(v, restore_type)
  host = v.read() if isinstance(v, safetensors_io.TensorEntry) else np.asarray(v)
  args = _args_for(t)
  try:
    if args.dtype is not None and host.dtype != args.dtype:
      host = host.astype(args.dtype)
    out = conform(host, args)
  except (TypeError, ValueError, OverflowError) as e:
    raise errors.StructureMismatchError(
        f"{where}: cannot convert the saved value to the template's type "
        f"({type(e).__name__}: {e}); fix the template leaf or use None to load it as "
        "saved.") from e
  if getattr(t, "weak_type", False) and isinstance(out, jax.Array):
    out = weakly_typed(out)  # as eval_shape's templates say: jit does not compile again
  return out


def _as_saved(x: Any, restore_type: type | None) -> Any:
  """A saved subtree as values: tensors read; arrays on the default device when
  ``restore_type`` is ``jax.Array``."""
  if isinstance(x, dict):
    return {k: _as_saved(v, restore_type) for k, v in x.items()}
  if isinstance(x, list):
    return [_as_saved(v, restore_type) for v in x]
  if isinstance(x, safetensors_io.TensorEntry):
    x = x.read()
  if isinstance(x, np.ndarray) and restore_type is jax.Array:
    return jax.device_put(x)
  return x
