"""flax.serialization msgpack files (``to_bytes`` output, legacy ``flax.training.checkpoints``
files) load through ``flax_ckpt.load`` with flax_ckpt's own decoder (issue 15): with and
without a template, chunked arrays, bf16, shardings, partial templates, and hostile files."""

from __future__ import annotations

import os
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from flax import serialization
from flax.training import checkpoints, train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))


def _train_state(dtype=jnp.float32) -> train_state.TrainState:
  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-3))
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  return state.apply_gradients(grads=grads)  # step 1, non-zero moments


def _write(path, data: bytes):
  with open(path, "wb") as f:
    f.write(data)
  return path


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_state_without_template_is_the_state_dict(tmp_path):
  state = _train_state()
  data = serialization.to_bytes(state)
  path = _write(tmp_path / "state.msgpack", data)
  got = flax_ckpt.load(path)
  _assert_trees_equal(got, serialization.msgpack_restore(data))
  assert set(got) == {"step", "params", "opt_state"} and got["step"] == 1
  assert isinstance(got["params"]["Dense_0"]["kernel"], np.ndarray)
  assert got["params"]["Dense_0"]["kernel"].flags.writeable
  as_jax = flax_ckpt.load(path, restore_type=jax.Array)
  assert isinstance(as_jax["params"]["Dense_0"]["kernel"], jax.Array)
  assert as_jax["step"] == 1  # Python scalars stay scalars


@pytest.mark.parametrize("kind", ["eval_shape", "concrete"])
def test_train_state_with_template_has_its_structure_and_types(tmp_path, kind):
  state = _train_state()
  path = _write(tmp_path / "state.msgpack", serialization.to_bytes(state))
  fresh = train_state.TrainState.create(apply_fn=state.apply_fn,
                                        params=jax.tree_util.tree_map(jnp.zeros_like,
                                                                      state.params),
                                        tx=state.tx)
  template = jax.eval_shape(lambda: fresh) if kind == "eval_shape" else fresh
  got = flax_ckpt.load(path, template)
  assert type(got) is train_state.TrainState and got.tx is state.tx
  assert got.apply_fn is state.apply_fn
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(state)
  _assert_trees_equal(got.params, state.params)
  _assert_trees_equal(got.opt_state, state.opt_state)
  assert type(got.opt_state[0]) is type(state.opt_state[0])
  assert int(got.step) == 1
  # each leaf is of its template leaf's type: a concrete TrainState's step is a Python int
  assert type(got.step) is (int if kind == "concrete" else type(got.params["Dense_0"]["bias"]))
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(got.params))
  if kind == "eval_shape":  # weakly typed as the template says, so jit does not recompile
    assert template.step.weak_type and got.step.weak_type


def test_numpy_and_scalar_template_leaves_come_back_as_such(tmp_path):
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": 5, "lr": 0.5,
          "c": 1 + 2j, "s": np.int32(3)}
  path = _write(tmp_path / "f", serialization.to_bytes(tree))
  template = {"w": np.zeros((2, 3), np.float64), "step": 0, "lr": 0.0, "c": 0j,
              "s": np.int64(0)}
  got = flax_ckpt.load(path, template)
  assert got["w"].dtype == np.float64 and isinstance(got["w"], np.ndarray)
  np.testing.assert_array_equal(got["w"], tree["w"])
  assert got["step"] == 5 and type(got["step"]) is int
  assert got["lr"] == 0.5 and type(got["lr"]) is float
  assert got["c"] == 1 + 2j and type(got["c"]) is complex
  assert got["s"] == 3 and isinstance(got["s"], np.int64)
  raw = flax_ckpt.load(path)
  assert raw["c"] == 1 + 2j and isinstance(raw["s"], np.int32)


