"""``CheckpointManager``: when it saves, what it keeps, how it names, locks and cleans up its
directory, how it splits a train state into parts, async saves, ``checkpoints_iterator`` and
preemption.

Every retention test asserts the exact steps left, worked out by hand in the comments (the
policies are applied after every save, on what is left on disk at that moment).
"""

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt import policies

_LOCK = ".flax_ckpt_owner"
_TMP_TAG = ".flax_ckpt-tmp-"
_OLD_TAG = ".flax_ckpt-old-"


# ----------------------------------------------------------------------------- helpers


class FakeClock:
  """A clock the test moves by hand."""

  def __init__(self, t=0.0):
    self.t = float(t)

  def __call__(self):
    return self.t


def _mngr(directory, **kw):
  """A synchronous manager without fsync (fast), unless the test says otherwise."""
  kw.setdefault("enable_async", False)
  kw.setdefault("fsync", False)
  return flax_ckpt.CheckpointManager(directory, **kw)


def _tree(step):
  return {"w": np.full((3,), step, np.float32), "step": step}


def _entries(directory):
  return sorted(os.listdir(directory))


def _leftovers(directory):
  return [e for e in os.listdir(directory) if _TMP_TAG in e or _OLD_TAG in e]


def _numeric_dirs(directory):
  return sorted(int(e) for e in os.listdir(directory)
                if e.isdigit() and os.path.isdir(os.path.join(directory, e)))


def _save_all(m, steps, **kw):
  return [s for s in steps if m.save(s, _tree(s), **kw)]


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_owner(directory, host, pid, since=0):
  path = os.path.join(directory, _LOCK)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"host": host, "pid": pid, "since": since}, f)
  return path


# ----------------------------------------------------------------------------- options


def test_options_are_a_frozen_dataclass_and_validated(ckpt_dir):
  opts = flax_ckpt.CheckpointManagerOptions(max_to_keep=2)
  with pytest.raises(dataclasses.FrozenInstanceError):
    opts.max_to_keep = 3
  with pytest.raises(ValueError, match="best_mode"):
    flax_ckpt.CheckpointManagerOptions(best_mode="median")
  with pytest.raises(ValueError, match="max_to_keep"):
    flax_ckpt.CheckpointManagerOptions(max_to_keep=0)
  with pytest.raises(ValueError, match="save_interval_steps"):
    flax_ckpt.CheckpointManagerOptions(save_interval_steps=-1)
  with pytest.raises(TypeError):
    flax_ckpt.CheckpointManager(ckpt_dir, options=opts, max_to_keep=3)
  # options= and keyword arguments are the same thing
  opts = flax_ckpt.CheckpointManagerOptions(save_interval_steps=3, enable_async=False,
                                            fsync=False)
  with flax_ckpt.CheckpointManager(ckpt_dir, options=opts) as m:
    assert _save_all(m, range(7)) == [0, 3, 6]


# ----------------------------------------------------------------------------- saving


def test_default_saves_every_step(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    assert [m.save(s, _tree(s)) for s in range(5)] == [True] * 5
    assert m.all_steps() == [0, 1, 2, 3, 4]
    assert m.latest_step() == 4
  assert _numeric_dirs(ckpt_dir) == [0, 1, 2, 3, 4]


def test_save_interval_steps(ckpt_dir):
  with _mngr(ckpt_dir, save_interval_steps=5) as m:
    assert _save_all(m, range(13)) == [0, 5, 10]
    assert m.all_steps() == [0, 5, 10]


def test_save_on_steps_alone_saves_only_those(ckpt_dir):
  with _mngr(ckpt_dir, save_on_steps=(3, 7)) as m:
    assert _save_all(m, range(10)) == [3, 7]


def test_save_on_steps_adds_to_the_interval(ckpt_dir):
  with _mngr(ckpt_dir, save_interval_steps=4, save_on_steps=[3, 7]) as m:
    assert _save_all(m, range(10)) == [0, 3, 4, 7, 8]


def test_save_interval_secs_with_fake_clock(ckpt_dir):
  clock = FakeClock()
  times = {0: 0, 1: 5, 2: 10, 3: 15, 4: 19.9, 5: 20, 6: 29, 7: 45}
  saved = []
  with _mngr(ckpt_dir, save_interval_secs=10, clock=clock) as m:
    for s, t in times.items():
      clock.t = t
      if m.save(s, _tree(s)):
        saved.append(s)
  # the first save; then >= 10 s after the last save: t=10 (step 2), t=20 (5), t=45 (7)
  assert saved == [0, 2, 5, 7]


def test_custom_save_decision_policy(ckpt_dir):

  class OddAfter(policies.SaveDecisionPolicy):
    """A user's own rule: odd steps from ``start`` on."""

    def __init__(self, start):
      self.start = start

    def should_save(self, context):
      return context.step >= self.start and context.step % 2 == 1

  policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(4),
                                   policies.SpecificStepsPolicy([6]), OddAfter(9)])
  # the policy replaces the save_* options: passing both is a clear error, not a silent pick
  with pytest.raises(ValueError, match="replaces"):
    flax_ckpt.CheckpointManagerOptions(save_decision_policy=policy, save_interval_steps=1)
  with _mngr(ckpt_dir, save_decision_policy=policy) as m:
    assert _save_all(m, range(14)) == [0, 4, 6, 8, 9, 11, 12, 13]


def test_should_save_agrees_with_save(ckpt_dir):
  clock = FakeClock()
  with _mngr(ckpt_dir, save_interval_steps=5, save_on_steps=[7], save_interval_secs=100,
             clock=clock) as m:
    decisions = []
    for s in range(14):
      clock.t = 40.0 * s
      predicted = m.should_save(s)
      assert m.should_save(s) == predicted  # asking does not change anything
      got = m.save(s, _tree(s))
      assert got == predicted, s
      decisions.append(got)
      assert m.should_save(s) is False  # saved now, or skipped and still not wanted
  # 0: first; 3 (t=120): 120 s after 0; 5: interval; 7: listed; 10: interval;
  # 13 (t=520): 120 s after 10 (t=400)
  assert [s for s, d in enumerate(decisions) if d] == [0, 3, 5, 7, 10, 13]


