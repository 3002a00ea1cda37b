"""Flax (linen and nnx) and Optax state: exact types back, with and without a template.

Covers the promises: ``load(path)`` without a template returns the real objects (FrozenDict,
optax states, nnx.State with the right Variable classes and their JSON metadata, typed PRNG
keys, int-keyed nnx.List entries); a template-driven load returns exactly the template's
types; a class with static fields comes back as a dict of its data fields with a warning
naming them; training resumed from a loaded checkpoint is bitwise identical to a run that
never stopped; and names read from a checkpoint are never imported.
"""

import json
import os
import sys
import typing
import warnings
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _crafting import reseal
from flax import nnx
from flax.core import FrozenDict
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt

# ----------------------------------------------------------------------------- helpers


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def _is_key(x):
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def _bits(x):
  """Raw bytes of an array (typed PRNG keys: of their key data) as a flat uint8 array."""
  if _is_key(x):
    x = jax.random.key_data(x)
  return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _assert_leaf_bitwise(actual, expected):
  assert type(actual) is type(expected) or (
      isinstance(actual, jax.Array) and isinstance(expected, jax.Array)), (
          type(actual), type(expected))
  if isinstance(expected, (jax.Array, np.ndarray, np.generic)):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert _is_key(actual) == _is_key(expected)
    np.testing.assert_array_equal(_bits(actual), _bits(expected))
  else:
    assert actual == expected