def test_bfloat16_leaves_round_trip_and_cast(tmp_path):
  state = _train_state(jnp.bfloat16)
  path = _write(tmp_path / "bf16", serialization.to_bytes(state.params))
  raw = flax_ckpt.load(path)
  assert raw["Dense_0"]["kernel"].dtype == jnp.bfloat16
  _assert_trees_equal(raw, jax.tree_util.tree_map(np.asarray, state.params))
  as_f32 = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                  state.params)
  got = flax_ckpt.load(path, as_f32)
  assert got["Dense_0"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(got["Dense_0"]["kernel"],
                                np.asarray(state.params["Dense_0"]["kernel"], np.float32))


def test_chunked_arrays_are_joined(tmp_path, monkeypatch):
  big = np.arange(1000, dtype=np.float32).reshape(10, 100)
  tree = {"emb": {"table": big}, "small": np.ones(3, np.float32)}
  monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 256)  # pieces of 64 elements
  data = serialization.to_bytes(tree)
  root_data = serialization.to_bytes(big)  # an array at the root is chunked too
  monkeypatch.undo()
  assert b"__msgpack_chunked_array__" in data
  got = flax_ckpt.load(_write(tmp_path / "chunked", data))
  np.testing.assert_array_equal(got["emb"]["table"], big)
  np.testing.assert_array_equal(got["small"], tree["small"])
  tmpl = {"emb": {"table": jax.ShapeDtypeStruct((10, 100), jnp.float32)},
          "small": jax.ShapeDtypeStruct((3,), jnp.float32)}
  np.testing.assert_array_equal(flax_ckpt.load(tmp_path / "chunked", tmpl)["emb"]["table"],
                                big)
  np.testing.assert_array_equal(flax_ckpt.load(_write(tmp_path / "root", root_data)), big)


@pytest.fixture
def legacy_flax_checkpoints():
  """flax.training.checkpoints writing its own msgpack files (not Orbax)."""
  old = flax.config.flax_use_orbax_checkpointing
  flax.config.update("flax_use_orbax_checkpointing", False)
  try:
    yield
  finally:
    flax.config.update("flax_use_orbax_checkpointing", old)


def test_legacy_flax_checkpoint_files(tmp_path, legacy_flax_checkpoints):
  state = _train_state()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # "Flax Checkpointing ... deprecated"
    written = checkpoints.save_checkpoint(tmp_path, state, step=3, keep=2)
    written = checkpoints.save_checkpoint(tmp_path, state.replace(step=4), step=4, keep=2)
    latest = checkpoints.latest_checkpoint(tmp_path)
  assert os.path.basename(written) == "checkpoint_4" and latest == written
  assert os.path.isfile(written)
  got = flax_ckpt.load(written, jax.eval_shape(lambda: state))
  assert type(got) is train_state.TrainState and int(got.step) == 4
  _assert_trees_equal(got.params, state.params)
  assert flax_ckpt.load(tmp_path / "checkpoint_3")["step"] == 1  # the state's own step


def test_sharded_template(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
  tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, np.float32)}
  path = _write(tmp_path / "f", serialization.to_bytes(tree))
  sharding = NamedSharding(mesh, P("x", "y"))
  template = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding),
              "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16)}
  with pytest.warns(UserWarning, match=r"\['b'\] float32->bfloat16"):  # a narrowing cast
    got = flax_ckpt.load(path, template)
  assert got["w"].sharding == sharding and len(got["w"].addressable_shards) == 8
  np.testing.assert_array_equal(got["w"], tree["w"])
  assert got["b"].dtype == jnp.bfloat16 and isinstance(got["b"], jax.Array)
  # abstract_with_sharding's templates work as they do for checkpoints
  t2 = flax_ckpt.abstract_with_sharding(tree, mesh, {"w": P("x"), "b": None})
  assert flax_ckpt.load(path, t2)["w"].sharding.spec == P("x")


