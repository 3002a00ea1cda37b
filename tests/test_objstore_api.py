"""The public API on object stores (s3:// on moto, gs:// on fake-gcs-server).

Every test that takes `objstore_root` runs once per store, each time in a fresh bucket. What a
save leaves in the bucket is checked straight through tensorstore (tests/_objstore_helpers.py):
parts under `<ckpt>/flax_ckpt-gen-<time>-<host>-<pid>-<hex>/`, committed by `<ckpt>/_CHECKPOINT`
(version 2, naming that generation), data files split into `data.p<i>.bin.<k>` segments.
"""

import json
import re
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import objstore_servers
import optax
import pytest
from _objstore_helpers import GEN_TAG, MARKER, generations, keys, marker, put, read
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.io import storage

_GEN_RE = re.compile(r"flax_ckpt-gen-\d+-[A-Za-z0-9._-]+-\d+-[0-9a-f]+")
_SEGMENT_RE = re.compile(r"data\.p\d+\.bin\.\d+")

# ----------------------------------------------------------------------------- helpers


def _mesh(shape=(4, 2)):
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), ("x", "y"))


def _assert_tree_equal(actual, expected):
  """Same structure, leaf types and values (bitwise for arrays)."""
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
    assert type(a) is type(e) or (isinstance(a, jax.Array) and isinstance(e, jax.Array)), (
        type(a), type(e))
    if isinstance(e, (np.ndarray, jax.Array, np.generic)):
      a, e = np.asarray(a), np.asarray(e)
      assert a.dtype == e.dtype and a.shape == e.shape
      assert a.tobytes() == e.tobytes()
    else:
      assert a == e


def _assert_committed_layout(ckpt, parts=("state",)):
  """`ckpt` holds its marker and exactly one generation, which the marker names and under
  which every other object lives."""
  m = marker(ckpt)
  assert m["version"] == 2
  gen = m["generation"]
  assert _GEN_RE.fullmatch(gen), gen
  ks = keys(ckpt)
  assert MARKER in ks
  others = [k for k in ks if k != MARKER]
  assert others and all(k.startswith(f"{gen}/") for k in others), ks
  assert {k.split("/")[1] for k in others} >= set(parts)
  return gen


def _tree(i, n=4096):
  return {"a": np.full((n,), i, np.float32), "b": {"c": np.full((7,), i, np.int64), "i": i}}


# ----------------------------------------------------------------------------- round trips


def test_save_load_metadata_round_trip(objstore_root):
  mesh = _mesh()
  sharded = jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32),
                           NamedSharding(mesh, P("x", "y")))
  state = {
      "np": {"f32": np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10),
             "i8": np.arange(-5, 5, dtype=np.int8), "empty": np.zeros((0, 3), np.float64)},
      "jax": {"sharded": sharded, "bf16": jnp.ones((5,), jnp.bfloat16) * 3,
              "scalar": jnp.float32(2.5)},
      "scalars": {"int": 7, "float": -0.125, "bool": True, "none": None,
                  "np_scalar": np.int32(-3)},
      "text": "grüße, ☃",
      "list": [1, "two", [np.arange(3)], (4.0, np.uint8(5))],
  }
  path = f"{objstore_root}/ckpt"
  flax_ckpt.save(path, state)
  _assert_committed_layout(path)

  loaded = flax_ckpt.load(path)
  _assert_tree_equal(loaded, state)
  assert isinstance(loaded["list"][3], tuple)

  meta = flax_ckpt.metadata(path)
  assert meta.format_version == 2
  assert set(meta.parts) == {"state"}
  f32 = meta["np"]["f32"]
  assert (f32.shape, f32.dtype) == ((10, 10), np.dtype(np.float32))
  sh = meta["jax"]["sharded"]
  assert (sh.shape, sh.dtype, sh.nbytes) == ((64, 32), np.dtype(np.float32), 64 * 32 * 4)
  assert sh.sharding == {"type": "NamedSharding", "mesh_shape": [4, 2],
                         "axis_names": ["x", "y"], "spec": ["x", "y"]}

  # with a template: onto another sharding, and a numpy leaf onto a device
  other = NamedSharding(_mesh((2, 4)), P(None, "y"))
  template = jax.tree_util.tree_map(lambda x: x, state)
  template["jax"]["sharded"] = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=other)
  template["np"]["f32"] = jax.ShapeDtypeStruct((10, 10), jnp.float32,
                                               sharding=NamedSharding(mesh, P("y")))
  got = flax_ckpt.load(path, template)
  assert got["jax"]["sharded"].sharding == other
  np.testing.assert_array_equal(np.asarray(got["jax"]["sharded"]), np.asarray(sharded))
  assert isinstance(got["np"]["f32"], jax.Array)
  np.testing.assert_array_equal(np.asarray(got["np"]["f32"]), state["np"]["f32"])
  assert got["text"] == state["text"]

  # partial: one sub-tree only
  part = flax_ckpt.load(path, {"jax": {"bf16": jax.ShapeDtypeStruct((5,), jnp.bfloat16)}},
                        partial=True)
  assert list(part) == ["jax"] and list(part["jax"]) == ["bf16"]
  np.testing.assert_array_equal(np.asarray(part["jax"]["bf16"]), np.full((5,), 3.0))


