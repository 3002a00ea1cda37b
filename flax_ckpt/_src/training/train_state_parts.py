"""Splitting a training state into separately loadable checkpointables, and back.

A state with ``params``, ``opt_state`` and ``step`` (``flax.training.train_state.TrainState``,
any flax.struct/dataclass PyTree with those fields, or a dict with those keys) is stored as
three parts: ``params``, ``opt_state`` and ``extra`` (``step`` and every other data field).
Static fields (``apply_fn``, ``tx``) are not data; they come from the template on restore.

Flax nnx: a dict with an ``nnx.Module`` under ``'model'`` and its ``nnx.Optimizer`` under
``'optimizer'`` is stored as ``params`` (the model's ``nnx.Param`` state), ``opt_state``
(the optimizer's state) and ``extra`` (the model's other state under ``'model_state'``,
plus the dict's other entries); restoring into such a dict updates those objects in place
with ``nnx.update``.

Anything else is stored whole as the part ``state``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from flax_ckpt._src.tree.library_types import nnx as _nnx

PARAMS, OPT_STATE, EXTRA, STATE = "params", "opt_state", "extra", "state"
MODEL_REST = "model_state"  # an nnx model's non-Param state (batch stats, RNG counters, ...)
_REQUIRED = ("params", "opt_state", "step")


def _data_fields(x: Any) -> list[str] | None:
  """Names of a dataclass PyTree node's data (non-static) fields, or None."""
  if not dataclasses.is_dataclass(x) or isinstance(x, type):
    return None
  flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
  if len(flat) == 1 and not flat[0][0] and flat[0][1] is x:
    return [f.name for f in dataclasses.fields(x)]  # not a PyTree node: every field is data
  names = []
  for kp, _ in flat:
    if len(kp) != 1 or not isinstance(kp[0], jax.tree_util.GetAttrKey):
      return None
    names.append(kp[0].name)
  return names


def is_nnx_train_state(x: Any) -> bool:
  nnx = _nnx()
  return (nnx is not None and isinstance(x, Mapping)
          and isinstance(x.get("model"), nnx.Module)
          and isinstance(x.get("optimizer"), nnx.Optimizer))


def is_train_state(x: Any) -> bool:
  if is_nnx_train_state(x):
    return True
  if isinstance(x, Mapping):
    return all(k in x for k in _REQUIRED)
  names = _data_fields(x)
  return names is not None and all(k in names for k in _REQUIRED)


def split(state: Any) -> dict[str, Any]:
  """``{'params', 'opt_state', 'extra'}`` for a train state, else ``{'state': state}``."""
  if not is_train_state(state):
    return {STATE: state}
  if is_nnx_train_state(state):
    nnx = _nnx()
    assert nnx is not None  # is_nnx_train_state found flax.nnx loaded
    model = state["model"]
    rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    rest[MODEL_REST] = nnx.state(model, nnx.Not(nnx.Param))
    return {PARAMS: nnx.state(model, nnx.Param), OPT_STATE: nnx.state(state["optimizer"]),
            EXTRA: rest}
  if isinstance(state, Mapping):
    rest = {k: v for k, v in state.items() if k not in (PARAMS, OPT_STATE)}
    return {PARAMS: state[PARAMS], OPT_STATE: state[OPT_STATE], EXTRA: rest}
  names = _data_fields(state)
  assert names is not None  # is_train_state: a dataclass with the required data fields
  rest = {k: getattr(state, k) for k in names if k not in (PARAMS, OPT_STATE)}
  return {PARAMS: state.params, OPT_STATE: state.opt_state, EXTRA: rest}


def merge(template: Any, parts: Mapping[str, Any]) -> Any:
  """Rebuilds the template's type from loaded parts (or a dict when there is no template)."""
  if STATE in parts and len(parts) == 1:
    return parts[STATE]
  fields = dict(parts.get(EXTRA) or {})
  for k in (PARAMS, OPT_STATE):
    if k in parts:
      fields[k] = parts[k]
  if template is None:
    return fields
  if is_nnx_train_state(template):
    nnx = _nnx()
    assert nnx is not None  # is_nnx_train_state found flax.nnx loaded
    out = dict(template)
    model_rest = fields.pop(MODEL_REST, None)
    if PARAMS in parts:
      nnx.update(template["model"], parts[PARAMS])
    if model_rest is not None:
      nnx.update(template["model"], model_rest)
    if OPT_STATE in parts:
      nnx.update(template["optimizer"], parts[OPT_STATE])
    out.update({k: v for k, v in fields.items() if k not in (PARAMS, OPT_STATE)})
    return out
  if isinstance(template, Mapping):
    return (type(template)(fields)  # pyright: ignore[reportCallIssue]  # subclasses take a dict
            if type(template) is not dict else fields)
  return dataclasses.replace(template, **fields)
