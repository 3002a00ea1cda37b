"""Registered dataclasses that are not JAX PyTree nodes: saved field by field, rebuilt whole.

JAX sees such a dataclass as one leaf. The structure codec (treespec.py) saves its fields as
children; in a template, :func:`expand_plain_dataclasses` makes it a node JAX can flatten,
and :func:`collapse_plain_dataclasses` turns the loaded result back into the class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from flax_ckpt._src.tree.class_registry import global_registry


def restore_dataclass(cls: type, fields: dict) -> Any:
  """An instance of dataclass ``cls`` from its saved ``fields``.

  Built like any dataclass, ``cls(**init_fields)``, so ``__post_init__`` sets up derived
  attributes again (it must therefore not transform fields it is given in a way that is not
  idempotent); fields with ``init=False`` are then set to their saved values. If the
  constructor fails, the object is built without it from the saved fields alone.
  """
  init = {f.name for f in dataclasses.fields(cls) if f.init}
  try:
    obj = cls(**{k: v for k, v in fields.items() if k in init})
  except Exception:  # noqa: BLE001 - a constructor that needs more than the saved fields
    obj = cls.__new__(cls)  # pyright: ignore[reportCallIssue]  # stubs see type.__new__, not cls's
    init = set()
  for name, value in fields.items():
    if name not in init:
      object.__setattr__(obj, name, value)
  return obj


def plain_dataclass_children(x: Any) -> list[tuple[tuple[str, Any], Any]]:
  """Fields of a registered dataclass that is not a JAX PyTree node, as (("a", name), value)."""
  return [(("a", f.name), getattr(x, f.name)) for f in dataclasses.fields(x)]


def _is_plain_registered_dataclass(x: Any) -> bool:
  return (global_registry().is_registered(type(x)) and dataclasses.is_dataclass(x)
          and not isinstance(x, type)
          and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(x)))


class _PlainNode:
  """Stands in for a registered plain dataclass inside a template while JAX flattens it."""

  def __init__(self, cls: type, names: list[str], values: list[Any]):
    self.cls, self.names, self.values = cls, names, values


jax.tree_util.register_pytree_with_keys(
    _PlainNode,
    lambda n: ([(jax.tree_util.GetAttrKey(k), v) for k, v in zip(n.names, n.values)],
               (n.cls, tuple(n.names))),
    lambda aux, values: _PlainNode(aux[0], list(aux[1]), list(values)),
)


def expand_plain_dataclasses(template: Any) -> Any:
  """Makes registered plain dataclasses in a template visible to JAX's flattening."""
  if not global_registry().has_dataclasses():
    return template

  def expand(x):
    if _is_plain_registered_dataclass(x):
      children = plain_dataclass_children(x)
      return _PlainNode(type(x), [name for (_, name), _ in children],
                        [expand_plain_dataclasses(v) for _, v in children])
    return x
  return jax.tree_util.tree_map(expand, template, is_leaf=_is_plain_registered_dataclass)


def collapse_plain_dataclasses(tree: Any) -> Any:
  """Inverse of :func:`expand_plain_dataclasses` on the loaded result."""
  if not global_registry().has_dataclasses():
    return tree

  def collapse(x):
    if isinstance(x, _PlainNode):
      fields = dict(zip(x.names, (collapse_plain_dataclasses(v) for v in x.values)))
      return restore_dataclass(x.cls, fields)
    return x
  return jax.tree_util.tree_map(collapse, tree, is_leaf=lambda y: isinstance(y, _PlainNode))