def test_already_saved_step_is_not_saved_again_even_with_force(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    assert m.save(5, _tree(5)) is True
    assert m.should_save(5) is False
    assert m.save(5, _tree(50)) is False
    assert m.save(5, _tree(50), force=True) is False
    np.testing.assert_array_equal(m.restore(5)["w"], np.full(3, 5, np.float32))


def test_force_saves_a_step_the_policy_skips(ckpt_dir):
  with _mngr(ckpt_dir, save_interval_steps=5) as m:
    assert m.should_save(3) is False
    assert m.save(3, _tree(3)) is False
    assert m.all_steps() == []
    assert m.save(3, _tree(3), force=True) is True
    assert m.all_steps() == [3]
    assert m.restore()["step"] == 3


def test_save_rejects_bad_steps_and_nothing_to_save(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    with pytest.raises((TypeError, ValueError)):
      m.save(-1, _tree(0))
    with pytest.raises(ValueError):
      m.save(1)
    assert m.save(np.int64(2), _tree(2)) is True
    assert m.all_steps() == [2]


def test_custom_metadata_is_stored(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    m.save(1, _tree(1), custom_metadata={"run": "abc", "epoch": 3})
  md = flax_ckpt.metadata(os.path.join(ckpt_dir, "1"))
  assert md.custom_metadata == {"run": "abc", "epoch": 3}


# ----------------------------------------------------------------------------- retention


def test_max_to_keep_alone(ckpt_dir):
  with _mngr(ckpt_dir, max_to_keep=3) as m:
    _save_all(m, range(10))
    assert m.all_steps() == [7, 8, 9]
  assert _numeric_dirs(ckpt_dir) == [7, 8, 9]
  assert _leftovers(ckpt_dir) == []


def test_keep_period_alone_keeps_everything(ckpt_dir):
  with _mngr(ckpt_dir, keep_period=10) as m:
    _save_all(m, range(26))
    assert m.all_steps() == list(range(26))


def test_keep_time_interval_alone_keeps_everything(ckpt_dir):
  clock = FakeClock()
  with _mngr(ckpt_dir, keep_time_interval=100, clock=clock) as m:
    for s in range(6):
      clock.t = 30.0 * s
      m.save(s, _tree(s))
    assert m.all_steps() == [0, 1, 2, 3, 4, 5]


def test_max_to_keep_plus_keep_period_over_50_steps(ckpt_dir):
  with _mngr(ckpt_dir, max_to_keep=3, keep_period=10) as m:
    _save_all(m, range(50))
    assert m.all_steps() == [0, 10, 20, 30, 40, 47, 48, 49]
  assert _numeric_dirs(ckpt_dir) == [0, 10, 20, 30, 40, 47, 48, 49]
  assert _leftovers(ckpt_dir) == []


def test_max_to_keep_plus_keep_time_interval_with_fake_clock(ckpt_dir):
  clock = FakeClock()
  with _mngr(ckpt_dir, max_to_keep=2, keep_time_interval=100, clock=clock) as m:
    for s in range(10):
      clock.t = 30.0 * s  # step s saved at t = 30 s
      m.save(s, _tree(s))
    # Kept by time: the first (t=0), then the first one >= 100 s after the last kept one.
    # After step 3: {0,1,2,3} -> time keeps 0, newest two 2,3 -> 1 deleted.
    # After step 4 (t=120): time keeps 0, 4; newest 3, 4 -> 2 deleted.
    # After step 5: time keeps 0, 4 (3 is t=90 < 100); newest 4, 5 -> 3 deleted.
    # After 6 and 7 (t=180, 210 < 220): 5 then 6 deleted; after 8 (t=240): time keeps
    # 0, 4, 8; after 9: 7 deleted.
    assert m.all_steps() == [0, 4, 8, 9]


def test_best_n_by_loss_keeps_the_newest_even_when_worst(ckpt_dir):
  losses = {0: 5.0, 1: 3.0, 2: 4.0, 3: 1.0, 4: 2.0, 5: 9.0}
  with _mngr(ckpt_dir, max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min") as m:
    for s, loss in losses.items():
      m.save(s, _tree(s), metrics={"loss": loss})
    # after 2: best 1 (3.0), 2 (4.0) -> 0 deleted; after 3: best 3, 1 -> 2 deleted;
    # after 4: best 3, 4 -> 1 deleted; after 5 (worst loss): kept as the newest.
    assert m.all_steps() == [3, 4, 5]
    assert m.best_step() == 3
    m.save(6, _tree(6), metrics={"loss": 0.5})
    # best 6 (0.5), 3 (1.0); 6 is also the newest -> 4 and 5 deleted
    assert m.all_steps() == [3, 6]
    assert m.best_step() == 6
  assert _numeric_dirs(ckpt_dir) == [3, 6]


def test_best_mode_max(ckpt_dir):
  acc = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.7, 4: 0.2}
  with _mngr(ckpt_dir, max_to_keep=2, best_fn=lambda m: m["acc"], best_mode="max") as m:
    for s, a in acc.items():
      m.save(s, _tree(s), metrics={"acc": a})
    # after 2: best 1, 2 -> 0 deleted; after 3: best 1, 3 -> 2 deleted; 4 kept as newest
    assert m.all_steps() == [1, 3, 4]
    assert m.best_step() == 1


@pytest.mark.parametrize("keep_without, expected", [(True, [0, 2, 3, 4]), (False, [3, 4])])
def test_keep_checkpoints_without_metrics(ckpt_dir, keep_without, expected):
  metrics = {0: None, 1: {"loss": 2.0}, 2: None, 3: {"loss": 1.0}, 4: {"loss": 3.0}}
  with _mngr(ckpt_dir, max_to_keep=1, best_fn=lambda m: m["loss"], best_mode="min",
             keep_checkpoints_without_metrics=keep_without) as m:
    for s, met in metrics.items():
      m.save(s, _tree(s), metrics=met)
    # True: 0 and 2 are never deleted; best-1 is 1 then 3 (1 deleted after 3); 4 newest.
    # False: after 1 best is 1 -> 0 deleted; 2 kept while newest; after 3 best is 3 ->
    # 1 and 2 deleted; 4 kept as the newest.
    assert m.all_steps() == expected
    assert m.best_step() == 3


def test_custom_preservation_policy(ckpt_dir):
  keep = policies.AnyPreservationPolicy([policies.LatestN(1), policies.EveryNSteps(7)])
  # the policy replaces the retention options: passing both is a clear error
  with pytest.raises(ValueError, match="replaces"):
    flax_ckpt.CheckpointManagerOptions(preservation_policy=keep, max_to_keep=5)
  with _mngr(ckpt_dir, preservation_policy=keep) as m:
    _save_all(m, range(21))
    assert m.all_steps() == [0, 7, 14, 20]
    m.save(21, _tree(21))
    assert m.all_steps() == [0, 7, 14, 21]


def test_user_defined_preservation_policy_cannot_delete_the_newest(ckpt_dir):

  class KeepEven(policies.PreservationPolicy):

    def keep(self, checkpoints):
      return {c.step for c in checkpoints if c.step % 2 == 0}

  class KeepNothing(policies.PreservationPolicy):

    def keep(self, checkpoints):
      return set()

  with _mngr(ckpt_dir, preservation_policy=KeepEven()) as m:
    _save_all(m, range(6))
    assert m.all_steps() == [0, 2, 4, 5]
  shutil.rmtree(ckpt_dir)
  with _mngr(ckpt_dir, preservation_policy=KeepNothing()) as m:
    _save_all(m, range(4))
    assert m.all_steps() == [3]
    assert m.restore()["step"] == 3


def test_retention_after_reopening_uses_saved_metrics(ckpt_dir):
  opts = dict(max_to_keep=2, best_fn=lambda m: m["loss"], best_mode="min")
  with _mngr(ckpt_dir, **opts) as m:
    for s, loss in {0: 3.0, 1: 1.0, 2: 2.0}.items():
      m.save(s, _tree(s), metrics={"loss": loss, "acc": np.float32(0.25)})
    assert m.all_steps() == [1, 2]  # after 2: best 1, 2 -> 0 deleted
  with _mngr(ckpt_dir, **opts) as m:
    assert m.all_steps() == [1, 2]
    assert m.metrics(1) == {"loss": 1.0, "acc": 0.25}
    assert m.metrics(2) == {"loss": 2.0, "acc": 0.25}
    assert m.best_step() == 1
    m.save(3, _tree(3), metrics={"loss": 5.0})
    assert m.all_steps() == [1, 2, 3]  # best 1, 2; 3 is the newest
    m.save(4, _tree(4), metrics={"loss": 0.5})
    # best 4 (0.5), 1 (1.0): 2 and 3 deleted (they would survive as "without metrics" if
    # the reopened manager had lost the saved metrics)
    assert m.all_steps() == [1, 4]
    assert m.best_step() == 4


def test_retention_after_reopening_uses_saved_times(ckpt_dir):
  clock = FakeClock()
  opts = dict(max_to_keep=1, keep_time_interval=100, clock=clock)
  with _mngr(ckpt_dir, **opts) as m:
    m.save(0, _tree(0))
    clock.t = 150
    m.save(1, _tree(1))
    assert m.all_steps() == [0, 1]  # 1 is 150 s after 0
  with _mngr(ckpt_dir, **opts) as m:
    assert m.all_steps() == [0, 1]
    clock.t = 200
    m.save(2, _tree(2))
    assert m.all_steps() == [0, 1, 2]  # time keeps 0 (t=0) and 1 (t=150); 2 is newest
    clock.t = 260
    m.save(3, _tree(3))
    # 2 (t=200) is only 50 s after 1; 3 (t=260) is 110 s after 1 -> 2 deleted
    assert m.all_steps() == [0, 1, 3]


def test_nan_metric_reads_back_as_a_float(ckpt_dir):
  """A NaN metric is a float NaN from metrics(step), before and after reopening."""
  with _mngr(ckpt_dir) as m:
    m.save(1, _tree(1), metrics={"loss": float("nan"), "n": 3})
    before = m.metrics(1)
  with _mngr(ckpt_dir) as m:
    after = m.metrics(1)
  assert isinstance(after["loss"], float) and math.isnan(after["loss"])
  assert after["n"] == 3.0
  assert isinstance(before["loss"], float) and math.isnan(before["loss"]), before


# ----------------------------------------------------------------------------- naming


def test_step_prefix(ckpt_dir):
  with _mngr(ckpt_dir, step_prefix="step") as m:
    m.save(10, _tree(10))
    assert m.all_steps() == [10]
    assert m.restore(10)["step"] == 10
  assert os.path.isfile(os.path.join(ckpt_dir, "step_10", "_CHECKPOINT"))
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0, step_prefix="step")) == [10]


def test_step_format_fixed_length(ckpt_dir):
  with _mngr(ckpt_dir, step_format_fixed_length=6) as m:
    m.save(10, _tree(10))
    m.save(1234567, _tree(1234567))  # wider than the width: not truncated
    assert m.all_steps() == [10, 1234567]
    assert m.restore(10)["step"] == 10
  assert os.path.isfile(os.path.join(ckpt_dir, "000010", "_CHECKPOINT"))
  assert os.path.isfile(os.path.join(ckpt_dir, "1234567", "_CHECKPOINT"))
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0,
                                             step_format_fixed_length=6)) == [10, 1234567]


