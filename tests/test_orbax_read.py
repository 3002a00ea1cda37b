"""Reading checkpoints written by Orbax (issue 15): the test process writes real checkpoints
with orbax-checkpoint (from the test extra) in every form Orbax produces, and loads them
with ``flax_ckpt.load`` / ``load_checkpointables``, which never import orbax.

Forms: ``StandardCheckpointer`` and ``PyTreeCheckpointer`` output (zarr v2 + OCDBT, their
defaults), ``PyTreeCheckpointHandler`` with zarr3 / zarr v2, with and without OCDBT, with and
without zstd compression, and the items of ``CheckpointManager`` steps (``<step>/default``,
``<step>/state`` of an ``args.Composite``). Each is loaded without a template (the tree as
Orbax recorded it, with a warning that class types are not recorded) and with one (exact
types and shardings, onto other meshes, only the needed bytes). docs/orbax_format.md
describes the layouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mp_launch import run_job
from flax.training import train_state
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "_orbax_mp_worker.py")

# A warning that Orbax does not record class types: loads without a template give it.
LOST_TYPES = r"(?i)orbax"


@contextlib.contextmanager
def _quiet():
  """Orbax's own warnings while it writes (never around flax_ckpt calls)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


@pytest.fixture(scope="module")
def ocp():
  with _quiet():
    return pytest.importorskip("orbax.checkpoint")


def _load_as_saved(path, **kw):
  """flax_ckpt.load without a template: it warns that Orbax lost the class types."""
  with pytest.warns(UserWarning, match=LOST_TYPES):
    return flax_ckpt.load(path, **kw)


# ---- the saved trees ----

def _mesh22():
  return jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"))


def _full_sharded():
  return (np.arange(8 * 16, dtype=np.float32).reshape(8, 16) * np.float32(0.37)) - 3


def _tree(with_str: bool) -> dict:
  """Every kind of leaf Orbax saves; strings only where the handler allows them."""
  rng = np.random.default_rng(0)
  dev0 = SingleDeviceSharding(jax.devices()[0])
  sharded = jax.device_put(_full_sharded(), NamedSharding(_mesh22(), P("x", "y")))
  tree = {
      "params": {"dense": {"kernel": jax.device_put(rng.standard_normal((3, 4)).astype(
          np.float32), dev0),
                           "bias": rng.standard_normal(4).astype(np.float32)}},
      "bf16": jnp.asarray(rng.standard_normal(5), jnp.bfloat16),
      "i32": jnp.asarray([-(2**31), -1, 0, 2**31 - 1], jnp.int32),
      "i8": np.arange(-3, 3, dtype=np.int8),
      "u16": np.array([0, 1, 65535], np.uint16),
      "bools": np.array([True, False, True]),
      "jbools": jnp.asarray([False, True]),
      "f64": np.array([np.pi, -0.0, np.inf], np.float64),
      "nan": np.array([np.nan, 1.0], np.float32),
      "jax_scalar": jnp.int32(5),
      "py_int": 7,
      "py_big_int": 2**40 + 3,
      "py_float": 0.1,
      "none": None,
      "empty_dict": {},
      "empty_list": [],
      "layers": [jnp.ones(2), {"x": np.zeros((2, 2), np.float32)}, [jnp.full(3, 2.0)]],
      "many": [np.array([i], np.int64) for i in range(12)],  # '10' sorts before '2'
      "dotted.key": jnp.arange(3, dtype=jnp.int32),
      "slash/key": {"inner": np.arange(4, dtype=np.float32)},
      "sharded": sharded,
  }
  if with_str:
    tree["name"] = "hello, orbax"
    tree["nested"] = {"s": ""}
  return tree


# ---- the forms: how Orbax writes them ----

def _pytree_handler(ocp, **kw):
  def save(path, tree):
    with _quiet(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kw)) as ck:
      ck.save(path, args=ocp.args.PyTreeSave(tree))
  return save


def _standard(ocp):
  def save(path, tree):
    with _quiet(), ocp.StandardCheckpointer() as ck:
      ck.save(path, tree)
      ck.wait_until_finished()
  return save


def _pytree_checkpointer(ocp):
  def save(path, tree):
    with _quiet(), ocp.PyTreeCheckpointer() as ck:
      ck.save(path, tree)
  return save