def test_partial_templates_and_none_leaves(tmp_path):
  state = _train_state()
  path = _write(tmp_path / "state", serialization.to_bytes(state))
  params_only = {"params": jax.eval_shape(lambda: state.params)}
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['opt_state'\].*partial=True"):
    flax_ckpt.load(path, params_only)
  got = flax_ckpt.load(path, params_only, partial=True)
  assert set(got) == {"params"}
  _assert_trees_equal(got["params"], state.params)
  # None loads that subtree as saved (the state dict), arrays as restore_type says
  got = flax_ckpt.load(path, {"params": None, "step": 0, "opt_state": None},
                       restore_type=jax.Array)
  assert isinstance(got["params"]["Dense_0"]["kernel"], jax.Array)
  assert got["step"] == 1 and set(got["opt_state"]) == {"0", "1"}


def test_mismatches_name_every_leaf(tmp_path):
  tree = {"a": {"w": np.ones((2, 3), np.float32)}, "b": np.zeros(4), "c": "text"}
  path = _write(tmp_path / "f", serialization.to_bytes(tree))
  template = {"a": {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)},
              "b": {"x": jax.ShapeDtypeStruct((4,), jnp.float32)},
              "c": jax.ShapeDtypeStruct((), jnp.float32), "d": np.zeros(1)}
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, template)
  msg = str(e.value)
  assert str(path) in msg
  assert "['a']['w']: file shape (2, 3), template shape (3, 2)" in msg
  assert "in the template but not in the file: ['b']['x'], ['d']" in msg
  assert "in the file but not in the template: ['b']" in msg
  assert "['c']: the file holds a str" in msg


def test_lists_and_int_keys_of_msgpack_serialize(tmp_path):
  tree = {"layers": [np.ones(2), np.zeros(3)], "n": {7: np.int32(1)}}
  path = _write(tmp_path / "f", serialization.msgpack_serialize(tree))
  raw = flax_ckpt.load(path)
  assert isinstance(raw["layers"], list) and raw["n"][7] == 1
  got = flax_ckpt.load(path, {"layers": [np.zeros(2), np.zeros(3)], "n": {7: np.int32(0)}})
  assert isinstance(got["layers"], list) and got["layers"][0].shape == (2,)


def test_directories_and_missing_paths_still_mean_checkpoints(tmp_path):
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    flax_ckpt.load(tmp_path / "missing")
  flax_ckpt.save(tmp_path / "ckpt", {"w": np.ones(2)})
  np.testing.assert_array_equal(flax_ckpt.load(tmp_path / "ckpt")["w"], np.ones(2))


# ---- hostile files: every one is a FormatError naming the file (and the leaf) ----


def _array_ext(shape, dtype_name: bytes, buf: bytes, code: int = 1) -> msgpack.ExtType:
  return msgpack.ExtType(code, msgpack.packb((shape, dtype_name, buf), use_bin_type=True))


def _hostile(tmp_path, name, data: bytes, match: str):
  path = _write(tmp_path / name, data)
  with pytest.raises(flax_ckpt.FormatError, match=match) as e:
    flax_ckpt.load(path)
  assert str(path) in str(e.value)
  return e.value