def _assert_trees_bitwise(actual, expected):
  """Equal PyTree structure (node types and aux data) and bitwise equal leaves."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    _assert_leaf_bitwise(a, e)


def _abstract(tree):
  """``jax.eval_shape``-style template of ``tree``: ShapeDtypeStructs in its exact nodes
  (Python scalars are kept: they load as the template's Python type)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree)


def _variables(tree):
  return jax.tree.leaves(tree, is_leaf=_is_var)


def _assert_same_variables(actual, expected):
  """Same Variable classes, same metadata, bitwise equal values, in the same order."""
  av, ev = _variables(actual), _variables(expected)
  assert len(av) == len(ev)
  for a, e in zip(av, ev, strict=True):
    assert type(a) is type(e), (type(a), type(e))
    assert a.get_metadata() == e.get_metadata()
    for k, v in e.get_metadata().items():
      assert type(a.get_metadata()[k]) is type(v), k
    _assert_trees_bitwise(a.get_value(), e.get_value())


def _tree_file(path):
  return path / "state" / "_TREE.json"


# ------------------------------------------------------------- Linen CNN in a TrainState


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    return nn.Dense(3)(x)


class _CNNState(train_state.TrainState):
  batch_stats: Any
  key: jax.Array


def _linen_batch(i):
  rng = np.random.default_rng(100 + i)
  x = rng.standard_normal((4, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, (4,)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


@jax.jit
def _linen_step(state, x, y):
  key, dropout_key = jax.random.split(state.key)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates

  grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"], key=key)


def _linen_steps(state, start, n):
  for i in range(start, start + n):
    state = _linen_step(state, *_linen_batch(i))
  return state


def _linen_state():
  model = _CNN()
  variables = model.init(jax.random.key(1), _linen_batch(0)[0], train=False)
  return _CNNState.create(apply_fn=model.apply, params=variables["params"],
                          tx=optax.adam(1e-2), batch_stats=variables["batch_stats"],
                          key=jax.random.key(0))


@pytest.fixture(scope="module")
def linen_run(tmp_path_factory):
  """3 steps, saved; then 3 more steps (the run that never stopped)."""
  path = tmp_path_factory.mktemp("linen") / "ckpt"
  state = _linen_steps(_linen_state(), 0, 3)
  flax_ckpt.save(path, state)
  reference = _linen_steps(state, 3, 3)
  return path, state, reference


def test_linen_train_state_with_template_resumes_bitwise(linen_run):
  path, state, reference = linen_run
  template = _abstract(state)
  assert type(template) is _CNNState
  assert jax.dtypes.issubdtype(template.key.dtype, jax.dtypes.prng_key)
  restored = flax_ckpt.load(path, template)
  assert type(restored) is _CNNState
  assert restored.apply_fn is state.apply_fn and restored.tx is state.tx
  assert type(restored.opt_state) is tuple
  assert [type(s) for s in restored.opt_state] == [optax.ScaleByAdamState, optax.EmptyState]
  assert _is_key(restored.key)
  assert restored.key.dtype == state.key.dtype
  _assert_trees_bitwise(restored, state)

  resumed = _linen_steps(restored, 3, 3)
  assert int(resumed.step) == int(reference.step) == 6
  _assert_trees_bitwise(resumed.params, reference.params)
  _assert_trees_bitwise(resumed.batch_stats, reference.batch_stats)
  _assert_trees_bitwise(resumed.opt_state, reference.opt_state)
  _assert_trees_bitwise(resumed.key, reference.key)


def test_linen_train_state_with_eval_shape_template(linen_run):
  path, state, _ = linen_run
  restored = flax_ckpt.load(path, jax.eval_shape(lambda s: s, state))
  assert type(restored) is _CNNState
  _assert_trees_bitwise(restored, state)


def test_linen_train_state_without_template_is_dict_of_data_fields(linen_run):
  path, state, _ = linen_run
  with pytest.warns(flax_ckpt.UnregisteredClassWarning) as rec:
    out = flax_ckpt.load(path)
  msgs = [str(w.message) for w in rec if issubclass(w.category,
                                                     flax_ckpt.UnregisteredClassWarning)]
  static_msgs = [m for m in msgs if "apply_fn" in m]
  assert len(static_msgs) == 1
  assert "tx" in static_msgs[0]
  assert "_CNNState" in static_msgs[0]

  assert type(out) is dict
  assert list(out) == ["step", "params", "opt_state", "batch_stats", "key"]
  # The optax state inside is the real optax type, not a dict or tuple of dicts.
  assert type(out["opt_state"]) is tuple
  adam, empty = out["opt_state"]
  assert type(adam) is optax.ScaleByAdamState
  assert type(empty) is optax.EmptyState
  _assert_trees_bitwise(out["opt_state"], state.opt_state)
  _assert_trees_bitwise(out["params"], state.params)
  _assert_trees_bitwise(out["batch_stats"], state.batch_stats)
  assert type(out["params"]) is type(state.params)
  assert _is_key(out["key"])
  assert out["key"].dtype == state.key.dtype
  _assert_leaf_bitwise(out["key"], state.key)
  _assert_leaf_bitwise(out["step"], state.step)


def test_plain_train_state_without_template_names_static_fields(ckpt_dir):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  state = train_state.TrainState.create(apply_fn=lambda p, x: x @ p["w"], params=params,
                                        tx=tx)
  state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
  flax_ckpt.save(ckpt_dir / "ckpt", state)

  with pytest.warns(flax_ckpt.UnregisteredClassWarning,
                    match=r"(?s)TrainState.*apply_fn.*tx"):
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out) is dict
  assert set(out) == {"step", "params", "opt_state"}
  _assert_trees_bitwise(out["opt_state"], state.opt_state)
  _assert_trees_bitwise(out["params"], state.params)

  restored = flax_ckpt.load(ckpt_dir / "ckpt", _abstract(state))
  assert type(restored) is train_state.TrainState
  assert restored.apply_fn is state.apply_fn and restored.tx is tx
  _assert_trees_bitwise(restored, state)


class _RegisteredState(train_state.TrainState):
  key: jax.Array


flax_ckpt.register_class(_RegisteredState)


def test_registered_train_state_subclass_without_template_warns(ckpt_dir):
  state = _RegisteredState.create(apply_fn=None, params={"w": jnp.ones(2)},
                                  tx=optax.adam(0.1), key=jax.random.key(3))
  flax_ckpt.save(ckpt_dir / "ckpt", state)
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match=r"(?s)apply_fn.*tx"):
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out) is dict and _is_key(out["key"])
  restored = flax_ckpt.load(ckpt_dir / "ckpt", _abstract(state))
  assert type(restored) is _RegisteredState
  _assert_trees_bitwise(restored, state)


# ------------------------------------------------------------------------ Optax states