def _manager(ocp, item):
  """A CheckpointManager step: ``default`` (args=StandardSave) or ``state`` (a Composite
  next to a JSON item); returns the item's directory."""
  def save(path, tree):
    with _quiet(), ocp.CheckpointManager(path) as mngr:
      if item == "default":
        mngr.save(5, args=ocp.args.StandardSave(tree))
      else:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                             extra=ocp.args.JsonSave({"epoch": 3})))
      mngr.wait_until_finished()
    return os.path.join(path, "5", item)
  return save


# name -> (saver factory, whether strings are allowed)
FORMS = {
    "standard": (_standard, False),
    "pytree_checkpointer": (_pytree_checkpointer, True),
    "zarr3_ocdbt": (lambda ocp: _pytree_handler(ocp, use_zarr3=True), True),
    "zarr3_ocdbt_uncompressed": (
        lambda ocp: _pytree_handler(ocp, use_zarr3=True, use_compression=False), True),
    "zarr3_files": (lambda ocp: _pytree_handler(ocp, use_zarr3=True, use_ocdbt=False), True),
    "zarr3_files_uncompressed": (lambda ocp: _pytree_handler(
        ocp, use_zarr3=True, use_ocdbt=False, use_compression=False), True),
    "zarr2_ocdbt_uncompressed": (lambda ocp: _pytree_handler(ocp, use_compression=False), True),
    "zarr2_files": (lambda ocp: _pytree_handler(ocp, use_ocdbt=False), True),
    "zarr2_files_uncompressed": (
        lambda ocp: _pytree_handler(ocp, use_ocdbt=False, use_compression=False), True),
    "manager_default": (lambda ocp: _manager(ocp, "default"), False),
    "manager_composite_state": (lambda ocp: _manager(ocp, "state"), False),
}


@pytest.fixture(scope="module")
def saved(ocp, tmp_path_factory):
  """{form: (path to load, the tree saved)}, each written once by orbax."""
  root = tmp_path_factory.mktemp("orbax_forms")
  out = {}
  for name, (factory, with_str) in FORMS.items():
    tree = _tree(with_str)
    path = str(root / name)
    item = factory(ocp)(path, tree)
    out[name] = (item or path, tree)
  return out


@pytest.fixture(params=list(FORMS))
def form(request, saved):
  return saved[request.param]


# ---- comparisons ----

def _same_bits(got, want):
  g, w = np.asarray(got), np.asarray(want)
  assert g.dtype == w.dtype, (g.dtype, w.dtype)
  assert g.shape == w.shape, (g.shape, w.shape)
  assert g.tobytes() == w.tobytes()


