"""What a training loop ported from Orbax does with a ``CheckpointManager`` (issue 15).

SIGTERM still ends a loop that never asks ``reached_preemption`` (after saving the step it
was at; real signals to child processes), ``best_fn`` needs ``best_mode``, Orbax's objects
and keywords are refused at once with the flax_ckpt spelling, and the manager gaps the ports
ran into: ``partial=True``, several data iterators, user-named parts, an iterator inside the
state, and the save in flight counted by ``latest_step``.
"""

import concurrent.futures
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint import checkpoint_managers as ocm

import flax_ckpt
from flax_ckpt import policies

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tree(v):
  return {"w": np.full(4, float(v), np.float32), "b": np.arange(3, dtype=np.int32) + int(v)}


class _Iter:
  """A data iterator with get_state/set_state (like a grain DatasetIterator)."""

  def __init__(self, start=0):
    self.i = start

  def __next__(self):
    self.i += 1
    return self.i

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


# ----------------------------------------------------------------------------- best_mode


def test_best_fn_without_best_mode_is_an_error_naming_both_modes(ckpt_dir):
  for kw in ({}, {"read_only": True}, {"max_to_keep": 2}):
    with pytest.raises(ValueError, match=r"best_mode.*'max'.*highest.*'min'.*lowest"):
      flax_ckpt.CheckpointManager(ckpt_dir, best_fn=lambda m: m["acc"], **kw)
  with pytest.raises(ValueError, match="best_mode"):
    flax_ckpt.CheckpointManagerOptions(best_fn=lambda m: m["acc"])
  with pytest.raises(ValueError, match=r"mode='max' or mode='min'"):
    policies.BestN(lambda m: m["acc"], 2)
  assert os.listdir(ckpt_dir) == []  # refused before the directory was touched


def test_best_mode_max_keeps_the_highest_and_best_step_reads_it(ckpt_dir):
  with flax_ckpt.CheckpointManager(ckpt_dir, best_fn=lambda m: m["acc"], best_mode="max",
                                   max_to_keep=2, enable_async=False) as m:
    for s, acc in enumerate([0.1, 0.9, 0.5, 0.7, 0.2]):
      m.save(s, _tree(s), metrics={"acc": acc})
    assert m.all_steps() == [1, 3, 4]  # the two best, plus the newest
  with flax_ckpt.CheckpointManager(ckpt_dir, read_only=True, best_fn=lambda m: m["acc"],
                                   best_mode="max") as r:
    assert r.best_step() == 1
  keep = policies.BestN(lambda m: m["acc"], 1, "max")
  infos = [policies.StepInfo(s, 0.0, {"acc": a}) for s, a in [(1, 0.3), (2, 0.8)]]
  assert keep.keep(infos) == {2}


# ----------------------------------------------------------------------------- Orbax objects


@pytest.mark.parametrize("opts, spelling", [
    (dict(preservation_policy=ocm.LatestN(n=2)), r"max_to_keep=n"),
    (dict(preservation_policy=ocm.BestN(get_metric_fn=lambda m: m["a"], n=2)), r"best_mode"),
    (dict(preservation_policy=ocm.EveryNSteps(interval_steps=5)), r"keep_period"),
    (dict(save_decision_policy=ocm.FixedIntervalPolicy(10)), r"save_interval_steps"),
    (dict(save_decision_policy=ocm.ContinuousCheckpointingPolicy()), r"save_interval_secs"),
    (dict(preservation_policy=policies.AnyPreservationPolicy([ocm.LatestN(n=2)])),
     r"LatestN; .*max_to_keep=n"),
], ids=["LatestN", "BestN", "EveryNSteps", "FixedInterval", "Continuous", "nested"])
def test_orbax_policies_are_refused_at_construction(ckpt_dir, opts, spelling):
  with pytest.raises(TypeError, match=rf"is an Orbax .*{spelling}"):
    flax_ckpt.CheckpointManager(ckpt_dir, **opts)
  with pytest.raises(TypeError, match=spelling):
    flax_ckpt.CheckpointManagerOptions(**opts)
  assert os.listdir(ckpt_dir) == []