def test_flax_params_and_optax_state(objstore_root):
  model = nn.Dense(8)
  params = model.init(jax.random.key(0), jnp.ones((2, 16)))
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  state = {"params": params, "opt_state": opt_state, "step": 1}
  path = f"{objstore_root}/train/1"
  flax_ckpt.save(path, state)

  loaded = flax_ckpt.load(path)  # no template: the real optax classes back
  _assert_tree_equal(loaded, state)
  assert type(loaded["opt_state"][0]) is optax.ScaleByAdamState
  # and usable: one more update step on the loaded state
  tx.update(grads, loaded["opt_state"], loaded["params"])

  abstract = jax.eval_shape(lambda: state)  # the step becomes a 0-d array, as asked
  _assert_tree_equal(flax_ckpt.load(path, abstract), {**state, "step": jnp.int32(1)})


@pytest.mark.parametrize("as_epath", [False, True], ids=["str", "epath"])
def test_save_async_and_path_types(objstore_root, as_epath):
  path = f"{objstore_root}/async/ckpt"
  arg = epath.Path(path) if as_epath else path
  state = _tree(3, n=100_000)
  resp = flax_ckpt.save_async(arg, state)
  state["a"][:] = -1  # the save holds its own snapshot once save_async returns
  assert resp.result() is None
  _assert_committed_layout(path)
  loaded = flax_ckpt.load(arg)
  assert np.all(loaded["a"] == 3) and loaded["b"]["i"] == 3
  # the other spelling reaches the same checkpoint; duplicate/trailing slashes do not matter
  other = path if as_epath else epath.Path(path)
  assert flax_ckpt.load(other)["b"]["i"] == 3
  assert flax_ckpt.load(path.replace("/async/", "//async/") + "/")["b"]["i"] == 3
  assert flax_ckpt.metadata(arg)["a"].shape == (100_000,)


# ----------------------------------------------------------------------------- checkpointables


class Counter:
  """A stateful checkpointable (the data-iterator protocol)."""

  def __init__(self, pos=0, on_get_state=None):
    self.pos = pos
    self.on_get_state = on_get_state

  def get_state(self):
    if self.on_get_state is not None:
      self.on_get_state()
    return {"pos": self.pos, "name": "train"}

  def set_state(self, state):
    self.pos = state["pos"]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_checkpointables(objstore_root, use_async):
  params = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4),
                                NamedSharding(_mesh(), P("x", "y")))}
  parts = {"params": params, "opt_state": {"mu": np.ones((8, 4), np.float32), "count": 5},
           "dataset": Counter(41), "config": {"lr": 1e-3, "name": "run"}}
  path = f"{objstore_root}/multi"
  if use_async:
    flax_ckpt.save_checkpointables_async(path, parts).result()
  else:
    flax_ckpt.save_checkpointables(path, parts)
  _assert_committed_layout(path, parts=tuple(parts))

  meta = flax_ckpt.metadata(path)
  assert set(meta.parts) == set(parts)
  assert meta.checkpointables["dataset"]["kind"] != meta.checkpointables["params"]["kind"]
  assert meta.parts["params"]["w"].shape == (8, 4)

  it = Counter()
  got = flax_ckpt.load_checkpointables(path, {"dataset": it, "config": None})
  assert set(got) == {"dataset", "config"}
  assert it.pos == 41
  assert got["config"] == {"lr": 1e-3, "name": "run"}
  allp = flax_ckpt.load_checkpointables(path)
  assert set(allp) == set(parts)
  _assert_tree_equal(allp["params"], params)
  _assert_tree_equal(allp["opt_state"], parts["opt_state"])
  one = flax_ckpt.load(path, checkpointable_name="opt_state")
  assert one["count"] == 5


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_swaps_generations_and_old_stays_loadable(objstore_root):
  path = f"{objstore_root}/ow"
  flax_ckpt.save_checkpointables(path, {"state": _tree(1), "dataset": Counter(1)})
  old_gen = _assert_committed_layout(path, parts=("state", "dataset"))
  seen = []

  def during_save():  # runs while the new save is writing: the old one is still whole
    loaded = flax_ckpt.load(path)
    seen.append((loaded["b"]["i"], marker(path)["generation"]))

  flax_ckpt.save_checkpointables(path, {"state": _tree(2), "dataset": Counter(2, during_save)},
                                 overwrite=True)
  assert seen == [(1, old_gen)]
  new_gen = _assert_committed_layout(path, parts=("state", "dataset"))
  assert new_gen != old_gen
  assert generations(path) == [new_gen]  # the old generation is deleted
  assert flax_ckpt.load(path)["b"]["i"] == 2