_PARAMS = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
_OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "schedule": lambda: optax.adam(optax.linear_schedule(1e-3, 0.0, 10)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
    "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-3), 2),
    "masked": lambda: optax.masked(optax.adam(1e-3), {"w": True, "b": False}),
    "named_chain": lambda: optax.named_chain(("clip", optax.clip(1.0)),
                                             ("adam", optax.adam(1e-3))),
    "partition": lambda: optax.partition({"a": optax.adam(1e-3), "s": optax.sgd(0.1)},
                                         {"w": "a", "b": "s"}),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-3),
    "schedule_free": lambda: optax.contrib.schedule_free_adamw(1e-3),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_optax_state_roundtrips_with_and_without_template(ckpt_dir, name):
  tx = _OPTIMIZERS[name]()
  params = _PARAMS
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  flax_ckpt.save(ckpt_dir / "ckpt", {"opt_state": opt_state})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  _assert_trees_bitwise(out["opt_state"], opt_state)
  restored = flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda s: s, {"opt_state":
                                                                             opt_state}))
  _assert_trees_bitwise(restored["opt_state"], opt_state)
  # the loaded state drives the optimizer exactly like the original
  a, _ = tx.update(grads, out["opt_state"], params)
  b, _ = tx.update(grads, opt_state, params)
  _assert_trees_bitwise(a, b)


# ----------------------------------------------------- FrozenDict and flax.struct classes


def _frozen_tree():
  inner = FrozenDict({"z": jnp.arange(3), "a": jnp.ones((2, 2), jnp.bfloat16)})
  return {
      "fd": FrozenDict({"b": inner, "a": jnp.float32(1.5), "c": {"d": jnp.zeros(2)}}),
      "int_keys": FrozenDict({1: jnp.ones(1), 0: jnp.zeros(1)}),
      "in_list": [FrozenDict({"x": jnp.int32(7)})],
      "empty": FrozenDict(),
  }


def _assert_frozen_types(out, tree):
  assert type(out) is dict
  assert type(out["fd"]) is FrozenDict
  # FrozenDict flattens in sorted key order (jax.tree.map(lambda x: x, fd) sorts it too)
  assert list(out["fd"].keys()) == ["a", "b", "c"]
  assert type(out["fd"]["b"]) is FrozenDict
  assert set(out["fd"]["b"].keys()) == {"a", "z"}
  assert type(out["fd"]["c"]) is FrozenDict  # FrozenDict freezes nested dicts
  assert type(out["int_keys"]) is FrozenDict
  assert sorted(out["int_keys"].keys()) == [0, 1]
  assert all(type(k) is int for k in out["int_keys"].keys())
  assert type(out["in_list"]) is list and type(out["in_list"][0]) is FrozenDict
  assert type(out["empty"]) is FrozenDict and len(out["empty"]) == 0
  _assert_trees_bitwise(out, tree)


def test_frozen_dict_without_template(ckpt_dir):
  tree = _frozen_tree()
  flax_ckpt.save(ckpt_dir / "ckpt", tree)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  _assert_frozen_types(out, tree)


def test_frozen_dict_with_template(ckpt_dir):
  tree = _frozen_tree()
  flax_ckpt.save(ckpt_dir / "ckpt", tree)
  out = flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda t: t, tree))
  _assert_frozen_types(out, tree)


@flax_ckpt.register_class
@flax.struct.dataclass
class _Stats:
  mean: jax.Array
  count: jax.Array
  extra: FrozenDict


class _StaticNode(flax.struct.PyTreeNode):
  w: jax.Array
  label: str = flax.struct.field(pytree_node=False, default="x")


def test_registered_struct_dataclass_without_template(ckpt_dir):
  s = _Stats(jnp.arange(4.0), jnp.int32(2), FrozenDict({"k": jnp.ones(1)}))
  flax_ckpt.save(ckpt_dir / "ckpt", {"stats": s})
  out = flax_ckpt.load(ckpt_dir / "ckpt")["stats"]
  assert type(out) is _Stats
  assert type(out.extra) is FrozenDict
  _assert_trees_bitwise(out, s)