def test_orbax_options_object_is_refused(ckpt_dir):
  with pytest.raises(TypeError, match=r"Orbax CheckpointManagerOptions.*"
                                      r"flax_ckpt\.CheckpointManagerOptions"):
    flax_ckpt.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))


def test_orbax_args_and_keywords_are_refused_with_the_flax_ckpt_spelling(ckpt_dir):
  tree = _tree(1)
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=False) as m:
    with pytest.raises(TypeError, match=r"no args=.*mngr\.save\(step, state\)"):
      m.save(1, args=ocp.args.StandardSave(tree))
    with pytest.raises(TypeError, match=r"no items="):
      m.save(1, items=tree)
    with pytest.raises(TypeError, match=r"Orbax StandardSave.*mngr\.save\(step, state\)"):
      m.save(1, ocp.args.StandardSave(tree))
    with pytest.raises(TypeError, match=r"Orbax Composite.*parts="):
      m.save(1, ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    with pytest.raises(TypeError, match=r"state\['state'\] is an Orbax StandardSave"):
      m.save(1, {"state": ocp.args.StandardSave(tree)})
    with pytest.raises(TypeError, match=r"parts\['ema'\] is an Orbax StandardSave"):
      m.save(1, parts={"ema": ocp.args.StandardSave(tree)})
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
      m.save(1, tree, stepz=3)
    assert m.all_steps() == [] and m.latest_step() is None  # nothing was saved
    m.save(1, tree)
    with pytest.raises(TypeError, match=r"no args=.*restore\(step, abstract_state\)"):
      m.restore(1, args=ocp.args.StandardRestore(tree))
    with pytest.raises(TypeError, match=r"Orbax StandardRestore.*abstract_state"):
      m.restore(1, ocp.args.StandardRestore(tree))
    with pytest.raises(TypeError, match=r"Orbax Composite"):
      m.restore(1, ocp.args.Composite(state=ocp.args.StandardRestore(tree)))
    np.testing.assert_array_equal(m.restore(1)["w"], tree["w"])
  with flax_ckpt.CheckpointManager(ckpt_dir / "b", save_interval_steps=100) as m:
    # refused at the first call, not at the first step the policies save
    with pytest.raises(TypeError, match=r"Orbax StandardSave"):
      m.save(1, ocp.args.StandardSave(tree))
    with pytest.raises(ValueError, match="not both"):
      m.save(1, tree, parts={"ema": tree})


# ----------------------------------------------------------------------------- restore gaps


def test_restore_partial_reads_a_subset(ckpt_dir):
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=False) as m:
    m.save(1, _tree(1))
    with pytest.raises(flax_ckpt.StructureMismatchError, match="partial=True"):
      m.restore(1, {"w": np.zeros(4, np.float32)})
    out = m.restore(1, {"w": np.zeros(4, np.float32)}, partial=True)
    assert list(out) == ["w"]
    np.testing.assert_array_equal(out["w"], _tree(1)["w"])


@pytest.mark.parametrize("enable_async", [False, True])
def test_several_data_iterators_are_saved_and_restored(ckpt_dir, enable_async):
  train, ev = _Iter(5), _Iter(70)
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=enable_async) as m:
    m.save(1, _tree(1), dataset={"train": train, "eval": ev})
    m.save(2, _tree(2), dataset=_Iter(9))  # one iterator still works as before
    m.wait_until_finished()
    assert set(m.metadata(1).checkpointables) == {"state", "dataset.train", "dataset.eval"}
    got_train, got_eval = _Iter(), _Iter()
    out = m.restore(1, dataset={"train": got_train, "eval": got_eval})
    assert (got_train.i, got_eval.i) == (5, 70)
    np.testing.assert_array_equal(out["w"], _tree(1)["w"])
    only_train = _Iter()
    m.restore(1, dataset={"train": only_train})  # a subset of them is fine
    assert only_train.i == 5
    one = _Iter()
    m.restore(2, dataset=one)
    assert one.i == 9
    with pytest.raises(flax_ckpt.StructureMismatchError, match=r"several iterators.*eval"):
      m.restore(1, dataset=_Iter())
    with pytest.raises(flax_ckpt.StructureMismatchError, match="no iterator 'test'"):
      m.restore(1, dataset={"test": _Iter()})
    with pytest.raises(flax_ckpt.StructureMismatchError, match="no iterator 'train'"):
      m.restore(2, dataset={"train": _Iter()})
    with pytest.raises(TypeError, match="get_state"):
      m.save(3, _tree(3), dataset={"train": [1, 2]})
    with pytest.raises(ValueError, match="not allowed"):
      m.save(3, _tree(3), dataset={"a/b": _Iter()})


