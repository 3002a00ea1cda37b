"""Logging, progress lines and jax.monitoring metrics (issue 16)."""

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax.monitoring
import numpy as np
import pytest

import flax_ckpt
from flax_ckpt._src.format import LOCK_NAME, TMP_TAG
from flax_ckpt._src.io import observe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _messages(caplog, level=logging.INFO):
  return [r.getMessage() for r in caplog.records
          if r.name.startswith("flax_ckpt") and r.levelno == level]


def _one(messages, needle):
  found = [m for m in messages if needle in m]
  assert len(found) == 1, (needle, messages)
  return found[0]


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _mngr(directory, **kw):
  kw.setdefault("enable_async", False)
  kw.setdefault("fsync", False)
  return flax_ckpt.CheckpointManager(directory, **kw)


def test_the_logger_only_has_a_null_handler_and_propagates():
  # a library must not decide where its records go: the program's handlers (absl's, on the
  # root logger) do
  log = logging.getLogger("flax_ckpt")
  assert log.propagate
  assert log.handlers and all(isinstance(h, logging.NullHandler) for h in log.handlers)
  assert log.level == logging.NOTSET  # the program's level applies


def test_save_and_load_log_one_info_line_each(ckpt_dir, caplog):
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  path = os.fspath(ckpt_dir / "ckpt")
  flax_ckpt.save(path, {"w": np.ones((256, 256), np.float32)})
  line = _one(_messages(caplog), "committed")
  assert path in line and "262144 bytes" in line and "1 part(s) [state]" in line
  assert " s, " in line and "MiB/s" in line
  caplog.clear()
  flax_ckpt.load(path)
  line = _one(_messages(caplog), "done")
  assert f"load of {path}" in line and "262144 bytes" in line and "MiB/s" in line
  assert "[state]" in line


def test_checkpointer_restores_and_orbax_loads_log_their_line(ckpt_dir, caplog):
  import warnings

  path = ckpt_dir / "h"
  ck = flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
  ck.save(path, {"w": np.ones(1000)})
  with caplog.at_level(logging.INFO, logger="flax_ckpt"):
    ck.restore(path)
  assert any("Checkpointer.restore of" in r.getMessage() and "8000 bytes" in
             r.getMessage() for r in caplog.records), caplog.text
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as oc:
      oc.save(ckpt_dir / "ox", {"w": np.ones(1000)})
      oc.wait_until_finished()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="flax_ckpt"):
    flax_ckpt.load(ckpt_dir / "ox", {"w": np.zeros(1000)})
  assert any("written by Orbax" in r.getMessage() and "8000 bytes" in r.getMessage()
             for r in caplog.records), caplog.text


def test_async_save_logs_the_blocked_time_and_the_commit(ckpt_dir, caplog):
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  path = os.fspath(ckpt_dir / "ckpt")
  flax_ckpt.save_async(path, {"w": np.ones(1000, np.float32)}).result()
  msgs = _messages(caplog)
  started = _one(msgs, "started")
  assert started.startswith(f"async save to {path}") and "training blocked" in started
  committed = _one(msgs, "committed at")
  assert committed.startswith(f"async save to {path}") and "4000 bytes" in committed


def test_debug_shows_the_phases(ckpt_dir, caplog):
  caplog.set_level(logging.DEBUG, logger="flax_ckpt")
  flax_ckpt.save(ckpt_dir / "ckpt", {"w": np.ones(3)})
  phases = [m for m in _messages(caplog, logging.DEBUG) if "phase" in m]
  for name in ("plan", "write (start)", "write and fsync", "barrier (written)", "commit",
               "barrier (committed)"):
    assert any(f"phase {name} took" in m for m in phases), (name, phases)


def test_info_hides_the_phases(ckpt_dir, caplog):
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  flax_ckpt.save(ckpt_dir / "ckpt", {"w": np.ones(3)})
  assert not _messages(caplog, logging.DEBUG)


def test_manager_logs_steps_retention_and_delete(ckpt_dir, caplog):
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  with _mngr(ckpt_dir, max_to_keep=2) as m:
    for step in (1, 2, 3):
      m.save(step, {"w": np.full(3, step)})
    msgs = _messages(caplog)
    assert len([x for x in msgs if "committed" in x]) == 3
    assert any("(step 3) committed" in x for x in msgs)
    assert _one(msgs, "retention: deleted step 1")
    m.delete(2)
  assert _one(_messages(caplog), "deleted step 2 of")


def test_leftovers_cleaned_are_logged(ckpt_dir, caplog):
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  leftover = ckpt_dir / f"5{TMP_TAG}{socket.gethostname()}-{_dead_pid()}-deadbeef"
  os.makedirs(leftover / "state")
  with _mngr(ckpt_dir):
    pass
  line = _one(_messages(caplog), "leftover")
  assert "removed 1 leftover(s)" in line and leftover.name in line


def test_stale_lock_takeover_is_logged(ckpt_dir, caplog):
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  lock = ckpt_dir / LOCK_NAME
  long_ago = time.time() - 3600
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": long_ago - 60}))
  os.utime(lock, (long_ago, long_ago))
  with _mngr(ckpt_dir):
    pass
  line = _one(_messages(caplog), "took over the stale lock")
  assert "elsewhere" in line and os.fspath(lock) in line


@pytest.fixture
def fast_progress(monkeypatch):
  monkeypatch.setenv(observe.PROGRESS_ENV, "0.001,0.001")


