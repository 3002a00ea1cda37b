"""Crashes on object stores (s3:// on moto, gs:// on fake-gcs-server): ``kill -9`` in the
middle of a save, the cleanup of the dead saves' generations, and the manager's owner lock.

A save writes ``<ckpt>/flax_ckpt-gen-<time>-<host>-<pid>-<hex>/...`` and commits by writing
``<ckpt>/_CHECKPOINT`` (naming that generation) last. A child process (tests/_objstore_worker.py)
saves ~64 MiB in 1 MiB segment objects and is SIGKILLed after its generation appears: no
partial generation may ever be listed or loaded, and what was committed before must load
exactly, whatever the moment of the kill.
"""

import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import flax_ckpt
from flax_ckpt._src.format import GEN_RE
from flax_ckpt._src.io.storage import objstore

_WORKER = Path(__file__).resolve().parent / "_objstore_worker.py"
_SEGMENT = 1 << 20
_LOCK = ".flax_ckpt_owner"
_MISSING = (flax_ckpt.CheckpointNotFoundError, flax_ckpt.IncompleteCheckpointError)


def _import_worker():
  import importlib.util

  spec = importlib.util.spec_from_file_location("_flax_ckpt_objstore_worker", _WORKER)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


worker = _import_worker()


# --- child processes (the machinery of tests/test_atomic.py) ---------------------------

def _child_env():
  env = dict(os.environ)  # the AWS_* / STORAGE_EMULATOR_HOST of the server fixtures
  env["FLAX_CKPT_OBJECT_BYTES"] = str(_SEGMENT)
  env["FLAX_CKPT_OBJECT_RETRIES"] = "2"
  return env


