"""Real multi-process jobs (jax.distributed on 127.0.0.1, CPU devices): sharded saves by
several processes, loads into other process counts and meshes, and failures mid-save."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from _mp_launch import run_job
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt

pytestmark = pytest.mark.slow  # subprocesses; `-m 'not slow'` skips them

WORKER = os.path.join(os.path.dirname(__file__), "_mp_worker.py")


def _run_job(nproc, ndev, scenario, path, mesh, spec, timeout=120):
  """Runs one job; returns each process's (returncode, RESULT dict, output tail)."""
  return run_job(lambda i, port: [sys.executable, WORKER, str(port), str(nproc), str(i),
                                  str(ndev), scenario, str(path), mesh, spec],
                 nproc, timeout=timeout)


@pytest.fixture(scope="module")
def saved_by_two(tmp_path_factory):
  """A checkpoint saved by 2 processes x 4 devices, w sharded P('x', 'y') on a 2x4 mesh."""
  path = tmp_path_factory.mktemp("mp") / "ckpt"
  res = _run_job(2, 4, "save", path, "2x4", "x,y")
  for rc, r, out in res:
    assert rc == 0 and r and r["saved"], out
  return path


def _host():
  rng = np.random.default_rng(0)
  return (rng.standard_normal((64, 1024)).astype(np.float32),
          rng.integers(-1000, 1000, (32, 16)).astype(np.int32))


def test_each_process_writes_its_own_shards(saved_by_two):
  state = saved_by_two / "state"
  assert sorted(p.name for p in state.iterdir() if p.name.startswith("_CHUNKS")) == [
      "_CHUNKS.p0.json", "_CHUNKS.p1.json"]
  chunks = {}
  for i in (0, 1):
    for leaf, cs in json.loads((state / f"_CHUNKS.p{i}.json").read_text())["chunks"].items():
      for c in cs:
        assert c["p"] == i
        chunks.setdefault(leaf, []).append((tuple(c["s"]), tuple(c["h"])))
  md = flax_ckpt.metadata(saved_by_two)
  w_id = [k for k, v in chunks.items() if len(v) == 8]
  assert len(w_id) == 1  # w: 8 distinct shards, each written exactly once
  assert sorted(chunks[w_id[0]]) == [((r, c), (32, 256)) for r in (0, 32)
                                     for c in (0, 256, 512, 768)]
  assert md["w"].sharding == {"type": "NamedSharding", "mesh_shape": [2, 4],
                              "axis_names": ["x", "y"], "spec": ["x", "y"]}
  assert flax_ckpt.load(saved_by_two)["step"] == 7


def test_load_in_one_process_on_another_mesh(saved_by_two):
  w, b = _host()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
  target = NamedSharding(mesh, P(None, "y"))
  out = flax_ckpt.load(saved_by_two, {"w": jax.ShapeDtypeStruct(w.shape, w.dtype,
                                                                sharding=target)},
                       partial=True)
  assert out["w"].sharding == target
  np.testing.assert_array_equal(np.asarray(out["w"]), w)
  plain = flax_ckpt.load(saved_by_two)  # no template: single-device arrays, any topology
  np.testing.assert_array_equal(np.asarray(plain["b"]), b)
  assert isinstance(plain["w"], jax.Array) and len(plain["w"].devices()) == 1
  host = flax_ckpt.load(saved_by_two, restore_type=np.ndarray)  # or numpy, when asked
  assert type(host["w"]) is np.ndarray
  np.testing.assert_array_equal(host["w"], w)


def test_load_with_four_processes_reads_only_their_share(saved_by_two):
  res = _run_job(4, 2, "load", saved_by_two, "2x4", "-,y")
  for rc, r, out in res:
    assert rc == 0 and r, out
    # this process's columns of w (once, not once per device) plus the replicated b
    assert r["read"] <= r["share_w"] + r["b_bytes"] + 4096, (r, out)
    assert r["share_w"] == 64 * 1024 * 4 // 2  # 2 of the 4 column blocks, not all of w