def test_a_long_save_and_load_log_progress(ckpt_dir, caplog, fast_progress):
  del fast_progress
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  path = ckpt_dir / "ckpt"
  tree = {f"w{i}": np.ones((1024, 1024), np.float32) for i in range(8)}  # 32 MiB
  flax_ckpt.save(path, tree)
  lines = [m for m in _messages(caplog) if "still running" in m]
  # the total grows while the leaves are placed, then stays: bytes done / total, rate
  assert any(" MiB of 32.0 MiB (" in m and "MiB/s" in m for m in lines), lines
  assert all("still running after" in m and "MiB/s" in m for m in lines), lines
  # A load of 32 MiB from the page cache takes a few ms: on a loaded machine the progress
  # thread may only get the GIL before the load planned its bytes ("0.0 MiB") and then
  # not again until it ended. Some of a few loads must log the planned total.
  seen = []
  for _ in range(5):
    caplog.clear()
    flax_ckpt.load(path)
    lines = [m for m in _messages(caplog) if "still running" in m]
    assert all("still running after" in m and "MiB/s" in m for m in lines), lines
    seen += lines
    if any(" MiB of 32.0 MiB (" in m for m in lines):
      break
  else:
    raise AssertionError(f"no load progress line named the planned total: {seen}")


def test_progress_lines_stop_with_the_operation(ckpt_dir, caplog, fast_progress):
  del fast_progress
  caplog.set_level(logging.INFO, logger="flax_ckpt")
  flax_ckpt.save(ckpt_dir / "ckpt", {"w": np.ones((512, 512))})
  n = len(_messages(caplog))
  time.sleep(0.05)
  assert len(_messages(caplog)) == n


def test_progress_env_parsing(monkeypatch):
  monkeypatch.delenv(observe.PROGRESS_ENV, raising=False)
  assert observe.progress_intervals() == (5.0, 10.0)
  monkeypatch.setenv(observe.PROGRESS_ENV, "2")
  assert observe.progress_intervals() == (2.0, 2.0)
  monkeypatch.setenv(observe.PROGRESS_ENV, "1,3")
  assert observe.progress_intervals() == (1.0, 3.0)
  monkeypatch.setenv(observe.PROGRESS_ENV, "x")
  assert observe.progress_intervals() == (5.0, 10.0)


def test_jax_monitoring_events(ckpt_dir):
  durations, scalars = [], []

  def on_duration(event, secs, **kw):
    del kw
    if event.startswith("/flax_ckpt/"):
      durations.append((event, secs))

  def on_scalar(event, value, **kw):
    del kw
    if event.startswith("/flax_ckpt/"):
      scalars.append((event, value))

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_scalar_listener(on_scalar)
  try:
    path = ckpt_dir / "ckpt"
    flax_ckpt.save_async(path, {"w": np.ones(100, np.float32)}).result()
    flax_ckpt.load(path)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_scalar_listener(on_scalar)
  events = [e for e, _ in durations]
  assert events == [observe.SAVE_BLOCKING, observe.SAVE_DURATION, observe.LOAD_DURATION]
  assert all(s >= 0 for _, s in durations)
  assert scalars == [(observe.SAVE_BYTES, 400), (observe.LOAD_BYTES, 400)]


def test_a_failing_listener_does_not_fail_the_save(ckpt_dir, caplog):
  caplog.set_level(logging.WARNING, logger="flax_ckpt")

  def broken(event, value, **kw):
    raise RuntimeError("listener bug")

  jax.monitoring.register_scalar_listener(broken)
  try:
    flax_ckpt.save(ckpt_dir / "ckpt", {"w": np.ones(3)})
  finally:
    jax.monitoring.unregister_scalar_listener(broken)
  assert flax_ckpt.load(ckpt_dir / "ckpt")["w"].shape == (3,)
  assert any("listener failed" in m for m in _messages(caplog, logging.WARNING))


@pytest.mark.slow
def test_absl_programs_show_the_info_lines(tmp_path):
  script = textwrap.dedent(f"""
      import os
      import numpy as np
      from absl import app, logging
      import flax_ckpt

      def main(argv):
        del argv
        logging.info("program start")
        flax_ckpt.save(os.path.join({os.fspath(tmp_path)!r}, "ckpt"), {{"w": np.ones(3)}})

      app.run(main)
      """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script, "--logtostderr"], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr
  assert "program start" in out.stderr
  assert any("save to" in ln and "committed" in ln for ln in out.stderr.splitlines()), (
      out.stderr)


@pytest.mark.slow
def test_the_training_examples_log_each_committed_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
      [sys.executable, "-m", "train_examples.linen_classifier", "--workdir",
       os.fspath(tmp_path), "--config.num_train_steps=20", "--config.dense=64",
       "--config.warmup_steps=2", "--config.log_every_steps=10",
       "--config.checkpoint.every_steps=10"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=280, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  for step in (10, 20):
    assert f"(step {step}) committed at" in out.stderr, out.stderr[-4000:]


_BARRIER_WORKER = """
import logging, os, sys, time
port, pid, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["FLAX_CKPT_PROGRESS_S"] = "0.2"
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import jax
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60,
                           heartbeat_timeout_seconds=60, shutdown_timeout_seconds=10)
import numpy as np
import flax_ckpt
jax.devices()  # the backend starts with every process: before process 1 is late
if pid == 1:
  time.sleep(2)  # late: process 0 waits for it at the save's barrier
flax_ckpt.save(path, {"w": np.ones(3)})
print("SAVED", flush=True)
"""


@pytest.mark.slow
def test_a_long_barrier_names_the_processes_it_waits_for(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = REPO
  procs = [subprocess.Popen(
      [sys.executable, "-c", _BARRIER_WORKER, str(port), str(i), os.fspath(tmp_path / "c")],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in (0, 1)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 and "SAVED" in o for p, o in zip(procs, outs)), outs
  waits = [ln for ln in outs[0].splitlines() if "flax_ckpt.multihost" in ln]
  assert any("process 0 of 2 has waited" in ln and "waiting for process(es) 1" in ln
             for ln in waits), outs[0][-3000:]