def test_truncated_file(tmp_path):
  data = serialization.to_bytes({"w": np.arange(100.0)})
  for n in (1, 10, len(data) // 2, len(data) - 1):
    _hostile(tmp_path, f"t{n}", data[:n], "not a readable flax msgpack file")


def test_object_and_unknown_dtypes(tmp_path):
  for name in (b"object", b"O", b"<U3", b"float32,float32", b"\xff\xfe", b"V8"):
    data = msgpack.packb({"p": {"w": _array_ext((1,), name, b"\0" * 8)}})
    err = _hostile(tmp_path, "dt", data, "is not one flax_ckpt reads")
    assert "['p']['w']" in str(err)


def test_shape_and_buffer_disagree(tmp_path):
  huge = _array_ext((1 << 40, 1 << 40), b"float32", b"\0" * 4)  # must not allocate
  _hostile(tmp_path, "huge", msgpack.packb({"w": huge}), r"\['w'\].*needs")
  short = _array_ext((2, 3), b"float32", b"\0" * 20)
  _hostile(tmp_path, "short", msgpack.packb({"w": short}), "needs 24 bytes, the file holds 20")
  for shape in ((-1,), (1.5,), ("2",), (True,), tuple([1] * 65)):
    _hostile(tmp_path, "shape", msgpack.packb({"w": _array_ext(shape, b"int8", b"\0")}),
             "invalid array shape")
  scalar = _array_ext((2,), b"int8", b"\0\0", code=3)
  _hostile(tmp_path, "scalar", msgpack.packb({"s": scalar}), "a numpy scalar of shape")


def test_unknown_extensions_and_values(tmp_path):
  _hostile(tmp_path, "ext", msgpack.packb({"x": msgpack.ExtType(42, b"data")}),
           r"\['x'\]: unknown msgpack extension type 42")
  _hostile(tmp_path, "ts", msgpack.packb({"t": msgpack.Timestamp(1, 0)}), "Timestamp")
  _hostile(tmp_path, "key", msgpack.packb({1.5: 1}), "map key of type float")
  _hostile(tmp_path, "cplx", msgpack.packb({"c": msgpack.ExtType(2, msgpack.packb("x"))}),
           "not \\[real, imag\\]")
  nested = msgpack.ExtType(1, msgpack.packb(((1,), b"int8", msgpack.ExtType(1, b""))))
  _hostile(tmp_path, "nested", msgpack.packb({"n": nested}), "not \\[shape, dtype name")
  _hostile(tmp_path, "gda", msgpack.packb({"w": "//GDAPlaceholder:w"}),
           "save_checkpoint_multiprocess")


def test_bad_chunked_arrays(tmp_path):
  piece = _array_ext((4,), b"float32", b"\0" * 16)
  ok = {"__msgpack_chunked_array__": True, "shape": {"0": 8}, "chunks": {"0": piece,
                                                                         "1": piece}}
  assert flax_ckpt.load(_write(tmp_path / "ok", msgpack.packb({"w": ok})))["w"].shape == (8,)
  bad = [({**ok, "shape": {"0": 9}}, "the pieces hold 8 elements"),
         ({**ok, "shape": {"0": 8, "2": 1}}, "keys '0'..'n-1'"),
         ({**ok, "chunks": {}}, "one or more flat pieces"),
         ({**ok, "chunks": {"0": 5}}, "not an array"),
         ({**ok, "extra": 1}, "needs exactly"),
         ({**ok, "chunks": {"0": piece, "1": _array_ext((4,), b"int32", b"\0" * 16)}},
          "one dtype")]
  for i, (value, match) in enumerate(bad):
    _hostile(tmp_path, f"c{i}", msgpack.packb({"w": value}), match)


def test_deep_nesting(tmp_path):
  deep: dict = {"w": 1}
  for _ in range(150):  # deeper than flax_ckpt walks, shallower than msgpack's own stack
    deep = {"d": deep}
  _hostile(tmp_path, "deep", msgpack.packb(deep), "nested deeper than")
  _hostile(tmp_path, "deeper", b"\x81\xa1a" + b"\x91" * 5000 + b"\x00",
           "not a readable flax msgpack")


def test_random_bytes(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(20):
    data = bytes([0x82]) + rng.bytes(200)  # starts like a state dict, then noise
    path = _write(tmp_path / f"r{i}", data)
    with pytest.raises(flax_ckpt.FormatError) as e:
      flax_ckpt.load(path)
    assert str(path) in str(e.value)


def test_files_of_neither_format_are_not_checkpoints(tmp_path):
  for i, data in enumerate([b"", b"x", b"hello world", b"\x05"]):
    path = _write(tmp_path / f"f{i}", data)
    with pytest.raises(flax_ckpt.CheckpointNotFoundError, match="is a file.*neither"):
      flax_ckpt.load(path)