def test_unregistered_struct_with_static_field(ckpt_dir):
  node = _StaticNode(w=jnp.arange(3.0), label="custom")
  flax_ckpt.save(ckpt_dir / "ckpt", {"node": node})
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match=r"(?s)_StaticNode.*label"):
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out["node"]) is dict
  assert list(out["node"]) == ["w"]
  _assert_leaf_bitwise(out["node"]["w"], node.w)

  restored = flax_ckpt.load(ckpt_dir / "ckpt", _abstract({"node": node}))
  assert type(restored["node"]) is _StaticNode
  assert restored["node"].label == "custom"
  _assert_trees_bitwise(restored, {"node": node})


def test_linen_partitioned_boxes(ckpt_dir):
  model = nn.Dense(4, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                       (None, "x")))
  variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
  assert type(variables["params"]["kernel"]) is nn.Partitioned
  flax_ckpt.save(ckpt_dir / "ckpt", variables)
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match=r"(?s)Partitioned.*names"):
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out["params"]["kernel"]) is dict
  _assert_leaf_bitwise(out["params"]["kernel"]["value"], variables["params"]["kernel"].value)
  restored = flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda: variables))
  assert type(restored["params"]["kernel"]) is nn.Partitioned
  assert restored["params"]["kernel"].names == (None, "x")
  _assert_trees_bitwise(restored, variables)


# ------------------------------------------------------------- nnx Transformer + Optimizer