def test_an_iterator_inside_the_state_points_to_dataset(ckpt_dir):
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=False) as m:
    with pytest.raises(TypeError, match=r"state\['loader'\] is a data iterator.*dataset="):
      m.save(1, {"params": _tree(1), "loader": _Iter()})
    with pytest.raises(TypeError, match=r"parts\['p'\]\['it'\] is a data iterator"):
      m.save(1, parts={"p": {"it": _Iter()}})
    assert m.all_steps() == []


def test_user_named_parts(ckpt_dir):
  params, ema = _tree(1), _tree(100)
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=False) as m:
    m.save(1, parts={"params": params, "ema": ema}, metrics={"loss": 1.0})
    m.save(2, {"params": params, "ema": ema})  # a dict state is still one state
    assert set(m.metadata(1).checkpointables) == {"params", "ema"}
    assert set(m.metadata(2).checkpointables) == {"state"}
    both = m.restore(1)
    assert set(both) == {"params", "ema"}
    np.testing.assert_array_equal(both["ema"]["w"], ema["w"])
    np.testing.assert_array_equal(m.restore(1, only="ema")["w"], ema["w"])
    assert set(m.restore(1, only=["ema"])) == {"ema"}
    # templates: one part's with only='name', else a dict {part: template}
    tmpl = {"w": np.zeros(4, np.float64), "b": np.zeros(3, np.int64)}
    assert m.restore(1, tmpl, only="ema")["w"].dtype == np.float64
    out = m.restore(1, {"ema": tmpl})
    assert out["ema"]["w"].dtype == np.float64 and out["params"]["w"].dtype == np.float32
    assert list(m.restore(1, {"w": tmpl["w"]}, only="ema", partial=True)) == ["w"]
    with pytest.raises(flax_ckpt.StructureMismatchError, match=r"not being restored"):
      m.restore(1, {"opt": tmpl})
    with pytest.raises(TypeError, match=r"dict \{part: template\}"):
      m.restore(1, [tmpl])
    with pytest.raises(flax_ckpt.StructureMismatchError, match="no part"):
      m.restore(1, only="opt")
    with pytest.raises(ValueError, match="not both"):
      m.save(3, params, parts={"ema": ema})
    with pytest.raises(ValueError, match="data iterators'"):
      m.save(3, parts={"dataset": ema})
    with pytest.raises(TypeError, match="non-empty dict"):
      m.save(3, parts={})
    it = _Iter(4)
    m.save(3, parts={"params": params}, dataset=it)
    got = _Iter()
    assert set(m.restore(3, dataset=got)) == {"params"} and got.i == 4


# ----------------------------------------------------------------------------- in flight


class _SlowHandler(flax_ckpt.AsyncCheckpointHandler):
  """Writes one small file once the test opens the gate."""

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1)

  def _write(self, directory, args):
    if not args.gate.wait(timeout=60):
      raise TimeoutError("gate never opened")
    (directory / "gate.txt").write_text("ok")

  def async_save(self, directory, args):
    return [self._pool.submit(self._write, directory, args)]

  def save(self, directory, args):
    self._write(directory, args)

  def restore(self, directory, args=None):
    return (directory / "gate.txt").read_text()

  def close(self):
    self._pool.shutdown()