def test_overwrite_failing_save_leaves_old_checkpoint(objstore_root):
  path = f"{objstore_root}/ow-fail"
  flax_ckpt.save(path, _tree(1))
  before = keys(path)

  def boom():
    raise RuntimeError("iterator state is unavailable")

  with pytest.raises(RuntimeError, match="unavailable"):
    flax_ckpt.save_checkpointables(path, {"state": _tree(2), "dataset": Counter(0, boom)},
                                   overwrite=True)
  assert keys(path) == before
  assert flax_ckpt.load(path)["b"]["i"] == 1


def test_no_overwrite_refuses_and_changes_nothing(objstore_root):
  path = f"{objstore_root}/exists"
  flax_ckpt.save(path, _tree(1))
  before = {k: read(f"{path}/{k}") for k in keys(path)}
  with pytest.raises(flax_ckpt.CheckpointExistsError, match="overwrite=True") as e:
    flax_ckpt.save(path, _tree(2))
  assert path in str(e.value)
  with pytest.raises(flax_ckpt.CheckpointExistsError):
    flax_ckpt.save_async(path, _tree(3)).result()
  with pytest.raises(flax_ckpt.CheckpointExistsError):
    flax_ckpt.save_checkpointables(path, {"state": _tree(4)})
  assert {k: read(f"{path}/{k}") for k in keys(path)} == before
  assert flax_ckpt.load(path)["b"]["i"] == 1


# ----------------------------------------------------------------------------- Checkpointer


@pytest.mark.parametrize("cls", ["Checkpointer", "AsyncCheckpointer"])
def test_checkpointers(objstore_root, cls):
  handler = flax_ckpt.handlers.PyTreeCheckpointHandler()
  ckptr = getattr(flax_ckpt.handlers, cls)(handler)
  path = f"{objstore_root}/ckptr"
  state = {"w": jax.device_put(jnp.arange(16.0), NamedSharding(_mesh(), P("x"))), "step": 1}
  ckptr.save(path, args=flax_ckpt.args.PyTreeSave(state))
  if cls == "AsyncCheckpointer":
    ckptr.wait_until_finished()
  assert marker(path)["version"] == 2
  got = ckptr.restore(path, args=flax_ckpt.args.PyTreeRestore())
  _assert_tree_equal(got, state)
  assert flax_ckpt.load(path)["step"] == 1  # the same format as flax_ckpt.save

  with pytest.raises(flax_ckpt.CheckpointExistsError):
    ckptr.save(path, args=flax_ckpt.args.PyTreeSave({"step": 2}))
    if cls == "AsyncCheckpointer":
      ckptr.wait_until_finished()
  ckptr.save(path, args=flax_ckpt.args.PyTreeSave({"step": 3}), force=True)
  if cls == "AsyncCheckpointer":
    ckptr.wait_until_finished()
  assert ckptr.restore(path, args=flax_ckpt.args.PyTreeRestore()) == {"step": 3}
  assert len(generations(path)) == 1
  ckptr.close()


# ----------------------------------------------------------------------------- CheckpointManager


def _entries(root):
  """The first-level names under `root` (steps, and the manager's own objects)."""
  return sorted({k.split("/", 1)[0] for k in keys(root)})


def _steps_present(root):
  return sorted(int(e) for e in _entries(root) if e.isdigit())


@pytest.mark.parametrize("enable_async", [False, True], ids=["sync", "async"])
def test_manager_saves_retention_restore_and_reopen(objstore_root, enable_async):
  root = f"{objstore_root}/run"
  with flax_ckpt.CheckpointManager(root, max_to_keep=2, enable_async=enable_async) as m:
    assert m.latest_step() is None and m.all_steps() == []
    for step in range(5):
      assert m.save(step, _tree(step)) is True
    m.wait_until_finished()
    assert m.all_steps() == [3, 4]
    assert m.latest_step() == 4
    _assert_tree_equal(m.restore(), _tree(4))
    _assert_tree_equal(m.restore(3), _tree(3))
  # the objects of the deleted steps are really gone; the kept ones are committed
  assert _steps_present(root) == [3, 4]
  for step in (0, 1, 2):
    assert keys(f"{root}/{step}") == []
  for step in (3, 4):
    _assert_committed_layout(f"{root}/{step}")

  # reopening sees the same steps, and keeps applying the policy
  with flax_ckpt.CheckpointManager(root, max_to_keep=2, enable_async=enable_async) as m:
    assert m.all_steps() == [3, 4] and m.latest_step() == 4
    assert m.save(5, _tree(5)) is True
    m.wait_until_finished()
    assert m.all_steps() == [4, 5]
    abstract = {"a": jax.ShapeDtypeStruct((4096,), jnp.float32,
                                          sharding=NamedSharding(_mesh(), P("x"))),
                "b": {"c": np.zeros((7,), np.int64), "i": 0}}
    got = m.restore(5, abstract_state=abstract)
    assert got["a"].sharding == abstract["a"].sharding
    assert np.all(np.asarray(got["a"]) == 5) and got["b"]["i"] == 5
  assert _steps_present(root) == [4, 5]
  assert keys(f"{root}/3") == []
  reader = flax_ckpt.CheckpointManager(root, read_only=True)
  assert reader.all_steps() == [4, 5]
  _assert_tree_equal(reader.restore(4), _tree(4))
  reader.close()