class _Block(nnx.Module):

  def __init__(self, d, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, qkv_features=d,
                                       dropout_rate=0.1, deterministic=False,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop(self.attn(self.ln1(x)))
    return x + self.drop(self.down(nnx.gelu(self.up(self.ln2(x)))))


class _Transformer(nnx.Module):

  def __init__(self, rngs, vocab=11, d=8, depth=2):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([_Block(d, rngs) for _ in range(depth)])
    self.norm = nnx.BatchNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def _nnx_batch(i):
  rng = np.random.default_rng(200 + i)
  tokens = jnp.asarray(rng.integers(0, 11, (4, 5)).astype(np.int32))
  return tokens, jnp.roll(tokens, -1, axis=1)


@nnx.jit
def _nnx_step(model, optimizer, tokens, targets):
  def loss_fn(model):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


def _nnx_steps(model, optimizer, start, n):
  for i in range(start, start + n):
    _nnx_step(model, optimizer, *_nnx_batch(i))


# One optax transformation for every optimizer: it is part of the optimizer's graphdef, so
# sharing it lets nnx.jit reuse one compiled step for every model built here.
_NNX_TX = optax.adamw(1e-3)


def _nnx_build(seed=0, dropout_seed=1):
  model = _Transformer(nnx.Rngs(seed, dropout=dropout_seed))
  return model, nnx.Optimizer(model, _NNX_TX, wrt=nnx.Param)


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
  """3 steps, saved as {'model': ..., 'opt': ...}; then 3 more steps (the reference)."""
  path = tmp_path_factory.mktemp("nnx") / "ckpt"
  model, optimizer = _nnx_build()
  _nnx_steps(model, optimizer, 0, 3)
  saved = {"model": nnx.state(model), "opt": nnx.state(optimizer)}
  # what was saved, as values that later steps cannot change
  snapshot = jax.tree.map(lambda x: x, saved)
  flax_ckpt.save(path, saved)
  _nnx_steps(model, optimizer, 3, 3)
  return path, snapshot, {"model": nnx.state(model), "opt": nnx.state(optimizer)}


def test_nnx_state_has_the_variable_kinds_under_test(nnx_run):
  _, saved, _ = nnx_run
  kinds = {type(v) for v in _variables(saved)}
  assert {nnx.Param, nnx.BatchStat, nnx.RngKey, nnx.RngCount, nnx.OptState, nnx.OptArray,
          nnx.OptVariable} <= kinds
  assert any(_is_key(v.get_value()) for v in _variables(saved))


def test_nnx_without_template_types_equal(nnx_run):
  path, saved, _ = nnx_run
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(path)
  assert type(out) is dict
  assert type(out["model"]) is nnx.State and type(out["opt"]) is nnx.State
  assert jax.tree.structure(out) == jax.tree.structure(saved)
  _assert_same_variables(out, saved)
  _assert_trees_bitwise(out, saved)
  # nnx.List entries keep int keys (also in the optimizer's mirror of the params)
  assert list(out["model"]["blocks"].keys()) == [0, 1]
  assert all(type(k) is int for k in out["model"]["blocks"].keys())
  mu = out["opt"]["opt_state"][0]["mu"]
  assert all(type(k) is int for k in mu["blocks"].keys())
  keys = [v for v in _variables(out) if type(v) is nnx.RngKey]
  assert keys and all(_is_key(v.get_value()) for v in keys)
  assert all(v.get_metadata()["tag"] == "dropout" for v in keys)


def test_nnx_with_template_and_resume_bitwise(nnx_run):
  path, saved, reference = nnx_run
  abstract_model = nnx.eval_shape(lambda: _Transformer(nnx.Rngs(0, dropout=1)))
  template = {"model": nnx.state(abstract_model),
              "opt": jax.eval_shape(lambda s: s, saved["opt"])}
  loaded = flax_ckpt.load(path, template)
  assert jax.tree.structure(loaded) == jax.tree.structure(saved)
  _assert_same_variables(loaded, saved)
  _assert_trees_bitwise(loaded, saved)

  # A fresh, differently seeded model and optimizer take the loaded state.
  model2, optimizer2 = _nnx_build(seed=5, dropout_seed=9)
  nnx.update(model2, loaded["model"])
  nnx.update(optimizer2, loaded["opt"])
  _assert_trees_bitwise(nnx.state(model2), saved["model"])
  _nnx_steps(model2, optimizer2, 3, 3)
  _assert_trees_bitwise(nnx.state(model2, nnx.Param), nnx.state(reference["model"],
                                                                   nnx.Param))
  _assert_trees_bitwise(nnx.state(model2), reference["model"])
  _assert_trees_bitwise(nnx.state(optimizer2), reference["opt"])


def test_nnx_resume_from_load_without_template(nnx_run):
  path, _, reference = nnx_run
  loaded = flax_ckpt.load(path)
  model2, optimizer2 = _nnx_build(seed=3, dropout_seed=4)
  nnx.update(model2, loaded["model"])
  nnx.update(optimizer2, loaded["opt"])
  _nnx_steps(model2, optimizer2, 3, 3)
  _assert_trees_bitwise(nnx.state(model2), reference["model"])
  _assert_trees_bitwise(nnx.state(optimizer2), reference["opt"])


def test_nnx_metadata_of_checkpoint(nnx_run):
  path, saved, _ = nnx_run
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tree = flax_ckpt.metadata(path).tree
  got, want = _variables(tree), _variables(saved)
  assert [type(v) for v in got] == [type(v) for v in want]
  for g, w in zip(got, want, strict=True):
    assert g.get_metadata() == w.get_metadata()
    assert tuple(g.get_value().shape) == tuple(w.get_value().shape)
    assert g.get_value().dtype == w.get_value().dtype


def test_nnx_list_and_sequential_state_int_keys(ckpt_dir):
  lst = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(3)])
  seq = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu,
                       nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
  tree = {"list": nnx.state(lst), "seq": nnx.state(seq),
          "pure": nnx.to_pure_dict(nnx.state(seq))}
  flax_ckpt.save(ckpt_dir / "ckpt", tree)
  out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  assert list(out["list"].keys()) == [0, 1, 2]
  assert list(out["seq"]["layers"].keys()) == [0, 2]
  assert list(out["pure"]["layers"]) == [0, 2]
  _assert_same_variables({k: out[k] for k in ("list", "seq")},
                         {k: tree[k] for k in ("list", "seq")})
  _assert_trees_bitwise(out, tree)
  lst2 = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(9)) for _ in range(3)])
  nnx.update(lst2, out["list"])
  _assert_trees_bitwise(nnx.state(lst2), tree["list"])


# ------------------------------------------------------------------ nnx Variable metadata


class _MyVar(nnx.Variable):
  pass


class _MyParam(nnx.Param):
  pass


