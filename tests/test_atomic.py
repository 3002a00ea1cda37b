"""Atomicity under a real crash: ``kill -9`` of a process in the middle of a large save.

A child process builds ~1.5 GiB of float32 data, prints ``SAVING`` and calls
``flax_ckpt.save``. The parent waits for that line and for the temporary sibling
``<name>.flax_ckpt-tmp-<host>-<pid>-<rand>`` to appear, sleeps a short random time and
sends SIGKILL. Whatever was at the path before must be untouched, the partial data must
never load, and the next save must clean up after the dead process.
"""

import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import flax_ckpt

_TMP_TAG = ".flax_ckpt-tmp-"
_OLD_TAG = ".flax_ckpt-old-"
_BIG_BLOCKS = 96  # 96 blocks of 4 Mi float32 = 1.5 GiB

# argv: path, overwrite ("1"/"0")
_CHILD_SAVE_BIG = f"""
import sys
import numpy as np
import flax_ckpt

path, overwrite = sys.argv[1], sys.argv[2] == "1"
block = np.random.default_rng().random(4 << 20, dtype=np.float32)
state = {{"big": np.tile(block, {_BIG_BLOCKS}), "step": 2, "tag": "partial"}}
print("SAVING", flush=True)
flax_ckpt.save(path, state, overwrite=overwrite)
print("SAVED", flush=True)
"""

_CHILD_SLEEP = "import time; print('UP', flush=True); time.sleep(120)"


def _child_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device is plenty for the child
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _siblings(path, tag=_TMP_TAG):
  parent, name = os.path.split(os.fspath(path))
  if not os.path.isdir(parent):
    return []
  return sorted(e for e in os.listdir(parent) if e.startswith(f"{name}{tag}"))