def _check_as_saved(got, want):
  """Same structure (dicts, lists, None, {} and []), leaf kinds and bits."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (kp, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    where = jax.tree_util.keystr(kp)
    if isinstance(w, (int, float, str)):
      assert type(g) is type(w) and g == w, (where, g, w)
      continue
    if isinstance(w, jax.Array):
      assert isinstance(g, jax.Array), (where, type(g))
    else:
      assert type(g) is np.ndarray, (where, type(g))
    _same_bits(g, w)


def _template(tree, *, sharding=None):
  """The template of a saved tree: jax arrays as ShapeDtypeStructs with a sharding (theirs,
  or ``sharding(path, leaf)``), numpy arrays as numpy, scalars and strings as themselves."""
  def one(kp, x):
    if isinstance(x, jax.Array):
      s = sharding(kp, x) if sharding is not None else x.sharding
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if isinstance(x, np.ndarray):
      return np.zeros_like(x)
    return type(x)() if isinstance(x, (int, float, str)) else x
  return jax.tree_util.tree_map_with_path(one, tree)


def _check_templated(got, want, template):
  assert jax.tree.structure(got) == jax.tree.structure(template)
  for g, w, t in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(template)):
    if isinstance(t, jax.ShapeDtypeStruct):
      assert isinstance(g, jax.Array)
      assert g.sharding == t.sharding, (g.sharding, t.sharding)
      for shard in g.addressable_shards:  # each device holds its own slice
        _same_bits(shard.data, np.asarray(w)[shard.index])
    elif isinstance(t, np.ndarray):
      assert type(g) is np.ndarray
    else:
      assert type(g) is type(t), (g, t)
    if isinstance(w, (int, float, str)):
      assert g == w
    else:
      _same_bits(g, w)


# ---- loads ----

def test_every_form_is_an_orbax_checkpoint(form):
  path, _ = form
  assert flax_ckpt.is_orbax_checkpoint(path)


def test_load_without_template_gives_the_tree_as_orbax_recorded_it(form):
  path, tree = form
  got = _load_as_saved(path)
  _check_as_saved(got, tree)


def test_load_with_template_gives_exact_types_and_shardings(form):
  path, tree = form
  template = _template(tree)
  got = flax_ckpt.load(path, template)
  _check_templated(got, tree, template)


def test_load_checkpointables_reads_the_same_tree(form):
  """A PyTree item is one checkpointable, named ``default`` as Orbax names a Checkpointer's
  single item."""
  path, tree = form
  template = _template(tree)
  got = flax_ckpt.load_checkpointables(path, {"default": template})
  assert list(got) == ["default"]
  _check_templated(got["default"], tree, template)
  with pytest.warns(UserWarning, match=LOST_TYPES):
    everything = flax_ckpt.load_checkpointables(path)
  assert list(everything) == ["default"]
  _check_as_saved(everything["default"], tree)


def test_restore_type_numpy(saved):
  path, tree = saved["zarr3_ocdbt"]
  got = _load_as_saved(path, restore_type=np.ndarray)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    if isinstance(w, (np.ndarray, jax.Array)):
      assert type(g) is np.ndarray
      _same_bits(g, w)


@pytest.mark.parametrize("form_name", ["manager_default", "manager_composite_state"])
def test_a_manager_step_directory_loads_its_state_item(saved, form_name):
  """load(<step>) picks the PyTree item (``state`` or ``default``); load_checkpointables
  lists the step's items."""
  item, tree = saved[form_name]
  step = os.path.dirname(item)
  assert flax_ckpt.is_orbax_checkpoint(step)
  template = _template(tree)
  _check_templated(flax_ckpt.load(step, template), tree, template)
  name = os.path.basename(item)
  got = flax_ckpt.load_checkpointables(step, {name: template})
  _check_templated(got[name], tree, template)


def test_a_composite_json_item_loads_as_json(saved):
  item, _ = saved["manager_composite_state"]
  step = os.path.dirname(item)
  got = flax_ckpt.load_checkpointables(step, {"extra": None})
  assert got == {"extra": {"epoch": 3}}


def test_a_manager_step_with_metrics_and_a_grain_item(ocp, tmp_path):
  """A step's other items: ``metrics`` (mgr.save(..., metrics=) with best_fn) loads as its
  JSON; a grain iterator item loads as the saved state, or into an iterator passed for it."""
  with _quiet():
    grain = pytest.importorskip("grain")
  it = iter(grain.MapDataset.range(30).shuffle(seed=1).to_iter_dataset())
  for _ in range(4):
    next(it)
  tree = {"w": np.arange(4, dtype=np.float32), "n": 2}
  root = tmp_path / "run"
  with _quiet(), ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
      best_fn=lambda m: m["loss"], best_mode="min")) as mngr:
    mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                         ds=grain.checkpoint.CheckpointSave(it)),
              metrics={"loss": 0.5})
    mngr.wait_until_finished()
  following = [int(next(it)) for _ in range(5)]
  step = root / "2"
  assert (step / "metrics" / "metrics").exists()
  assert flax_ckpt.load_checkpointables(step, {"metrics": None}) == {"metrics": {"loss": 0.5}}
  got = flax_ckpt.load(step, {"w": np.zeros(4, np.float32), "n": 0})
  _same_bits(got["w"], tree["w"])
  assert got["n"] == 2
  assert flax_ckpt.load_checkpointables(step, {"ds": None}) == {"ds": {"next_index": 4}}
  fresh = iter(grain.MapDataset.range(30).shuffle(seed=1).to_iter_dataset())
  out = flax_ckpt.load_checkpointables(step, {"state": {"w": np.zeros(4, np.float32), "n": 0},
                                              "ds": fresh})
  assert out["ds"] is fresh and out["state"]["n"] == 2
  assert [int(next(fresh)) for _ in range(5)] == following


# ---- shardings: onto other meshes, more and fewer devices ----