def test_step_prefix_with_fixed_length(ckpt_dir):
  with _mngr(ckpt_dir, step_prefix="ckpt", step_format_fixed_length=4) as m:
    m.save(7, _tree(7))
    assert m.all_steps() == [7]
  assert os.path.isdir(os.path.join(ckpt_dir, "ckpt_0007"))


def test_other_entries_in_the_root_are_ignored(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    m.save(2, _tree(2))
  with _mngr(ckpt_dir, step_prefix="step") as m:
    m.save(20, _tree(20))
  os.mkdir(ckpt_dir / "foo")
  (ckpt_dir / "notes.txt").write_text("hi")
  (ckpt_dir / "8").write_text("a file named like a step")
  os.mkdir(ckpt_dir / "7")  # a step directory without _CHECKPOINT
  (ckpt_dir / "7" / "data").write_text("x")
  os.mkdir(ckpt_dir / "step_x")
  os.mkdir(ckpt_dir / "step_30")  # uncommitted, prefixed
  with _mngr(ckpt_dir, max_to_keep=1) as m:
    assert m.all_steps() == [2]
    m.save(3, _tree(3))
    assert m.all_steps() == [3]
  with _mngr(ckpt_dir, step_prefix="step", read_only=True) as m:
    assert m.all_steps() == [20]
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0)) == [3]
  # what is not the manager's is left alone
  for name in ("foo", "notes.txt", "8", "7", "step_x", "step_20", "step_30"):
    assert os.path.exists(ckpt_dir / name), name