def _start(args, err_file, stdin=subprocess.DEVNULL):
  proc = subprocess.Popen([sys.executable, str(_WORKER), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=err_file, stdin=stdin,
                          env=_child_env(), text=True)
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in proc.stdout:
      lines.put(line.rstrip("\n"))
    lines.put(None)

  proc.pump = threading.Thread(target=pump, daemon=True)
  proc.pump.start()
  return proc, lines


def _read(p):
  try:
    return Path(p).read_text(errors="replace")[-4000:]
  except OSError:
    return "<none>"


def _wait_line(proc, lines, want, timeout, err_path):
  deadline = time.monotonic() + timeout
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      pytest.fail(f"child did not print {want!r} within {timeout}s; stderr:\n{_read(err_path)}")
    try:
      line = lines.get(timeout=left)
    except queue.Empty:
      continue
    if line is None:
      pytest.fail(f"child exited (rc={proc.wait()}) before printing {want!r}; stderr:\n"
                  f"{_read(err_path)}")
    if line == want:
      return


def _kill(proc):
  """SIGKILLs the child if still running and reaps it (a zombie's pid still looks alive)."""
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  proc.pump.join(timeout=30)
  proc.stdout.close()


# --- the object-store layout -----------------------------------------------------------

def _gens(path):
  """The generation prefixes directly under ``path``."""
  return sorted({k.split("/", 1)[0] for k in objstore.list_keys(path)
                 if GEN_RE.fullmatch(k.split("/", 1)[0])})


def _marker(path):
  got = objstore.read_versioned(f"{path}/_CHECKPOINT")
  return None if got is None else json.loads(got[0])


def _of_pid(gens, pid):
  return [g for g in gens if int(GEN_RE.fullmatch(g).group(3)) == pid]


def _kill_mid_save(args, watch, delay, err_path):
  """Runs a saving child, SIGKILLs it ``delay`` s after its generation shows up under
  ``watch``; returns (pid, return code, whether its generation was seen before the kill)."""
  with open(err_path, "w") as err:
    proc, lines = _start(args, err)
    try:
      _wait_line(proc, lines, "SAVING", 120, err_path)
      deadline = time.monotonic() + 30
      seen = False
      while proc.poll() is None and time.monotonic() < deadline:
        if _of_pid(_gens(watch), proc.pid):
          seen = True
          break
        time.sleep(0.005)
      time.sleep(delay)
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
      rc = proc.wait(timeout=30)
    finally:
      _kill(proc)
  if rc not in (0, -signal.SIGKILL):
    pytest.fail(f"the saving child failed (rc={rc}); stderr:\n{_read(err_path)}")
  return proc.pid, rc, seen


def _small(tag, n=8):
  return {"w": np.arange(n * 16, dtype=np.float32).reshape(n, 16) + len(tag), "tag": tag}


def _assert_tree_equal(got, want):
  assert set(got) == set(want), (sorted(got), sorted(want))
  for k, v in want.items():
    if isinstance(v, np.ndarray):
      g = np.asarray(got[k])
      assert g.dtype == v.dtype and g.shape == v.shape, k
      assert np.array_equal(g, v), k
    else:
      assert got[k] == v, k


def _assert_not_loadable(path):
  with pytest.raises(_MISSING):
    flax_ckpt.load(path)
  with pytest.raises(_MISSING):
    flax_ckpt.metadata(path)


def _committed_steps(run):
  with flax_ckpt.CheckpointManager(run, read_only=True) as m:
    steps = m.all_steps()
  assert list(flax_ckpt.checkpoints_iterator(run, timeout=0)) == steps
  return steps


# --- A1 + A2: repeated kills mid-save, then the cleanup -------------------------------

@pytest.mark.slow
def test_sigkill_mid_save_never_exposes_a_partial_checkpoint(objstore_root, tmp_path):
  root = objstore_root
  ckpt, run = f"{root}/ckpt", f"{root}/run"
  want_ckpt = _small("earlier")
  flax_ckpt.save(ckpt, want_ckpt)
  with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
    m.save(1, _small("step1"), force=True)
  want_steps = {1: _small("step1")}

  # from "at once" to "long after the commit"; the order varies from run to run
  delays = [0.0, 0.03, 0.15, 0.5, 3.0]
  random.shuffle(delays)
  outcomes, dead = [], []
  for i, delay in enumerate(delays):
    seed = 100 + i
    if i % 2 == 0:  # overwrite a committed checkpoint
      args, watch = ["save", ckpt, "1", seed], ckpt
    else:  # a new step in a manager's directory (the last child's lock is a dead pid's)
      args, watch = ["manager", run, 10 + i, seed], f"{run}/{10 + i}"
    pid, rc, seen = _kill_mid_save(args, watch, delay, tmp_path / f"child{i}.err")
    # this child's save (or its manager's open) removed what the killed children before it
    # left behind: their pids are dead (a manager's open removes every unnamed generation)
    for kind, where, gens in dead:
      if kind == args[0]:
        left = set(_gens(where)) & set(gens)
        assert not left, (kind, where, left, outcomes)
    assert seen, "the child's generation never appeared before it exited"
    marker = _marker(watch)
    committed = marker is not None and _of_pid([marker["generation"]], pid) != []
    child_gens = _of_pid(_gens(watch), pid)
    outcomes.append((args[0], round(delay, 3), rc, "committed" if committed else "torn"))

    if args[0] == "save":
      if committed:
        want_ckpt = worker.big_tree(seed)
      assert marker is not None and marker["version"] == 2
      _assert_tree_equal(flax_ckpt.load(ckpt), want_ckpt)
    else:
      if committed:
        want_steps[10 + i] = worker.big_tree(seed)
        _assert_tree_equal(flax_ckpt.load(watch), want_steps[10 + i])
      else:
        _assert_not_loadable(watch)
      assert _committed_steps(run) == sorted(want_steps)
      _assert_tree_equal(flax_ckpt.load(f"{run}/1"), want_steps[1])
    if not committed:
      assert child_gens, "a torn save must have left its generation (it was seen)"
      dead.append((args[0], watch, child_gens))
      for g in child_gens:  # a generation prefix on its own is never a checkpoint
        with pytest.raises(flax_ckpt.IncompleteCheckpointError):
          flax_ckpt.load(f"{watch}/{g}")

  torn = [o for o in outcomes if o[3] == "torn"]
  assert len(torn) >= 2, f"too few kills landed in the middle of a save: {outcomes}"

  # A2: a plain save to the same path removes the generations of dead processes; the
  # marker names the new one. (A generation of this very process is kept: it could be one of
  # its own saves in flight. The first checkpoint here was this process's, so a kill between
  # the marker swap and the removal of the replaced generation leaves one.)
  newest = _small("newest")
  flax_ckpt.save(ckpt, newest, overwrite=True)
  current = _marker(ckpt)["generation"]
  assert current in _gens(ckpt)
  assert set(_gens(ckpt)) - {current} <= set(_of_pid(_gens(ckpt), os.getpid())), outcomes
  for kind, where, gens in dead:
    if kind == "save":
      assert not set(_gens(where)) & set(gens), (where, outcomes)
  _assert_tree_equal(flax_ckpt.load(ckpt), newest)

  # ... and opening a manager removes every generation no marker names (also the last
  # killed child's), keeping each committed step intact; the dead child's lock is taken
  # over at once (its pid is gone)
  torn_steps = [f"{run}/{10 + i}" for i in range(1, 5, 2) if 10 + i not in want_steps]
  with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
    assert m.all_steps() == sorted(want_steps)
    for p in torn_steps:
      assert objstore.list_keys(p) == [], p
    for _, where, gens in dead:
      assert not set(_gens(where)) & set(gens), (where, outcomes)
    for s in want_steps:
      assert _gens(f"{run}/{s}") == [_marker(f"{run}/{s}")["generation"]]
    _assert_tree_equal(m.restore(1), want_steps[1])
    last = max(want_steps)
    _assert_tree_equal(flax_ckpt.load(f"{run}/{last}"), want_steps[last])
  assert objstore.read_versioned(f"{run}/{_LOCK}") is None  # released on close


@pytest.mark.slow
def test_loads_during_overwrites_by_another_process_are_never_torn(objstore_root, tmp_path):
  """A reader holding the old marker notices the swap (the old generation goes right after
  it) and reads again: every load gives one whole committed tree."""
  path = f"{objstore_root}/ckpt"
  n = worker.BIG_ELEMS // 4
  flax_ckpt.save(path, worker.big_tree(0, n))
  err_path = tmp_path / "writer.err"
  seen = set()
  with open(err_path, "w") as err:
    proc, lines = _start(["overwrite_loop", path, 12], err)
    try:
      while proc.poll() is None:
        got = flax_ckpt.load(path)
        _assert_tree_equal(got, worker.big_tree(got["seed"], n))
        seen.add(got["seed"])
      _wait_line(proc, lines, "DONE", 30, err_path)
    finally:
      _kill(proc)
  assert len(seen) >= 2, seen
  _assert_tree_equal(flax_ckpt.load(path), worker.big_tree(12, n))
  assert _gens(path) == [_marker(path)["generation"]]


# --- A2 without a kill: which leftovers a save and a manager remove --------------------

def _fake_generation(path, t, host, pid):
  gen = f"flax_ckpt-gen-{int(t)}-{host}-{pid}-{os.urandom(4).hex()}"
  objstore.write(f"{path}/{gen}/state/data.p0.bin.0", b"x" * 100)
  objstore.write(f"{path}/{gen}/state/_TREE.json", b"{}")
  return gen


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_cleanup_removes_only_dead_saves_and_never_a_committed_one(objstore_root, tmp_path):
  from flax_ckpt._src.io.storage.objcommit import _host

  root = objstore_root
  ckpt = f"{root}/ckpt"
  host, now = _host(), time.time()
  with open(tmp_path / "sleeper.err", "w") as err:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               stderr=err)
  try:
    dead = _fake_generation(ckpt, now, host, _dead_pid())
    live = _fake_generation(ckpt, now, host, sleeper.pid)
    other_host = _fake_generation(ckpt, now, f"not-{host}", 1)
    ancient = _fake_generation(ckpt, now - 7 * 3600, f"not-{host}", 1)
    _assert_not_loadable(ckpt)  # generations without a marker
    # a plain (not overwrite) save to a path holding only leftovers
    flax_ckpt.save(ckpt, _small("first"))
    current = _marker(ckpt)["generation"]
    assert _gens(ckpt) == sorted([current, live, other_host])
    assert dead not in _gens(ckpt) and ancient not in _gens(ckpt)
    _assert_tree_equal(flax_ckpt.load(ckpt), _small("first"))

    # a manager's open removes every generation no marker names (it owns the directory),
    # in every entry of its directory, and keeps what markers name
    run = f"{root}/run"
    with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
      m.save(3, _small("three"), force=True)
    committed3 = _marker(f"{run}/3")["generation"]
    stray3 = _fake_generation(f"{run}/3", now, f"not-{host}", 1)
    stray_live = _fake_generation(f"{run}/3", now, host, sleeper.pid)
    torn5 = _fake_generation(f"{run}/5", now, host, sleeper.pid)
    del stray3, stray_live, torn5
    assert len(_gens(f"{run}/3")) == 3
    assert list(flax_ckpt.checkpoints_iterator(run, timeout=0)) == [3]  # not 5
    _assert_not_loadable(f"{run}/5")
    with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
      assert m.all_steps() == [3]
      assert _gens(f"{run}/3") == [committed3]
      assert objstore.list_keys(f"{run}/5") == []
      _assert_tree_equal(m.restore(3), _small("three"))
  finally:
    sleeper.kill()
    sleeper.wait()