def _targets():
  d = jax.devices()
  return {
      "mesh_2x4": NamedSharding(jax.sharding.Mesh(np.array(d).reshape(2, 4), ("a", "b")),
                                P("b", "a")),
      "mesh_8": NamedSharding(jax.sharding.Mesh(np.array(d), ("z",)), P(None, "z")),
      "mesh_4x2_replicated_rows": NamedSharding(
          jax.sharding.Mesh(np.array(d).reshape(4, 2), ("x", "y")), P("x")),
      "two_devices": NamedSharding(jax.sharding.Mesh(np.array(d[6:8]), ("x",)), P("x")),
      "one_device": SingleDeviceSharding(d[5]),
      "replicated": NamedSharding(jax.sharding.Mesh(np.array(d[:4]).reshape(2, 2),
                                                    ("x", "y")), P()),
  }


@pytest.mark.parametrize("target", list(_targets()))
@pytest.mark.parametrize("form_name", ["standard", "zarr3_ocdbt", "zarr3_files", "zarr2_files"])
def test_resharding_onto_another_mesh(saved, form_name, target):
  path, tree = saved[form_name]
  sharding = _targets()[target]
  want = _full_sharded()
  got = flax_ckpt.load(path, {"sharded": jax.ShapeDtypeStruct(want.shape, want.dtype,
                                                              sharding=sharding)},
                       partial=True)
  assert list(got) == ["sharded"]
  assert got["sharded"].sharding == sharding
  for shard in got["sharded"].addressable_shards:
    _same_bits(shard.data, want[shard.index])
  _same_bits(got["sharded"], want)


def test_every_array_onto_an_8_device_mesh(saved):
  """Each jax leaf of the tree replicated over all 8 devices, the sharded one split."""
  path, tree = saved["standard"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))

  def sharding(kp, x):
    return NamedSharding(mesh, P("x", "y") if x.shape == (8, 16) else P())
  template = _template(tree, sharding=sharding)
  got = flax_ckpt.load(path, template)
  _check_templated(got, tree, template)


# ---- types with a template ----

class Pair(NamedTuple):
  a: jax.Array
  b: np.ndarray