# ----------------------------------------------------------------------------- create / ro


def test_create_false_on_missing_dir(ckpt_dir):
  missing = ckpt_dir / "nope"
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    _mngr(missing, create=False)
  assert not missing.exists()
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    _mngr(missing, read_only=True)
  assert not missing.exists()
  with _mngr(missing / "deeper") as m:  # create=True is the default, parents too
    assert m.all_steps() == []
  assert (missing / "deeper").is_dir()


def test_read_only(ckpt_dir):
  with _mngr(ckpt_dir) as w:
    w.save(1, _tree(1))
    w.save(2, _tree(2))
    # read_only takes no lock: it opens while the writer holds the directory
    with _mngr(ckpt_dir, read_only=True) as r:
      assert r.all_steps() == [1, 2]
      assert r.restore()["step"] == 2
      assert r.restore(1)["step"] == 1
      assert r.should_save(3) is False
      with pytest.raises(flax_ckpt.CheckpointError):
        r.save(3, _tree(3))
      with pytest.raises(flax_ckpt.CheckpointError):
        r.save(3, _tree(3), force=True)
      with pytest.raises(flax_ckpt.CheckpointError):
        r.delete(1)
      assert r.all_steps() == [1, 2]
    assert w.all_steps() == [1, 2]


def test_read_only_opened_first_does_not_block_a_writer(ckpt_dir):
  leftover = ckpt_dir / f"9{_TMP_TAG}otherhost-1-abcd"
  os.mkdir(leftover)
  with _mngr(ckpt_dir, read_only=True) as r:
    assert not os.path.exists(ckpt_dir / _LOCK)
    assert leftover.exists()  # read_only never cleans up
    with _mngr(ckpt_dir) as w:
      assert w.save(4, _tree(4)) is True
    assert r.all_steps() == []
    r.reload()
    assert r.all_steps() == [4]


# ----------------------------------------------------------------------------- cleanup


def test_leftover_tmp_of_crashed_save_is_removed_and_never_blocks(ckpt_dir):
  host = socket.gethostname()
  tmp = ckpt_dir / f"5{_TMP_TAG}{host}-{_dead_pid()}-deadbeef"
  os.makedirs(tmp / "state")
  (tmp / "state" / "data.bin").write_bytes(b"\0" * 100)
  (tmp / "_CHECKPOINT").write_text("{}")  # even a marker: never a checkpoint
  tmp2 = ckpt_dir / f"5{_TMP_TAG}otherhost-{os.getpid()}-0123abcd"
  os.makedirs(tmp2 / "params")
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0)) == []
  with _mngr(ckpt_dir) as m:
    assert _leftovers(ckpt_dir) == []
    assert m.all_steps() == []
    assert m.save(5, _tree(5)) is True
    assert m.all_steps() == [5]
    assert m.restore(5)["step"] == 5
  assert _entries(ckpt_dir) == ["5"]


def test_leftover_old_dir_is_removed(ckpt_dir):
  old = ckpt_dir / f"3{_OLD_TAG}{socket.gethostname()}-{os.getpid()}-cafe0001"
  os.makedirs(old / "state")
  (old / "_CHECKPOINT").write_text("{}")
  with _mngr(ckpt_dir) as m:
    assert not old.exists()
    assert m.all_steps() == []
    assert m.save(3, _tree(3)) is True
    assert m.all_steps() == [3]


def test_leftover_kept_without_cleanup_still_does_not_block(ckpt_dir):
  tmp = ckpt_dir / f"5{_TMP_TAG}otherhost-4242-feedf00d"
  os.makedirs(tmp / "state")
  with _mngr(ckpt_dir, cleanup_tmp_directories=False) as m:
    assert tmp.exists()
    assert m.all_steps() == []
    assert m.save(5, _tree(5)) is True
    assert m.all_steps() == [5]
  assert tmp.exists()


# ----------------------------------------------------------------------------- lock


