"""A ``CheckpointManager`` training loop under real preemption (SIGTERM) and crashes (SIGKILL).

``tests/_train_loop.py`` runs as a child process: a deterministic toy training loop whose
state after step ``k`` is a pure function of ``k``, so every checkpoint on disk can be checked
bit for bit. SIGTERM must make it save the current step and exit 0, and the restart must go
on from there. SIGKILL at random moments (often in the middle of an async save or of the
retention's deletion) must never leave a partial checkpoint that is listed or loaded; every
restart resumes from the latest committed step, removes the dead process's leftovers and
takes over its stale directory lock: also when the dead owner's pid came back (the restarted
process itself, as after a container restart, or an unrelated process) and its heartbeat
stopped long ago. A lock whose owner is alive blocks a second writer.
"""

import importlib.util
import json
import os
import pathlib
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import flax_ckpt

pytestmark = pytest.mark.slow  # subprocesses; `-m 'not slow'` skips them

_LOOP = pathlib.Path(__file__).resolve().parent / "_train_loop.py"
_TMP_TAG = ".flax_ckpt-tmp-"
_OLD_TAG = ".flax_ckpt-old-"
_LOCK = ".flax_ckpt_owner"
_NEVER_ENDS = 10**6  # TOTAL_STEPS of a run that is killed long before it finishes


def _import_loop():
  spec = importlib.util.spec_from_file_location("_flax_ckpt_train_loop", _LOOP)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


loop = _import_loop()


class _Expected:
  """``loop.state_at`` with a small cache (states are 4 MiB each)."""

  def __init__(self):
    self._cache = {}

  def __call__(self, step):
    state = loop.state_at(step, self._cache)
    for s in sorted(self._cache)[:-6]:
      del self._cache[s]
    return state


def _child_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device is plenty for the child
  env["JAX_PLATFORMS"] = "cpu"
  return env


