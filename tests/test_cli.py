"""The ``flax-ckpt`` command line (issue 16): every command on real checkpoints written by
the library (a manager directory, several parts, sharded arrays, a damaged copy), human
and ``--json`` output, and exit statuses (0 good, 1 a failed check, 2 could not run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Counter:
  """A data iterator: saved as a stateful part."""

  def __init__(self, n=0):
    self.n = n

  def get_state(self):
    return {"n": self.n}

  def set_state(self, state):
    self.n = state["n"]


LOSSES = {10: 0.9, 20: 0.4, 30: 0.7}  # step 20 is the best (min), 30 the latest


def _train_state(step):
  return {"params": {"w": jnp.full((4, 8), float(step)), "b": np.arange(3, dtype=np.int32)},
          "step": step}


@pytest.fixture
def run_dir(tmp_path):
  """A CheckpointManager directory: 3 steps with metrics, best_fn, a dataset part."""
  d = os.fspath(tmp_path / "run")
  with flax_ckpt.CheckpointManager(d, best_fn=lambda m: m["loss"], best_mode="min",
                                   max_to_keep=5) as mngr:
    for step, loss in LOSSES.items():
      mngr.save(step, _train_state(step), dataset=Counter(step),
                metrics={"loss": loss, "acc": 1 - loss}, force=True)
  return d


@pytest.fixture
def parts_ckpt(tmp_path):
  path = os.fspath(tmp_path / "parts")
  flax_ckpt.save_checkpointables(path, {
      "params": {"dense": {"kernel": np.ones((3, 5), np.float32),
                           "bias": np.zeros(5, jnp.bfloat16)}},
      "opt_state": {"mu": np.zeros((3, 5), np.float32), "count": 7},
      "data": Counter(4)}, custom_metadata={"lr": 0.1})
  return path


@pytest.fixture
def sharded_ckpt(tmp_path):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("data", "model")))
  path = os.fspath(tmp_path / "sharded")
  flax_ckpt.save(path, {"x": x, "y": jnp.ones(16, jnp.bfloat16), "name": "model"})
  return path


def _run(capsys, *argv):
  """``(status, stdout, stderr)`` of ``flax-ckpt argv`` run in this process."""
  rc = main([os.fspath(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def _json(capsys, *argv, status=0):
  rc, out, err = _run(capsys, *argv, "--json")
  assert rc == status, err
  return json.loads(out)


def _flip(path, offset=0):
  """Flips every bit of the byte at ``offset`` of ``path`` (as tests/test_integrity.py)."""
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)
    f.seek(offset)
    f.write(bytes([b[0] ^ 0xFF]))


# ---- help ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ls", "show", "verify", "diff", "cp", "rm", "convert"])
def test_every_command_answers_help_with_an_example(capsys, command):
  rc, out, _ = _run(capsys, command, "--help")
  assert rc == 0
  assert "example" in out and f"flax-ckpt {command}" in out


def test_no_command_is_a_usage_error(capsys):
  rc, _, err = _run(capsys)
  assert rc == 2 and "usage" in err


# ---- ls --------------------------------------------------------------------------------


def test_ls_of_a_manager_directory_marks_latest_and_best(capsys, run_dir):
  rc, out, _ = _run(capsys, "ls", run_dir)
  assert rc == 0
  rows = {line.split()[0]: line for line in out.splitlines()[1:]}
  assert sorted(rows) == ["10", "20", "30"]
  assert rows["20"].rstrip().endswith("best") and "latest" not in rows["20"]
  assert rows["30"].rstrip().endswith("latest") and "best" not in rows["30"]
  assert "loss=0.4" in rows["20"] and "state, dataset" in rows["20"]


def test_ls_json_of_a_manager_directory(capsys, run_dir):
  doc = _json(capsys, "ls", run_dir)
  assert doc["latest_step"] == 30 and doc["best_step"] == 20 and doc["best_mode"] == "min"
  by_step = {r["step"]: r for r in doc["steps"]}
  assert by_step[20]["metrics"] == {"loss": 0.4, "acc": pytest.approx(0.6)}
  assert by_step[20]["score"] == 0.4
  assert by_step[20]["parts"] == ["state", "dataset"]
  assert by_step[20]["bytes"] == 4 * 8 * 4 + 3 * 4 + 8  # w, b, step


def test_ls_best_follows_best_mode_max(capsys, tmp_path):
  d = os.fspath(tmp_path / "run")
  with flax_ckpt.CheckpointManager(d, best_fn=lambda m: m["acc"], best_mode="max") as mngr:
    for step, acc in ((1, 0.5), (2, 0.8), (3, 0.6)):
      mngr.save(step, {"w": np.ones(2)}, metrics={"acc": acc}, force=True)
  doc = _json(capsys, "ls", d)
  assert doc["best_step"] == 2 and doc["best_mode"] == "max"


def test_ls_without_best_fn_best_is_the_latest(capsys, tmp_path):
  d = os.fspath(tmp_path / "run")
  with flax_ckpt.CheckpointManager(d, step_prefix="step") as mngr:
    for step in (5, 6):
      mngr.save(step, {"w": np.ones(2)}, force=True)
  doc = _json(capsys, "ls", d)
  assert [r["step"] for r in doc["steps"]] == [5, 6]
  assert doc["latest_step"] == doc["best_step"] == 6 and doc["best_mode"] is None


def test_ls_lists_a_step_whose_tree_is_damaged(capsys, run_dir):
  with open(os.path.join(run_dir, "20", "state", "_TREE.json"), "wb") as f:
    f.write(b"[")
  rc, out, _ = _run(capsys, "ls", run_dir)
  assert rc == 0 and "?" in next(x for x in out.splitlines() if x.startswith("20 "))
  doc = _json(capsys, "ls", run_dir)
  assert [r["bytes"] is None for r in doc["steps"]] == [False, True, False]


def test_ls_of_a_checkpoint_lists_its_parts(capsys, parts_ckpt):
  rc, out, _ = _run(capsys, "ls", parts_ckpt)
  assert rc == 0
  assert "params" in out and "opt_state" in out and "stateful" in out
  doc = _json(capsys, "ls", parts_ckpt)
  parts = {p["name"]: p for p in doc["parts"]}
  assert parts["params"] == {"name": "params", "kind": "pytree", "leaves": 2,
                             "bytes": 3 * 5 * 4 + 5 * 2}
  assert parts["data"]["kind"] == "stateful"
  assert doc["custom_metadata"] == {"lr": 0.1}


def test_ls_of_a_step_shows_its_manager_record(capsys, run_dir):
  doc = _json(capsys, "ls", os.path.join(run_dir, "20"))
  assert doc["manager"]["step"] == 20 and doc["manager"]["best_mode"] == "min"


def test_ls_of_nothing_is_an_error(capsys, tmp_path):
  rc, out, err = _run(capsys, "ls", tmp_path / "missing")
  assert rc == 2 and not out and "flax-ckpt:" in err


# ---- show ------------------------------------------------------------------------------


def test_show_lists_shapes_dtypes_shardings_and_totals(capsys, sharded_ckpt):
  rc, out, _ = _run(capsys, "show", sharded_ckpt)
  assert rc == 0
  assert "state['x']" in out and "(8, 8)" in out and "float32" in out
  assert "NamedSharding P(data,model) mesh 4x2 (data,model)" in out
  assert "bfloat16" in out and "str" in out
  assert "80 parameters" in out  # 64 + 16


def test_show_json(capsys, sharded_ckpt):
  doc = _json(capsys, "show", sharded_ckpt)
  leaves = {x["path"]: x for x in doc["leaves"]}
  assert leaves["['x']"]["shape"] == [8, 8]
  assert leaves["['x']"]["sharding"]["spec"] == ["data", "model"]
  assert leaves["['name']"]["type"] == "str"
  assert doc["totals"]["parameters"] == 80
  assert doc["totals"]["bytes_per_dtype"]["float32"] == 256
  assert doc["totals"]["bytes_per_dtype"]["bfloat16"] == 32


def test_show_part_depth_and_filter(capsys, parts_ckpt):
  doc = _json(capsys, "show", parts_ckpt, "--part", "params", "--filter", "kernel")
  assert [x["path"] for x in doc["leaves"]] == ["['dense']['kernel']"]
  assert doc["totals"]["bytes_per_part"] == {"params": 60}
  rc, out, _ = _run(capsys, "show", parts_ckpt, "--depth", "1")
  assert rc == 0
  assert "params['dense']" in out and "opt_state['mu']" in out
  assert "opt_state['count']" in out
  rc, _, err = _run(capsys, "show", parts_ckpt, "--part", "data")
  assert rc == 2 and "not a PyTree" in err
  rc, _, err = _run(capsys, "show", parts_ckpt, "--filter", "(")
  assert rc == 2 and "--filter" in err


def test_show_reads_no_array_data(capsys, sharded_ckpt):
  os.remove(os.path.join(sharded_ckpt, "state", "data.p0.bin"))
  rc, out, _ = _run(capsys, "show", sharded_ckpt)
  assert rc == 0 and "(8, 8)" in out


def test_show_of_a_directory_names_a_step(capsys, run_dir):
  rc, _, err = _run(capsys, "show", run_dir)
  assert rc == 2 and os.path.join(run_dir, "30") in err


# ---- verify ----------------------------------------------------------------------------


def test_verify_good_checkpoints(capsys, run_dir, parts_ckpt, sharded_ckpt):
  for path in (run_dir, parts_ckpt, sharded_ckpt):
    rc, out, _ = _run(capsys, "verify", path)
    assert rc == 0 and "OK" in out
  doc = _json(capsys, "verify", run_dir)
  assert doc["ok"] and len(doc["checkpoints"]) == 3


def test_verify_lists_every_problem_and_exits_1(capsys, run_dir, tmp_path):
  bad = os.fspath(tmp_path / "bad")
  shutil.copytree(run_dir, bad)
  _flip(os.path.join(bad, "20", "state", "data.p0.bin"), 0)
  _flip(os.path.join(bad, "30", "state", "_TREE.json"), 5)
  rc, out, _ = _run(capsys, "verify", bad)
  assert rc == 1
  assert "2 with problems" in out and "data.p0.bin" in out and "_TREE.json" in out
  doc = _json(capsys, "verify", bad, status=1)
  ok = {os.path.basename(c["path"]): c["ok"] for c in doc["checkpoints"]}
  assert ok == {"10": True, "20": False, "30": False}
  problems = doc["checkpoints"][1]["problems"]
  assert problems and problems[0]["part"] == "state" and problems[0]["leaf"]
  rc, _, _ = _run(capsys, "verify", os.path.join(bad, "10"))
  assert rc == 0


def test_verify_of_a_directory_reports_a_step_whose_commit_marker_is_damaged(capsys, run_dir):
  with open(os.path.join(run_dir, "20", "_CHECKPOINT"), "wb") as f:
    f.write(b"{not json")
  doc = _json(capsys, "verify", run_dir, status=1)
  bad = [c for c in doc["checkpoints"] if not c["ok"]]
  assert [os.path.basename(c["path"]) for c in bad] == ["20"]
  assert "_CHECKPOINT" in bad[0]["problems"][0]["message"]
  assert [r["step"] for r in _json(capsys, "ls", run_dir)["steps"]] == [10, 30]


# ---- diff ------------------------------------------------------------------------------


def test_diff_equal_checkpoints(capsys, run_dir, tmp_path):
  copy = os.fspath(tmp_path / "copy")
  flax_ckpt.save(copy, _train_state(10))
  a = os.path.join(run_dir, "10")
  rc, out, _ = _run(capsys, "diff", a, copy)
  assert rc == 1 and "dataset: only in A" in out  # the step has a dataset part
  doc = _json(capsys, "diff", os.path.join(run_dir, "10"), os.path.join(run_dir, "10"),
              "--values")
  assert not doc["differ"] and doc["bitwise_equal"] == 3 and doc["values"] == []


def test_diff_structure_shape_and_dtype(capsys, tmp_path):
  a, b = os.fspath(tmp_path / "a"), os.fspath(tmp_path / "b")
  flax_ckpt.save(a, {"w": np.ones((2, 3), np.float32), "v": np.ones(2), "gone": 1})
  flax_ckpt.save(b, {"w": np.ones((3, 2), np.float32), "v": np.ones(2, np.float16),
                     "new": 1})
  doc = _json(capsys, "diff", a, b, status=1)
  what = {(s["leaf"], s["what"]) for s in doc["structure"]}
  assert ("['gone']", "only in A") in what and ("['new']", "only in B") in what
  assert ("['w']", "shape (2, 3) != (3, 2)") in what
  assert ("['v']", "dtype float64 != float16") in what


def test_diff_values_and_atol(capsys, tmp_path):
  a, b = os.fspath(tmp_path / "a"), os.fspath(tmp_path / "b")
  base = {"w": np.linspace(0, 1, 100, dtype=np.float32), "same": np.arange(4), "n": 3}
  flax_ckpt.save(a, base)
  flax_ckpt.save(b, {**base, "w": base["w"] + np.float32(1e-3)})
  assert _run(capsys, "diff", a, b)[0] == 0  # same structure: equal without --values
  doc = _json(capsys, "diff", a, b, "--values", status=1)
  (w,) = doc["values"]
  assert w["leaf"] == "['w']" and w["max_abs"] == pytest.approx(1e-3, rel=1e-2)
  assert w["max_rel"] == pytest.approx(1e-3 / 1.001, rel=1e-2)
  assert doc["bitwise_equal"] == 2
  doc = _json(capsys, "diff", a, b, "--values", "--atol", "0.01")
  assert not doc["differ"] and doc["close"] == 1
  rc, out, _ = _run(capsys, "diff", a, b, "--values")
  assert rc == 1 and "max abs" in out and "2 bitwise equal" in out


def test_diff_of_sharded_checkpoints(capsys, sharded_ckpt, tmp_path):
  other = os.fspath(tmp_path / "other")
  flax_ckpt.save(other, {"x": jnp.arange(64.0).reshape(8, 8), "y": jnp.ones(16, jnp.bfloat16),
                         "name": "other"})
  doc = _json(capsys, "diff", sharded_ckpt, other, "--values", status=1)
  assert [v["leaf"] for v in doc["values"]] == ["['name']"]
  assert doc["bitwise_equal"] == 2


# ---- cp --------------------------------------------------------------------------------


def _marker(path):
  with open(os.path.join(path, "_CHECKPOINT")) as f:
    return json.load(f)


def test_cp_keeps_the_manifest_and_verifies(capsys, run_dir, tmp_path):
  src, dst = os.path.join(run_dir, "20"), os.fspath(tmp_path / "backup" / "20")
  rc, out, _ = _run(capsys, "cp", src, dst)
  assert rc == 0 and "verified" in out
  assert _marker(dst) == _marker(src)  # checksums and the manager record included
  assert not [n for n in os.listdir(tmp_path / "backup") if n != "20"]  # no leftovers
  assert flax_ckpt.verify(dst)
  got = flax_ckpt.load(dst)
  np.testing.assert_array_equal(got["params"]["w"], np.full((4, 8), 20.0))
  it = Counter()
  flax_ckpt.load_checkpointables(dst, {"dataset": it})
  assert it.n == 20


def test_cp_refuses_an_existing_destination_unless_force(capsys, run_dir, tmp_path):
  dst = os.fspath(tmp_path / "dst")
  assert _run(capsys, "cp", run_dir, "--step", "10", dst)[0] == 0
  rc, _, err = _run(capsys, "cp", run_dir, "--step", "20", dst)
  assert rc == 2 and "--force" in err
  assert _marker(dst)["manager"]["step"] == 10
  doc = _json(capsys, "cp", run_dir, "--step", "20", dst, "--force")
  assert doc["verified"] and _marker(dst)["manager"]["step"] == 20
  rc, _, err = _run(capsys, "cp", run_dir, tmp_path / "x")
  assert rc == 2 and "--step" in err
  rc, _, err = _run(capsys, "cp", run_dir, "--step", "99", tmp_path / "x")
  assert rc == 2 and "no committed step 99" in err


def test_cp_of_a_damaged_checkpoint_commits_nothing(capsys, parts_ckpt, tmp_path):
  _flip(os.path.join(parts_ckpt, "params", "data.p0.bin"), 3)
  rc, _, err = _run(capsys, "cp", parts_ckpt, tmp_path / "copy")
  assert rc == 2 and "does not verify" in err
  assert not os.path.exists(tmp_path / "copy")
  assert [n for n in os.listdir(tmp_path) if n.startswith("copy")] == []


def test_cp_local_to_s3_and_back(capsys, run_dir, s3_root, tmp_path):
  for step in (10, 20, 30):
    assert _run(capsys, "cp", run_dir, "--step", str(step), f"{s3_root}/run/{step}")[0] == 0
  doc = _json(capsys, "ls", f"{s3_root}/run")
  assert [r["step"] for r in doc["steps"]] == [10, 20, 30]
  assert doc["best_step"] == 20 and doc["latest_step"] == 30
  assert _run(capsys, "verify", f"{s3_root}/run")[0] == 0
  assert _run(capsys, "rm", f"{s3_root}/run", "--step", "10")[0] == 0
  assert [r["step"] for r in _json(capsys, "ls", f"{s3_root}/run")["steps"]] == [20, 30]
  back = os.fspath(tmp_path / "back")
  assert _run(capsys, "cp", f"{s3_root}/run/20", back)[0] == 0
  got, want = _marker(back), _marker(os.path.join(run_dir, "20"))
  # the same manifest, but for the chunk index's checksum: on S3 it records the segments
  sums, want_sums = got.pop("checksums")["files"], want.pop("checksums")["files"]
  assert got == want and sums.keys() == want_sums.keys()
  assert {k for k in sums if sums[k] != want_sums[k]} == {"state/_CHUNKS.p0.json"}
  np.testing.assert_array_equal(flax_ckpt.load(back)["params"]["w"], np.full((4, 8), 20.0))


def test_cp_refuses_a_link_out_of_the_checkpoint(capsys, parts_ckpt, tmp_path):
  secret = tmp_path / "secret.txt"
  secret.write_text("not yours")
  os.symlink(secret, os.path.join(parts_ckpt, "params", "notes.txt"))
  rc, _, err = _run(capsys, "cp", parts_ckpt, tmp_path / "copy")
  assert rc == 2 and "symlink" in err
  assert not os.path.exists(tmp_path / "copy")


def test_cp_to_an_object_store_writes_a_local_data_file_as_segments(capsys, tmp_path,
                                                                    objstore_root, monkeypatch):
  from flax_ckpt._src.io import storage
  monkeypatch.setenv("FLAX_CKPT_OBJECT_BYTES", "4096")
  src = os.fspath(tmp_path / "big")
  w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # 16 KiB: 4 segments
  flax_ckpt.save_checkpointables(src, {"params": {"w": w}, "data": Counter(3)})
  dst = f"{objstore_root}/big"
  assert _run(capsys, "cp", src, dst)[0] == 0
  objects = storage.backend_for(dst).list_files(dst)
  data = sorted(o.rsplit("/", 1)[-1] for o in objects if "data.p0.bin" in o)
  assert data == [f"data.p0.bin.{k}" for k in range(4)]
  assert _run(capsys, "verify", dst)[0] == 0
  np.testing.assert_array_equal(flax_ckpt.load_checkpointables(dst)["params"]["w"], w)
  back = os.fspath(tmp_path / "back")  # the segments come back as they are, and load
  assert _run(capsys, "cp", dst, back)[0] == 0
  np.testing.assert_array_equal(flax_ckpt.load_checkpointables(back)["params"]["w"], w)
  assert _run(capsys, "diff", src, back, "--values")[0] == 0


# ---- rm --------------------------------------------------------------------------------


def test_rm_deletes_a_step(capsys, run_dir):
  rc, out, _ = _run(capsys, "rm", run_dir, "--step", "20")
  assert rc == 0 and "deleted step 20" in out
  assert _json(capsys, "ls", run_dir)["best_step"] == 30
  with flax_ckpt.CheckpointManager(run_dir, read_only=True) as mngr:
    assert mngr.all_steps() == [10, 30]
  rc, _, err = _run(capsys, "rm", run_dir, "--step", "20")
  assert rc == 2 and "no committed step 20" in err
  doc = _json(capsys, "rm", run_dir, "--step", "10")
  assert doc["deleted_step"] == 10 and not os.path.exists(os.path.join(run_dir, "10"))


def test_rm_with_a_step_prefix(capsys, tmp_path):
  d = os.fspath(tmp_path / "run")
  with flax_ckpt.CheckpointManager(d, step_prefix="ckpt", step_format_fixed_length=4) as m:
    for step in (1, 2):
      m.save(step, {"w": np.ones(2)}, force=True)
  assert _run(capsys, "rm", d, "--step", "1")[0] == 0
  names = os.listdir(d)
  assert "ckpt_0001" not in names and "ckpt_0002" in names


def test_rm_is_refused_while_a_writer_holds_the_directory(capsys, run_dir):
  with flax_ckpt.CheckpointManager(run_dir):
    rc, _, err = _run(capsys, "rm", run_dir, "--step", "10")
  assert rc == 2 and "another" in err  # its own error: who holds the directory
  assert os.path.exists(os.path.join(run_dir, "10"))


# ---- convert ---------------------------------------------------------------------------


def test_convert_to_safetensors_and_back(capsys, parts_ckpt, tmp_path):
  out_dir = os.fspath(tmp_path / "hf")
  doc = _json(capsys, "convert", parts_ckpt, out_dir, "--to", "safetensors")
  assert [os.path.basename(f) for f in doc["written"]] == ["model.safetensors"]
  back = os.fspath(tmp_path / "back")
  rc, out, _ = _run(capsys, "convert", os.path.join(out_dir, "model.safetensors"), back,
                    "--to", "flax_ckpt")
  assert rc == 0 and "converted" in out
  got = flax_ckpt.load(back)
  np.testing.assert_array_equal(got["dense"]["kernel"], np.ones((3, 5), np.float32))
  sharded = os.fspath(tmp_path / "hf2")
  doc = _json(capsys, "convert", parts_ckpt, sharded, "--to", "safetensors",
              "--max-shard-bytes", "16")
  assert len(doc["written"]) == 3  # two shard files and the index


def test_convert_msgpack_to_flax_ckpt(capsys, tmp_path):
  from flax import serialization
  src = tmp_path / "state.msgpack"
  src.write_bytes(serialization.to_bytes({"w": np.arange(6.0).reshape(2, 3), "step": 3}))
  dst = os.fspath(tmp_path / "ckpt")
  assert _run(capsys, "convert", src, dst, "--to", "flax_ckpt")[0] == 0
  got = flax_ckpt.load(dst)
  assert got["step"] == 3
  np.testing.assert_array_equal(got["w"], np.arange(6.0).reshape(2, 3))
  rc, _, err = _run(capsys, "convert", src, dst, "--to", "flax_ckpt")
  assert rc == 2 and "exists" in err
  assert _run(capsys, "convert", src, dst, "--to", "flax_ckpt", "--force")[0] == 0


def test_convert_orbax_to_flax_ckpt(capsys, tmp_path):
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # orbax's own import-time noise
    ocp = pytest.importorskip("orbax.checkpoint")
  src = tmp_path / "orbax_ckpt"
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int32)}
  with ocp.StandardCheckpointer() as ck:
    ck.save(src, tree)
    ck.wait_until_finished()
  dst = os.fspath(tmp_path / "ckpt")
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match="written by Orbax"):
    assert _run(capsys, "convert", src, dst, "--to", "flax_ckpt")[0] == 0
  got = flax_ckpt.load(dst, restore_type=np.ndarray)
  np.testing.assert_array_equal(got["w"], tree["w"])
  np.testing.assert_array_equal(got["b"], tree["b"])
  assert _run(capsys, "verify", dst)[0] == 0


# ---- as a program ----------------------------------------------------------------------


def _program_env():
  return {**os.environ, "PYTHONPATH": ROOT}


@pytest.mark.slow
def test_python_m_flax_ckpt(run_dir, tmp_path):
  bad = os.fspath(tmp_path / "bad")
  shutil.copytree(run_dir, bad)
  _flip(os.path.join(bad, "10", "state", "data.p0.bin"))
  commands = [[sys.executable, "-m", "flax_ckpt"]]
  if shutil.which("flax-ckpt"):
    commands.append(["flax-ckpt"])
  for cmd in commands:
    r = subprocess.run(cmd + ["ls", run_dir, "--json"], capture_output=True, text=True,
                       cwd=ROOT, env=_program_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["best_step"] == 20
    r = subprocess.run(cmd + ["verify", bad], capture_output=True, text=True, cwd=ROOT,
                       env=_program_env(), timeout=120)
    assert r.returncode == 1 and "1 with problems" in r.stdout