@flax_ckpt.args.register_with_handler(_SlowHandler, for_save=True)
@dataclasses.dataclass
class _Slow(flax_ckpt.args.CheckpointArgs):
  gate: threading.Event


def test_latest_step_includes_the_save_in_flight_and_restore_waits_for_it(ckpt_dir):
  gate = threading.Event()
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=True) as m:
    m.save(1, parts={"state": _tree(1)})
    m.wait_until_finished()
    try:
      assert m.save(2, parts={"state": _tree(2), "slow": _Slow(gate)}) is True
      assert not os.path.exists(ckpt_dir / "2")  # not committed yet
      assert m.latest_step() == 2
      assert m.all_steps() == [1, 2]
      threading.Timer(0.3, gate.set).start()
      t0 = time.monotonic()
      out = m.restore(only="state")  # the latest: waits for step 2 to commit
      assert time.monotonic() - t0 >= 0.2
    finally:
      gate.set()
    np.testing.assert_array_equal(out["w"], _tree(2)["w"])
    assert os.path.exists(ckpt_dir / "2")


# ----------------------------------------------------------------------------- SIGTERM

_CHILD = textwrap.dedent("""
    import concurrent.futures, dataclasses, signal, sys, time
    import numpy as np
    import flax_ckpt

    workdir, mode, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])


    class SlowHandler(flax_ckpt.AsyncCheckpointHandler):  # a part written in 3 s, async
      def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

      def _write(self, directory):
        time.sleep(3.0)
        (directory / "slow.txt").write_text("ok")

      def async_save(self, directory, args):
        return [self._pool.submit(self._write, directory)]

      def save(self, directory, args):
        self._write(directory)

      def restore(self, directory, args=None):
        return (directory / "slow.txt").read_text()


    @flax_ckpt.args.register_with_handler(SlowHandler, for_save=True)
    @dataclasses.dataclass
    class Slow(flax_ckpt.args.CheckpointArgs):
      pass


    if mode == "ignore":
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    m = flax_ckpt.CheckpointManager(workdir, save_interval_steps=1000, enable_async=True,
                                    sigterm_grace_s=grace)
    step = 0
    while True:
      step += 1
      state = {"w": np.full(1 << 16, step, np.int64)}
      if mode in ("saves", "checks", "ignore"):
        m.save(step, state)
      if mode == "in_flight" and step == 3:
        m.save(step, parts={"state": state, "slow": Slow()}, force=True)  # async: 3 s
        print("SAVING", flush=True)
      print(f"STEP {step}", flush=True)
      if mode == "checks" and m.reached_preemption(step):
        m.save(step, state, force=True)
        m.wait_until_finished()
        print(f"PREEMPTED {step}", flush=True)
        time.sleep(grace + 1.0)  # the grace timer must not end a loop that asks
        m.close()
        print("DONE", flush=True)
        sys.exit(0)
      time.sleep(0.05)
""")