def test_second_writer_in_this_process_is_refused(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    m.save(1, _tree(1))
    with pytest.raises(flax_ckpt.CheckpointError) as e:
      _mngr(ckpt_dir)
    assert m.save(2, _tree(2)) is True  # the owner is unaffected
  msg = str(e.value)
  assert str(ckpt_dir) in msg
  # the issue: "the second gets a clear error naming the owner (host, pid)"
  assert socket.gethostname() in msg and str(os.getpid()) in msg, msg


def test_second_writer_refused_while_another_live_process_owns_it(ckpt_dir):
  host = socket.gethostname()
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_owner(ckpt_dir, host, proc.pid, since=time.time())
    with pytest.raises(flax_ckpt.CheckpointError) as e:
      _mngr(ckpt_dir)
    assert host in str(e.value) and str(proc.pid) in str(e.value)
    with _mngr(ckpt_dir, read_only=True) as r:  # readers are fine
      assert r.all_steps() == []
  finally:
    proc.kill()
    proc.wait()
  # the owner died: its lock does not block any more
  with _mngr(ckpt_dir) as m:
    assert m.save(1, _tree(1)) is True
    with open(ckpt_dir / _LOCK, encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()
  assert not os.path.exists(ckpt_dir / _LOCK)


def test_lock_of_dead_process_is_taken_over(ckpt_dir):
  _write_owner(ckpt_dir, socket.gethostname(), _dead_pid())
  with _mngr(ckpt_dir) as m:
    assert m.save(1, _tree(1)) is True
    with open(ckpt_dir / _LOCK, encoding="utf-8") as f:
      owner = json.load(f)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()


def test_lock_from_other_host_taken_over_only_when_stale(ckpt_dir):
  path = _write_owner(ckpt_dir, "some-other-host.example", 4242, since=time.time())
  # fresh heartbeat: refused, naming the owner
  with pytest.raises(flax_ckpt.CheckpointError) as e:
    _mngr(ckpt_dir, lock_stale_after_s=60)
  assert "some-other-host.example" in str(e.value) and "4242" in str(e.value)
  # the same lock whose heartbeat stopped long ago is taken over
  past = time.time() - 3600
  os.utime(path, (past, past))
  with _mngr(ckpt_dir, lock_stale_after_s=60) as m:
    assert m.save(1, _tree(1)) is True
    with open(path, encoding="utf-8") as f:
      assert json.load(f)["host"] == socket.gethostname()
  assert not os.path.exists(path)


def test_close_releases_the_lock(ckpt_dir):
  m = _mngr(ckpt_dir)
  assert os.path.exists(ckpt_dir / _LOCK)
  m.save(1, _tree(1))
  m.close()
  m.close()  # idempotent
  assert not os.path.exists(ckpt_dir / _LOCK)
  with pytest.raises(flax_ckpt.CheckpointError):
    m.save(2, _tree(2))
  with _mngr(ckpt_dir) as m2:
    assert m2.all_steps() == [1]
    assert m2.save(2, _tree(2)) is True
  with _mngr(ckpt_dir) as m3:  # the context manager released it too
    assert m3.all_steps() == [1, 2]


# ----------------------------------------------------------------------------- TrainState


def _apply(params, x):
  return x @ params["dense"]["kernel"] + params["dense"]["bias"]


def _apply_other(params, x):
  return _apply(params, x)


def _create_state(apply_fn=_apply, tx=None):
  params = {"dense": {"kernel": jnp.arange(32, dtype=jnp.float32).reshape(8, 4) / 10,
                      "bias": jnp.arange(4, dtype=jnp.float32)}}
  return train_state.TrainState.create(apply_fn=apply_fn, params=params,
                                       tx=tx if tx is not None else optax.adamw(1e-2))


def _trained_state():
  state = _create_state()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), state.params)
  return state.apply_gradients(grads=grads)


def _with_shardings(abstract, mesh):
  def target(x):
    spec = {2: P("x", "y"), 1: P("y")}.get(x.ndim, P())
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree.map(target, abstract)


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _assert_shardings(got, template):
  for a, t in zip(jax.tree.leaves(got), jax.tree.leaves(template)):
    assert isinstance(a, jax.Array)
    assert a.shape == t.shape and a.dtype == t.dtype
    assert a.sharding.is_equivalent_to(t.sharding, a.ndim), (a.sharding, t.sharding)


def test_train_state_parts_and_sharded_restore(ckpt_dir):
  state = _trained_state()
  with _mngr(ckpt_dir) as m:
    m.save(1, state, metrics={"loss": 0.1})
  step_dir = ckpt_dir / "1"
  for part in ("params", "opt_state", "extra"):
    assert (step_dir / part).is_dir(), part
  assert not (step_dir / "state").exists()

  mesh = _mesh()
  other_tx = optax.adamw(1e-2)
  abstract = jax.eval_shape(lambda: _create_state(apply_fn=_apply_other, tx=other_tx))
  abstract = _with_shardings(abstract, mesh)
  with _mngr(ckpt_dir, read_only=True) as m:
    restored = m.restore(abstract_state=abstract)
  assert type(restored) is train_state.TrainState
  assert restored.apply_fn is _apply_other
  assert restored.tx is other_tx
  assert int(restored.step) == 1
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.opt_state, state.opt_state)
  _assert_shardings(restored.params, abstract.params)
  _assert_shardings(restored.opt_state, abstract.opt_state)
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P("x", "y"))
  assert len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (4, 1)
  # training continues from the restored state exactly as from the original
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), state.params)
  _assert_trees_equal(restored.apply_gradients(grads=grads).params,
                      state.apply_gradients(grads=grads).params)


def test_train_state_restore_without_template_is_a_dict(ckpt_dir):
  state = _trained_state()
  with _mngr(ckpt_dir) as m:
    m.save(1, state)
    out = m.restore()
  assert isinstance(out, dict)
  assert set(out) == {"params", "opt_state", "step"}
  assert int(out["step"]) == 1
  _assert_trees_equal(out["params"], state.params)
  _assert_trees_equal(jax.tree.leaves(out["opt_state"]), jax.tree.leaves(state.opt_state))


def test_params_only_restore(ckpt_dir):
  state = _trained_state()
  with _mngr(ckpt_dir) as m:
    m.save(1, state)
    params = m.restore(only="params")
    _assert_trees_equal(params, state.params)
    mesh = _mesh()
    tmpl = _with_shardings(jax.eval_shape(lambda: state.params), mesh)
    params = m.restore(abstract_state=tmpl)
    _assert_trees_equal(params, state.params)
    _assert_shardings(params, tmpl)
    both = m.restore(only=["params", "extra"])
    assert set(both) == {"params", "extra"}
    assert int(both["extra"]["step"]) == 1
    with pytest.raises(flax_ckpt.StructureMismatchError):
      m.restore(only="nope")


def test_params_only_restore_reads_no_opt_state_files(ckpt_dir):
  """With the step's opt_state/ gone, a params-only restore still works (it reads none of
  those files)."""
  state = _trained_state()
  with _mngr(ckpt_dir) as m:
    m.save(1, state)
  shutil.rmtree(ckpt_dir / "1" / "opt_state")
  with _mngr(ckpt_dir, read_only=True) as m:
    _assert_trees_equal(m.restore(only="params"), state.params)
    tmpl = _with_shardings(jax.eval_shape(lambda: state.params), _mesh())
    params = m.restore(abstract_state=tmpl)
    _assert_trees_equal(params, state.params)
    _assert_shardings(params, tmpl)


@flax.struct.dataclass
class _StructState:
  step: Any
  params: Any
  opt_state: Any
  ema: Any
  note: str = flax.struct.field(pytree_node=False, default="saved")