# --- A3: the manager's owner lock on an object store ----------------------------------

def _lock_owner(run):
  if "://" not in run:  # a local run directory
    lock = os.path.join(run, _LOCK)
    if not os.path.exists(lock):
      return None
    with open(lock) as f:
      return json.load(f)
  got = objstore.read_versioned(f"{run}/{_LOCK}")
  return None if got is None else json.loads(got[0])


def _hold(run, stale_after_s, err_path):
  """A child process holding ``run``'s owner lock (heartbeat every stale_after_s / 4)."""
  err = open(err_path, "w")  # noqa: SIM115 - closed by the caller's _release
  proc, lines = _start(["hold", run, stale_after_s], err)
  proc.err = err
  _wait_line(proc, lines, "HELD", 120, err_path)
  return proc


def _release(proc):
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)  # also ends a stopped process
  _kill(proc)
  proc.err.close()


@pytest.mark.slow
def test_owner_lock_refuses_a_second_manager_and_is_taken_over_when_stale(s3_root, tmp_path):
  run = f"{s3_root}/run"
  # in this process: a second writing manager on the same directory is refused
  with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
    assert _lock_owner(run)["pid"] == os.getpid()
    with pytest.raises(flax_ckpt.CheckpointError, match="already managed by another open "
                       "CheckpointManager in this process"):
      flax_ckpt.CheckpointManager(run)
    m.save(1, _small("one"), force=True)
  assert _lock_owner(run) is None

  # in another process (alive, refreshing its heartbeat): refused with who holds it
  stale = 2.0
  holder = _hold(run, stale, tmp_path / "holder.err")
  try:
    assert _lock_owner(run)["pid"] == holder.pid
    with pytest.raises(flax_ckpt.CheckpointError,
                       match=rf"in use by another CheckpointManager \(host .*pid {holder.pid}"):
      flax_ckpt.CheckpointManager(run, lock_stale_after_s=stale)
    time.sleep(stale + 0.5)  # longer than stale_after_s: the heartbeat keeps the lock fresh
    with pytest.raises(flax_ckpt.CheckpointError, match="in use by another CheckpointManager"):
      flax_ckpt.CheckpointManager(run, lock_stale_after_s=stale)
    with flax_ckpt.CheckpointManager(run, read_only=True) as ro:  # readers need no lock
      assert ro.all_steps() == [1]
    # the owner hangs (its pid stays alive, its heartbeat stops): taken over once stale
    os.kill(holder.pid, signal.SIGSTOP)
    time.sleep(0.3)
    stopped_at = time.time()
    beat = _lock_owner(run)["beat"]
    # Refused while the heartbeat is fresh. Why only up to half of stale_after_s: the
    # manager reads the lock a moment after this loop's clock check, and on a loaded
    # machine that moment can be long (CI once saw a takeover right at the 1 s edge).
    while time.time() - beat <= stale / 2:
      with pytest.raises(flax_ckpt.CheckpointError, match="in use by another"):
        flax_ckpt.CheckpointManager(run, lock_stale_after_s=stale)
      time.sleep(0.2)
    time.sleep(max(0.0, beat + stale + 0.1 - time.time()))
    with flax_ckpt.CheckpointManager(run, enable_async=False, lock_stale_after_s=stale) as m:
      assert _lock_owner(run)["pid"] == os.getpid()
      assert time.time() - stopped_at < 10
      m.save(2, _small("two"), force=True)
      assert m.all_steps() == [1, 2]
  finally:
    _release(holder)
  assert _lock_owner(run) is None

  # an owner SIGKILLed on this host: its pid is gone, so the lock goes at once, even with
  # the default lock_stale_after_s (600 s)
  holder = _hold(run, 600.0, tmp_path / "holder2.err")
  _release(holder)
  assert _lock_owner(run)["pid"] == holder.pid
  t = time.monotonic()
  with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
    assert time.monotonic() - t < 10
    assert _lock_owner(run)["pid"] == os.getpid()
    assert m.all_steps() == [1, 2]
    _assert_tree_equal(m.restore(2), _small("two"))
  assert _lock_owner(run) is None


