"""Unchanged bytes are never written twice (``CheckpointManagerOptions.reuse_unchanged``).

A manager save compares each array chunk with the same chunk (leaf path, dtype, start,
shape) of the newest committed step by that step's recorded XXH3 block checksums; equal
chunks are not written: the step hard-links the earlier data file into its part directory
(``data.p<i>.r<k>.bin``) and the chunk record says so (``"f"``, marker version 3). These
tests save real checkpoints through the public API and look at the files on disk: what is
written and what is linked, that every kept step loads bit for bit and verifies after the
older ones are deleted, invalidation (shape, dtype, sharding, path), the space bound,
damaged or vanished previous steps, hostile ``"f"`` values, copies, a SIGKILL in the
middle of a reusing save, and two processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mp_launch import run_job
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.cli.main import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TMP_TAG = ".flax_ckpt-tmp-"
_OLD_TAG = ".flax_ckpt-old-"
_SLACK = 8192  # alignment padding a data file may carry beyond its chunks' bytes

# ----------------------------------------------------------------------------- helpers


def _mngr(directory, **kw):
  """A synchronous manager without fsync (fast), unless the test says otherwise."""
  kw.setdefault("enable_async", False)
  kw.setdefault("fsync", False)
  return flax_ckpt.CheckpointManager(directory, **kw)


def _step_dir(root, step):
  return os.path.join(os.fspath(root), str(step))


def _marker(step_dir):
  with open(os.path.join(step_dir, "_CHECKPOINT"), encoding="utf-8") as f:
    return json.load(f)


def _files(step_dir, part="state"):
  """``{name: os.stat_result}`` of the files of a part directory."""
  d = os.path.join(step_dir, part)
  return {n: os.stat(os.path.join(d, n)) for n in os.listdir(d)
          if os.path.isfile(os.path.join(d, n))}


def _rfiles(step_dir, part="state"):
  return sorted(n for n in _files(step_dir, part) if ".r" in n and n.endswith(".bin"))


def _data_size(step_dir, part="state", p=0):
  """Bytes of the part's own (newly written) data file; 0 when it has none."""
  st = _files(step_dir, part).get(f"data.p{p}.bin")
  return 0 if st is None else st.st_size


def _records(step_dir, part="state"):
  """``{'a/b/c': [chunk records of every process]}`` of a part."""
  d = os.path.join(step_dir, part)
  with open(os.path.join(d, "_TREE.json"), encoding="utf-8") as f:
    leaves = json.load(f)["leaves"]
  names = ["/".join(str(e[-1]) for e in leaf["path"]) for leaf in leaves]
  out = {n: [] for n in names}
  for fn in sorted(os.listdir(d)):
    if fn.startswith("_CHUNKS.p"):
      with open(os.path.join(d, fn), encoding="utf-8") as f:
        for k, recs in json.load(f)["chunks"].items():
          out[names[int(k)]].extend(recs)
  return out


def _linked(records):
  return [c for c in records if "f" in c]


def _assert_bitwise(got, want, where=""):
  """Same structure, and every array leaf has the same dtype, shape and bytes."""
  got_leaves, got_def = jax.tree.flatten_with_path(got)
  want_leaves, want_def = jax.tree.flatten_with_path(want)
  assert [k for k, _ in got_leaves] == [k for k, _ in want_leaves], where
  for (k, a), (_, b) in zip(got_leaves, want_leaves):
    name = f"{where}{jax.tree_util.keystr(k)}"
    if isinstance(b, (np.ndarray, jax.Array, np.generic)):
      a, b = np.asarray(a), np.asarray(b)
      assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape)
      assert a.tobytes() == b.tobytes(), f"{name}: bytes differ"
    else:
      assert a == b, (name, a, b)


def _verify_ok(step_dir):
  report = flax_ckpt.verify(step_dir)
  assert report, str(report)


def _rand(seed, shape, dtype=np.float32):
  rng = np.random.default_rng(seed)
  if np.dtype(dtype).kind in "iu":
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
  return rng.standard_normal(shape).astype(dtype)


_FROZEN_SHAPE = (128, 512)  # 256 KiB each, 9 of them; the head is one more (10%)
_FROZEN = {f"w{i}": _rand(100 + i, _FROZEN_SHAPE) for i in range(9)}


def _frozen_state(step):
  return {"frozen": _FROZEN, "head": _rand(step, _FROZEN_SHAPE)}