def test_nnx_variable_metadata_roundtrips(ckpt_dir):
  class LocalVar(nnx.Variable):
    pass

  state = nnx.State({
      "p": nnx.Param(jnp.arange(8.0).reshape(2, 4), out_sharding=("a", "b"),
                     eager_sharding=False, note="hi", n=3, tup=(1, "x"), lst=[1, 2.5],
                     cfg={"k": (None, True)}, spec=P("x", None)),
      "q": nnx.Param(jnp.ones(3), out_sharding=(None,), eager_sharding=False),
      "mine": _MyVar(jnp.int8(-3), tag="t"),
      "my_param": _MyParam(jnp.zeros(2, jnp.bfloat16)),
      "local": LocalVar(jnp.uint32(9)),
      "cache": nnx.Cache(jnp.ones((1, 2))),
      "inter": nnx.Intermediate((jnp.full(2, 4.0),)),
  })
  md = state["p"].get_metadata()
  assert md["out_sharding"] == ("a", "b") and md["note"] == "hi"
  flax_ckpt.save(ckpt_dir / "ckpt", state)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out) is nnx.State
  assert type(out["mine"]) is _MyVar
  assert type(out["my_param"]) is _MyParam
  assert type(out["local"]) is LocalVar
  assert type(out["cache"]) is nnx.Cache
  assert type(out["inter"]) is nnx.Intermediate
  out_md = out["p"].get_metadata()
  assert out_md == md
  assert type(out_md["tup"]) is tuple and type(out_md["lst"]) is list
  assert type(out_md["spec"]) is P and out_md["spec"] == P("x", None)
  assert type(out_md["cfg"]["k"]) is tuple
  assert jax.tree.structure(out) == jax.tree.structure(state)
  _assert_same_variables(out, state)

  restored = flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda s: s, state))
  _assert_same_variables(restored, state)
  _assert_trees_bitwise(restored, state)


def test_nnx_variable_non_json_metadata_is_left_out_with_warning(ckpt_dir):
  fn = lambda x: x
  state = {"p": nnx.Param(jnp.arange(3.0), init_fn=fn, note="kept", n=2)}
  flax_ckpt.save(ckpt_dir / "ckpt", state)
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match="init_fn"):
    out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out["p"]) is nnx.Param
  expected = {k: v for k, v in state["p"].get_metadata().items() if k != "init_fn"}
  assert out["p"].get_metadata() == expected
  _assert_leaf_bitwise(out["p"].get_value(), state["p"].get_value())

  # With a template, the template's Variables (and their metadata) are used: no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    restored = flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda s: s, state))
  assert restored["p"].get_metadata()["init_fn"] is fn
  _assert_trees_bitwise(restored, state)


def _make_variable_class():
  class Redefined(nnx.Variable):
    pass
  return Redefined


def test_nnx_redefined_variable_subclass_loads_as_the_current_class(ckpt_dir):
  """A Variable subclass defined again (a re-run notebook cell, a class made in a function)
  under the same qualified name must load as the class the saved Variables belong to."""
  old = _make_variable_class()
  flax_ckpt.save(ckpt_dir / "old", {"v": old(jnp.ones(1))})
  assert type(flax_ckpt.load(ckpt_dir / "old")["v"]) is old
  new = _make_variable_class()
  assert new is not old and new.__qualname__ == old.__qualname__
  flax_ckpt.save(ckpt_dir / "new", {"v": new(jnp.ones(1))})
  out = flax_ckpt.load(ckpt_dir / "new")
  assert type(out["v"]) is new, f"loaded as the stale class {type(out['v'])!r}"


class _UserRegisteredVar(nnx.Variable):
  pass


flax_ckpt.register_class(_UserRegisteredVar)


def test_nnx_user_registered_variable_subclass_keeps_metadata(ckpt_dir):
  """Registering one's own Variable subclass with register_class (as users do with their
  classes) must not make load drop the saved Variable metadata silently."""
  v = _UserRegisteredVar(jnp.ones(2), note="a", out_sharding=("x",), eager_sharding=False)
  flax_ckpt.save(ckpt_dir / "ckpt", {"v": v})
  out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert type(out["v"]) is _UserRegisteredVar
  assert out["v"].get_metadata() == v.get_metadata()