def _start_child(code, args, stderr_file):
  proc = subprocess.Popen(
      [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=stderr_file,
      stdin=subprocess.DEVNULL, env=_child_env(), text=True)
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in proc.stdout:
      lines.put(line.rstrip("\n"))
    lines.put(None)

  proc.pump = threading.Thread(target=pump, daemon=True)
  proc.pump.start()
  return proc, lines


def _wait_line(proc, lines, want, timeout, err_path):
  deadline = time.monotonic() + timeout
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      pytest.fail(f"child did not print {want!r} within {timeout}s; stderr:\n"
                  f"{_read(err_path)}")
    try:
      line = lines.get(timeout=left)
    except queue.Empty:
      continue
    if line is None:
      pytest.fail(f"child exited (rc={proc.wait()}) before printing {want!r}; stderr:\n"
                  f"{_read(err_path)}")
    if line == want:
      return


def _read(p):
  try:
    with open(p, errors="replace") as f:
      return f.read()[-4000:]
  except OSError:
    return "<none>"


def _kill(proc):
  """SIGKILLs the child (if still running), reaps it and closes its pipe."""
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  proc.pump.join(timeout=30)
  proc.stdout.close()


def _kill_during_save(path, overwrite, delay, err_path):
  """Runs the big save in a child and SIGKILLs it ``delay`` s after its temp dir appears.

  Returns (child pid, temp siblings seen just before the kill, return code).
  """
  with open(err_path, "w") as err:
    proc, lines = _start_child(_CHILD_SAVE_BIG, [os.fspath(path), "1" if overwrite else "0"],
                               err)
    try:
      _wait_line(proc, lines, "SAVING", 120, err_path)
      deadline = time.monotonic() + 30
      while not _siblings(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
      time.sleep(delay)
      seen = _siblings(path)
      os.kill(proc.pid, signal.SIGKILL)
      rc = proc.wait(timeout=30)
    finally:
      _kill(proc)
  return proc.pid, seen, rc


def _killed_mid_write(path, pid, seen, rc):
  """Whether the kill landed while the save was still writing (not committed)."""
  if rc != -signal.SIGKILL or len(seen) != 1:
    return False
  if f"-{pid}-" not in seen[0] or _siblings(path) != seen:
    return False
  tmp = os.path.join(os.path.dirname(os.fspath(path)), seen[0])
  return not os.path.exists(os.path.join(tmp, "_CHECKPOINT"))


def _crash_a_save(base, make_earlier, overwrite):
  """Repeats the kill with shorter delays until it lands mid-write; returns (path, tmp)."""
  delay = random.uniform(0.05, 0.4)
  outcomes = []
  for attempt in range(5):
    path = base / f"attempt{attempt}" / "ckpt"
    path.parent.mkdir()
    if make_earlier is not None:
      make_earlier(path)
    pid, seen, rc = _kill_during_save(path, overwrite, delay, base / f"child{attempt}.err")
    if _killed_mid_write(path, pid, seen, rc):
      return path, path.parent / seen[0]
    outcomes.append((delay, rc, seen))
    shutil.rmtree(path.parent)
    delay /= 3
  pytest.fail(f"could not kill the child in the middle of its save: {outcomes}")


def _earlier_state():
  rng = np.random.default_rng(7)
  return {
      "w": rng.random((64, 32), dtype=np.float32),
      "b": jnp.asarray(rng.standard_normal(16), dtype=jnp.float32),
      "step": 1,
      "tag": "earlier",
  }


def _assert_state_equal(got, want):
  assert set(got) == set(want)
  for k, v in want.items():
    if isinstance(v, (np.ndarray, jnp.ndarray)):
      assert isinstance(got[k], type(v)), k
      assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
    else:
      assert got[k] == v and type(got[k]) is type(v), k


def test_kill_during_overwrite_keeps_earlier_checkpoint(ckpt_dir):
  earlier = _earlier_state()

  def make_earlier(path):
    flax_ckpt.save(path, earlier)

  path, tmp = _crash_a_save(ckpt_dir, make_earlier, overwrite=True)

  # The earlier checkpoint is untouched and still loads, with the same values.
  _assert_state_equal(flax_ckpt.load(path), earlier)
  md = flax_ckpt.metadata(path)
  assert md["w"].shape == (64, 32)
  assert "big" not in md.tree
  # The partial checkpoint is never loaded, not even when asked for explicitly.
  assert tmp.is_dir()
  assert not (tmp / "_CHECKPOINT").exists()
  with pytest.raises(flax_ckpt.IncompleteCheckpointError):
    flax_ckpt.load(tmp)
  with pytest.raises(flax_ckpt.IncompleteCheckpointError):
    flax_ckpt.metadata(tmp)
  assert not _siblings(path, _OLD_TAG)

  # The next save from this process succeeds and removes the dead child's temp dir.
  newer = {"w": np.full((3, 3), 5.0, np.float32), "step": 3, "tag": "newer"}
  flax_ckpt.save(path, newer, overwrite=True)
  assert not tmp.exists()
  assert _siblings(path) == [] and _siblings(path, _OLD_TAG) == []
  _assert_state_equal(flax_ckpt.load(path), newer)


def test_kill_during_first_save_leaves_nothing(ckpt_dir):
  path, tmp = _crash_a_save(ckpt_dir, None, overwrite=False)

  assert not os.path.lexists(path)
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    flax_ckpt.load(path)
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    flax_ckpt.metadata(path)
  with pytest.raises(flax_ckpt.IncompleteCheckpointError):
    flax_ckpt.load(tmp)

  # A plain (non-overwrite) save to the same path now succeeds and cleans up.
  state = _earlier_state()
  flax_ckpt.save(path, state)
  assert not tmp.exists()
  assert _siblings(path) == []
  _assert_state_equal(flax_ckpt.load(path), state)


def test_temp_dirs_of_live_processes_and_other_hosts_are_kept(ckpt_dir):
  path = ckpt_dir / "ckpt"
  host = socket.gethostname()
  other_host = ckpt_dir / f"ckpt{_TMP_TAG}not-{host}-1-abcd1234"
  unrelated = ckpt_dir / f"other{_TMP_TAG}{host}-999999999-abcd1234"
  err_path = ckpt_dir / "sleeper.err"
  with open(err_path, "w") as err:
    proc, lines = _start_child(_CHILD_SLEEP, [], err)
    try:
      _wait_line(proc, lines, "UP", 60, err_path)
      live = ckpt_dir / f"ckpt{_TMP_TAG}{host}-{proc.pid}-abcd1234"
      for d in (live, other_host, unrelated):
        d.mkdir()
        (d / "data.p0.bin").write_bytes(b"x" * 100)
      flax_ckpt.save(path, {"x": np.arange(4)})
      assert live.is_dir()  # its writer may still be saving
      assert other_host.is_dir() and unrelated.is_dir()
    finally:
      _kill(proc)
  # Once the process is gone, its leftovers go at the next save to this path.
  flax_ckpt.save(path, {"x": np.arange(5)}, overwrite=True)
  assert not live.exists()
  assert other_host.is_dir() and unrelated.is_dir()
  np.testing.assert_array_equal(flax_ckpt.load(path)["x"], np.arange(5))