def test_lock_of_a_dead_owner_on_another_host_goes_after_lock_stale_after_s(s3_root):
  run = f"{s3_root}/run"
  other = {"host": f"not-{socket.gethostname()}", "pid": 1, "since": time.time(),
           "beat": time.time()}
  assert objstore.write(f"{run}/{_LOCK}", json.dumps(other).encode(),
                        if_generation=objstore.missing_generation()) is not None
  with pytest.raises(flax_ckpt.CheckpointError, match=f"host {other['host']}, pid 1"):
    flax_ckpt.CheckpointManager(run, lock_stale_after_s=1.0)
  time.sleep(1.2)
  with flax_ckpt.CheckpointManager(run, enable_async=False, lock_stale_after_s=1.0) as m:
    assert _lock_owner(run)["pid"] == os.getpid()
    m.save(1, _small("one"), force=True)
  assert _lock_owner(run) is None


def _next_line(proc, lines, timeout, err_path):
  try:
    line = lines.get(timeout=timeout)
  except queue.Empty:
    pytest.fail(f"child printed nothing within {timeout}s; stderr:\n{_read(err_path)}")
  if line is None:
    pytest.fail(f"child exited (rc={proc.wait()}); stderr:\n{_read(err_path)}")
  return line


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_manager_that_lost_its_lock_does_not_write_anymore(where, request, tmp_path):
  """The old owner, stopped (SIGSTOP) until its lock looked stale and was taken over, then
  resumed (SIGCONT), refuses to save: nothing of it is committed, on S3 and on a local
  disk (issue 14)."""
  run = (f"{request.getfixturevalue('s3_root')}/run" if where == "s3"
         else str(tmp_path / "run"))
  with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
    m.save(0, _small("zero"), force=True)
  err_path = tmp_path / "old_owner.err"
  with open(err_path, "w") as err:
    proc, lines = _start(["hold_then_save", run, 1.0, 3], err, stdin=subprocess.PIPE)
    try:
      _wait_line(proc, lines, "HELD", 120, err_path)
      os.kill(proc.pid, signal.SIGSTOP)  # the owner hangs: its heartbeat stops
      time.sleep(1.6)
      with flax_ckpt.CheckpointManager(run, enable_async=False, lock_stale_after_s=1.0) as m:
        m.save(1, _small("one"), force=True)
        m.save(2, _small("two"), force=True)
        # the old owner (max_to_keep=1, it listed step 0) wakes up and saves step 3
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.5)  # its heartbeat notices the takeover
        proc.stdin.write("go\n")
        proc.stdin.flush()
        outcome = _next_line(proc, lines, 60, err_path)
        assert _next_line(proc, lines, 60, err_path) == "CLOSED"
        # still this manager's directory: its checkpoints intact, nothing new from the other
        m.reload()
        steps = m.all_steps()
        assert _lock_owner(run)["pid"] == os.getpid()
      assert outcome.startswith("REFUSED CheckpointError"), (outcome, steps)
      assert steps == [0, 1, 2], (outcome, steps)
    finally:
      proc.stdin.close()
      _kill(proc)