# ------------------------------------------------------------------- nnx.Rngs and sharding


def test_nnx_rngs_state_roundtrips(ckpt_dir):
  rngs = nnx.Rngs(0, dropout=1)
  rngs.dropout()
  rngs.dropout()
  rngs()
  state = nnx.state(rngs)
  flax_ckpt.save(ckpt_dir / "ckpt", state)
  out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert jax.tree.structure(out) == jax.tree.structure(state)
  _assert_same_variables(out, state)
  assert type(out["dropout"]["key"]) is nnx.RngKey
  assert type(out["dropout"]["count"]) is nnx.RngCount
  assert _is_key(out["dropout"]["key"].get_value())
  assert int(out["dropout"]["count"].get_value()) == 2

  restored = flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda s: s, state))
  _assert_trees_bitwise(restored, state)

  rngs2 = nnx.Rngs(42, dropout=43)
  nnx.update(rngs2, out)
  _assert_leaf_bitwise(rngs2.dropout(), rngs.dropout())
  _assert_leaf_bitwise(rngs2(), rngs())


def test_nnx_rngs_with_other_key_impls(ckpt_dir):
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"), dropout=jax.random.key(1, impl="unsafe_rbg"))
  rngs.dropout()
  state = nnx.state(rngs)
  flax_ckpt.save(ckpt_dir / "ckpt", state)
  out = flax_ckpt.load(ckpt_dir / "ckpt")
  assert out["default"]["key"].get_value().dtype == state["default"]["key"].get_value().dtype
  assert out["dropout"]["key"].get_value().dtype == state["dropout"]["key"].get_value().dtype
  _assert_trees_bitwise(out, state)
  _assert_trees_bitwise(flax_ckpt.load(ckpt_dir / "ckpt", jax.eval_shape(lambda s: s, state)),
                        state)


class _ShardedMLP(nnx.Module):

  def __init__(self, rngs):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("x", "y"))
    self.up = nnx.Linear(8, 16, kernel_init=init,
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                         ("y",)), rngs=rngs)
    self.down = nnx.Linear(16, 8, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("y", None)), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)


def test_nnx_sharded_model_loads_into_named_sharding_template(ckpt_dir):
  mesh = _mesh()
  with jax.set_mesh(mesh):
    model = _ShardedMLP(nnx.Rngs(0))
  state = nnx.state(model)
  assert state["up"]["kernel"].get_value().sharding == NamedSharding(mesh, P("x", "y"))
  flax_ckpt.save(ckpt_dir / "ckpt", state)

  specs = nnx.get_partition_spec(state)
  template = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
      state, specs)
  out = flax_ckpt.load(ckpt_dir / "ckpt", template)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  _assert_same_variables(out, state)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(template), strict=True):
    assert got.sharding == want.sharding
  assert out["up"]["kernel"].get_value().sharding.spec == P("x", "y")
  assert out["down"]["kernel"].get_value().sharding.spec == P("y", None)

  # flax_ckpt's own template builder reads the Variables' sharding annotations
  template2 = flax_ckpt.abstract_with_sharding(state, mesh)
  out2 = flax_ckpt.load(ckpt_dir / "ckpt", template2)
  _assert_same_variables(out2, state)
  assert out2["up"]["kernel"].get_value().sharding == NamedSharding(mesh, P("x", "y"))

  # and into another layout (resharded on load)
  flipped = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          mesh, P(*reversed(mesh.axis_names[:x.ndim])))), state)
  out3 = flax_ckpt.load(ckpt_dir / "ckpt", flipped)
  _assert_same_variables(out3, state)
  assert out3["up"]["kernel"].get_value().sharding.spec == P("y", "x")


# ------------------------------------------------------------------- no import by name


class _Pair(typing.NamedTuple):
  a: jax.Array
  b: int


flax_ckpt.register_class(_Pair)


def _edit_tree(path, edit):
  f = _tree_file(path)
  tree = json.loads(f.read_text())
  edit(tree["root"])
  f.write_text(json.dumps(tree))
  reseal(path)  # crafted: the author recomputed the checksums


def _nodes(node):
  yield node
  for c in node.get("c", ()):
    yield from _nodes(c)