def test_flax_struct_dataclass_state_is_split(ckpt_dir):
  params = {"w": jnp.arange(8.0).reshape(2, 4)}
  tx = optax.sgd(0.1, momentum=0.9)
  st = _StructState(step=3, params=params, opt_state=tx.init(params),
                    ema={"w": jnp.ones((2, 4))})
  with _mngr(ckpt_dir) as m:
    m.save(3, st)
    assert sorted(e for e in os.listdir(ckpt_dir / "3") if not e.startswith("_")) == [
        "extra", "opt_state", "params"]
    template = jax.eval_shape(lambda: st).replace(note="template")
    out = m.restore(abstract_state=template)
    assert type(out) is _StructState
    assert out.note == "template"
    assert int(out.step) == 3
    _assert_trees_equal(out.params, st.params)
    _assert_trees_equal(out.ema, st.ema)
    _assert_trees_equal(out.opt_state, st.opt_state)
    assert set(m.restore()) == {"step", "params", "opt_state", "ema"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _RegisteredState:
  params: Any
  opt_state: Any
  step: Any


def test_registered_dataclass_state_is_split(ckpt_dir):
  st = _RegisteredState({"w": np.ones(3)}, {"mu": np.zeros(3)}, 4)
  with _mngr(ckpt_dir) as m:
    m.save(4, st)
    assert (ckpt_dir / "4" / "opt_state").is_dir()
    out = m.restore(abstract_state=_RegisteredState({"w": np.zeros(3)}, {"mu": np.ones(3)}, 0))
    assert type(out) is _RegisteredState
    np.testing.assert_array_equal(out.params["w"], np.ones(3))
    np.testing.assert_array_equal(out.opt_state["mu"], np.zeros(3))
    assert int(out.step) == 4


@dataclasses.dataclass
class _PlainState:
  params: Any
  opt_state: Any
  step: int


def test_plain_dataclass_state_is_split(ckpt_dir):
  """The issue: "any flax.struct/dataclass/PyTree with params, opt_state and step"."""
  st = _PlainState({"w": np.ones(3)}, {"mu": np.zeros(3)}, 4)
  with _mngr(ckpt_dir) as m:
    m.save(4, st)
    assert (ckpt_dir / "4" / "params").is_dir()
    assert (ckpt_dir / "4" / "opt_state").is_dir()
    np.testing.assert_array_equal(m.restore(only="params")["w"], np.ones(3))


def test_dict_train_state_is_split(ckpt_dir):
  st = {"params": {"w": np.ones(3)}, "opt_state": {"mu": np.zeros(3)}, "step": 2,
        "rng": np.arange(2, dtype=np.uint32)}
  with _mngr(ckpt_dir) as m:
    m.save(2, st)
    for part in ("params", "opt_state", "extra"):
      assert (ckpt_dir / "2" / part).is_dir(), part
    out = m.restore()
    assert set(out) == {"params", "opt_state", "step", "rng"}
    np.testing.assert_array_equal(out["rng"], st["rng"])
    assert out["step"] == 2
    np.testing.assert_array_equal(m.restore(only="params")["w"], np.ones(3))


def test_plain_pytree_goes_to_the_state_part(ckpt_dir):
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
          "params": {"b": np.ones(2, np.float32)}}  # no opt_state
  with _mngr(ckpt_dir) as m:
    m.save(1, tree)
    assert sorted(e for e in os.listdir(ckpt_dir / "1") if not e.startswith("_")) == ["state"]
    out = m.restore()
    _assert_trees_equal(out, tree)
    mesh = _mesh()
    tmpl = {"w": jax.ShapeDtypeStruct((2, 3), np.float32, sharding=NamedSharding(mesh, P())),
            "params": {"b": jax.ShapeDtypeStruct((2,), np.float32,
                                                 sharding=NamedSharding(mesh, P("x")))}}
    out = m.restore(abstract_state=tmpl)
    assert out["params"]["b"].sharding == NamedSharding(mesh, P("x"))
    _assert_trees_equal(out, tree)


# ----------------------------------------------------------------------------- dataset


class _Counter:
  """A minimal stateful iterator."""

  def __init__(self):
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    self.i += 1
    return self.i

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


@pytest.mark.parametrize("enable_async", [False, True])
def test_dataset_iterator_saved_and_restored(ckpt_dir, enable_async):
  it = _Counter()
  for _ in range(5):
    next(it)
  state = _trained_state()
  with _mngr(ckpt_dir, enable_async=enable_async) as m:
    assert m.save(5, state, dataset=it) is True
    next(it)  # moves on after the save call: the saved position stays 5
    m.wait_until_finished()
    assert (ckpt_dir / "5" / "dataset").is_dir()
    fresh = _Counter()
    out = m.restore(dataset=fresh)
    assert fresh.i == 5
    assert set(out) == {"params", "opt_state", "step"}  # the dataset is not in the state
    assert next(fresh) == 6
    m.save(6, dataset=it)  # a dataset alone
    fresh = _Counter()
    m.restore(6, dataset=fresh)
    assert fresh.i == 6
    m.save(7, _tree(7))
    with pytest.raises(flax_ckpt.StructureMismatchError):
      m.restore(7, dataset=_Counter())


def test_grain_iterator_saved_and_restored(ckpt_dir):
  gp = pytest.importorskip("grain.python")
  ds = gp.MapDataset.range(40).shuffle(seed=3).batch(4).to_iter_dataset()
  it = iter(ds)
  for _ in range(3):
    next(it)
  with _mngr(ckpt_dir) as m:
    m.save(3, _tree(3), dataset=it)
    expected = [next(it) for _ in range(3)]
    fresh = iter(ds)
    out = m.restore(dataset=fresh)
    assert out["step"] == 3
    got = [next(fresh) for _ in range(3)]
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- queries


def test_metrics_best_step_and_delete(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    m.save(1, _tree(1), metrics={"loss": 2, "acc": jnp.float32(0.5), "tag": "a"})
    m.save(2, _tree(2))
    m.save(3, _tree(3), metrics={"loss": np.float64(1.5)})
    assert m.metrics(1) == {"loss": 2.0, "acc": 0.5, "tag": "a"}
    assert m.metrics(2) is None
    assert m.metrics(3) == {"loss": 1.5}
    with pytest.raises(flax_ckpt.CheckpointNotFoundError):
      m.metrics(4)
    assert m.best_step() == 3  # no best_fn: the latest
    m.delete(2)
    assert m.all_steps() == [1, 3]
    assert not os.path.exists(ckpt_dir / "2")
    assert _leftovers(ckpt_dir) == []
    assert m.should_save(2) is True  # deleted: may be saved again
    m.delete(3)  # deleting the latest is allowed when asked
    assert m.all_steps() == [1]
    assert m.latest_step() == 1
    assert m.restore()["step"] == 1
    with pytest.raises(flax_ckpt.CheckpointNotFoundError):
      m.restore(3)
  assert _numeric_dirs(ckpt_dir) == [1]
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0)) == [1]


