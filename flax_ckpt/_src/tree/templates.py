"""Building restore templates: a tree of ``jax.ShapeDtypeStruct`` with target shardings."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_ckpt._src.tree import library_types

SpecTree = Any  # a PartitionSpec, a tree (prefix) of them, or a callable (path, leaf) -> spec


def _is_box(x: Any) -> bool:
  try:
    from flax.core import meta
  except ImportError:  # pragma: no cover - flax is a dependency
    return False
  return isinstance(x, meta.AxisMetadata)


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _box_spec(box: Any, rules: Any) -> PartitionSpec:
  """The PartitionSpec of a Flax ``Partitioned`` / ``LogicallyPartitioned`` box."""
  import flax.linen as nn
  from flax.linen import spmd

  names = getattr(box, "names", None)
  if names is None:
    return PartitionSpec()
  if isinstance(box, nn.LogicallyPartitioned) or rules is not None:
    spec = spmd.logical_to_mesh_axes(names, rules if rules is not None else box.rules)
    assert spec is not None  # it returns None only for names=None
    return spec
  return PartitionSpec(*names)


def _own_spec(leaf: Any, rules: Any) -> PartitionSpec:
  """The spec a leaf already carries (e.g. from ``nnx.eval_shape`` under a mesh), else P()."""
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return sharding.spec
  return PartitionSpec()


def _nnx_specs(tree: Any, rules: Any) -> Any:
  """Specs from nnx Variable metadata (``out_sharding`` / ``sharding_names``), else None."""
  flax_nnx = library_types.nnx()
  if flax_nnx is None:  # then the tree holds no nnx Variable
    return None
  is_var = lambda x: isinstance(x, flax_nnx.Variable)  # noqa: E731
  found = []

  def spec_of(v):
    metadata = v.get_metadata() if hasattr(v, "get_metadata") else {}
    names = (metadata.get("out_sharding") or metadata.get("sharding_names")
             or metadata.get("sharding"))
    if names is None or isinstance(names, jax.sharding.Sharding):
      return _own_spec(v.get_value() if hasattr(v, "get_value") else v.value, rules)
    found.append(True)
    if rules is not None:
      from flax.linen import spmd
      return spmd.logical_to_mesh_axes(tuple(names), rules)
    return PartitionSpec(*names)

  specs = jax.tree_util.tree_map(lambda x: spec_of(x) if is_var(x) else None, tree,
                                 is_leaf=is_var)
  return specs if found else None


def abstract_with_sharding(tree: Any, mesh: Mesh, specs: SpecTree = None, *,
                           rules: Any = None) -> Any:
  """A restore template for ``tree`` whose arrays are sharded over ``mesh``.

  Every array leaf (``jax.Array``, ``np.ndarray`` or ``jax.ShapeDtypeStruct``, e.g. from
  ``jax.eval_shape(init_fn)``) becomes a ``jax.ShapeDtypeStruct`` with the same shape and
  dtype and a ``NamedSharding(mesh, spec)``; other leaves (Python scalars, strings, None) are
  kept, so they load as saved. Flax ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes
  are unwrapped (the saved state usually holds plain arrays; ``nn.unbox`` them before saving
  too) and give their leaf's spec when ``specs`` is None; so do ``nnx.Variable`` sharding
  annotations (``nnx.with_partitioning``: the Variables themselves are kept) and shardings
  that abstract leaves already carry (``nnx.eval_shape`` under a mesh).

  Args:
    tree: the state, or its abstract version.
    mesh: the target mesh (any shape; need not be the one the checkpoint was saved on).
    specs: one ``PartitionSpec`` for every array, a tree of them matching ``tree`` (a prefix
      is enough: one spec for a whole subtree), or ``fn(path, leaf) -> PartitionSpec``.
      Default: the Flax annotations' or the leaves' own specs, else replicated (``P()``).
    rules: logical-to-mesh axis rules for ``LogicallyPartitioned`` names, as for
      ``flax.linen.logical_to_mesh_axes`` (default: the rules stored in the boxes).

  Returns:
    The template, to pass as ``flax_ckpt.load(path, template)``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, flax_ckpt
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('x',))
    >>> state = {'w': jnp.zeros((4, 2)), 'step': 0}
    >>> t = flax_ckpt.abstract_with_sharding(state, mesh, {'w': P('x'), 'step': None})
    >>> t['w'].sharding.spec, t['step']
    (P('x',), 0)
  """
  if specs is None:
    specs = _nnx_specs(tree, rules)
  box_flat = []  # the spec of each leaf's Flax box, aligned with the unboxed leaves
  for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_box):
    if _is_box(x):
      box_flat += [_box_spec(x, rules)] * len(jax.tree_util.tree_leaves(x.unbox()))
    else:
      box_flat.append(None)
  unboxed = jax.tree_util.tree_map(lambda x: x.unbox() if _is_box(x) else x, tree,
                                   is_leaf=_is_box)
  flat, treedef = jax.tree_util.tree_flatten_with_path(unboxed)
  if specs is None:
    leaf_specs = [s if s is not None else _own_spec(leaf, rules)
                  for s, (_, leaf) in zip(box_flat, flat)]
  elif isinstance(specs, PartitionSpec):
    leaf_specs = [specs] * len(flat)
  elif callable(specs):
    leaf_specs = [specs(path, leaf) for path, leaf in flat]
  else:
    leaf_specs = _broadcast_prefix(specs, unboxed)
  out = []
  for (path, leaf), spec in zip(flat, leaf_specs):
    if not _is_array_like(leaf):
      out.append(leaf)
      continue
    if spec is None:
      spec = PartitionSpec()
    if not isinstance(spec, PartitionSpec):
      raise TypeError(f"leaf {jax.tree_util.keystr(path)}: expected a PartitionSpec, got "
                      f"{spec!r}")
    out.append(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=NamedSharding(mesh, spec)))
  return jax.tree_util.tree_unflatten(treedef, out)


def _broadcast_prefix(specs: Any, tree: Any) -> list:
  """One spec per leaf of ``tree`` from a spec tree that is a prefix of it."""
  out: list = []

  def add(spec: Any, subtree: Any) -> None:
    n = len(jax.tree_util.tree_leaves(subtree))
    out.extend([spec] * n)

  is_spec = lambda x: x is None or isinstance(x, PartitionSpec)  # noqa: E731
  try:
    jax.tree_util.tree_map(add, specs, tree, is_leaf=is_spec)
  except ValueError as e:
    raise ValueError(f"specs must be a PartitionSpec, a callable, or a tree that is a prefix "
                     f"of the state's structure: {e}") from None
  return out
