"""Multi-process jobs (jax.distributed on 127.0.0.1, CPU devices) saving to and restoring
from s3:// (moto): one generation for all processes' objects, one commit marker, and a
resharding restore in which each process reads only its share of the segment objects."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _mp_launch import run_job

import flax_ckpt
from flax_ckpt._src.format import GEN_RE
from flax_ckpt._src.io.storage import objstore

pytestmark = pytest.mark.slow  # subprocesses; `-m 'not slow'` skips them

_WORKER = Path(__file__).resolve().parent / "_objstore_worker.py"
_SEGMENT = 64 << 10  # w (2 MiB) is 4 chunks of 512 KiB: many segments per data file


def _run_job(nproc, ndev, scenario, path, timeout=150):
  """Runs one job; returns each process's (returncode, RESULT dict, output tail)."""
  return run_job(lambda i, port: [sys.executable, str(_WORKER), "mp", str(port), str(nproc),
                                  str(i), str(ndev), scenario, path],
                 nproc, timeout=timeout, extra_env={"FLAX_CKPT_OBJECT_BYTES": str(_SEGMENT)})


def _host():
  rng = np.random.default_rng(0)  # as tests/_objstore_worker.py host_data()
  return (rng.standard_normal((512, 1024)).astype(np.float32),
          rng.integers(-1000, 1000, (32, 16)).astype(np.int32))


def test_two_processes_save_four_restore_their_share(s3_root):
  path = f"{s3_root}/ckpt"
  for rc, r, out in _run_job(2, 2, "save", path):
    assert rc == 0 and r and r["saved"], out

  # B2: one generation holds both processes' objects; one commit marker names it
  keys = objstore.list_keys(path)
  assert [k for k in keys if k.endswith("_CHECKPOINT")] == ["_CHECKPOINT"]
  marker = json.loads(objstore.read_versioned(f"{path}/_CHECKPOINT")[0])
  gen = marker["generation"]
  assert marker["version"] == 2 and marker["process_count"] == 2
  assert GEN_RE.fullmatch(gen)
  assert {k.split("/", 1)[0] for k in keys} == {"_CHECKPOINT", gen}
  data = {}
  for k in keys:
    name = k.rsplit("/", 1)[-1]
    if name.startswith("data.p"):
      assert k.startswith(f"{gen}/state/"), k
      proc, seg = name[len("data.p"):].split(".bin.")
      data.setdefault(int(proc), []).append(int(seg))
  assert sorted(data) == [0, 1]
  for segs in data.values():  # each process's file: 1 MiB of w in 64 KiB segments, at least
    assert sorted(segs) == list(range(len(segs))) and len(segs) >= (1 << 20) // _SEGMENT
  assert f"{gen}/state/_CHUNKS.p0.json" in keys and f"{gen}/state/_CHUNKS.p1.json" in keys
  for i in (0, 1):
    chunks = json.loads(objstore.read_versioned(f"{path}/{gen}/state/_CHUNKS.p{i}.json")[0])
    assert chunks["process_index"] == i
    assert all(c["p"] == i for cs in chunks["chunks"].values() for c in cs)

  # the whole tree, in this one process
  w, b = _host()
  out = flax_ckpt.load(path)
  np.testing.assert_array_equal(np.asarray(out["w"]), w)
  np.testing.assert_array_equal(np.asarray(out["b"]), b)
  assert float(out["scale"]) == 2.5 and out["step"] == 7
  assert flax_ckpt.metadata(path)["w"].sharding["spec"] == ["x", "y"]

  # B1: 4 processes x 2 devices, w's rows split over the processes (another mesh and
  # sharding); each checks its shards and reads about its quarter of w, not all of it
  res = _run_job(4, 2, "load", path)
  rows = []
  for rc, r, out in res:
    assert rc == 0 and r, out
    assert r["share_w"] == w.nbytes // 4, r
    # its rows of w (in 2 saved chunks, contiguous in each) + b + the scalar, with a little
    # slack for alignment; all of w would be 4x its share
    assert r["share_w"] <= r["read"] <= r["share_w"] + r["other"] + 8192, (r, out)
    rows.append(r["rows"])
  assert sorted(rows) == [[[r, r + 128]] for r in (0, 128, 256, 384)]


def test_a_process_killed_mid_save_commits_nothing_and_leaves_nothing(s3_root):
  path = f"{s3_root}/ckpt"
  (rc0, r0, out0), (rc1, _, out1) = _run_job(2, 2, "die", path, timeout=90)
  assert rc1 == -9 and "P1_UPLOADED" in out1, out1  # killed with its segments stored
  assert rc0 == 0 and r0, out0
  assert r0["raised"] == "CheckpointError", out0
  assert r0["seconds"] < 40, r0
  assert objstore.read_versioned(f"{path}/_CHECKPOINT") is None
  assert objstore.list_keys(path) == [], r0  # process 0 removed the whole generation
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    flax_ckpt.load(path)