def test_manager_with_dataset_and_delete(objstore_root):
  root = f"{objstore_root}/run-ds"
  with flax_ckpt.CheckpointManager(root, enable_async=False) as m:
    m.save(1, _tree(1), dataset=Counter(11), metrics={"loss": 0.5})
    m.save(2, _tree(2), dataset=Counter(22), metrics={"loss": 0.25})
    it = Counter()
    m.restore(1, dataset=it)
    assert it.pos == 11
    m.delete(1)
    assert m.all_steps() == [2]
  assert _steps_present(root) == [2]
  assert keys(f"{root}/1") == []


def test_manager_removes_crashed_saves_and_keeps_committed_steps(objstore_root):
  root = f"{objstore_root}/run-crash"
  with flax_ckpt.CheckpointManager(root, enable_async=False) as m:
    m.save(3, _tree(3))
  committed = {k: read(f"{root}/3/{k}") for k in keys(f"{root}/3")}
  # a save of step 7 that died before its marker, and an overwrite of step 3 that died
  # before swapping markers: generations no marker names
  crashed = f"{root}/7/flax_ckpt-gen-1-otherhost-1-abcd"
  put(f"{crashed}/state/x", b"partial")
  put(f"{crashed}/state/_TREE.json", b"{}")
  dead_overwrite = f"{root}/3/flax_ckpt-gen-2-otherhost-2-beef"
  put(f"{dead_overwrite}/state/data.p0.bin.0", b"\0" * 100)
  # never listed as steps, never loaded
  assert list(flax_ckpt.checkpoints_iterator(root, timeout=0)) == [3]
  with pytest.raises(flax_ckpt.IncompleteCheckpointError):
    flax_ckpt.load(f"{root}/7")

  with flax_ckpt.CheckpointManager(root, enable_async=False) as m:
    assert keys(f"{root}/7") == []
    assert {k: read(f"{root}/3/{k}") for k in keys(f"{root}/3")} == committed
    assert m.all_steps() == [3]
    assert m.save(7, _tree(7)) is True
    assert m.all_steps() == [3, 7]
    _assert_tree_equal(m.restore(7), _tree(7))
  _assert_committed_layout(f"{root}/7")
  _assert_tree_equal(flax_ckpt.load(f"{root}/3"), _tree(3))


def test_checkpoints_iterator_and_wait_for_new_checkpoint(objstore_root):
  root = f"{objstore_root}/run-poll"
  with flax_ckpt.CheckpointManager(root, enable_async=False) as m:
    m.save(1, _tree(1))
  assert flax_ckpt.wait_for_new_checkpoint(root, last_step=None, timeout=0) == 1
  t0 = time.monotonic()
  assert flax_ckpt.wait_for_new_checkpoint(root, last_step=1, timeout=0.5,
                                           poll_interval_s=0.1) is None
  assert time.monotonic() - t0 < 5

  def later():
    time.sleep(0.5)
    with flax_ckpt.CheckpointManager(root, enable_async=True) as w:
      w.save(4, _tree(4))
      w.save(6, _tree(6))

  thread = threading.Thread(target=later)
  thread.start()
  try:
    assert flax_ckpt.wait_for_new_checkpoint(root, last_step=1, timeout=30,
                                             poll_interval_s=0.05) in (4, 6)
    seen = []
    for step in flax_ckpt.checkpoints_iterator(root, timeout=30, poll_interval_s=0.05,
                                               start_after=1):
      seen.append(step)
      # each step it yields is committed and loadable
      assert flax_ckpt.load(f"{root}/{step}")["b"]["i"] == step
      if step == 6:
        break
  finally:
    thread.join()
  assert seen[-1] == 6 and set(seen) <= {4, 6}
  assert list(flax_ckpt.checkpoints_iterator(root, timeout=0)) == [1, 4, 6]