def _nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def _mesh(n=8, axes=("x",)):
  devs = np.array(jax.devices()[:n])
  return Mesh(devs.reshape(-1) if len(axes) == 1 else devs.reshape(2, n // 2), axes)


def _sharded(host, spec, mesh=None):
  return jax.device_put(host, NamedSharding(mesh or _mesh(), spec))


def _cli(capsys, *argv):
  rc = cli_main([os.fspath(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


# ------------------------------------------------------------------ 1. a frozen part


def test_frozen_part_is_linked_not_written(tmp_path):
  with _mngr(tmp_path, max_to_keep=10) as m:
    for s in range(4):
      m.save(s, _frozen_state(s))
    total = _nbytes(_frozen_state(0))
    head = _FROZEN_SHAPE[0] * _FROZEN_SHAPE[1] * 4
    first = _step_dir(tmp_path, 0)
    assert _rfiles(first) == [] and _marker(first)["version"] == 1
    assert _data_size(first) >= total
    for s in range(1, 4):
      sd = _step_dir(tmp_path, s)
      files = _files(sd)
      assert _data_size(sd) <= 0.12 * total + _SLACK, (s, _data_size(sd), total)
      assert _data_size(sd) >= head
      assert _rfiles(sd) == ["data.p0.r0.bin"], sorted(files)
      assert files["data.p0.r0.bin"].st_nlink >= 2
      # the reused file is the very inode of step 0's data file (the frozen bytes)
      assert files["data.p0.r0.bin"].st_ino == _files(first)["data.p0.bin"].st_ino
      assert _marker(sd)["version"] == 3
      recs = _records(sd)
      for i in range(9):
        (c,) = recs[f"frozen/w{i}"]
        assert c["f"] == "data.p0.r0.bin" and c["x"] and c["o"] % 64 == 0, c
      assert _linked(recs["head"]) == []
      _assert_bitwise(m.restore(s), _frozen_state(s), f"step {s}")
      _verify_ok(sd)
      assert m.verify(s)
      # a load without a template rebuilds the saved structure
      _assert_bitwise(flax_ckpt.load(sd, checkpointable_name="state"), _frozen_state(s))
      md = flax_ckpt.metadata(sd)
      assert md is not None


# ------------------------------------------------------------------ 2. retention


@pytest.mark.parametrize("keep", [1, 2])
def test_retention_never_breaks_a_kept_step(tmp_path, keep):
  with _mngr(tmp_path, max_to_keep=keep) as m:
    for s in range(6):
      m.save(s, _frozen_state(s))
      kept = m.all_steps()
      assert kept == list(range(max(0, s - keep + 1), s + 1)), kept
      assert sorted(int(e) for e in os.listdir(tmp_path) if e.isdigit()) == kept
      for k in kept:  # the steps they linked from are gone: each is still whole
        _assert_bitwise(m.restore(k), _frozen_state(k), f"step {k}")
        _verify_ok(_step_dir(tmp_path, k))
      if s:
        assert _rfiles(_step_dir(tmp_path, s)) == ["data.p0.r0.bin"]
    # the frozen bytes' inode has lived through every deletion: one link per kept step
    newest = _files(_step_dir(tmp_path, 5))["data.p0.r0.bin"]
    assert newest.st_nlink == keep


def test_explicit_delete_of_older_and_newer_steps(tmp_path):
  with _mngr(tmp_path, max_to_keep=None) as m:
    for s in range(5):
      m.save(s, _frozen_state(s))
    m.delete(0)  # the step whose data file all the others link
    m.delete(2)  # a step in the middle of the chain
    assert m.all_steps() == [1, 3, 4]
    for k in (1, 3, 4):
      _assert_bitwise(m.restore(k), _frozen_state(k), f"step {k}")
      _verify_ok(_step_dir(tmp_path, k))
    m.delete(4)  # the newest: the next save reuses step 3
    m.save(5, _frozen_state(5))
    assert _rfiles(_step_dir(tmp_path, 5)) == ["data.p0.r0.bin"]
    assert _data_size(_step_dir(tmp_path, 5)) <= 0.12 * _nbytes(_frozen_state(5)) + _SLACK
    for k in (1, 3, 5):
      _assert_bitwise(m.restore(k), _frozen_state(k), f"step {k}")
      _verify_ok(_step_dir(tmp_path, k))


# ------------------------------------------------------- 3. nothing / everything changed


def test_nothing_changed_writes_nothing_but_alignment(tmp_path):
  state = _frozen_state(0)
  with _mngr(tmp_path) as m:
    m.save(0, state)
    m.save(1, state)
    sd = _step_dir(tmp_path, 1)
    assert _data_size(sd) <= _SLACK, _data_size(sd)
    assert _rfiles(sd) == ["data.p0.r0.bin"] and _marker(sd)["version"] == 3
    assert all(_linked(r) == r for r in _records(sd).values())
    _assert_bitwise(m.restore(1), state)
    _verify_ok(sd)


def test_nothing_changed_after_a_change_links_two_files(tmp_path):
  """Step 1 links step 0's file (frozen) and writes the head; step 2 changes nothing, so
  it links both of step 1's files: r0 and r1, and writes nothing."""
  with _mngr(tmp_path) as m:
    m.save(0, _frozen_state(0))
    m.save(1, _frozen_state(1))
    m.save(2, _frozen_state(1))
    sd = _step_dir(tmp_path, 2)
    assert _rfiles(sd) == ["data.p0.r0.bin", "data.p0.r1.bin"]
    assert _data_size(sd) <= _SLACK
    s1 = _files(_step_dir(tmp_path, 1))
    inodes = {st.st_ino for n, st in _files(sd).items() if n in _rfiles(sd)}
    assert inodes == {s1["data.p0.bin"].st_ino, s1["data.p0.r0.bin"].st_ino}
    m.delete(0)
    m.delete(1)
    _assert_bitwise(m.restore(2), _frozen_state(1))
    _verify_ok(sd)


def test_everything_changed_writes_every_byte(tmp_path):
  def state(s):
    return {"frozen": {k: v + s for k, v in _FROZEN.items()}, "head": _rand(s, (64, 64))}

  with _mngr(tmp_path) as m:
    m.save(0, state(0))
    m.save(1, state(1))
    sd = _step_dir(tmp_path, 1)
    assert _rfiles(sd) == []
    assert _marker(sd)["version"] == 1
    assert _data_size(sd) >= _nbytes(state(1))
    assert all(_linked(r) == [] for r in _records(sd).values())
    _assert_bitwise(m.restore(1), state(1))
    _verify_ok(sd)


# ------------------------------------------------------------------ 4. invalidation

_V = _rand(7, (64, 256))  # the leaf that changes its identity (64 KiB; the rest is 2.25 MiB)


def _base(v):
  return {"keep": _FROZEN, "v": v}


_VARIANTS = {
    # name: (step 0 state, step 1 state, the leaf name in step 1 that must be written)
    "shape": (_base(_V), _base(_V.reshape(256, 64)), "v"),
    "shape_same_chunking": (_base(_V), _base(_V.reshape(64, 4, 64)), "v"),
    "dtype": (_base(_V), _base(_V.view(np.int32)), "v"),
    "dtype_same_itemsize_float": (_base(_V), _base(_V.view(np.uint32)), "v"),
    "renamed": (_base(_V), {"keep": _FROZEN, "v2": _V}, "v2"),
    "moved": (_base(_V), {"keep": _FROZEN, "sub": {"v": _V}}, "sub/v"),
    "swapped_names": ({"keep": _FROZEN, "a": _V, "b": _V[::-1].copy()},
                      {"keep": _FROZEN, "a": _V[::-1].copy(), "b": _V}, "a"),
}


@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_changed_leaf_identity_is_written(tmp_path, variant):
  before, after, changed = _VARIANTS[variant]
  with _mngr(tmp_path) as m:
    m.save(0, before)
    m.save(1, after)
    sd = _step_dir(tmp_path, 1)
    recs = _records(sd)
    assert recs[changed] and _linked(recs[changed]) == [], recs[changed]
    if variant == "swapped_names":
      assert _linked(recs["b"]) == []
    for i in range(9):  # the rest is still linked
      assert _linked(recs[f"keep/w{i}"]) == recs[f"keep/w{i}"]
    assert _data_size(sd) >= _V.nbytes
    _assert_bitwise(m.restore(1), after)
    _assert_bitwise(m.restore(0), before)
    _verify_ok(sd)


def _sharded_variants():
  mesh8, mesh24 = _mesh(), _mesh(8, ("x", "y"))
  v = _rand(8, (64, 256))
  return {
      "rows_to_cols": (P("x"), P(None, "x"), mesh8, mesh8),
      "replicated_to_sharded": (P(), P("x"), mesh8, mesh8),
      "sharded_to_replicated": (P("x"), P(), mesh8, mesh8),
      "1d_to_2d_mesh": (P("x"), P("x", "y"), mesh8, mesh24),
  }, v


@pytest.mark.parametrize("variant", ["rows_to_cols", "replicated_to_sharded",
                                     "sharded_to_replicated", "1d_to_2d_mesh"])
def test_changed_sharding_is_written(tmp_path, variant):
  variants, host = _sharded_variants()
  s0, s1, m0, m1 = variants[variant]
  before = {"keep": _FROZEN, "v": _sharded(host, s0, m0)}
  after = {"keep": _FROZEN, "v": _sharded(host, s1, m1)}
  with _mngr(tmp_path) as m:
    m.save(0, before)
    m.save(1, after)
    sd = _step_dir(tmp_path, 1)
    recs = _records(sd)
    assert recs["v"] and _linked(recs["v"]) == [], recs["v"]
    assert all(_linked(recs[f"keep/w{i}"]) for i in range(9))
    got = m.restore(1, {"keep": _FROZEN, "v": after["v"]})
    _assert_bitwise(got, after)
    assert got["v"].sharding.is_equivalent_to(after["v"].sharding, 2)
    _assert_bitwise(m.restore(0), before)
    _verify_ok(sd)


def test_unchanged_shards_are_reused_per_chunk(tmp_path):
  """A sharded leaf whose first shard changes: that chunk is written, the other 7 linked."""
  host = _rand(9, (256, 1024))  # 1 MiB, 8 row shards of 128 KiB
  changed = host.copy()
  changed[:32] += 1.0  # rows of shard 0 only
  before = {"keep": _FROZEN, "v": _sharded(host, P("x"))}
  after = {"keep": _FROZEN, "v": _sharded(changed, P("x"))}
  with _mngr(tmp_path) as m:
    m.save(0, before)
    m.save(1, after)
    sd = _step_dir(tmp_path, 1)
    recs = _records(sd)["v"]
    assert len(recs) == 8
    written = [c for c in recs if "f" not in c]
    assert [c["s"] for c in written] == [[0, 0]], recs
    assert _data_size(sd) <= host.nbytes / 8 + _SLACK
    got = m.restore(1, {"keep": _FROZEN, "v": after["v"]})
    _assert_bitwise(got, {"keep": _FROZEN, "v": changed})
    _verify_ok(sd)


# ------------------------------------------------------------------ 5. a TrainState


def _train_setup():
  rng = np.random.default_rng(5)
  params = {"backbone": {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal((128, 128)),
                                                           jnp.float32),
                                   "bias": jnp.zeros((128,), jnp.float32)} for i in range(6)},
            "head": {"kernel": jnp.asarray(rng.standard_normal((128, 8)), jnp.float32)}}
  labels = {"backbone": jax.tree.map(lambda _: "frozen", params["backbone"]),
            "head": jax.tree.map(lambda _: "train", params["head"])}
  # frozen: adamw's moments are kept (and stay zero: no gradient reaches the backbone),
  # and its updates are zeroed
  tx = optax.multi_transform(
      {"train": optax.adamw(1e-2),
       "frozen": optax.chain(optax.adamw(1e-2), optax.set_to_zero())}, labels)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  x = jnp.asarray(rng.standard_normal((16, 128)), jnp.float32)

  def loss(p):
    h = x
    for i in range(6):
      layer = jax.lax.stop_gradient(p["backbone"][f"l{i}"])
      h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
    return jnp.mean((h @ p["head"]["kernel"]) ** 2)

  @jax.jit
  def step(s):
    return s.apply_gradients(grads=jax.grad(loss)(s.params))

  return state, step


def test_train_state_reuses_frozen_params_and_moments(tmp_path):
  state, step = _train_setup()
  saved = {}
  with _mngr(tmp_path, max_to_keep=2) as m:
    for s in range(3):
      state = step(state)
      saved[s] = state
      m.save(s, state)
    sd = _step_dir(tmp_path, 2)
    assert sorted(_marker(sd)["checkpointables"]) == ["extra", "opt_state", "params"]
    assert _marker(sd)["version"] == 3
    params = _records(sd, "params")
    for name, recs in params.items():
      if name.startswith("backbone/"):
        assert _linked(recs) == recs, name
      else:
        assert _linked(recs) == [], name
    assert _rfiles(sd, "params") == ["data.p0.r0.bin"]
    opt = _records(sd, "opt_state")
    frozen_moments = [n for n in opt if "backbone" in n]
    assert len(frozen_moments) == 2 * 12, sorted(opt)  # mu and nu of 12 frozen arrays
    for name in frozen_moments:
      assert _linked(opt[name]) == opt[name], name
    for name in opt:
      if "head" in name:
        assert _linked(opt[name]) == [], name
    for s in (1, 2):
      got = m.restore(s, saved[s])
      assert isinstance(got, train_state.TrainState)
      _assert_bitwise(got.params, saved[s].params, f"step {s} params")
      _assert_bitwise(got.opt_state, saved[s].opt_state, f"step {s} opt_state")
      assert int(got.step) == int(saved[s].step)
      _verify_ok(_step_dir(tmp_path, s))
    params_only = m.restore(2, only="params")
    _assert_bitwise(params_only, flax.core.unfreeze(saved[2].params))


# ------------------------------------------------------ 6. async, numpy, narrow dtypes


def _mixed(s):
  return {"jax": jnp.asarray(_FROZEN["w0"]),
          "np": _FROZEN["w1"],
          "bf16": jnp.asarray(_FROZEN["w2"], jnp.bfloat16),
          "i8": _rand(3, (256, 512), np.int8),
          "u16": _rand(4, (128, 512), np.uint16),
          "changes": np.full((16, 16), s, np.float32),
          "step": s}


@pytest.mark.parametrize("enable_async", [True, False])
def test_async_and_blocking_saves_reuse_every_array_kind(tmp_path, enable_async):
  with _mngr(tmp_path, enable_async=enable_async) as m:
    for s in range(3):
      m.save(s, _mixed(s))
    m.wait_until_finished()
    for s in (1, 2):
      sd = _step_dir(tmp_path, s)
      recs = _records(sd)
      for name in ("jax", "np", "bf16", "i8", "u16"):
        assert recs[name] and _linked(recs[name]) == recs[name], (s, name)
      assert _linked(recs["changes"]) == []
      assert _data_size(sd) <= 1024 + _SLACK
      assert _marker(sd)["version"] == 3
      got = m.restore(s)
      _assert_bitwise(got, _mixed(s), f"step {s}")
      assert isinstance(got["np"], np.ndarray) and isinstance(got["jax"], jax.Array)
      assert got["bf16"].dtype == jnp.bfloat16
      _verify_ok(sd)


_A = _rand(1, (256, 512))

_LAYOUTS = {
    # name: (step 0 leaf, step 1 leaf): the same values in another memory layout
    "fortran_both": (np.asfortranarray(_A), np.asfortranarray(_A)),
    "c_then_fortran": (_A, np.asfortranarray(_A)),
    "transposed_view": (_A.T.copy(), _A.T),
    "strided_view": (_A[:, ::2].copy(), _A[:, ::2]),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_memory_layout_of_a_numpy_leaf_does_not_matter(tmp_path, layout):
  """Identity is the logical bytes (C order): a Fortran-ordered array or a strided view of
  the same values is reused, and loads as those values."""
  a0, a1 = _LAYOUTS[layout]
  with _mngr(tmp_path) as m:
    m.save(0, {"keep": _FROZEN, "a": a0})
    m.save(1, {"keep": _FROZEN, "a": a1})
    sd = _step_dir(tmp_path, 1)
    recs = _records(sd)["a"]
    assert _linked(recs) == recs
    _assert_bitwise(m.restore(1), {"keep": _FROZEN, "a": np.ascontiguousarray(a1)})
    _verify_ok(sd)


def test_scalars_and_empty_arrays_beside_reused_ones(tmp_path):
  def state():
    return {"keep": _FROZEN, "np0d": np.array(5.0), "jax0d": jnp.float32(2.0),
            "empty": np.zeros((0, 4), np.float32), "npscalar": np.float32(3.0),
            "pyint": 7}

  with _mngr(tmp_path) as m:
    m.save(0, state())
    m.save(1, state())
    sd = _step_dir(tmp_path, 1)
    recs = _records(sd)
    assert _linked(recs["np0d"]) == recs["np0d"] and _linked(recs["jax0d"]) == recs["jax0d"]
    assert _linked(recs["empty"]) == []  # no bytes: nothing to link
    _assert_bitwise(m.restore(1), state())
    _verify_ok(sd)


@pytest.mark.parametrize("case", ["equal_then_mutated", "changed_then_mutated_back"])
def test_async_save_reuses_the_values_at_save_time(tmp_path, case):
  """An async save snapshots: mutating the numpy leaf right after save() returns changes
  neither what is compared with the previous step nor what is written."""
  orig = _rand(30, (256, 512))
  leaf = orig.copy() if case == "equal_then_mutated" else orig + 5
  at_save = leaf.copy()
  with _mngr(tmp_path, enable_async=True) as m:
    m.save(0, {"keep": _FROZEN, "b": orig})
    m.wait_until_finished()
    m.save(1, {"keep": _FROZEN, "b": leaf})
    if case == "equal_then_mutated":
      leaf += 1.0
    else:
      leaf[...] = orig
    m.wait_until_finished()
    recs = _records(_step_dir(tmp_path, 1))["b"]
    assert bool(_linked(recs)) == (case == "equal_then_mutated"), recs
    _assert_bitwise(m.restore(1), {"keep": _FROZEN, "b": at_save})
    _verify_ok(_step_dir(tmp_path, 1))


# ------------------------------------------------------------------ 7. option off


def test_reuse_unchanged_false_writes_every_byte(tmp_path):
  state = _frozen_state(0)
  opts = flax_ckpt.CheckpointManagerOptions(reuse_unchanged=False, enable_async=False,
                                            fsync=False)
  with flax_ckpt.CheckpointManager(tmp_path, options=opts) as m:
    m.save(0, state)
    m.save(1, state)
    sd = _step_dir(tmp_path, 1)
    assert _rfiles(sd) == [] and _marker(sd)["version"] == 1
    assert _data_size(sd) >= _nbytes(state)
    assert _files(sd)["data.p0.bin"].st_nlink == 1
    assert all(_linked(r) == [] for r in _records(sd).values())
    _assert_bitwise(m.restore(1), state)
    _verify_ok(sd)


# ------------------------------------------------------------------ 8. space bound


def test_space_bound_a_mostly_dead_file_is_not_kept(tmp_path):
  small = _rand(11, (64, 128))  # 32 KiB that stay, next to 2.25 MiB that change

  def state(s):
    return {"big": {k: v + s for k, v in _FROZEN.items()}, "small": small}

  with _mngr(tmp_path) as m:
    m.save(0, state(0))
    m.save(1, state(1))
    sd = _step_dir(tmp_path, 1)
    assert _rfiles(sd) == [] and _marker(sd)["version"] == 1
    assert _data_size(sd) >= _nbytes(state(1))
    recs = _records(sd)
    assert all(_linked(r) == [] for r in recs.values())
    assert all("x" in c for r in recs.values() for c in r)  # written: checksummed anew
    m.delete(0)
    _assert_bitwise(m.restore(1), state(1))
    _verify_ok(sd)


@pytest.mark.parametrize("late", ["a", "z"])
def test_space_bound_drops_one_link_and_keeps_another(tmp_path, late):
  """Step 1 links step 0's file (F: 9 of 10 units) and writes ``late`` (1 unit). Step 2
  keeps one F leaf and ``late``: step 1's r-file would be referred to for 1/10 of its size
  (dropped, that chunk written), its own data file whole (kept). ``late`` is named to be
  looked at before or after the dropped file."""
  a0, a1 = _rand(20, _FROZEN_SHAPE), _rand(21, _FROZEN_SHAPE)
  s0 = {"f": _FROZEN, late: a0}
  s1 = {"f": _FROZEN, late: a1}
  s2 = {"f": {k: (v if k == "w0" else v + 2) for k, v in _FROZEN.items()}, late: a1}
  with _mngr(tmp_path) as m:
    m.save(0, s0)
    m.save(1, s1)
    m.save(2, s2)
    sd = _step_dir(tmp_path, 2)
    (r,) = _rfiles(sd)
    assert _files(sd)[r].st_ino == _files(_step_dir(tmp_path, 1))["data.p0.bin"].st_ino
    recs = _records(sd)
    assert [c["f"] for c in recs[late]] == [r]
    assert all(_linked(recs[f"f/w{i}"]) == [] for i in range(9))
    assert _data_size(sd) >= 9 * a0.nbytes
    assert _marker(sd)["version"] == 3
    m.delete(0)
    m.delete(1)
    _assert_bitwise(m.restore(2), s2)
    _verify_ok(sd)


# ------------------------------------------------- 9. previous step vanished or damaged


def test_previous_step_removed_from_outside(tmp_path):
  with _mngr(tmp_path) as m:
    m.save(0, _frozen_state(0))
    shutil.rmtree(_step_dir(tmp_path, 0))
    m.save(1, _frozen_state(1))
    sd = _step_dir(tmp_path, 1)
    assert _rfiles(sd) == [] and _marker(sd)["version"] == 1
    assert _data_size(sd) >= _nbytes(_frozen_state(1))
    _assert_bitwise(m.restore(1), _frozen_state(1))
    _verify_ok(sd)
  with _mngr(tmp_path) as m:  # a new manager lists what is there and reuses from it
    assert m.all_steps() == [1]
    m.save(2, _frozen_state(2))
    assert _rfiles(_step_dir(tmp_path, 2)) == ["data.p0.r0.bin"]
    _assert_bitwise(m.restore(2), _frozen_state(2))


def test_previous_step_deleted_by_another_manager_between_saves(tmp_path):
  with _mngr(tmp_path) as m:
    m.save(0, _frozen_state(0))
    m.save(1, _frozen_state(1))
  with _mngr(tmp_path) as m:
    m.delete(1)  # the newest step: the next save reuses step 0
    m.save(2, _frozen_state(2))
    sd = _step_dir(tmp_path, 2)
    assert _rfiles(sd) == ["data.p0.r0.bin"]
    assert _files(sd)["data.p0.r0.bin"].st_ino == _files(
        _step_dir(tmp_path, 0))["data.p0.bin"].st_ino
    _assert_bitwise(m.restore(2), _frozen_state(2))
    _verify_ok(sd)


def _flip(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)
    f.seek(offset)
    f.write(bytes([b[0] ^ 0x20]))


def _damage_chunks_json(sd):
  path = os.path.join(sd, "state", "_CHUNKS.p0.json")
  with open(path, "rb") as f:
    raw = f.read()
  _flip(path, raw.index(b'"o"') + 1)  # "o" -> "O": the record loses its offset


def _truncate_data(sd):
  path = os.path.join(sd, "state", "data.p0.bin")
  os.truncate(path, os.path.getsize(path) // 2)


def _flip_data(sd):
  _flip(os.path.join(sd, "state", "data.p0.bin"), 100)


@pytest.mark.parametrize("damage", [
    pytest.param(_damage_chunks_json, id="chunks_json_byte_flipped"),
    pytest.param(_truncate_data, id="data_file_truncated"),
])
def test_damaged_previous_step_still_gives_a_correct_new_step(tmp_path, damage):
  with _mngr(tmp_path) as m:
    m.save(0, _frozen_state(0))
    damage(_step_dir(tmp_path, 0))
    m.save(1, _frozen_state(1))
    sd = _step_dir(tmp_path, 1)
    _verify_ok(sd)
    _assert_bitwise(m.restore(1), _frozen_state(1))
    _assert_bitwise(flax_ckpt.load(sd, checkpointable_name="state"), _frozen_state(1))


def test_bit_rot_in_a_shared_file_is_detected_in_every_step_sharing_it(tmp_path):
  """Documented trade-off (docs/format.md, "Reused bytes"): steps that share a file share
  its damage. A flipped byte of the shared file is never loaded as wrong values: every
  step referring to it raises CorruptCheckpointError and verify() names the file."""
  with _mngr(tmp_path) as m:
    m.save(0, _frozen_state(0))
    _flip_data(_step_dir(tmp_path, 0))  # before the next save links it
    m.save(1, _frozen_state(1))
    for step in (0, 1):
      with pytest.raises(flax_ckpt.CorruptCheckpointError):
        m.restore(step)
      report = m.verify(step)
      assert not report
      assert any("data.p0" in str(p.file) for p in report.problems)


# ------------------------------------------------------------------ 10. hostile "f"


def _reseal(ckpt):
  """Recomputes the commit marker's file checksums after crafting (as tests/_crafting.py
  ``reseal`` does, leaving out reused data files too: data files are never in it)."""
  import re

  import xxhash
  data = re.compile(r"data\.p\d+(\.r\d+)?\.bin(\.\d+)?")
  marker = os.path.join(ckpt, "_CHECKPOINT")
  with open(marker, "rb") as f:
    manifest = json.load(f)
  files = {}
  for d, _, names in os.walk(ckpt):
    for n in names:
      rel = os.path.relpath(os.path.join(d, n), ckpt).replace(os.sep, "/")
      if rel == "_CHECKPOINT" or data.fullmatch(n):
        continue
      with open(os.path.join(d, n), "rb") as f:
        files[rel] = xxhash.xxh3_64_hexdigest(f.read())
  manifest["checksums"]["files"] = files
  with open(marker, "w") as f:
    json.dump(manifest, f)


@pytest.fixture
def reused_step(tmp_path):
  """Step 1 of a manager directory, whose frozen chunks are in data.p0.r0.bin."""
  root = tmp_path / "run"
  with _mngr(root) as m:
    m.save(0, _frozen_state(0))
    m.save(1, _frozen_state(1))
  sd = _step_dir(root, 1)
  assert _rfiles(sd) == ["data.p0.r0.bin"]
  (tmp_path / "outside").write_bytes(b"\0" * (4 << 20))
  return sd


def _set_f(sd, value):
  path = os.path.join(sd, "state", "_CHUNKS.p0.json")
  with open(path, encoding="utf-8") as f:
    doc = json.load(f)
  rec = doc["chunks"]["0"][0]
  assert rec["f"] == "data.p0.r0.bin"
  rec["f"] = value
  with open(path, "w", encoding="utf-8") as f:
    json.dump(doc, f)
  _reseal(sd)


_HOSTILE = {
    "dotdot": "../x",
    "dotdot_outside": "../../outside",
    "through_data_file": "data.p0.bin/../../etc",
    "absolute": "/etc/passwd",
    "r_file_dotdot": "../../0/state/data.p0.bin",
    "own_data_file": "data.p0.bin",
    "chunks_file": "_CHUNKS.p0.json",
    "suffix": "data.p0.r0.bin.0",
    "empty": "",
    "int": 3,
    "list": ["data.p0.r0.bin"],
    "null_byte": "data.p0.r0.bin\0",
    "newline": "data.p0.r0.bin\n",
}


def test_crafting_reaches_the_f_validation(reused_step):
  """The control: an edit that keeps 'f' valid loads (so the reseal is right)."""
  _set_f(reused_step, "data.p0.r0.bin")
  _assert_bitwise(flax_ckpt.load(reused_step, checkpointable_name="state"), _frozen_state(1))


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_hostile_f_is_a_format_error(reused_step, name):
  _set_f(reused_step, _HOSTILE[name])
  with pytest.raises(flax_ckpt.FormatError) as e:
    flax_ckpt.load(reused_step, checkpointable_name="state")
  # the chunk record check ('f'), not the marker's checksums nor a failed read
  assert not isinstance(e.value, flax_ckpt.CorruptCheckpointError), e.value
  assert "chunk records are malformed" in str(e.value), e.value
  assert not flax_ckpt.verify(reused_step)


def test_f_naming_a_missing_reused_file_is_missing_data(reused_step):
  _set_f(reused_step, "data.p0.r7.bin")
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as e:
    flax_ckpt.load(reused_step, checkpointable_name="state")
  assert isinstance(e.value, FileNotFoundError), type(e.value)
  assert "data.p0.r7.bin" in str(e.value)
  assert not flax_ckpt.verify(reused_step)


def test_reused_file_replaced_by_a_symlink_out_of_the_checkpoint(reused_step, tmp_path):
  r = os.path.join(reused_step, "state", "data.p0.r0.bin")
  outside = tmp_path / "outside_copy"
  shutil.copyfile(r, outside)
  os.unlink(r)
  os.symlink(outside, r)
  with pytest.raises(flax_ckpt.FormatError, match="symlink"):
    flax_ckpt.load(reused_step, checkpointable_name="state")


# ------------------------------------------------------------------ 11. copies


def test_cli_cp_local_of_a_reusing_step(capsys, tmp_path):
  root = tmp_path / "run"
  with _mngr(root) as m:
    for s in range(3):
      m.save(s, _frozen_state(s))
  src = _step_dir(root, 2)
  dst = tmp_path / "copy" / "2"
  rc, _, err = _cli(capsys, "cp", src, dst)
  assert rc == 0, err
  _verify_ok(dst)
  _assert_bitwise(flax_ckpt.load(dst, checkpointable_name="state"), _frozen_state(2))
  # the copy is self-contained: removing the whole run leaves it whole
  shutil.rmtree(root)
  _verify_ok(dst)
  _assert_bitwise(flax_ckpt.load(dst, checkpointable_name="state"), _frozen_state(2))


def test_cli_cp_local_of_a_step_that_wrote_nothing(capsys, tmp_path):
  """A step that reused everything has no data.p0.bin of its own."""
  root = tmp_path / "run"
  with _mngr(root) as m:
    m.save(0, _frozen_state(0))
    m.save(1, _frozen_state(0))
  dst = tmp_path / "copy"
  rc, _, err = _cli(capsys, "cp", _step_dir(root, 1), dst)
  assert rc == 0, err
  _verify_ok(dst)
  _assert_bitwise(flax_ckpt.load(dst, checkpointable_name="state"), _frozen_state(0))



@pytest.mark.slow
@pytest.mark.parametrize("nothing_written", [
    pytest.param(False, id="data_and_reused_file"),
    pytest.param(True, id="reused_files_only"),
])
def test_cli_cp_to_s3_and_back(capsys, tmp_path, s3_root, nothing_written):
  root = tmp_path / "run"
  with _mngr(root) as m:
    m.save(0, _frozen_state(0))
    m.save(1, _frozen_state(0 if nothing_written else 1))
  want = _frozen_state(0 if nothing_written else 1)
  remote = f"{s3_root}/run/1"
  rc, _, err = _cli(capsys, "cp", _step_dir(root, 1), remote)
  assert rc == 0, err
  _assert_bitwise(flax_ckpt.load(remote, checkpointable_name="state"), want)
  _verify_ok(remote)
  back = tmp_path / "back"
  rc, _, err = _cli(capsys, "cp", remote, back)
  assert rc == 0, err
  _assert_bitwise(flax_ckpt.load(back, checkpointable_name="state"), want)
  _verify_ok(back)


@pytest.mark.slow
def test_manager_on_s3_writes_every_byte(s3_root):
  """Object stores have no hard links: every save writes all its bytes."""
  with _mngr(s3_root) as m:
    m.save(0, _frozen_state(0))
    m.save(1, _frozen_state(1))
    for s in (0, 1):
      _assert_bitwise(m.restore(s), _frozen_state(s))
      assert m.verify(s)


# ------------------------------------------------------------------ 12. crash safety

_CHILD = r"""
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np
import flax_ckpt

root = sys.argv[1]
def frozen():
  return {f"w{i}": np.random.default_rng(100 + i).standard_normal((512, 512)).astype(
      np.float32) for i in range(8)}
F = frozen()
def state(s):
  return {"frozen": F, "head": np.full((512, 512), s, np.float32)}
with flax_ckpt.CheckpointManager(root, enable_async=True, fsync=True, max_to_keep=3) as m:
  start = (m.latest_step() or 0) + 1
  for s in range(start, 10**6):
    m.save(s, state(s))
    print("started", s, flush=True)
"""


def _crash_state(s):
  f = {f"w{i}": np.random.default_rng(100 + i).standard_normal((512, 512)).astype(np.float32)
       for i in range(8)}
  return {"frozen": f, "head": np.full((512, 512), s, np.float32)}


@pytest.mark.slow
def test_sigkill_during_a_reusing_save_leaves_committed_steps_whole(tmp_path):
  root = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([os.fspath(ROOT), env.get("PYTHONPATH", "")])
  want = {}
  for kill_after, delay in ((2, 0.0), (4, 0.003)):
    proc = subprocess.Popen([sys.executable, "-W", "error", "-c", _CHILD, os.fspath(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
      seen = 0
      while seen < kill_after:
        line = proc.stdout.readline()
        assert line, f"child ended (rc={proc.wait()}): {proc.stderr.read()[-3000:]}"
        seen += 1
      time.sleep(delay)  # in the middle of the save in flight (async, reusing)
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      proc.stdout.close()
      proc.stderr.close()
    with flax_ckpt.CheckpointManager(root, read_only=True) as ro:
      steps = ro.all_steps()
      assert steps, steps
      for s in steps:
        assert not any(_TMP_TAG in e for e in os.listdir(_step_dir(root, s)))
        want.setdefault(s, _crash_state(s))
        _assert_bitwise(ro.restore(s), want[s], f"step {s}")
        _verify_ok(_step_dir(root, s))
      listed = [e for e in os.listdir(root) if e.isdigit()]
      assert sorted(int(e) for e in listed) == steps
  # a new writer cleans the dead one's leftovers and reuses the newest committed step
  with _mngr(root, max_to_keep=3) as m:
    assert not [e for e in os.listdir(root) if _TMP_TAG in e or _OLD_TAG in e]
    nxt = m.latest_step() + 1
    m.save(nxt, _crash_state(nxt))
    sd = _step_dir(root, nxt)
    assert _rfiles(sd) == ["data.p0.r0.bin"]
    _assert_bitwise(m.restore(nxt), _crash_state(nxt))
    _verify_ok(sd)


# ------------------------------------------------------------------ 13. two processes

_MP_WORKER = pathlib.Path(__file__).resolve().parent / "_reuse_mp_worker.py"


@pytest.mark.slow
def test_two_processes_reuse_their_own_shards(tmp_path):
  root = tmp_path / "run"
  pythonpath = os.pathsep.join([os.fspath(ROOT), os.environ.get("PYTHONPATH", "")])
  for rc, r, out in run_job(lambda i, port: [sys.executable, "-W", "error",
                                             os.fspath(_MP_WORKER), str(port), str(i),
                                             os.fspath(root)],
                            2, timeout=150, extra_env={"PYTHONPATH": pythonpath}):
    assert rc == 0 and r == "ok", out
  sd = _step_dir(root, 2)
  assert _marker(sd)["version"] == 3
  part = os.path.join(sd, "state")
  for i in (0, 1):
    with open(os.path.join(part, f"_CHUNKS.p{i}.json"), encoding="utf-8") as f:
      recs = [c for cs in json.load(f)["chunks"].values() for c in cs]
    linked = [c for c in recs if "f" in c]
    assert linked, (i, recs)
    assert all(c["f"].startswith(f"data.p{i}.r") for c in linked), linked
    assert os.path.exists(os.path.join(part, f"data.p{i}.r0.bin"))
  _verify_ok(sd)
  # this (single-process) side loads what the two wrote, bit for bit
  got = flax_ckpt.load(sd, checkpointable_name="state")
  with open(os.path.join(root, "expected.json"), encoding="utf-8") as f:
    seeds = json.load(f)
  for name, seed in seeds.items():
    a = np.asarray(got[name])
    want = _rand(seed["seed"], tuple(seed["shape"]))
    assert a.tobytes() == want.tobytes(), name


# ------------------------------------------------------- identity of jax arrays vs bytes


@pytest.mark.parametrize("same_objects", [True, False], ids=["same_jax_arrays", "equal_copies"])
def test_jax_leaves_reused_by_identity_and_by_bytes(tmp_path, same_objects):
  """The same (immutable) jax.Array objects are reused without hashing; new objects with
  equal bytes (what a jitted train step returns for frozen weights) by their checksums."""
  frozen = {k: jnp.asarray(v) for k, v in _FROZEN.items()}
  with _mngr(tmp_path) as m:
    for step in range(3):
      base = frozen if same_objects else {k: v + 0 for k, v in frozen.items()}
      state = {"frozen": base, "head": jnp.asarray(_rand(step, _FROZEN_SHAPE))}
      m.save(step, state)
      if step:
        recs = _records(_step_dir(tmp_path, step))
        assert all(_linked(recs[f"frozen/{k}"]) for k in _FROZEN), step
        assert not _linked(recs["head"])
      _assert_bitwise(m.restore(step), state)


def test_numpy_leaf_changed_in_place_is_written(tmp_path):
  """numpy arrays are mutable: the same object with new bytes is written again."""
  arr = _rand(7, _FROZEN_SHAPE)
  with _mngr(tmp_path) as m:
    m.save(0, {"a": arr, "b": _FROZEN["w0"]})
    arr[0, 0] += 1.0
    m.save(1, {"a": arr, "b": _FROZEN["w0"]})
    recs = _records(_step_dir(tmp_path, 1))
    assert not _linked(recs["a"]) and _linked(recs["b"])
    _assert_bitwise(m.restore(1), {"a": arr, "b": _FROZEN["w0"]})