def _abstract(tree):
  """jax arrays as ShapeDtypeStructs with their sharding; numpy arrays, Python scalars and
  strings as themselves (what a template of a live state usually is)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def _train_state():
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4) / 3, "bias": jnp.ones(4)},
            "out": {"kernel": jnp.full((4, 2), 0.5)}}
  state = train_state.TrainState.create(apply_fn=lambda *a: a, params=params,
                                        tx=optax.chain(optax.clip_by_global_norm(1.0),
                                                       optax.adamw(1e-2)))
  grads = jax.tree.map(lambda p: p * 0.1 + 0.01, params)
  return state.apply_gradients(grads=grads).apply_gradients(grads=grads)


@pytest.mark.parametrize("form_name", ["standard", "zarr3_ocdbt", "zarr2_files",
                                       "manager_composite_state"])
def test_a_flax_train_state_with_optax_state_comes_back_exactly(ocp, tmp_path, form_name):
  state = _train_state()
  path = str(tmp_path / "ts")
  factory, _ = FORMS[form_name]
  path = factory(ocp)(path, state) or path
  got = flax_ckpt.load(path, _abstract(state))
  assert type(got) is train_state.TrainState
  assert jax.tree.structure(got) == jax.tree.structure(state)  # optax state classes too
  assert got.apply_fn is state.apply_fn and got.tx is state.tx
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    assert type(g) is type(w) or (isinstance(g, jax.Array) and isinstance(w, jax.Array))
    _same_bits(g, w)
  # it trains on exactly as the saved one would
  grads = jax.tree.map(jnp.ones_like, state.params)
  for g, w in zip(jax.tree.leaves(got.apply_gradients(grads=grads)),
                  jax.tree.leaves(state.apply_gradients(grads=grads))):
    _same_bits(g, w)


def test_a_train_state_without_template_is_nested_dicts_and_lists(ocp, tmp_path):
  state = _train_state()
  path = str(tmp_path / "ts")
  _standard(ocp)(path, state)
  got = _load_as_saved(path)
  assert set(got) == {"step", "params", "opt_state"}
  assert isinstance(got["opt_state"], list)  # the optax tuples and NamedTuples
  adam = got["opt_state"][1][0]
  assert isinstance(adam, dict) and set(adam) == {"count", "mu", "nu"}
  _same_bits(adam["mu"]["dense"]["kernel"], state.opt_state[1][0].mu["dense"]["kernel"])
  _same_bits(got["params"]["out"]["kernel"], state.params["out"]["kernel"])


def test_tuples_namedtuples_int_keys_and_prng_keys_follow_the_template(ocp, tmp_path):
  """Orbax records tuples as lists, int keys as strings and typed keys as uint32 data;
  the template says what they were."""
  tree = {"tup": (jnp.ones(2), np.arange(3)), "pair": Pair(jnp.zeros(2), np.ones(1)),
          "ik": {3: jnp.arange(2), 10: jnp.arange(3)}, "key": jax.random.key(42),
          "keys": jax.random.split(jax.random.key(1), 4)}
  path = str(tmp_path / "t")
  _standard(ocp)(path, tree)
  got = flax_ckpt.load(path, _abstract(tree))
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  assert type(got["pair"]) is Pair and type(got["tup"]) is tuple
  assert sorted(got["ik"]) == [3, 10]
  assert jnp.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
  _same_bits(jax.random.key_data(got["key"]), jax.random.key_data(tree["key"]))
  _same_bits(jax.random.key_data(got["keys"]), jax.random.key_data(tree["keys"]))
  _same_bits(got["ik"][10], tree["ik"][10])
  _same_bits(got["pair"].b, tree["pair"].b)


def test_a_template_dtype_casts(saved):
  path, tree = saved["zarr3_ocdbt"]
  want = np.asarray(tree["params"]["dense"]["kernel"])
  with pytest.warns(UserWarning, match=r"\['kernel'\] float32->bfloat16"):  # narrowing
    got = flax_ckpt.load(path, {"params": {"dense": {"kernel": jax.ShapeDtypeStruct(
        want.shape, jnp.bfloat16)}}}, partial=True)
  assert got["params"]["dense"]["kernel"].dtype == jnp.bfloat16
  _same_bits(got["params"]["dense"]["kernel"], want.astype(jnp.bfloat16))


# ---- only the needed bytes ----

def _rchar():
  with open("/proc/self/io") as f:
    return int(next(ln for ln in f if ln.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("kw", [{}, {"use_ocdbt": False}, {"use_zarr3": True},
                                {"use_ocdbt": False, "use_zarr3": True,
                                 "use_compression": False}],
                         ids=["zarr2_ocdbt", "zarr2_files", "zarr3_ocdbt", "zarr3_files_raw"])
def test_a_partial_template_reads_only_its_leaves(ocp, tmp_path, kw):
  big = np.random.default_rng(1).random(2 << 20, dtype=np.float32)  # 8 MiB, incompressible
  small = np.arange(16, dtype=np.float32)
  path = str(tmp_path / "c")
  _pytree_handler(ocp, **kw)(path, {"big": big, "small": small, "n": 3})
  flax_ckpt.load(path, {"n": 0}, partial=True)  # imports and metadata (rchar counts them)
  before = _rchar()
  got = flax_ckpt.load(path, {"small": np.zeros(16, np.float32)}, partial=True)
  read = _rchar() - before
  _same_bits(got["small"], small)
  assert read < big.nbytes // 8, read  # not the big array (whatever metadata it reads)


# ---- the unmerged per-process OCDBT layout ----

def test_per_process_ocdbt_without_the_merged_root_still_loads(saved, tmp_path):
  """Older saves, or a save that failed at merge time, have no root manifest.ocdbt: the
  data is only in ocdbt.process_<i>/."""
  src, tree = saved["zarr3_ocdbt"]
  path = tmp_path / "unmerged"
  shutil.copytree(src, path)
  os.remove(path / "manifest.ocdbt")
  shutil.rmtree(path / "d")
  template = _template(tree)
  _check_templated(flax_ckpt.load(path, template), tree, template)


# ---- errors ----

def test_a_template_missing_a_leaf_is_a_structure_mismatch(saved):
  path, tree = saved["standard"]
  template = _template(tree)
  del template["params"]["dense"]["bias"]
  with pytest.raises(flax_ckpt.StructureMismatchError, match="bias"):
    flax_ckpt.load(path, template)


def test_a_template_with_a_leaf_orbax_did_not_save_is_a_structure_mismatch(saved):
  path, tree = saved["standard"]
  template = _template(tree)
  template["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(flax_ckpt.StructureMismatchError, match="extra"):
    flax_ckpt.load(path, template)
  with pytest.raises(flax_ckpt.StructureMismatchError, match="extra"):
    flax_ckpt.load(path, template, partial=True)


def test_a_shape_mismatch_is_a_structure_mismatch(saved):
  path, tree = saved["zarr3_ocdbt"]
  template = _template(tree)
  template["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((4, 3), jnp.float32)
  with pytest.raises(flax_ckpt.StructureMismatchError, match="kernel"):
    flax_ckpt.load(path, template)


def _copy(saved, form_name, tmp_path):
  src, tree = saved[form_name]
  dst = tmp_path / form_name
  shutil.copytree(src, dst)
  return dst, tree


def _truncate(path, keep=0.5):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * keep))


def _expect_a_flax_ckpt_error(path, template=None, match=None):
  with pytest.raises(flax_ckpt.CheckpointError, match=match) as e:
    with warnings.catch_warnings():  # the warning of a load without template is not the point
      warnings.simplefilter("ignore", UserWarning)
      jax.block_until_ready(flax_ckpt.load(path, template))
  assert "did not finish" not in str(e.value)
  return e.value


@pytest.mark.parametrize("form_name", ["zarr2_files", "zarr3_files"])
def test_a_truncated_chunk_file_is_a_flax_ckpt_error(saved, tmp_path, form_name):
  path, tree = _copy(saved, form_name, tmp_path)
  chunk = [os.path.join(d, f) for d, _, fs in os.walk(path / "params.dense.kernel")
           for f in fs if not f.startswith(".") and f != "zarr.json"]
  assert chunk
  _truncate(chunk[0])
  _expect_a_flax_ckpt_error(path, _template(tree))


@pytest.mark.parametrize("use_zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_a_truncated_ocdbt_data_file_is_a_flax_ckpt_error(ocp, tmp_path, use_zarr3):
  """Values over 1 KiB live in ocdbt.process_0/d/ (smaller ones inline in the B-tree)."""
  big = np.random.default_rng(2).random(16 << 10, dtype=np.float32)  # 64 KiB
  path = tmp_path / "c"
  _pytree_handler(ocp, use_zarr3=use_zarr3)(str(path), {"big": big, "n": 1})
  data = path / "ocdbt.process_0" / "d"
  for f in os.listdir(data):
    _truncate(data / f, 0.3)
  _expect_a_flax_ckpt_error(path, {"big": np.zeros_like(big), "n": 0})


def test_a_corrupted_ocdbt_manifest_is_a_flax_ckpt_error(saved, tmp_path):
  path, tree = _copy(saved, "standard", tmp_path)
  (path / "manifest.ocdbt").write_bytes(b"\x0c\xdb\x3a\x2a" + b"\x00garbage" * 8)
  _expect_a_flax_ckpt_error(path, _template(tree))


def test_a_missing_array_is_a_flax_ckpt_error(saved, tmp_path):
  path, tree = _copy(saved, "zarr2_files", tmp_path)
  shutil.rmtree(path / "params.dense.kernel")
  _expect_a_flax_ckpt_error(path, _template(tree), match="kernel")


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"tree_metadata": 5}',
                                     b'["a list"]'])
def test_a_corrupted_metadata_file_is_a_format_error(saved, tmp_path, content):
  path, _ = _copy(saved, "standard", tmp_path)
  (path / "_METADATA").write_bytes(content)
  with pytest.raises(flax_ckpt.FormatError) as e:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)
      flax_ckpt.load(path)
  assert "did not finish" not in str(e.value)


def test_a_leaf_type_flax_ckpt_cannot_read_is_named_in_the_error(saved, tmp_path):
  path, _ = _copy(saved, "standard", tmp_path)
  meta = json.loads((path / "_METADATA").read_text())
  meta["tree_metadata"]["('py_int',)"]["value_metadata"]["value_type"] = "my.CustomLeaf"
  (path / "_METADATA").write_text(json.dumps(meta))
  _expect_a_flax_ckpt_error(path, match="my.CustomLeaf")


def test_an_unfinished_orbax_save_is_a_clear_error(saved, tmp_path):
  """What a failed or running Orbax save leaves: ``<name>.orbax-checkpoint-tmp`` with an
  uncommitted _CHECKPOINT_METADATA (here also with all the data, as mid-commit)."""
  src, tree = saved["standard"]
  failed = tmp_path / "3.orbax-checkpoint-tmp"
  failed.mkdir()
  (failed / "_CHECKPOINT_METADATA").write_text(json.dumps({
      "item_handlers": None, "metrics": {}, "performance_metrics": {},
      "init_timestamp_nsecs": 1796318904387390914, "commit_timestamp_nsecs": None,
      "custom_metadata": {}}))
  full = tmp_path / "4.orbax-checkpoint-tmp"
  shutil.copytree(src, full)
  for path in (failed, full):
    assert not flax_ckpt.is_orbax_checkpoint(path)
    err = _expect_a_flax_ckpt_error(path, _template(tree))
    assert "Orbax" in str(err) and str(path) in str(err), err


def test_a_pre_0_5_orbax_checkpoint_is_named_unsupported(tmp_path):
  """Orbax <= 0.4 wrote the tree as a msgpack file ``checkpoint`` (arrays as
  'PLACEHOLDER://<name>') beside the zarr arrays; flax_ckpt reads 0.5 and newer only."""
  msgpack = pytest.importorskip("msgpack")
  path = tmp_path / "old"
  (path / "a").mkdir(parents=True)
  (path / "checkpoint").write_bytes(msgpack.packb({"a": "PLACEHOLDER://a", "step": 3}))
  (path / "a" / ".zarray").write_text(json.dumps({
      "chunks": [2], "compressor": None, "dtype": "<f4", "fill_value": None, "filters": None,
      "order": "C", "shape": [2], "zarr_format": 2}))
  (path / "a" / "0").write_bytes(np.ones(2, np.float32).tobytes())
  err = _expect_a_flax_ckpt_error(path, {"a": np.zeros(2, np.float32), "step": 0})
  assert "Orbax" in str(err) and "0.5" in str(err), err


def test_a_missing_path_is_checkpoint_not_found(tmp_path):
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    flax_ckpt.load(tmp_path / "nothing", {"w": np.zeros(2)})


# ---- orbax is never imported ----

@pytest.mark.slow
def test_loading_never_imports_orbax(saved, ocp, tmp_path):
  """A fresh interpreter that loads every form (and lists/restores a manager run)
  without ever importing orbax."""
  run = tmp_path / "run"
  with _quiet(), ocp.CheckpointManager(run) as mngr:
    mngr.save(2, args=ocp.args.StandardSave({"w": np.arange(3.0)}))
    mngr.wait_until_finished()
  paths = {name: path for name, (path, _) in saved.items()}
  code = textwrap.dedent(f"""
      import sys, warnings
      import numpy as np
      import flax_ckpt
      paths = {paths!r}
      for name, path in paths.items():
        assert flax_ckpt.is_orbax_checkpoint(path), name
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          tree = flax_ckpt.load(path)
          parts = flax_ckpt.load_checkpointables(path)
        assert tree["py_int"] == 7 and list(parts) == ["default"], (name, list(parts))
        assert np.asarray(tree["sharded"]).shape == (8, 16), name
        got = flax_ckpt.load(path, {{"py_int": 0}}, partial=True)
        assert got == {{"py_int": 7}}, (name, got)
      bad = sorted(m for m in sys.modules if m == "orbax" or m.startswith("orbax."))
      assert not bad, bad
      print("LOADS_WITHOUT_ORBAX", flush=True)
      mngr = flax_ckpt.CheckpointManager({str(run)!r}, read_only=True)
      assert mngr.all_steps() == [2], mngr.all_steps()
      out = mngr.restore(abstract_state={{"w": np.zeros(3)}})
      np.testing.assert_array_equal(out["w"], np.arange(3.0))
      bad = sorted(m for m in sys.modules if m == "orbax" or m.startswith("orbax."))
      assert not bad, bad
      print("NO_ORBAX_OK")
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE), env=env,
                     capture_output=True, text=True, timeout=240)
  out = r.stdout[-3000:] + r.stderr[-5000:]
  assert "LOADS_WITHOUT_ORBAX" in r.stdout, out  # every form loaded, orbax not imported
  assert r.returncode == 0 and "NO_ORBAX_OK" in r.stdout, out  # and the manager too


