"""flax_ckpt.abstract_with_sharding: restore templates from a tree, a mesh and specs or Flax
logical partitioning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt


def _mesh(shape=(2, 4)):
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), ("x", "y"))


def test_spec_tree_prefix_and_non_array_leaves(ckpt_dir):
  state = {"params": {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(8)},
           "opt": [jnp.zeros((8, 8)), jnp.zeros(8)], "step": 3, "name": "run"}
  path = ckpt_dir / "c"
  saved_on = NamedSharding(_mesh((8, 1)), P("x", None))
  flax_ckpt.save(path, {**state, "params": {**state["params"],
                                            "w": jax.device_put(state["params"]["w"],
                                                                saved_on)}})
  mesh = _mesh()
  template = flax_ckpt.abstract_with_sharding(
      state, mesh,
      {"params": {"w": P(None, "y"), "b": P("x")}, "opt": P(), "step": None, "name": None})
  assert template["params"]["w"].sharding == NamedSharding(mesh, P(None, "y"))
  assert template["opt"][1].sharding == NamedSharding(mesh, P())
  out = flax_ckpt.load(path, template)
  assert out["params"]["w"].sharding == NamedSharding(mesh, P(None, "y"))
  np.testing.assert_array_equal(np.asarray(out["params"]["w"]), np.asarray(state["params"]["w"]))
  assert out["step"] == 3 and out["name"] == "run"


def test_single_spec_and_callable():
  mesh = _mesh()
  tree = {"a": jnp.zeros((8, 4)), "b": np.zeros((4,), np.int8)}
  one = flax_ckpt.abstract_with_sharding(tree, mesh, P("x"))
  assert all(t.sharding.spec == P("x") for t in jax.tree_util.tree_leaves(one))
  assert one["b"].dtype == np.int8 and one["b"].shape == (4,)
  by_rank = flax_ckpt.abstract_with_sharding(
      tree, mesh, lambda path, leaf: P("x", "y") if leaf.ndim == 2 else P())
  assert by_rank["a"].sharding.spec == P("x", "y") and by_rank["b"].sharding.spec == P()


def test_bad_specs_are_clear_errors():
  mesh = _mesh()
  with pytest.raises(TypeError, match=r"\['a'\].*PartitionSpec"):
    flax_ckpt.abstract_with_sharding({"a": jnp.zeros(8)}, mesh, lambda p, x: "x")
  with pytest.raises(ValueError, match="prefix"):
    flax_ckpt.abstract_with_sharding({"a": jnp.zeros(8)}, mesh, {"zzz": P()})


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    x = nn.Dense(16, kernel_init=init)(x)
    return nn.Dense(8, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp", "embed")))(x)


def test_flax_logical_partitioning(ckpt_dir):
  model = _MLP()
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8)))
  params = nn.unbox(boxed)
  path = ckpt_dir / "c"
  flax_ckpt.save(path, params)
  mesh = _mesh()
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8)))
  template = flax_ckpt.abstract_with_sharding(abstract, mesh,
                                              rules=(("embed", "x"), ("mlp", "y")))
  k0 = template["params"]["Dense_0"]["kernel"]
  assert isinstance(k0, jax.ShapeDtypeStruct) and k0.sharding.spec == P("x", "y")
  assert template["params"]["Dense_1"]["kernel"].sharding.spec == P("y", "x")
  assert template["params"]["Dense_0"]["bias"].sharding.spec == P()
  out = flax_ckpt.load(path, template)
  assert out["params"]["Dense_1"]["kernel"].sharding == NamedSharding(mesh, P("y", "x"))
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flax_nnx_partitioning_annotations(ckpt_dir):
  from flax import nnx

  mesh = _mesh()

  class Model(nnx.Module):
    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "y"))
      self.dense = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)

  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    abstract = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
  path = ckpt_dir / "c"
  flax_ckpt.save(path, nnx.state(model))
  template = flax_ckpt.abstract_with_sharding(abstract, mesh)
  out = flax_ckpt.load(path, template)
  kernel = out["dense"]["kernel"]
  assert isinstance(kernel, nnx.Param)
  assert kernel.get_value().sharding == NamedSharding(mesh, P(None, "y"))
  np.testing.assert_array_equal(np.asarray(kernel.get_value()),
                                np.asarray(model.dense.kernel.get_value()))


def test_concrete_template_keeps_committed_and_uncommitted_placement(ckpt_dir):
  """A template array made without a device (uncommitted: jit may move it next to sharded
  operands) is restored uncommitted; one placed on a sharding is restored there."""
  mesh = _mesh()
  sharded = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("y")))
  free = jnp.arange(3.0)
  key = jax.random.key(1)
  assert not free.committed and not key.committed and sharded.committed
  state = {"sharded": sharded, "free": free, "key": key}
  flax_ckpt.save(ckpt_dir / "c", state)
  out = flax_ckpt.load(ckpt_dir / "c", state)
  assert out["sharded"].committed and out["sharded"].sharding == sharded.sharding
  assert not out["free"].committed and not out["key"].committed
  # an uncommitted restored array mixes with sharded ones in one jitted call, as before
  f = jax.jit(lambda s, f, k: s.sum() + f.sum() + jax.random.key_data(k).sum())
  np.testing.assert_allclose(f(out["sharded"], out["free"], out["key"]),
                             f(sharded, free, key))
  pinned = jax.device_put(jnp.arange(3.0), jax.devices()[3])
  assert pinned.committed
  out2 = flax_ckpt.load(ckpt_dir / "c", {**state, "free": pinned})
  assert out2["free"].committed and out2["free"].devices() == {jax.devices()[3]}