class _Loop:
  """The training loop as a child process; stdout lines are followed by a reader thread."""

  def __init__(self, workdir, total, err_path, *, interval, sleep=0.0, chain=False,
               hold=False):
    args = [os.fspath(workdir), str(total), "--interval", str(interval), "--sleep", str(sleep)]
    args += ["--chain"] * chain + ["--hold"] * hold
    self.err_path = err_path
    self._err = open(err_path, "w")  # closed in close()
    self.proc = subprocess.Popen(
        [sys.executable, "-W", "error", os.fspath(_LOOP), *args], stdout=subprocess.PIPE,
        stderr=self._err, stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
        env=_child_env(), text=True)
    self.pid = self.proc.pid
    self.lines = []
    self._q = queue.Queue()
    self._pump = threading.Thread(target=self._read, daemon=True)
    self._pump.start()

  def _read(self):
    for line in self.proc.stdout:
      self._q.put(line.rstrip("\n"))
    self._q.put(None)

  def stderr(self):
    try:
      with open(self.err_path, errors="replace") as f:
        return f.read()[-4000:]
    except OSError:
      return "<none>"

  def wait_line(self, pattern, timeout=60):
    """The match of the first new line that fully matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        pytest.fail(f"loop did not print {pattern!r} within {timeout}s; output: "
                    f"{self.lines[-20:]}\nstderr:\n{self.stderr()}")
      try:
        line = self._q.get(timeout=left)
      except queue.Empty:
        continue
      if line is None:
        self._q.put(None)
        pytest.fail(f"loop exited (rc={self.proc.wait()}) before printing {pattern!r}; "
                    f"output: {self.lines[-20:]}\nstderr:\n{self.stderr()}")
      self.lines.append(line)
      m = re.fullmatch(pattern, line)
      if m:
        return m

  def finish(self, timeout=60):
    """Waits for the exit; returns the return code (all output is in ``lines``)."""
    try:
      rc = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      pytest.fail(f"loop did not exit within {timeout}s; output: {self.lines[-20:]}")
    self._pump.join(timeout=30)
    while True:
      line = self._q.get()
      if line is None:
        break
      self.lines.append(line)
    return rc

  def sigkill(self):
    os.kill(self.pid, signal.SIGKILL)
    return self.finish(timeout=30)

  def close(self):
    """Kills the child if it still runs, reaps it and closes its pipes (for finally:)."""
    if self.proc.poll() is None:
      os.kill(self.pid, signal.SIGKILL)
    self.proc.wait(timeout=30)
    self._pump.join(timeout=30)
    self.proc.stdout.close()
    if self.proc.stdin is not None:
      self.proc.stdin.close()
    self._err.close()


def _leftovers(workdir):
  """``{name: pid}`` of temporary/old step directories (pid None if the name has none)."""
  out = {}
  for e in os.listdir(workdir):
    for tag in (_TMP_TAG, _OLD_TAG):
      if tag in e:
        parts = e.split(tag, 1)[1].rsplit("-", 2)
        out[e] = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
  return out


def _own_tmp_dirs(workdir, pid):
  host = socket.gethostname()
  return [e for e in os.listdir(workdir) if f"{_TMP_TAG}{host}-{pid}-" in e]


def _lock_owner(workdir):
  with open(os.path.join(workdir, _LOCK), encoding="utf-8") as f:
    return json.load(f)


def _assert_equal_state(got, want, step):
  assert set(got) == {"w", "b", "step"}, (step, sorted(got))
  assert isinstance(got["w"], jax.Array), (step, type(got["w"]))
  assert isinstance(got["b"], np.ndarray), (step, type(got["b"]))
  assert type(got["step"]) is int and got["step"] == step, (step, got["step"])
  for k in ("w", "b"):
    a = np.asarray(got[k])
    assert a.dtype == np.float32 and a.shape == want[k].shape, (step, k, a.dtype, a.shape)
    # bit for bit: compare the raw bytes, not the float values
    assert a.tobytes() == want[k].tobytes(), f"step {step}: {k} differs from the expectation"


def _check_committed(workdir, expected, *, interval, max_listed):
  """Every listed step is committed, loads fully and equals its expectation.

  Returns the listed steps (ascending).
  """
  with flax_ckpt.CheckpointManager(workdir, read_only=True) as ro:
    steps = ro.all_steps()
    assert steps == sorted(flax_ckpt.checkpoints_iterator(workdir, timeout=0))
    assert len(steps) <= max_listed, steps
    for s in steps:
      assert s % interval == 0, steps  # only policy saves happen in these runs
      _assert_equal_state(ro.restore(s), expected(s), s)
      assert ro.metrics(s) == {"loss": loop.loss(expected(s))}, s
    if steps:
      _assert_equal_state(ro.restore(), expected(steps[-1]), steps[-1])
  # No directory under a final step name lacks its commit marker: a partial save is only
  # ever under a temporary name.
  for e in os.listdir(workdir):
    if e.isdigit():
      assert os.path.exists(os.path.join(workdir, e, "_CHECKPOINT")), e
      assert int(e) in steps, (e, steps)
  return steps


def _assert_clean_run(run, rc):
  err = run.stderr()
  assert rc == 0, f"rc={rc}; output: {run.lines[-20:]}\nstderr:\n{err}"
  assert "Traceback" not in err and "ERROR" not in err and "Warning" not in err, err


def test_sigterm_saves_current_step_and_restart_resumes(ckpt_dir):
  interval, total = 5, 30
  workdir = ckpt_dir / "run"
  expected = _Expected()

  run = _Loop(workdir, total, ckpt_dir / "first.err", interval=interval, sleep=0.1,
              chain=True)
  try:
    assert run.wait_line(r"FRESH|RESUMED \d+").group(0) == "FRESH"
    # A step right after a policy save, so the preempted step is not one the policy saves.
    while True:
      k = int(run.wait_line(r"STEP (\d+)").group(1))
      if k > interval and k % interval == 1:
        break
    os.kill(run.pid, signal.SIGTERM)
    rc = run.finish()
  finally:
    run.close()
  _assert_clean_run(run, rc)
  preempted = [int(m.group(1)) for m in map(re.compile(r"PREEMPTED (\d+)").fullmatch,
                                            run.lines) if m]
  assert len(preempted) == 1, run.lines
  kp = preempted[0]
  assert k <= kp <= k + 3 and kp % interval != 0, (k, kp)
  steps_run = [int(x.split()[1]) for x in run.lines if x.startswith("STEP ")]
  assert steps_run == list(range(1, kp + 1)), run.lines
  assert run.lines[-4:] == ["CHAINED 1", "HANDLER_RESTORED True",
                            f"FINAL {kp} {loop.digest(expected(kp))}", "DONE"], run.lines

  # The preempted step is the latest committed one, exactly the state of that step.
  saved = sorted({s for s in range(interval, kp + 1, interval)} | {kp})
  with flax_ckpt.CheckpointManager(workdir, read_only=True) as ro:
    assert ro.latest_step() == kp
    assert ro.all_steps() == saved[-3:]
    _assert_equal_state(ro.restore(), expected(kp), kp)
    for s in ro.all_steps():
      _assert_equal_state(ro.restore(s), expected(s), s)
  assert list(flax_ckpt.checkpoints_iterator(workdir, timeout=0)) == saved[-3:]
  assert not _leftovers(workdir)
  assert not os.path.exists(workdir / _LOCK)  # close() released the directory

  # The restart resumes from the preempted step and ends where an uninterrupted run ends.
  run = _Loop(workdir, total, ckpt_dir / "second.err", interval=interval)
  try:
    assert run.wait_line(r"FRESH|RESUMED \d+").group(0) == f"RESUMED {kp}"
    rc = run.finish()
  finally:
    run.close()
  _assert_clean_run(run, rc)
  steps_run = [int(x.split()[1]) for x in run.lines if x.startswith("STEP ")]
  assert steps_run == list(range(kp + 1, total + 1)), run.lines
  assert not any(x.startswith("PREEMPTED") for x in run.lines), run.lines
  assert run.lines[-2:] == [f"FINAL {total} {loop.digest(expected(total))}", "DONE"]
  with flax_ckpt.CheckpointManager(workdir, read_only=True) as ro:
    assert ro.all_steps() == [total - 2 * interval, total - interval, total]
    _assert_equal_state(ro.restore(), expected(total), total)
  assert not _leftovers(workdir)
  assert not os.path.exists(workdir / _LOCK)


def test_sigkill_at_random_moments_never_loses_or_exposes_a_checkpoint(ckpt_dir):
  interval = 2
  workdir = ckpt_dir / "run"
  expected = _Expected()
  rnd = random.Random()
  seed = rnd.randrange(2**32)
  rnd.seed(seed)
  budget_end = time.monotonic() + 22
  min_iters, max_iters = 5, 10
  latest = None  # the latest committed step before each start
  prev_steps = []  # the steps listed before each start
  dead_pid = None
  log = []  # (mode, delay, latest after the kill, leftovers of the dead process)
  it = 0
  while it < max_iters and (it < min_iters or time.monotonic() < budget_end):
    if dead_pid is not None:
      # The dead process's lock is still there, naming it: the restart must take it over.
      assert _lock_owner(workdir)["pid"] == dead_pid
    run = _Loop(workdir, _NEVER_ENDS, ckpt_dir / f"iter{it}.err", interval=interval)
    try:
      first = run.wait_line(r"FRESH|RESUMED \d+").group(0)
      want = "FRESH" if latest is None else f"RESUMED {latest}"
      assert first == want, f"seed={seed} iter {it}: {first!r} != {want!r}\n{run.stderr()}"
      # Its manager is open: it holds the lock, and nothing of a dead process is left over.
      assert _lock_owner(workdir)["pid"] == run.pid
      stale = {e: p for e, p in _leftovers(workdir).items() if p != run.pid}
      assert not stale, f"seed={seed} iter {it}: leftovers of dead processes: {stale}"

      run.wait_line(r"STEP \d+")
      mode = rnd.choice(["random", "mid-save"])
      if mode == "random":
        delay = rnd.uniform(0.0, 0.6)
      else:  # right after an async save of this process started writing
        delay = rnd.uniform(0.0, 0.04)
        deadline = time.monotonic() + 10
        while not _own_tmp_dirs(workdir, run.pid) and time.monotonic() < deadline:
          time.sleep(0.001)
      time.sleep(delay)
      rc = run.sigkill()
    finally:
      run.close()
    assert rc == -signal.SIGKILL, f"iter {it}: rc={rc}\n{run.stderr()}"
    dead_pid = run.pid
    # A kill between a commit and its retention leaves 3 kept + 1. If the next run is
    # killed the same way after its first commit, the dead runs' extras are all still
    # there plus that one step: retention runs after a commit, never on open (opening a
    # manager to restore must not delete anything).
    steps = _check_committed(workdir, expected, interval=interval,
                             max_listed=max(4, len(prev_steps) + 1))
    if len(steps) > 4:
      assert set(steps[:-1]) == set(prev_steps), (seed, it, prev_steps, steps)
    new_latest = steps[-1] if steps else None
    if latest is not None:
      assert new_latest is not None and new_latest >= latest, (seed, it, latest, steps)
    printed = [int(x.split()[1]) for x in run.lines if x.startswith("STEP ")]
    if new_latest is not None:
      assert new_latest <= max(printed) + 1, (seed, it, printed, steps)
    left = {e for e, p in _leftovers(workdir).items() if p == dead_pid}
    log.append((mode, round(delay, 3), new_latest, sorted(left)))
    latest = new_latest
    prev_steps = steps
    it += 1

  # Some kills must have hit an async save in the middle of writing, or the test proved
  # little: its temporary directory is left behind.
  mid_save = [x for x in log if any(_TMP_TAG in e for e in x[3])]
  assert mid_save, f"seed={seed}: no kill landed in the middle of a save: {log}"
  assert latest is not None, log

  # A final run to completion resumes from the latest committed step, ends with the state
  # of an uninterrupted run and keeps exactly the 3 newest checkpoints.
  total = latest + 4 * interval
  run = _Loop(workdir, total, ckpt_dir / "final.err", interval=interval)
  try:
    assert run.wait_line(r"FRESH|RESUMED \d+").group(0) == f"RESUMED {latest}"
    rc = run.finish()
  finally:
    run.close()
  _assert_clean_run(run, rc)
  assert run.lines[-2:] == [f"FINAL {total} {loop.digest(expected(total))}", "DONE"]
  steps = _check_committed(workdir, expected, interval=interval, max_listed=3)
  assert steps == [total - 2 * interval, total - interval, total], (seed, log)
  assert not _leftovers(workdir)
  assert not os.path.exists(workdir / _LOCK)


def test_lock_of_a_live_owner_blocks_and_of_a_killed_one_does_not(ckpt_dir):
  interval = 2
  workdir = ckpt_dir / "run"
  expected = _Expected()
  run = _Loop(workdir, _NEVER_ENDS, ckpt_dir / "first.err", interval=interval, sleep=0.02)
  try:
    run.wait_line(r"STEP 5")
    # While its owner lives, the directory cannot be opened for writing by anyone else.
    with pytest.raises(flax_ckpt.CheckpointError, match="in use by another CheckpointManager"):
      flax_ckpt.CheckpointManager(workdir, save_interval_steps=interval).close()
    rc = run.sigkill()
  finally:
    run.close()
  assert rc == -signal.SIGKILL
  owner = _lock_owner(workdir)
  assert owner["pid"] == run.pid and owner["host"] == socket.gethostname()
  with flax_ckpt.CheckpointManager(workdir, read_only=True) as ro:
    latest = ro.latest_step()
  assert latest is not None and latest >= 2  # save(4) waited for save(2) to commit

  total = latest + 2 * interval
  run = _Loop(workdir, total, ckpt_dir / "second.err", interval=interval)
  try:
    first = run.wait_line(r"FRESH|RESUMED \d+").group(0)
    assert first == f"RESUMED {latest}", run.stderr()
    rc = run.finish()
  finally:
    run.close()
  _assert_clean_run(run, rc)
  assert "in use by another CheckpointManager" not in run.stderr()
  assert run.lines[-2:] == [f"FINAL {total} {loop.digest(expected(total))}", "DONE"]
  assert not os.path.exists(workdir / _LOCK)
  # The test process can now open it for writing too.
  with flax_ckpt.CheckpointManager(workdir, save_interval_steps=interval) as m:
    assert m.latest_step() == total


def _committed_like_the_loop(workdir, steps):
  """Commits ``steps`` exactly as the loop saves them (from this process)."""
  with flax_ckpt.CheckpointManager(workdir, save_interval_steps=2, max_to_keep=3,
                                   enable_async=False) as m:
    for s in steps:
      st = loop.state_at(s)
      assert m.save(s, loop.to_saved(st), metrics={"loss": loop.loss(st)})


def _leave_dead_owner_lock(workdir, pid):
  """The lock file a SIGKILLed owner with ``pid`` leaves, its heartbeat stopped an hour ago
  (far more than the default ``lock_stale_after_s`` of 600 s)."""
  path = os.path.join(workdir, _LOCK)
  long_ago = time.time() - 3600
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": pid, "since": long_ago - 60}, f)
  os.utime(path, (long_ago, long_ago))


def _resumes_and_finishes(run, latest, total):
  first = run.wait_line(r"FRESH|RESUMED \d+").group(0)
  assert first == f"RESUMED {latest}", run.stderr()
  rc = run.finish()
  _assert_clean_run(run, rc)
  assert run.lines[-2:] == [f"FINAL {total} {loop.digest(loop.state_at(total))}", "DONE"]


def test_restart_with_the_dead_owners_pid_is_not_blocked(ckpt_dir):
  # A job killed by SIGKILL and restarted in a fresh container (same hostname) often gets
  # the same pid again (e.g. 1). No manager of the new process holds the lock, its
  # heartbeat stopped long ago: the restart must take it over, not refuse to start.
  workdir = ckpt_dir / "run"
  _committed_like_the_loop(workdir, [2, 4])
  run = _Loop(workdir, 8, ckpt_dir / "run.err", interval=2, hold=True)
  try:
    pid = int(run.wait_line(r"HOLD (\d+)").group(1))
    assert pid == run.pid
    _leave_dead_owner_lock(workdir, pid)
    run.proc.stdin.write("go\n")
    run.proc.stdin.flush()
    _resumes_and_finishes(run, 4, 8)
  finally:
    run.close()
  assert not os.path.exists(workdir / _LOCK)


def test_restart_when_the_dead_owners_pid_was_reused_is_not_blocked(ckpt_dir):
  # The dead owner's pid now belongs to an unrelated live process. Its heartbeat stopped an
  # hour ago (a live owner refreshes it every lock_stale_after_s / 4): the lock is stale.
  workdir = ckpt_dir / "run"
  _committed_like_the_loop(workdir, [2, 4])
  unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               stdin=subprocess.DEVNULL, env=_child_env())
  try:
    _leave_dead_owner_lock(workdir, unrelated.pid)
    run = _Loop(workdir, 8, ckpt_dir / "run.err", interval=2)
    try:
      _resumes_and_finishes(run, 4, 8)
    finally:
      run.close()
  finally:
    unrelated.kill()
    unrelated.wait(timeout=30)
  assert not os.path.exists(workdir / _LOCK)
