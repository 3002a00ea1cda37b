"""How a load's template maps onto a saved tree: matching, the checks that list every
problem before anything is read, per-leaf RestoreArgs, and converting loaded values to the
template's types. ``saved`` is ``pytree_io``'s saved tree (``root``, ``leaves``, ``cp_dir``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import dtypes
from flax_ckpt._src.leaves import registry
from flax_ckpt._src.leaves import type_handlers as th
from flax_ckpt._src.leaves.arrays import key_dtype
from flax_ckpt._src.tree import plain_dataclasses, treespec

_KEY_DTYPES: dict[Any, bool] = {}


def _is_key_dtype(dtype: Any) -> bool:
  """Whether ``dtype`` is a typed PRNG key's. Cached: ``jnp.issubdtype`` costs ~2 us, and
  a load asks twice per template leaf."""
  got = _KEY_DTYPES.get(dtype)
  if got is None:
    got = _KEY_DTYPES[dtype] = bool(jnp.issubdtype(dtype, jax.dtypes.prng_key))
  return got


def _args_from_template(t: Any) -> th.RestoreArgs:
  if t is None:
    return th.RestoreArgs()
  sds = type(t) is jax.ShapeDtypeStruct  # first: isinstance on jax.Array (an ABC) is slow
  if sds or isinstance(t, (jax.ShapeDtypeStruct, jax.Array)):
    is_key = _is_key_dtype(t.dtype)
    sharding = getattr(t, "sharding", None)
    if not sds and isinstance(t, jax.Array) and not getattr(t, "committed", True):
      # An uncommitted template array (made without a device or sharding, e.g. a fresh
      # ``nnx.Rngs`` key) comes back uncommitted too, so jit may still move it next to
      # sharded operands as it could move the template.
      sharding = None
    return th.RestoreArgs(restore_type=jax.Array, dtype=None if is_key else np.dtype(t.dtype),
                          sharding=sharding, shape=tuple(t.shape),
                          weak_type=bool(getattr(t, "weak_type", False)))
  if isinstance(t, np.ndarray):
    return th.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype, shape=tuple(t.shape))
  if isinstance(t, np.generic):
    return th.RestoreArgs(restore_type=np.generic, dtype=t.dtype, shape=())
  if type(t) in (int, float, bool, complex):
    return th.RestoreArgs(restore_type=type(t), shape=())
  return th.RestoreArgs()


_NUMERIC = {"jax.Array", "np.ndarray", "np.generic", "int", "float", "bool", "complex"}


def _kind_conflict(t: Any, typestr: str, impl: str | None = None) -> str | None:
  """Why template leaf ``t`` cannot receive a leaf saved as ``typestr`` (None if it can)."""
  if t is None:
    return None
  if type(t) is jax.ShapeDtypeStruct or isinstance(  # see _args_from_template
      t, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)):
    if _is_key_dtype(t.dtype):
      if typestr == "jax.PRNGKey" and (impl is None or
                                       key_dtype(impl) == t.dtype):
        return None
      want = f"a typed PRNG key of {t.dtype}" + (f" (saved: key<{impl}>)" if impl else "")
    else:
      if typestr in _NUMERIC:
        return None
      want = f"an array of {t.dtype}"
  elif type(t) in (int, float, bool, complex):
    if typestr in _NUMERIC:
      return None
    want = f"a Python {type(t).__name__}"
  elif type(t) in (str, bytes):
    if typestr == type(t).__name__:
      return None
    want = f"a {type(t).__name__}"
  else:
    return None
  return (f"the checkpoint holds a {typestr} leaf, the template asks for {want} (use None "
          "in the template to load it as saved)")


def _saved_shape(leaf: dict) -> tuple[int, ...] | None:
  rec = leaf["record"]
  if "key_shape" in rec:
    return tuple(rec["key_shape"])
  if "shape" in rec:
    return tuple(rec["shape"])
  if leaf["typestr"] in ("int", "float", "bool", "complex", "np.generic"):
    return ()
  return None


def _host_as(v: Any, dtype: Any) -> np.ndarray:
  """``v`` as a numpy array of ``dtype`` with ``astype`` semantics (ints wrap)."""
  host = np.asarray(v)
  return host if dtype is None or host.dtype == dtype else host.astype(dtype)


def conform(v: Any, a: th.RestoreArgs) -> Any:
  """Converts a loaded scalar/array to the template leaf's type when they differ."""
  rt = a.restore_type
  if rt is None:
    return v
  if rt is jax.Array and not isinstance(v, jax.Array):
    host = _host_as(v, a.dtype)
    return jax.device_put(host, a.sharding) if a.sharding is not None else jax.device_put(host)
  if rt is np.ndarray and not isinstance(v, np.ndarray):
    return _host_as(v, a.dtype)
  if rt is np.generic and not isinstance(v, np.generic):
    return _host_as(v, a.dtype)[()]
  if rt in (int, float, bool, complex) and type(v) is not rt:
    return rt(np.asarray(v).item())
  return v


def as_saved_args(saved: Any, ids: list[int],
                  restore_type: Any) -> list[th.RestoreArgs] | None:
  """Args for leaves loaded without a template leaf: as saved, or arrays as ``restore_type``."""
  if restore_type is None:
    return None
  return [th.RestoreArgs(restore_type=restore_type)
          if saved.leaves[i]["typestr"] in ("jax.Array", "np.ndarray") else th.RestoreArgs()
          for i in ids]