# ---- a 2-process sharded save by orbax ----

def _run_job(nproc, ndev, scenario, path, timeout=180):
  """Runs one job of tests/_orbax_mp_worker.py; returns each process's (rc, RESULT, tail)."""
  return run_job(lambda i, port: [sys.executable, WORKER, str(port), str(nproc), str(i),
                                  str(ndev), scenario, str(path)],
                 nproc, timeout=timeout, cwd=os.path.dirname(HERE))


def _mp_host():
  """The global arrays of tests/_orbax_mp_worker.py (random: zstd cannot shrink them)."""
  w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
  b = np.arange(-6, 6, dtype=np.int32)
  return w, b


@pytest.fixture(scope="module")
def saved_by_two_orbax(tmp_path_factory):
  """Orbax checkpoints saved by 2 processes x 2 devices, w sharded P('x', 'y') on a 2x2 mesh
  of all 4 devices: ``std`` (StandardCheckpointer), ``z3`` (zarr3), ``run/<step>/state``
  (CheckpointManager)."""
  path = tmp_path_factory.mktemp("orbax_mp")
  for rc, r, out in _run_job(2, 2, "save", path):
    assert rc == 0 and r and r["saved"], out
  return path


@pytest.mark.slow
@pytest.mark.parametrize("which", ["std", "z3", "run/4/state", "run/4"])
def test_two_process_orbax_save_loads_in_one_process(saved_by_two_orbax, which):
  path = saved_by_two_orbax / which
  assert flax_ckpt.is_orbax_checkpoint(path)
  w, b = _mp_host()
  want_w = w + 4 if which.startswith("run") else w
  plain = _load_as_saved(path)  # no template: the tree, on the default device
  _same_bits(plain["w"], want_w)
  _same_bits(plain["b"], b)
  assert plain["step"] == 7
  for sharding in _targets().values():  # 8 devices, fewer, one, other mesh shapes
    replicated = (NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding)
                  else sharding)
    template = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding),
                "b": jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=replicated),
                "step": 0}
    got = flax_ckpt.load(path, template)
    assert got["w"].sharding == sharding and got["b"].sharding == replicated
    for shard in got["w"].addressable_shards:
      _same_bits(shard.data, want_w[shard.index])
    _same_bits(got["b"], b)
    assert got["step"] == 7