@pytest.mark.slow
def test_two_processes_racing_to_create_one_checkpoint(s3_root, tmp_path):
  """Of two new saves to one path, exactly one commits; the other fails with
  CheckpointExistsError (at its start, or at the create-only marker write when both were
  writing) and leaves no generation. (S3 only: the GCS test server ignores preconditions.)"""
  path = f"{s3_root}/race"
  errs = [open(tmp_path / f"racer{i}.err", "w") for i in range(2)]  # noqa: SIM115
  try:
    racers = [_start(["save", path, "0", 200 + i], errs[i]) for i in range(2)]
    for proc, _ in racers:
      proc.wait(timeout=120)
  finally:
    for proc, _ in racers:
      _kill(proc)
    for e in errs:
      e.close()
  rcs = [proc.returncode for proc, _ in racers]
  assert sorted(rcs) == [0, 1], [_read(tmp_path / f"racer{i}.err") for i in range(2)]
  loser = rcs.index(1)
  assert "CheckpointExistsError" in _read(tmp_path / f"racer{loser}.err")
  winner_pid = racers[1 - loser][0].pid
  gen = _marker(path)["generation"]
  assert _of_pid([gen], winner_pid) and _gens(path) == [gen]
  _assert_tree_equal(flax_ckpt.load(path), worker.big_tree(200 + 1 - loser))


def test_manager_open_removes_a_generation_next_to_a_copied_checkpoint(s3_root, tmp_path):
  local = tmp_path / "c"
  flax_ckpt.save(local, _small("copied"))
  run = f"{s3_root}/run"
  for f in local.rglob("*"):  # copy it into the manager's directory as step 7
    if f.is_file():
      objstore.write(f"{run}/7/{f.relative_to(local).as_posix()}", f.read_bytes())
  assert _marker(f"{run}/7")["version"] == 1
  _assert_tree_equal(flax_ckpt.load(f"{run}/7"), _small("copied"))
  dead = _fake_generation(f"{run}/7", time.time(), "not-this-host", 1)  # a crashed overwrite
  with flax_ckpt.CheckpointManager(run, enable_async=False) as m:
    assert m.all_steps() == [7]
    _assert_tree_equal(m.restore(7), _small("copied"))
    assert dead not in _gens(f"{run}/7")