def test_async_save_by_two_processes(tmp_path):
  path = tmp_path / "ckpt"
  for rc, r, out in _run_job(2, 2, "save_async", path, "2x2", "y,x"):
    assert rc == 0 and r and r["saved"], out
  w, b = _host()
  out = flax_ckpt.load(path)
  np.testing.assert_array_equal(np.asarray(out["w"]), w)
  np.testing.assert_array_equal(np.asarray(out["b"]), b)
  assert flax_ckpt.metadata(path)["w"].sharding["spec"] == ["y", "x"]


def test_overwrite_by_two_processes(tmp_path):
  path = tmp_path / "ckpt"
  for rc, r, out in _run_job(2, 2, "overwrite", path, "2x2", "x,y"):
    assert rc == 0 and r and r["saved"], out
  w, _ = _host()
  out = flax_ckpt.load(path)
  assert out["step"] == 8
  np.testing.assert_array_equal(np.asarray(out["w"]), w)
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or old dirs left


def test_a_save_failing_in_one_process_does_not_pair_up_the_next(tmp_path):
  res = _run_job(2, 2, "desync", tmp_path, "2x2", "x,y", timeout=90)
  for rc, r, out in res:
    assert rc == 0 and r, out
  assert res[0][1]["errors"] == ["CheckpointError"]  # timed out waiting for process 1
  assert res[1][1]["errors"] == ["TypeError"]  # its own bad custom_metadata
  assert not (tmp_path / "d0").exists()
  w, b = _host()
  out = flax_ckpt.load(tmp_path / "d1")
  np.testing.assert_array_equal(np.asarray(out["w"]), w)
  np.testing.assert_array_equal(np.asarray(out["b"]), b)


def test_arrays_on_one_process_and_sharded_keys(tmp_path):
  for rc, r, out in _run_job(2, 2, "submesh", tmp_path / "ckpt", "2x2", "x,y"):
    assert rc == 0 and r and r["ok"], out
  _, b = _host()
  np.testing.assert_array_equal(np.asarray(flax_ckpt.load(tmp_path / "ckpt")["on1"]), b)


@pytest.mark.parametrize("scenario", ["die", "raise"])
def test_failed_process_mid_save_commits_nothing(tmp_path, scenario):
  path = tmp_path / "ckpt"
  res = _run_job(2, 2, scenario, path, "2x2", "x,y", timeout=90)
  rc0, r0, out0 = res[0]
  assert rc0 == 0 and r0, out0
  assert r0["raised"] == "CheckpointError", out0
  assert r0["seconds"] < 40 and not r0["exists"], r0
  assert not path.exists()
  assert not [p for p in tmp_path.iterdir() if "flax_ckpt-tmp" in p.name]


def test_each_process_restores_its_own_iterator_state(tmp_path):
  pytest.importorskip("grain")
  path = tmp_path / "ckpt"
  res = _run_job(2, 2, "stateful", path, "2x2", "x,y")
  for rc, r, out in res:
    assert rc == 0 and r, out
  (_, r0, _), (_, r1, _) = res
  for r in (r0, r1):
    assert r["restored"] == r["following"]  # resumes exactly where this process saved
    assert r["files"] == ["process_0-of-2.json", "process_1-of-2.json"]
  assert r0["following"] != r1["following"]
  # process_mapping={0: 1, 1: 0}: each process got the other's saved state
  assert r0["swapped"] == {"next_index": 8} and r1["swapped"] == {"next_index": 5}
  md = flax_ckpt.metadata(path)
  assert md.checkpointables["dataset"]["kind"] == "stateful"
  assert md.checkpointables["dataset"]["process_count"] == 2
  with pytest.raises(flax_ckpt.StructureMismatchError, match="saved by 2 processes"):
    flax_ckpt.load_checkpointables(path, {"dataset": None})  # this test is one process


def test_manager_in_a_two_process_job(tmp_path):
  """Periodic async saves, retention by process 0 only, restore onto another layout."""
  path = tmp_path / "run"
  res = _run_job(2, 2, "manager", path, "2x2", "x,y")
  for rc, r, out in res:
    assert rc == 0 and r, out
    assert r["saved"] == [0, 2, 4, 6]
    assert r["steps"] == [4, 6] and r["latest"] == 6
  assert res[0][1]["dirs"] == ["4", "6"]  # nothing else: no leftovers, the lock released
