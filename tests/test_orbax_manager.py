"""``flax_ckpt.CheckpointManager`` over a directory of Orbax steps (issue 15): a running
Orbax job switches by changing its import and manager calls, and resumes from its last
Orbax step. The Orbax steps are listed and restored (with the grain data iterator state
into ``dataset=``), new saves are written in flax_ckpt format next to them, and retention
counts both kinds. The last test resumes a real optax training run bit for bit."""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import flax_ckpt

LOST_TYPES = r"(?i)orbax"  # the warning of a load without template


@contextlib.contextmanager
def _quiet():
  """Orbax's (and grain's) own warnings while they write; never around flax_ckpt calls."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


@pytest.fixture(scope="module")
def ocp():
  with _quiet():
    return pytest.importorskip("orbax.checkpoint")


@pytest.fixture(scope="module")
def grain():
  with _quiet():
    return pytest.importorskip("grain")


def _tree(step: int) -> dict:
  return {"params": {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + step,
                     "b": np.full(3, step, np.int32)},
          "step": step}


def _template() -> dict:
  return {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                     "b": np.zeros(3, np.int32)},
          "step": 0}


def _same_bits(got, want):
  g, w = np.asarray(got), np.asarray(want)
  assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
  assert g.tobytes() == w.tobytes()


def _check(got, step):
  want = _tree(step)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert got["step"] == step and type(got["step"]) is int
  _same_bits(got["params"]["w"], want["params"]["w"])
  _same_bits(got["params"]["b"], want["params"]["b"])


def _orbax_run(ocp, root, steps, *, item="state", options=None, **save_kw):
  """An Orbax CheckpointManager run: each step saves _tree(step) as ``item`` (``default``:
  args=StandardSave; otherwise a Composite item) and whatever ``save_kw`` builds."""
  with _quiet(), ocp.CheckpointManager(root, options=options) as mngr:
    for step in steps:
      if item == "default":
        args = ocp.args.StandardSave(_tree(step))
      else:
        extra = {k: f(step) for k, f in save_kw.items()}
        args = ocp.args.Composite(**{item: ocp.args.StandardSave(_tree(step))}, **extra)
      mngr.save(step, args=args)
    mngr.wait_until_finished()


def _step_dirs(root):
  return sorted(p for p in os.listdir(root) if not p.startswith((".", "_")))


# ---- listing and restoring ----

@pytest.mark.parametrize("item", ["state", "default"])
def test_orbax_steps_are_listed_and_restored(ocp, tmp_path, item):
  root = tmp_path / "run"
  _orbax_run(ocp, root, [1, 2, 3], item=item)
  mngr = flax_ckpt.CheckpointManager(root)
  try:
    assert mngr.all_steps() == [1, 2, 3]
    assert mngr.latest_step() == 3
    _check(mngr.restore(abstract_state=_template()), 3)  # the latest
    _check(mngr.restore(2, _template()), 2)
    _check(mngr.restore(1, abstract_state=_template()), 1)
    with pytest.warns(UserWarning, match=LOST_TYPES):
      plain = mngr.restore()  # no template: the tree as Orbax recorded it
    _check(plain, 3)
    with pytest.raises(flax_ckpt.CheckpointNotFoundError):
      mngr.restore(7, _template())
  finally:
    mngr.close()
  assert _step_dirs(root) == ["1", "2", "3"]  # listing and restoring change nothing


def test_a_read_only_manager_lists_and_restores_orbax_steps(ocp, tmp_path):
  root = tmp_path / "run"
  _orbax_run(ocp, root, [10, 20])
  before = sorted(os.listdir(root))
  with flax_ckpt.CheckpointManager(root, read_only=True) as mngr:
    assert mngr.all_steps() == [10, 20] and mngr.latest_step() == 20
    _check(mngr.restore(abstract_state=_template()), 20)
  assert sorted(os.listdir(root)) == before


@pytest.mark.parametrize("naming", [{"step_prefix": "ckpt"}, {"step_format_fixed_length": 5},
                                    {"step_prefix": "run_a", "step_format_fixed_length": 3}],
                         ids=["prefix", "fixed_length", "both"])
def test_orbax_step_names_with_prefix_and_padding(ocp, tmp_path, naming):
  root = tmp_path / "run"
  _orbax_run(ocp, root, [4, 8], options=ocp.CheckpointManagerOptions(**naming))
  with flax_ckpt.CheckpointManager(root, **naming) as mngr:
    assert mngr.all_steps() == [4, 8]
    _check(mngr.restore(abstract_state=_template()), 8)
    assert mngr.save(9, _tree(9))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 8, 9]
  prefix, width = naming.get("step_prefix"), naming.get("step_format_fixed_length")

  def name(step):
    return (f"{prefix}_" if prefix else "") + (str(step).zfill(width) if width else str(step))
  assert _step_dirs(root) == [name(4), name(8), name(9)]  # the new step named the same way


def test_unfinished_orbax_saves_and_root_metadata_are_not_steps(ocp, tmp_path):
  """``<step>.orbax-checkpoint-tmp`` (a running or failed save), an uncommitted step and
  the root ``metadata/`` of ``CheckpointManager(metadata=...)`` are not steps."""
  root = tmp_path / "run"
  with _quiet(), ocp.CheckpointManager(root, metadata={"model": "tiny"}) as mngr:
    mngr.save(1, args=ocp.args.StandardSave(_tree(1)))
    mngr.wait_until_finished()
  assert (root / "metadata").is_dir()
  for name in ("2.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1796318904", "4"):
    (root / name).mkdir()  # 0.12's tmp name, older ones', and a step not committed yet
    (root / name / "_CHECKPOINT_METADATA").write_text(json.dumps(
        {"item_handlers": None, "metrics": {}, "performance_metrics": {},
         "init_timestamp_nsecs": 1, "commit_timestamp_nsecs": None, "custom_metadata": {}}))
  with flax_ckpt.CheckpointManager(root) as mngr:
    assert mngr.all_steps() == [1] and mngr.latest_step() == 1
    _check(mngr.restore(abstract_state=_template()), 1)


# ---- saving next to Orbax steps; retention ----

def test_new_saves_are_flax_ckpt_next_to_the_orbax_steps(ocp, tmp_path):
  root = tmp_path / "run"
  _orbax_run(ocp, root, [1, 2, 3])
  with flax_ckpt.CheckpointManager(root) as mngr:
    _check(mngr.restore(abstract_state=_template()), 3)
    assert mngr.save(4, _tree(4))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 2, 3, 4] and mngr.latest_step() == 4
    _check(mngr.restore(abstract_state=_template()), 4)
    _check(mngr.restore(3, _template()), 3)  # the Orbax steps stay readable
  assert not flax_ckpt.is_orbax_checkpoint(root / "4")
  assert all(flax_ckpt.is_orbax_checkpoint(root / s) for s in ("1", "2", "3"))
  _check(flax_ckpt.load(root / "4", _template()), 4)  # a flax_ckpt step
  with flax_ckpt.CheckpointManager(root) as mngr:  # a new process sees both kinds
    assert mngr.all_steps() == [1, 2, 3, 4]
    _check(mngr.restore(abstract_state=_template()), 4)


def test_retention_counts_orbax_and_flax_ckpt_steps(ocp, tmp_path):
  """3 Orbax steps and max_to_keep=2: after the next save, only 2 remain; the Orbax ones
  are deleted oldest first."""
  root = tmp_path / "run"
  _orbax_run(ocp, root, [1, 2, 3])
  with flax_ckpt.CheckpointManager(root, max_to_keep=2) as mngr:
    assert mngr.all_steps() == [1, 2, 3]  # opening deletes nothing
    assert mngr.save(4, _tree(4))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 4]
    assert _step_dirs(root) == ["3", "4"]
    _check(mngr.restore(3, _template()), 3)
    assert mngr.save(5, _tree(5))
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4, 5]
  assert _step_dirs(root) == ["4", "5"]
  assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(root))


def test_best_fn_retention_reads_the_orbax_metrics(ocp, tmp_path):
  """Orbax's ``metrics`` item gives its steps their metrics: the best ones are kept, of
  both kinds."""
  root = tmp_path / "run"
  losses = {1: 0.3, 2: 0.1, 3: 0.2}
  with _quiet(), ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
      best_fn=lambda m: m["loss"], best_mode="min")) as mngr:
    for step, loss in losses.items():
      mngr.save(step, args=ocp.args.StandardSave(_tree(step)), metrics={"loss": loss})
    mngr.wait_until_finished()
  with flax_ckpt.CheckpointManager(root, max_to_keep=2, best_fn=lambda m: m["loss"],
                                   best_mode="min") as mngr:
    assert mngr.metrics(2) == {"loss": 0.1}
    assert mngr.best_step() == 2
    assert mngr.save(4, _tree(4), metrics={"loss": 0.15})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 4]
    assert mngr.best_step() == 2
  assert _step_dirs(root) == ["2", "4"]


def test_delete_an_orbax_step(ocp, tmp_path):
  root = tmp_path / "run"
  _orbax_run(ocp, root, [1, 2])
  with flax_ckpt.CheckpointManager(root) as mngr:
    mngr.delete(1)
    assert mngr.all_steps() == [2]
  assert _step_dirs(root) == ["2"]


# ---- grain data iterator state into dataset= ----

def _dataset_iterator(grain):
  ds = grain.MapDataset.range(40).shuffle(seed=3).map(lambda x: x * 10)
  return iter(ds.to_iter_dataset())


def _dataloader_iterator(grain):
  loader = grain.DataLoader(
      data_source=grain.sources.RangeDataSource(0, 40, 1),
      sampler=grain.samplers.IndexSampler(40, shuffle=True, seed=3, num_epochs=1),
      worker_count=0)
  return iter(loader)


@pytest.mark.parametrize("kind", ["dataset_iterator", "dataloader"])
@pytest.mark.parametrize("name", ["dataset", "ds"])
def test_grain_iterator_state_restores_into_dataset(ocp, grain, tmp_path, kind, name):
  """Orbax's Composite item of grain's ``CheckpointSave`` (``process_0-of-1.json``) restores
  into the iterator passed as ``dataset=``; the run goes on with the same elements."""
  make = {"dataset_iterator": _dataset_iterator, "dataloader": _dataloader_iterator}[kind]
  it = make(grain)
  for _ in range(5):
    next(it)
  root = tmp_path / "run"
  _orbax_run(ocp, root, [5], **{name: lambda step: grain.checkpoint.CheckpointSave(it)})
  assert os.listdir(root / "5" / name) and (root / "5" / name / "process_0-of-1.json").exists()
  following = [int(np.asarray(next(it))) for _ in range(6)]
  fresh = make(grain)
  with flax_ckpt.CheckpointManager(root) as mngr:
    _check(mngr.restore(5, _template(), dataset=fresh), 5)
  assert [int(np.asarray(next(fresh))) for _ in range(6)] == following
  fresh = make(grain)
  with flax_ckpt.CheckpointManager(root) as mngr:
    _check(mngr.restore(abstract_state=_template(), dataset=fresh), 5)  # latest
  assert [int(np.asarray(next(fresh))) for _ in range(6)] == following


def test_dataset_from_an_orbax_step_without_one_is_a_structure_mismatch(ocp, grain, tmp_path):
  root = tmp_path / "run"
  _orbax_run(ocp, root, [1])
  with flax_ckpt.CheckpointManager(root) as mngr:
    with pytest.raises(flax_ckpt.StructureMismatchError):
      mngr.restore(1, _template(), dataset=_dataset_iterator(grain))


# ---- a training run resumed bit for bit ----

TOTAL, EVERY, STOP = 10, 3, 7  # steps in all; save interval; the Orbax job dies after STOP


def _batch(i):
  rng = np.random.default_rng(int(i))
  x = rng.standard_normal((8, 4)).astype(np.float32)
  return {"x": x, "y": (x @ np.arange(8, dtype=np.float32).reshape(4, 2)).astype(np.float32)}


def _data(grain):
  return iter(grain.MapDataset.range(10_000).shuffle(seed=0).map(_batch).to_iter_dataset())


def _apply(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


_TX = optax.adamw(1e-2, weight_decay=1e-3)  # one object: it is part of the TrainState treedef


def _init_state():
  rng = np.random.default_rng(123)
  params = {"w1": jnp.asarray(rng.standard_normal((4, 16)), jnp.float32),
            "b1": jnp.zeros(16, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((16, 2)) * 0.1, jnp.float32)}
  return train_state.TrainState.create(apply_fn=_apply, params=params, tx=_TX)


@jax.jit
def _train_step(state, batch):
  def loss(p):
    return jnp.mean((state.apply_fn(p, batch["x"]) - batch["y"]) ** 2)
  return state.apply_gradients(grads=jax.grad(loss)(state.params))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def test_an_orbax_run_resumes_bit_for_bit_with_flax_ckpt(ocp, grain, tmp_path):
  # the uninterrupted run
  ref, data = _init_state(), _data(grain)
  for _ in range(TOTAL):
    ref = _train_step(ref, next(data))

  # an Orbax job saving every EVERY steps (state and data iterator), killed after STOP
  root = tmp_path / "run"
  state, data = _init_state(), _data(grain)
  with _quiet(), ocp.CheckpointManager(root) as mngr:
    for step in range(1, STOP + 1):
      state = _train_step(state, next(data))
      if step % EVERY == 0:
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            dataset=grain.checkpoint.CheckpointSave(data)))
    mngr.wait_until_finished()
  del state, data

  # the same job after changing its import: resumes from the last Orbax step (6)
  template = _abstract(_init_state())
  data = _data(grain)
  with flax_ckpt.CheckpointManager(root, save_interval_steps=EVERY, max_to_keep=3) as mngr:
    start = mngr.latest_step()
    assert start == 6 and mngr.all_steps() == [3, 6]
    state = mngr.restore(abstract_state=template, dataset=data)
    assert type(state) is train_state.TrainState and int(state.step) == start
    for step in range(start + 1, TOTAL + 1):
      state = _train_step(state, next(data))
      mngr.save(step, state, dataset=data)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3, 6, 9]

  assert jax.tree.structure(state) == jax.tree.structure(ref)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
    _same_bits(got, want)  # params and the whole optimizer state

  # and once more from its own flax_ckpt step 9: the same final state again
  data = _data(grain)
  with flax_ckpt.CheckpointManager(root) as mngr:
    state = mngr.restore(abstract_state=template, dataset=data)
  assert int(state.step) == 9
  state = _train_step(state, next(data))
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
    _same_bits(got, want)
