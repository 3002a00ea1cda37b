"""Checkpoints written by Orbax (orbax-checkpoint, from the test extra) are told apart from
flax_ckpt's: ``flax_ckpt.is_orbax_checkpoint`` and a load error that says what the
directory is, never "the save did not finish" (issue 15; tests/test_orbax_read.py
tests the reading)."""

from __future__ import annotations

import os
import warnings

import jax
import numpy as np
import pytest

import flax_ckpt


@pytest.fixture(scope="module")
def ocp():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return pytest.importorskip("orbax.checkpoint")


def _tree():
  return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int32)}


def test_an_orbax_checkpoint_is_recognised_and_a_load_says_so(ocp, tmp_path):
  path = tmp_path / "orbax_ckpt"
  with ocp.StandardCheckpointer() as ck:
    ck.save(path, _tree())
    ck.wait_until_finished()
  assert flax_ckpt.is_orbax_checkpoint(path)
  assert flax_ckpt.is_orbax_checkpoint(str(path))
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match="written by Orbax"):
    got = flax_ckpt.load(path)  # read by the Orbax reader (tests/test_orbax_read.py)
  want = _tree()
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(flax_ckpt.FormatError, match="written by Orbax") as e:
    flax_ckpt.metadata(path)  # the other APIs say what it is, never "did not finish"
  assert "did not finish" not in str(e.value) and str(path) in str(e.value)
  report = flax_ckpt.verify(path)
  assert not report and "Orbax" in str(report.problems[0])


def test_orbax_manager_steps_and_items_are_recognised(ocp, tmp_path):
  root = tmp_path / "run"
  with ocp.CheckpointManager(root) as mngr:
    mngr.save(3, args=ocp.args.StandardSave(_tree()))
    mngr.wait_until_finished()
  step = root / "3"
  assert flax_ckpt.is_orbax_checkpoint(step)  # the step (_CHECKPOINT_METADATA)
  items = [p for p in step.iterdir() if p.is_dir()]
  assert items and all(flax_ckpt.is_orbax_checkpoint(p) for p in items)  # its items
  assert not flax_ckpt.is_orbax_checkpoint(root)  # the run directory is not a checkpoint


def test_flax_ckpt_checkpoints_and_other_directories_are_not_orbax(tmp_path):
  path = tmp_path / "ckpt"
  flax_ckpt.save(path, _tree())
  assert not flax_ckpt.is_orbax_checkpoint(path)
  assert not flax_ckpt.is_orbax_checkpoint(tmp_path / "missing")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert not flax_ckpt.is_orbax_checkpoint(empty)
  with pytest.raises(flax_ckpt.IncompleteCheckpointError, match="did not finish"):
    flax_ckpt.load(empty)  # not Orbax either: the usual error


def test_an_unfinished_orbax_save_is_not_a_checkpoint(tmp_path):
  """Orbax writes _CHECKPOINT_METADATA without a commit time, in a tmp directory, until
  the save commits; neither counts. A marker that is not JSON is not trusted either."""
  tmp = tmp_path / "7.orbax-checkpoint-tmp-1234"
  tmp.mkdir()
  (tmp / "_CHECKPOINT_METADATA").write_text('{"commit_timestamp_nsecs": 5}')
  assert not flax_ckpt.is_orbax_checkpoint(tmp)
  uncommitted = tmp_path / "8"
  uncommitted.mkdir()
  (uncommitted / "_CHECKPOINT_METADATA").write_text(
      '{"init_timestamp_nsecs": 1, "commit_timestamp_nsecs": null}')
  assert not flax_ckpt.is_orbax_checkpoint(uncommitted)
  (uncommitted / "_CHECKPOINT_METADATA").write_bytes(b"\xff{not json")
  assert not flax_ckpt.is_orbax_checkpoint(uncommitted)
  os.remove(uncommitted / "_CHECKPOINT_METADATA")
  with pytest.raises(flax_ckpt.IncompleteCheckpointError):
    flax_ckpt.load(uncommitted)


def test_params_of_an_orbax_checkpoint_export_to_safetensors(ocp, tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  path = tmp_path / "orbax_ckpt"
  state = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
           "opt": {"mu": np.zeros(3, np.float32)}}
  with ocp.StandardCheckpointer() as ck:
    ck.save(path, state)
    ck.wait_until_finished()
  out = tmp_path / "hf"
  assert flax_ckpt.export_safetensors(path, out) == ["model.safetensors"]
  got = st.load_file(os.fspath(out / "model.safetensors"))
  assert list(got) == ["dense/kernel"]
  np.testing.assert_array_equal(got["dense/kernel"], state["params"]["dense"]["kernel"])
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['ema'\]"):
    flax_ckpt.export_safetensors(path, out, part="ema")  # a subtree that is not there


def test_a_none_template_leaf_must_name_a_saved_subtree(ocp, tmp_path):
  path = tmp_path / "orbax_ckpt"
  with ocp.StandardCheckpointer() as ck:
    ck.save(path, _tree())
    ck.wait_until_finished()
  got = flax_ckpt.load(path, {"w": None}, partial=True)
  np.testing.assert_array_equal(got["w"], _tree()["w"])
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['x'\]"):
    flax_ckpt.load(path, {"x": None}, partial=True)


def test_a_manager_restores_named_orbax_items_like_parts(ocp, tmp_path):
  root = tmp_path / "run"
  params, ema = _tree(), {"w": np.full((2, 3), 0.5, np.float32)}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.CheckpointManager(root) as mngr:
      mngr.save(4, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                           ema=ocp.args.StandardSave(ema),
                                           extra=ocp.args.JsonSave({"epoch": 1})))
      mngr.wait_until_finished()
  with flax_ckpt.CheckpointManager(root, read_only=True) as mngr:
    assert mngr.all_steps() == [4]
    with pytest.warns(flax_ckpt.UnregisteredClassWarning):
      both = mngr.restore()
    assert sorted(both) == ["ema", "params"]
    np.testing.assert_array_equal(both["ema"]["w"], ema["w"])
    got = mngr.restore(4, {"w": np.zeros((2, 3), np.float32)}, only="ema")
    np.testing.assert_array_equal(got["w"], ema["w"])
    got = mngr.restore(4, {"params": {"w": np.zeros((2, 3), np.float32)}}, only=["params"],
                       partial=True)
    assert list(got) == ["params"] and list(got["params"]) == ["w"]
    with pytest.raises(flax_ckpt.StructureMismatchError, match="opt_state"):
      mngr.restore(4, only="opt_state")
