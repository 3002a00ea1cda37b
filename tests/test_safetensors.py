"""flax_ckpt.export_safetensors and loading .safetensors files (issue 15): exports from
checkpoints and in-memory trees, Hugging Face sharding with its index, bf16, names, errors,
atomic writes, and hostile files."""

from __future__ import annotations

import json
import struct
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import safetensors.numpy as stnp
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(4)(x)))


def _state(dtype=jnp.float32) -> train_state.TrainState:
  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optax.adam(1e-3))


def _flat(params) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(x)
          for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same(got: dict, want: dict):
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k])


def test_export_in_memory_train_state_and_read_back(tmp_path):
  state = _state()
  names = flax_ckpt.export_safetensors(state, tmp_path / "out")  # the TrainState's params
  assert names == ["model.safetensors"]
  file = tmp_path / "out" / "model.safetensors"
  _assert_same(stnp.load_file(file), _flat(state.params))
  assert set(stnp.load_file(file)) == {"Dense_0/kernel", "Dense_0/bias", "Dense_1/kernel",
                                       "Dense_1/bias"}
  raw = flax_ckpt.load(file)  # nested at '/'
  _assert_same(_flat(raw), _flat(state.params))
  got = flax_ckpt.load(file, jax.eval_shape(lambda: state.params))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(state.params)
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(got))
  _assert_same(_flat(got), _flat(state.params))
  # a dict with the key 'params' exports that entry; anything else exports whole
  flax_ckpt.export_safetensors({"params": state.params, "step": 3}, tmp_path / "d")
  _assert_same(stnp.load_file(tmp_path / "d" / "model.safetensors"), _flat(state.params))
  flax_ckpt.export_safetensors({"w": np.ones(2)}, tmp_path / "w")
  assert list(stnp.load_file(tmp_path / "w" / "model.safetensors")) == ["w"]


def test_export_from_checkpoints(tmp_path):
  state = _state()
  want = _flat(state.params)
  # flax_ckpt.save: one part 'state' whose tree has a 'params' field
  flax_ckpt.save(tmp_path / "saved", state)
  flax_ckpt.export_safetensors(tmp_path / "saved", tmp_path / "e1")
  _assert_same(stnp.load_file(tmp_path / "e1" / "model.safetensors"), want)
  # several parts: the part 'params'
  flax_ckpt.save_checkpointables(tmp_path / "parts", {"params": state.params,
                                                      "opt_state": state.opt_state})
  flax_ckpt.export_safetensors(str(tmp_path / "parts"), tmp_path / "e2")
  _assert_same(stnp.load_file(tmp_path / "e2" / "model.safetensors"), want)
  # a CheckpointManager step (parts params / opt_state / extra)
  with flax_ckpt.CheckpointManager(tmp_path / "run") as mngr:
    mngr.save(7, state)
    mngr.wait_until_finished()
  flax_ckpt.export_safetensors(tmp_path / "run" / "7", tmp_path / "e3")
  _assert_same(stnp.load_file(tmp_path / "e3" / "model.safetensors"), want)
  # the whole saved tree, and a part that is not there
  flax_ckpt.save(tmp_path / "plain", {"w": np.arange(3.0)})
  flax_ckpt.export_safetensors(tmp_path / "plain", tmp_path / "e4", part="state")
  assert list(stnp.load_file(tmp_path / "e4" / "model.safetensors")) == ["w"]
  with pytest.raises(flax_ckpt.StructureMismatchError, match="no part 'params'.*part="):
    flax_ckpt.export_safetensors(tmp_path / "plain", tmp_path / "e5")
  assert not (tmp_path / "e5").exists()


def test_export_from_a_flax_msgpack_file(tmp_path):
  from flax import serialization

  state = _state()
  legacy = tmp_path / "checkpoint_100"
  legacy.write_bytes(serialization.to_bytes(state))
  assert flax_ckpt.export_safetensors(legacy, tmp_path / "out") == ["model.safetensors"]
  _assert_same(stnp.load_file(tmp_path / "out" / "model.safetensors"), _flat(state.params))