def test_best_step_with_best_fn(ckpt_dir):
  with _mngr(ckpt_dir, best_fn=lambda m: m["loss"], best_mode="min") as m:
    assert m.best_step() is None
    m.save(1, _tree(1))
    assert m.best_step() is None  # nothing with metrics
    m.save(2, _tree(2), metrics={"loss": 3.0})
    m.save(3, _tree(3), metrics={"loss": 1.0})
    m.save(4, _tree(4), metrics={"loss": 1.0})
    assert m.best_step() in (3, 4)
    assert m.all_steps() == [1, 2, 3, 4]  # no max_to_keep: everything is kept


def test_empty_directory(ckpt_dir):
  with _mngr(ckpt_dir) as m:
    assert m.latest_step() is None
    assert m.all_steps() == []
    assert m.best_step() is None
    with pytest.raises(flax_ckpt.CheckpointNotFoundError):
      m.restore()
    with pytest.raises(flax_ckpt.CheckpointNotFoundError):
      m.restore(3)


def test_reload_sees_checkpoints_of_another_manager(ckpt_dir):
  with _mngr(ckpt_dir, read_only=True) as r:
    assert r.all_steps() == []
    with _mngr(ckpt_dir) as w:
      w.save(3, _tree(3))
    assert r.all_steps() == []  # listed as of the last reload
    r.reload()
    assert r.all_steps() == [3]
    assert r.latest_step() == 3
    with _mngr(ckpt_dir) as w:  # reopened writer: sees 3, adds 4
      assert w.all_steps() == [3]
      w.save(4, _tree(4))
      w.delete(3)
    assert r.restore()["step"] == 4  # restore() of the latest lists again
    assert r.all_steps() == [4]


# ----------------------------------------------------------------------------- async