@pytest.mark.slow
def test_two_process_orbax_save_unmerged_per_process_databases(saved_by_two_orbax, tmp_path):
  """Without the merged root manifest, each process's data is only in its own
  ocdbt.process_<i>/: both must be read."""
  path = tmp_path / "std"
  shutil.copytree(saved_by_two_orbax / "std", path)
  assert sorted(p.name for p in path.iterdir() if p.name.startswith("ocdbt.process_")) == [
      "ocdbt.process_0", "ocdbt.process_1"]
  os.remove(path / "manifest.ocdbt")
  shutil.rmtree(path / "d")
  w, b = _mp_host()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
  got = flax_ckpt.load(path, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype,
                                                        sharding=NamedSharding(mesh, P("y"))),
                              "b": b * 0, "step": 0})
  _same_bits(got["w"], w)
  _same_bits(got["b"], b)


@pytest.mark.slow
def test_two_process_orbax_save_loads_in_two_processes_on_another_mesh(saved_by_two_orbax):
  """flax_ckpt in a 2-process job (4 devices each) loads the Orbax checkpoint onto a 2x4
  mesh of another shape, each process reading its own share only."""
  for which in ("std", "z3"):
    res = _run_job(2, 4, "load", saved_by_two_orbax / which)
    for rc, r, out in res:
      assert rc == 0 and r and r["ok"], out
      assert r["read"] < r["w_bytes"] * 3 // 4, (which, r)  # its half of w, not all of it


@pytest.mark.slow
def test_two_process_orbax_run_resumes_with_a_flax_ckpt_manager(saved_by_two_orbax, tmp_path):
  """The 2-process Orbax job switched to flax_ckpt: its manager resumes from the latest
  Orbax step in both processes, saves next to it, and retention deletes the oldest."""
  run = tmp_path / "run"
  shutil.copytree(saved_by_two_orbax / "run", run)
  res = _run_job(2, 2, "manager", run)
  for rc, r, out in res:
    assert rc == 0 and r and r["ok"], out
    assert r["steps"] == [2, 4] and r["latest"] == 4 and r["after"] == [4, 6], r
  assert sorted(p.name for p in run.iterdir() if not p.name.startswith((".", "_"))) == [
      "4", "6"]
  assert flax_ckpt.is_orbax_checkpoint(run / "4") and not flax_ckpt.is_orbax_checkpoint(
      run / "6")