def test_sharded_export_with_index(tmp_path):
  tree = {f"layer{i}": {"w": np.full((16, 16), i, np.float32)} for i in range(5)}  # 1 KiB each
  out = tmp_path / "out"
  names = flax_ckpt.export_safetensors(tree, out, max_shard_bytes=2048)
  assert names == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                   "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert index["metadata"] == {"total_size": 5 * 1024}
  assert index["weight_map"] == {"layer0/w": names[0], "layer1/w": names[0],
                                 "layer2/w": names[1], "layer3/w": names[1],
                                 "layer4/w": names[2]}
  merged = {}
  for n in names[:-1]:
    merged.update(stnp.load_file(out / n))
  _assert_same(merged, _flat(tree))
  _assert_same(_flat(flax_ckpt.load(out / "model.safetensors.index.json")), _flat(tree))
  tmpl = {f"layer{i}": {"w": jax.ShapeDtypeStruct((16, 16), jnp.bfloat16)} for i in range(5)}
  with pytest.warns(UserWarning, match=r"casting 5 leaves.*'layer4/w' float32->bfloat16"):
    got = flax_ckpt.load(out / "model.safetensors.index.json", tmpl)
  assert got["layer4"]["w"].dtype == jnp.bfloat16 and float(got["layer4"]["w"][0, 0]) == 4
  # an array above the limit gets a file of its own; a re-export replaces the old files
  names = flax_ckpt.export_safetensors({"big": np.ones(1000, np.float32)}, out,
                                       max_shard_bytes=100)
  assert names == ["model.safetensors"]
  assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_bfloat16_round_trips(tmp_path):
  state = _state(jnp.bfloat16)
  flax_ckpt.export_safetensors(state, tmp_path)
  file = tmp_path / "model.safetensors"
  header = json.loads(file.read_bytes()[8:8 + struct.unpack("<Q", file.read_bytes()[:8])[0]])
  assert header["Dense_0/kernel"]["dtype"] == "BF16" and header["__metadata__"] == {
      "format": "flax"}
  loaded = stnp.load_file(file)
  assert loaded["Dense_0/kernel"].dtype == ml_dtypes.bfloat16
  _assert_same(loaded, _flat(state.params))
  _assert_same(_flat(flax_ckpt.load(file)), _flat(state.params))
  f32 = flax_ckpt.load(file, jax.tree_util.tree_map(
      lambda x: np.zeros(x.shape, np.float32), state.params))
  assert isinstance(f32["Dense_0"]["kernel"], np.ndarray)
  assert f32["Dense_0"]["kernel"].dtype == np.float32


def test_name_fn_and_sequences(tmp_path):
  tree = {"blocks": [{"w": np.ones(2, np.float32)}, {"w": np.zeros(2, np.float32)}]}
  flax_ckpt.export_safetensors(tree, tmp_path / "a")
  assert set(stnp.load_file(tmp_path / "a" / "model.safetensors")) == {"blocks/0/w",
                                                                       "blocks/1/w"}
  got = flax_ckpt.load(tmp_path / "a" / "model.safetensors",
                       {"blocks": [{"w": np.ones(2, np.float32)}, {"w": None}]})
  assert isinstance(got["blocks"], list) and got["blocks"][1]["w"].sum() == 0

  def dotted(kp):
    return "model." + ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)

  flax_ckpt.export_safetensors(tree, tmp_path / "b", name_fn=dotted)
  assert set(stnp.load_file(tmp_path / "b" / "model.safetensors")) == {
      "model.blocks.0.w", "model.blocks.1.w"}
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match="the name 'same' is also"):
    flax_ckpt.export_safetensors(tree, tmp_path / "c", name_fn=lambda kp: "same")
  assert not (tmp_path / "c").exists()


def test_sharded_jax_arrays_export(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
  w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("x")))
  flax_ckpt.export_safetensors({"w": w}, tmp_path)
  np.testing.assert_array_equal(stnp.load_file(tmp_path / "model.safetensors")["w"], w)
  sharding = NamedSharding(mesh, P(None, "x"))
  tmpl = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sharding)}
  got = flax_ckpt.load(tmp_path / "model.safetensors", tmpl)
  assert got["w"].sharding.spec == P(None, "x")
  np.testing.assert_array_equal(got["w"], w)


def test_refused_leaves_write_nothing(tmp_path):
  bad = {"w": np.ones(2, np.float32), "step": 3, "name": "x", "c": np.ones(2, np.complex128),
         "i4": np.ones(2, ml_dtypes.int4), "key": jax.random.key(0), "none": None}
  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    flax_ckpt.export_safetensors(bad, tmp_path / "out")
  msg = str(e.value)
  for leaf in ("['step']: a int", "['name']: a str", "['c']: dtype complex128",
               "['i4']: dtype int4", "['key']: dtype key<fry>"):
    assert leaf in msg
  assert "none" not in msg and not (tmp_path / "out").exists()
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match="<root>: the name ''"):
    flax_ckpt.export_safetensors(np.ones(2), tmp_path / "out")
  with pytest.raises(ValueError, match="max_shard_bytes"):
    flax_ckpt.export_safetensors({"w": np.ones(2)}, tmp_path / "out", max_shard_bytes=0)