@dataclasses.dataclass
class LoadPlan:
  """How a template maps onto a saved tree.

  Attributes:
    flat: the template's (key path, leaf) pairs; ``treedef`` rebuilds it.
    ids: per template leaf, the saved leaf id, or -1 where a None leaf stands for a whole
      saved subtree (``subtrees[position]`` then holds its node and leaf ids).
    args: per template leaf, the RestoreArgs derived from it.
  """

  flat: list
  treedef: Any
  ids: list[int]
  subtrees: dict[int, tuple[dict, list[int]]]
  args: list[th.RestoreArgs]


def match_template(saved: Any, abstract: Any, partial: bool,
                    restore_type: Any) -> LoadPlan:
  """Matches the template's leaves to the saved ones; raises StructureMismatchError (with
  every problem listed) before reading anything."""
  # JAX already treats arrays, ShapeDtypeStructs and unregistered classes as leaves; also
  # stop at None and at user types with a TypeHandler that happen to be PyTree nodes.
  custom = registry.custom_types()
  abstract = plain_dataclasses.expand_plain_dataclasses(abstract)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: x is None or (bool(custom) and type(x) in custom))
  ids, subtrees = _match_leaves(saved, flat, partial)
  args = [_args_from_template(t) for _, t in flat]
  if restore_type is not None:  # None template leaves: arrays as restore_type
    for j, ((_, t), i) in enumerate(zip(flat, ids)):
      if t is None and i >= 0:
        saved_args = as_saved_args(saved, [i], restore_type)
        assert saved_args is not None  # restore_type is not None
        args[j] = saved_args[0]
  plan = LoadPlan(flat, treedef, ids, subtrees, args)
  _check_fit(saved, plan)
  return plan


def _match_leaves(saved: Any, flat: list, partial: bool
                  ) -> tuple[list[int], dict[int, tuple[dict, list[int]]]]:
  """The saved leaf id of each template leaf (-1: a whole saved subtree, see LoadPlan)."""
  by_key = {treespec.match_key(leaf["path"]): i for i, leaf in enumerate(saved.leaves)}
  ids, missing = [], []
  subtrees: dict[int, tuple[dict, list[int]]] = {}  # position in flat -> (node, leaf ids)
  for pos, (kp, t) in enumerate(flat):
    i = by_key.get(treespec.jax_match_key(kp))
    if i is not None:
      ids.append(i)
      continue
    path = treespec.path_from_jax(kp)
    if t is None:  # None stands for a whole saved subtree: load it as saved
      node = treespec.find_node(saved.root, path)
      if node is not None and node["t"] != "leaf":
        subtrees[pos] = (node, treespec.leaf_ids(node))
        ids.append(-1)
        continue
    missing.append(treespec.path_str(path))
  extra = []
  if not partial:
    used = set(ids).union(*(set(sub[1]) for sub in subtrees.values()))
    extra = [treespec.path_str(leaf["path"]) for i, leaf in enumerate(saved.leaves)
             if i not in used]
  if missing or extra:
    raise errors.StructureMismatchError(errors.mismatch_summary(
        "the template does not match the checkpoint at " + os.fspath(saved.cp_dir), [
            ("missing from the checkpoint",
             "in the template but not in the checkpoint: {}", missing),
            ("not in the template", "in the checkpoint but not in the template: {} (pass "
             "partial=True to load only the template's leaves)", extra)],
        "Fix the template, or load without one / call flax_ckpt.metadata to see what was "
        "saved."))
  return ids, subtrees


def _check_fit(saved: Any, plan: LoadPlan) -> None:
  """Each template leaf must be able to receive its saved leaf (kind and shape); warns
  (once, naming them) of the leaves whose dtype the template narrows."""
  kinds, shapes, dtype_pairs = [], [], []
  path_str = treespec.path_str  # why only on a problem: ~4 us a leaf, 5000 leaves a load
  for i, (_, t), a in zip(plan.ids, plan.flat, plan.args):
    if i < 0:
      continue
    leaf = saved.leaves[i]
    why = _kind_conflict(t, leaf["typestr"], leaf["record"].get("impl"))
    if why:
      kinds.append(f"{path_str(leaf['path'])}: {why}")
      continue
    s = _saved_shape(leaf)
    if a.shape is not None and s is not None and tuple(a.shape) != s:
      shapes.append(f"{path_str(leaf['path'])}: checkpoint shape {s}, template shape "
                    f"{tuple(a.shape)}")
    elif a.dtype is not None and leaf["record"].get("dtype") is not None:
      saved_dtype = _saved_dtype(leaf["record"]["dtype"])
      if saved_dtype != a.dtype:  # the same dtype casts nothing
        dtype_pairs.append((path_str(leaf["path"]), saved_dtype, a.dtype,
                            a.restore_type is jax.Array))
  if kinds or shapes:
    raise errors.StructureMismatchError(errors.mismatch_summary(
        "the template does not fit the leaves of the checkpoint at " + os.fspath(saved.cp_dir),
        [("of another kind", "", kinds), ("of another shape", "", shapes)],
        "Fix the template, or load without one / call flax_ckpt.metadata to see what was "
        "saved."))
  errors.warn_lossy_casts(errors.lossy_casts(dtype_pairs))


def _saved_dtype(name: str) -> Any:
  """The numpy dtype of a record's dtype name (None for one this numpy cannot name)."""
  try:
    return dtypes.dtype_from_name(name)
  except (KeyError, TypeError, ValueError):
    return None