class _Child:
  """The loop above as a child process (this checkout's flax_ckpt, one CPU device)."""

  def __init__(self, tmp_path, mode, grace):
    script = tmp_path / "loop.py"
    script.write_text(_CHILD)
    self.workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.fspath(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    self.err = tmp_path / "stderr.txt"
    with open(self.err, "w") as err:
      self.proc = subprocess.Popen(
          [sys.executable, "-W", "error", os.fspath(script), os.fspath(self.workdir), mode,
           str(grace)], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
          env=env, text=True)
    self.lines = []

  def wait_line(self, prefix, timeout=60):
    deadline = time.monotonic() + timeout
    for line in self.proc.stdout:
      self.lines.append(line.strip())
      if line.startswith(prefix):
        return line.strip()
      assert time.monotonic() < deadline, self.lines[-10:]
    pytest.fail(f"exited (rc={self.proc.wait()}) before {prefix!r}: {self.lines[-10:]}\n"
                f"{self.err.read_text()[-3000:]}")

  def finish(self, timeout=60):
    out, _ = self.proc.communicate(timeout=timeout)
    self.lines += out.split()
    return self.proc.returncode

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate()

  def steps_printed(self):
    return [int(x.split()[1]) for x in self.lines if x.startswith("STEP ")]


def _committed(workdir):
  with flax_ckpt.CheckpointManager(workdir, read_only=True) as r:
    return r.all_steps(), (r.restore() if r.all_steps() else None)


@pytest.mark.slow
def test_sigterm_ends_a_loop_that_never_asks_after_saving_its_next_step(tmp_path):
  child = _Child(tmp_path, "saves", grace=30.0)
  try:
    child.wait_line("STEP 5")
    os.kill(child.proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    rc = child.finish()
  finally:
    child.kill()
  assert rc == -signal.SIGTERM, (rc, child.lines[-5:], child.err.read_text()[-3000:])
  assert time.monotonic() - t0 < 20  # by the save, not by the 30 s grace period
  assert "Traceback" not in child.err.read_text()
  # save(k) of the first step after the signal was forced, committed, and never returned
  k = max(child.steps_printed()) + 1
  steps, state = _committed(child.workdir)
  assert steps == [k], (steps, child.lines[-5:])
  np.testing.assert_array_equal(state["w"], np.full(1 << 16, k, np.int64))


@pytest.mark.slow
def test_sigterm_ends_a_loop_that_never_saves_within_the_grace_period(tmp_path):
  grace = 1.5
  child = _Child(tmp_path, "no_saves", grace=grace)
  try:
    child.wait_line("STEP 3")
    os.kill(child.proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    rc = child.finish()
    took = time.monotonic() - t0
  finally:
    child.kill()
  assert rc == -signal.SIGTERM, (rc, child.err.read_text()[-3000:])
  assert grace - 0.2 <= took < grace + 10, took
  assert _committed(child.workdir)[0] == []


@pytest.mark.slow
def test_sigterm_grace_period_lets_a_save_in_flight_commit(tmp_path):
  child = _Child(tmp_path, "in_flight", grace=0.3)
  try:
    child.wait_line("SAVING")
    os.kill(child.proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    rc = child.finish()
    took = time.monotonic() - t0
  finally:
    child.kill()
  assert rc == -signal.SIGTERM, (rc, child.err.read_text()[-3000:])
  assert took > 1.5, took  # the write (3 s) was still going when the grace period ended
  with flax_ckpt.CheckpointManager(child.workdir, read_only=True) as r:
    assert r.all_steps() == [3]  # ended after the commit, well past the grace period
    np.testing.assert_array_equal(r.restore(only="state")["w"], np.full(1 << 16, 3, np.int64))


@pytest.mark.slow
def test_sigterm_in_a_loop_that_asks_reached_preemption_saves_and_exits_0(tmp_path):
  grace = 1.0
  child = _Child(tmp_path, "checks", grace=grace)
  try:
    child.wait_line("STEP 5")
    os.kill(child.proc.pid, signal.SIGTERM)
    kp = int(child.wait_line("PREEMPTED").split()[1])
    rc = child.finish()
  finally:
    child.kill()
  assert rc == 0, (rc, child.err.read_text()[-3000:])
  assert child.lines[-1] == "DONE"  # outlived the grace period: the loop ended itself
  steps, state = _committed(child.workdir)
  assert steps == [kp] and kp >= 5
  np.testing.assert_array_equal(state["w"], np.full(1 << 16, kp, np.int64))


@pytest.mark.slow
def test_sigterm_ignored_before_the_manager_stays_ignored(tmp_path):
  grace = 0.5
  child = _Child(tmp_path, "ignore", grace=grace)
  try:
    child.wait_line("STEP 3")
    os.kill(child.proc.pid, signal.SIGTERM)
    time.sleep(grace + 1.5)
    last = int(child.wait_line("STEP").split()[1])
    assert child.proc.poll() is None  # still training
  finally:
    child.kill()
  assert last > 3