class _GateHandler(flax_ckpt.AsyncCheckpointHandler):
  """Writes one small file once the test opens the gate; fails if asked to."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1)

  def _write(self, directory, args):
    if not args.gate.wait(timeout=60):
      raise TimeoutError("gate never opened")
    if args.fail:
      raise RuntimeError("gate: the disk write failed")
    (directory / "gate.txt").write_text("ok")

  def async_save(self, directory, args):
    return [self._pool.submit(self._write, directory, args)]

  def save(self, directory, args):
    self._write(directory, args)

  def restore(self, directory, args=None):
    return (directory / "gate.txt").read_text()

  def close(self):
    self._pool.shutdown()


@flax_ckpt.args.register_with_handler(_GateHandler, for_save=True)
@dataclasses.dataclass
class _GateSave(flax_ckpt.args.CheckpointArgs):
  gate: threading.Event
  fail: bool = False


def test_async_save_returns_before_the_commit(ckpt_dir):
  gate = threading.Event()
  with _mngr(ckpt_dir, enable_async=True) as m:
    try:
      assert m.save(1, _tree(1), dataset=_GateSave(gate)) is True
      # listed while in flight, as Orbax lists it (issue 15); not on disk yet
      assert m.all_steps() == [1]
      assert m.latest_step() == 1
      assert not os.path.exists(ckpt_dir / "1")
      assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0)) == []
      # in flight counts as saved
      assert m.should_save(1) is False
      assert m.save(1, _tree(1)) is False
      assert m.save(1, _tree(1), force=True) is False
    finally:
      gate.set()
    m.wait_until_finished()
    assert m.all_steps() == [1]
    assert m.restore()["step"] == 1
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0)) == [1]


def test_async_second_save_waits_for_the_first(ckpt_dir):
  gate = threading.Event()
  with _mngr(ckpt_dir, enable_async=True) as m:
    try:
      m.save(1, _tree(1), dataset=_GateSave(gate))
      second = concurrent.futures.ThreadPoolExecutor(1)
      fut = second.submit(m.save, 2, _tree(2))
      time.sleep(0.3)
      assert not fut.done()  # waits while the first is in flight
      assert not any(e.startswith("2") for e in os.listdir(ckpt_dir))
    finally:
      gate.set()
    assert fut.result(timeout=30) is True
    second.shutdown()
    m.wait_until_finished()
    assert m.all_steps() == [1, 2]


def test_async_background_error_surfaces_from_wait_until_finished(ckpt_dir):
  gate = threading.Event()
  gate.set()
  with _mngr(ckpt_dir, enable_async=True) as m:
    assert m.save(1, _tree(1), dataset=_GateSave(gate, fail=True)) is True
    with pytest.raises(RuntimeError, match="disk write failed"):
      m.wait_until_finished()
    assert m.all_steps() == []
    assert _leftovers(ckpt_dir) == []
    m.wait_until_finished()  # reported once
    assert m.save(1, _tree(1)) is True  # the failed step can be saved again
    m.wait_until_finished()
    assert m.all_steps() == [1]


def test_async_background_error_surfaces_from_close(ckpt_dir):
  gate = threading.Event()
  gate.set()
  with pytest.raises(RuntimeError, match="disk write failed"):
    with _mngr(ckpt_dir, enable_async=True) as m:
      m.save(1, _tree(1), dataset=_GateSave(gate, fail=True))
  assert m.all_steps() == []
  with _mngr(ckpt_dir) as m2:  # the lock was released anyway
    assert m2.all_steps() == []


def test_async_large_state_snapshot_and_retention(ckpt_dir):
  big = np.ones(16 * 2**20, np.float32)  # 64 MiB
  with _mngr(ckpt_dir, enable_async=True, max_to_keep=2, fsync=True) as m:
    assert m.save(0, {"big": big}) is True
    big[:] = 7.0  # changing the source after save() returned does not change the checkpoint
    m.wait_until_finished()
    assert m.all_steps() == [0]
    out = m.restore(0)["big"]
    assert out.shape == big.shape and bool((out == 1.0).all())
    for s in range(1, 5):
      m.save(s, _tree(s))
    m.wait_until_finished()
    assert m.all_steps() == [3, 4]
  assert _numeric_dirs(ckpt_dir) == [3, 4]


# ----------------------------------------------------------------------------- iterator


def test_checkpoints_iterator_yields_committed_steps_in_order(ckpt_dir):
  for s in (10, 2, 5):  # written out of step order (a manager refuses going backwards)
    flax_ckpt.save(ckpt_dir / str(s), _tree(s))
  os.mkdir(ckpt_dir / f"20{_TMP_TAG}otherhost-1-abcd")  # in flight elsewhere
  os.mkdir(ckpt_dir / "30")  # no commit marker
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0)) == [2, 5, 10]
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0, start_after=2)) == [5, 10]
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0, start_after=10)) == []


def test_checkpoints_iterator_stops_after_timeout(ckpt_dir):
  t0 = time.monotonic()
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0.3,
                                             poll_interval_s=0.05)) == []
  assert 0.3 <= time.monotonic() - t0 < 5
  # a directory that does not exist yet: nothing, no error
  assert list(flax_ckpt.checkpoints_iterator(ckpt_dir / "later", timeout=0.1,
                                             poll_interval_s=0.05)) == []


def test_checkpoints_iterator_waits_for_new_checkpoints(ckpt_dir):
  gate = threading.Event()
  with _mngr(ckpt_dir, enable_async=True) as m:
    m.save(1, _tree(1))
    m.wait_until_finished()
    it = flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=30, poll_interval_s=0.05)
    assert next(it) == 1
    try:
      m.save(2, _tree(2), dataset=_GateSave(gate))
      # the in-flight save is never yielded
      assert list(flax_ckpt.checkpoints_iterator(ckpt_dir, timeout=0.2, poll_interval_s=0.05,
                                                 start_after=1)) == []
      timer = threading.Timer(0.2, gate.set)
      timer.start()
      t0 = time.monotonic()
      assert next(it) == 2  # blocks until committed
      assert time.monotonic() - t0 >= 0.1
    finally:
      gate.set()
    it.close()
    m.wait_until_finished()
    timer.join()


# ----------------------------------------------------------------------------- preemption


def test_preemption_sigterm_is_seen_chained_and_handler_restored(ckpt_dir):
  original = signal.getsignal(signal.SIGTERM)
  calls = []

  def mine(signum, frame):
    calls.append(signum)

  try:
    signal.signal(signal.SIGTERM, mine)
    with _mngr(ckpt_dir, save_interval_steps=10) as m:
      assert signal.getsignal(signal.SIGTERM) is not mine  # the manager installed its own
      assert m.reached_preemption(3) is False
      assert m.should_save(3) is False
      assert m.save(3, _tree(3)) is False
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 10
      while not m.reached_preemption(3) and time.monotonic() < deadline:
        time.sleep(0.01)
      assert m.reached_preemption(3) is True
      assert calls == [signal.SIGTERM]  # the previous handler was called too
      assert m.should_save(3) is True  # off-interval, saved because of the preemption
      assert m.save(3, _tree(3)) is True
      assert m.all_steps() == [3]
      assert m.should_save(3) is False  # already saved
    assert signal.getsignal(signal.SIGTERM) is mine
    with _mngr(ckpt_dir, read_only=True):
      assert signal.getsignal(signal.SIGTERM) is mine  # read_only installs nothing
  finally:
    if original is not None:
      signal.signal(signal.SIGTERM, original)


def test_preemption_handler_restored_when_managers_close_in_any_order(ckpt_dir):
  original = signal.getsignal(signal.SIGTERM)

  def mine(signum, frame):
    pass

  try:
    signal.signal(signal.SIGTERM, mine)
    a = _mngr(ckpt_dir / "a")
    b = _mngr(ckpt_dir / "b")
    a.close()  # closed in the order they were opened, not the reverse
    b.close()
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    if original is not None:
      signal.signal(signal.SIGTERM, original)


class _Gate:
  """A leaf whose save waits for ``event``: holds an async save open between its start
  and its commit."""

  def __init__(self, event):
    self.event = event


class _GateHandler(flax_ckpt.type_handlers.TypeHandler):
  def typestr(self):
    return "test_manager._Gate"

  async def serialize(self, values, infos, args=None):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    futs = [pool.submit(v.event.wait, 30) for v in values]
    pool.shutdown(wait=False)
    return futs

  async def deserialize(self, infos, args=None):
    return [None for _ in infos]

  async def metadata(self, infos):
    return [flax_ckpt.metadata.Metadata(name=i.name) for i in infos]


def test_async_save_refuses_to_commit_after_its_lock_was_taken_over(ckpt_dir):
  """A manager paused past lock_stale_after_s (here: its lock replaced while a background
  save is in flight, as a taker would) never commits into the directory."""
  import threading
  flax_ckpt.type_handlers.register_type_handler(_Gate, _GateHandler(), override=True)
  gate = threading.Event()
  m = _mngr(ckpt_dir, enable_async=True)
  try:
    m.save(1, _tree(1))
    m.wait_until_finished()
    m.save(2, {"w": np.ones(3), "g": _Gate(gate)})  # returns; the commit waits for the gate
    lock = os.path.join(ckpt_dir, _LOCK)
    os.unlink(lock)  # another job took the stale lock over
    with open(lock, "w") as f:
      json.dump({"host": "other-host", "pid": 1, "since": 0.0}, f)
    gate.set()
    with pytest.raises(flax_ckpt.CheckpointError, match="lost its owner lock"):
      m.wait_until_finished()
    assert m.all_steps() == [1]
    assert not os.path.exists(os.path.join(ckpt_dir, "2"))
    assert not [e for e in os.listdir(ckpt_dir) if e.startswith("2")]  # nothing partial
  finally:
    gate.set()
    m.close()
  with open(os.path.join(ckpt_dir, _LOCK)) as f:  # the taker's lock is untouched
    assert json.load(f)["host"] == "other-host"
