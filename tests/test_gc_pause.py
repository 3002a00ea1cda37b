"""Saves and loads pause Python's cyclic collector only while they run (io/gc_pause.py)."""

from __future__ import annotations

import gc
import threading

import numpy as np

import flax_ckpt


def _tree(n: int = 50) -> dict:
  return {f"a{i}": np.arange(i + 1, dtype=np.float32) for i in range(n)}


def test_collector_state_is_restored_after_save_load_metadata_verify(tmp_path):
  assert gc.isenabled()
  flax_ckpt.save(tmp_path / "c", _tree())
  assert gc.isenabled()
  flax_ckpt.save_async(tmp_path / "d", _tree()).result()
  assert gc.isenabled()
  out = flax_ckpt.load(tmp_path / "c")
  assert gc.isenabled()
  np.testing.assert_array_equal(out["a7"], np.arange(8, dtype=np.float32))
  flax_ckpt.metadata(tmp_path / "c")
  assert flax_ckpt.verify(tmp_path / "c")
  assert gc.isenabled()


def test_collector_turned_off_by_the_caller_stays_off(tmp_path):
  gc.disable()
  try:
    flax_ckpt.save(tmp_path / "c", _tree())
    flax_ckpt.load(tmp_path / "c")
    assert not gc.isenabled()
  finally:
    gc.enable()


def test_collector_back_on_after_a_failed_load(tmp_path):
  flax_ckpt.save(tmp_path / "c", _tree())
  (tmp_path / "c" / "state" / "_TREE.json").write_bytes(b"{not json")
  try:
    flax_ckpt.load(tmp_path / "c")
  except flax_ckpt.FormatError:
    pass
  else:
    raise AssertionError("a damaged _TREE.json loaded")
  assert gc.isenabled()


def test_concurrent_loads_leave_the_collector_on(tmp_path):
  flax_ckpt.save(tmp_path / "c", _tree(300))
  errors: list[BaseException] = []

  def work():
    try:
      for _ in range(5):
        flax_ckpt.load(tmp_path / "c")
    except BaseException as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=work) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert gc.isenabled()


def test_an_async_save_leaves_the_collector_on_while_its_data_is_written(tmp_path):
  """The commit thread pauses the collector only for its bookkeeping (the chunk index and
  tree dumps), not while it waits for the data: a training loop running meanwhile keeps
  its collector. Sampled from this thread while the save is in flight."""
  tree = {f"w{i}": np.random.default_rng(i).random(2 << 20, dtype=np.float32)
          for i in range(16)}  # 128 MiB: the write takes far longer than the bookkeeping
  samples = []
  pending = flax_ckpt.save_async(tmp_path / "c", tree)
  while not pending.done():
    samples.append(gc.isenabled())
  pending.result()
  assert gc.isenabled()
  if len(samples) >= 20:  # (a save that finished at once has nothing to sample)
    assert sum(samples) >= 0.5 * len(samples), f"{sum(samples)} of {len(samples)} samples"