def _rename(old, new):
  def edit(root):
    hits = [n for n in _nodes(root) if n.get("cls") == old]
    assert hits, f"{old} not in the saved tree"
    for n in hits:
      n["cls"] = new
  return edit


def test_class_names_from_checkpoint_are_never_imported(ckpt_dir, monkeypatch):
  calls = []
  monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(a) or 0)
  tree = {"pair": _Pair(jnp.arange(2.0), 5), "stats": _Stats(jnp.ones(2), jnp.int32(1),
                                                             FrozenDict())}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  saved = json.loads(_tree_file(path).read_text())
  names = {n.get("cls") for n in _nodes(saved["root"])}
  pair_name = next(n for n in names if n and n.endswith("._Pair"))
  stats_name = next(n for n in names if n and n.endswith("._Stats"))
  _edit_tree(path, _rename(pair_name, "os.system"))
  _edit_tree(path, _rename(stats_name, "nonexistent_module_xyz.Cls"))
  assert "nonexistent_module_xyz" not in sys.modules

  with pytest.warns(flax_ckpt.UnregisteredClassWarning) as rec:
    out = flax_ckpt.load(path)
  msgs = " ".join(str(w.message) for w in rec)
  assert "os.system" in msgs and "nonexistent_module_xyz.Cls" in msgs
  assert type(out["pair"]) is dict and list(out["pair"]) == ["a", "b"]
  assert out["pair"]["b"] == 5
  assert type(out["stats"]) is dict and list(out["stats"]) == ["mean", "count", "extra"]
  assert calls == []
  assert "nonexistent_module_xyz" not in sys.modules


def test_unknown_library_names_are_not_imported(ckpt_dir):
  tree = {
      "state": nnx.State({"w": nnx.Param(jnp.ones(2))}),
      "fd": FrozenDict({"a": jnp.zeros(1)}),
      "adam": optax.adam(0.1).init({"w": jnp.ones(2)}),
  }
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  _edit_tree(path, _rename("flax.nnx.variablelib.Param", "flax.nonexistent_sub.Param"))
  _edit_tree(path, _rename("flax.core.FrozenDict", "flax.nonexistent_fd.FrozenDict"))
  _edit_tree(path, _rename("optax.ScaleByAdamState", "optax.nonexistent_opt.State"))
  with pytest.warns(flax_ckpt.UnregisteredClassWarning) as rec:
    out = flax_ckpt.load(path)
  msgs = " ".join(str(w.message) for w in rec)
  for name in ("flax.nonexistent_sub.Param", "flax.nonexistent_fd.FrozenDict",
               "optax.nonexistent_opt.State"):
    assert name in msgs
    assert name.rsplit(".", 1)[0] not in sys.modules
  assert type(out["state"]) is nnx.State
  w = out["state"].raw_mapping["w"]
  assert type(w) is dict and list(w) == ["value"]
  assert type(out["fd"]) is dict and list(out["fd"]) == ["a"]
  assert type(out["adam"]) is tuple
  assert type(out["adam"][0]) is dict and list(out["adam"][0]) == ["count", "mu", "nu"]
  assert type(out["adam"][1]) is optax.EmptyState


def test_flat_node_with_unknown_name_comes_back_as_tuple(ckpt_dir):
  """A custom node whose children have flattened-index keys becomes a tuple."""

  class Box:
    def __init__(self, a, b):
      self.a, self.b = a, b

  jax.tree_util.register_pytree_node(Box, lambda x: ((x.a, x.b), None),
                                     lambda _, c: Box(*c))
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"box": Box(jnp.ones(1), jnp.zeros(2))})
  saved = json.loads(_tree_file(path).read_text())
  box = saved["root"]["c"][0]
  assert box["t"] == "node" and all(k[0] == "f" for k in box["keys"])
  _edit_tree(path, _rename(box["cls"], "nonexistent_module_abc.Box"))
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match="nonexistent_module_abc.Box"):
    out = flax_ckpt.load(path)
  assert type(out["box"]) is tuple and len(out["box"]) == 2
  assert "nonexistent_module_abc" not in sys.modules