def test_template_mismatches_and_partial(tmp_path):
  flax_ckpt.export_safetensors({"a": np.ones((2, 3), np.float32), "b": np.ones(2)}, tmp_path)
  file = tmp_path / "model.safetensors"
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(file, {"a": jax.ShapeDtypeStruct((3, 2), jnp.float32), "c": np.ones(1)})
  msg = str(e.value)
  assert "tensor 'a': file shape (2, 3), template shape (3, 2)" in msg
  assert "in the template but not in the file: tensor 'c'" in msg
  assert "in the file but not in the template: tensor 'b'" in msg and str(file) in msg
  got = flax_ckpt.load(file, {"a": np.zeros((2, 3), np.float32)}, partial=True)
  assert set(got) == {"a"} and got["a"].sum() == 6


def test_writes_are_atomic(tmp_path, monkeypatch):
  out = tmp_path / "out"
  flax_ckpt.export_safetensors({"w": np.ones(4, np.float32)}, out)
  before = (out / "model.safetensors").read_bytes()

  def fail_halfway(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"half a file")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(stnp, "save_file", fail_halfway)
  with pytest.raises(OSError, match="No space"):
    flax_ckpt.export_safetensors({"w": np.zeros(4, np.float32)}, out)
  assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
  assert (out / "model.safetensors").read_bytes() == before


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
  flax_ckpt.export_safetensors({"w": np.ones(2, np.float32)}, tmp_path)
  monkeypatch.setitem(sys.modules, "safetensors", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(ImportError, match=r"pip install 'flax_ckpt\[safetensors\]'"):
    flax_ckpt.export_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "x")
  # reading parses the format itself: no package needed
  np.testing.assert_array_equal(flax_ckpt.load(tmp_path / "model.safetensors")["w"],
                                np.ones(2, np.float32))


# ---- hostile files ----


def _file(tmp_path, header: dict | bytes, data: bytes = b"", name="x.safetensors",
          length: int | None = None):
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  path = tmp_path / name
  path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
  return path


def _hostile(path, match):
  with pytest.raises(flax_ckpt.FormatError, match=match) as e:
    flax_ckpt.load(path)
  assert str(path) in str(e.value)


def test_hostile_headers(tmp_path):
  ok = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
  assert flax_ckpt.load(_file(tmp_path, ok, b"\0" * 8))["w"].shape == (2,)
  _hostile(_file(tmp_path, ok, b"\0" * 8, length=1 << 62), "header length")
  _hostile(_file(tmp_path, b"{not json", b""), "not JSON")
  _hostile(_file(tmp_path, b"[1, 2]"), "not a JSON object")
  (tmp_path / "short.safetensors").write_bytes(b"\1\0")
  _hostile(tmp_path / "short.safetensors", "shorter than")
  cases = [
      ({"w": {**ok["w"], "data_offsets": [0, 16]}}, "outside the data"),
      ({"w": {**ok["w"], "data_offsets": [4, 8]}}, "needs 8 bytes, its offsets span 4"),
      ({"w": {**ok["w"], "shape": [1 << 40, 1 << 40]}}, "needs"),
      ({"w": {**ok["w"], "shape": [-2]}}, "invalid shape"),
      ({"w": {**ok["w"], "dtype": "OBJ"}}, "dtype 'OBJ'"),
      ({"w": {**ok["w"], "extra": 1}}, "expected dtype, shape and data_offsets"),
      ({"w": ok["w"], "v": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, "overlap"),
  ]
  for i, (header, match) in enumerate(cases):
    _hostile(_file(tmp_path, header, b"\0" * 8, name=f"c{i}.safetensors"), match)
  prefix = {"w": ok["w"], "w/x": {**ok["w"], "data_offsets": [8, 16]}}
  _hostile(_file(tmp_path, prefix, b"\0" * 16), "both a tensor and a prefix")


def test_hostile_index(tmp_path):
  flax_ckpt.export_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "m")
  for i, weight_map in enumerate([{"w": "../m/model.safetensors"}, {"w": "/etc/passwd"},
                                  {"w": 3}, {"v": "model.safetensors"},
                                  {"w": "model-00001-of-00002.safetensors"}]):
    index = tmp_path / "m" / f"i{i}.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _hostile(index, "weight_map|not in its shard|are missing")


def test_files_are_recognised_by_content_not_only_by_name(tmp_path):
  flax_ckpt.export_safetensors({"w": np.arange(3, dtype=np.int32)}, tmp_path)
  renamed = tmp_path / "weights.bin"
  renamed.write_bytes((tmp_path / "model.safetensors").read_bytes())
  np.testing.assert_array_equal(flax_ckpt.load(renamed)["w"], np.arange(3, dtype=np.int32))
