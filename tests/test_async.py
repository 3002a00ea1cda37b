"""``save_async``: the returned handle, snapshot semantics, failures and interpreter exit."""

import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import flax_ckpt

_TMP_TAG = ".flax_ckpt-tmp-"
_OLD_TAG = ".flax_ckpt-old-"


def _siblings(path):
  parent, name = os.path.split(os.fspath(path))
  return sorted(e for e in os.listdir(parent)
                if e.startswith(f"{name}{_TMP_TAG}") or e.startswith(f"{name}{_OLD_TAG}"))


def _child_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run_child(code, *args, timeout=120):
  proc = subprocess.Popen([sys.executable, "-c", code, *map(os.fspath, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, env=_child_env(), text=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, 9)
      proc.communicate()
  return proc.returncode, out, err


# ------------------------------------------------------------------------ the handle


def test_save_async_returns_response_and_result_commits(ckpt_dir):
  path = ckpt_dir / "ckpt"
  state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": jnp.ones(5), "step": 7}
  r = flax_ckpt.save_async(path, state, custom_metadata={"epoch": 2})
  assert isinstance(r, flax_ckpt.AsyncResponse)
  assert r.result() is None
  assert r.done()
  assert "done" in repr(r) and "ckpt" in repr(r)
  assert (path / "_CHECKPOINT").is_file()
  assert _siblings(path) == []
  out = flax_ckpt.load(path)
  np.testing.assert_array_equal(out["w"], state["w"])
  assert isinstance(out["b"], jax.Array)
  np.testing.assert_array_equal(out["b"], np.ones(5, np.float32))
  assert out["step"] == 7
  assert flax_ckpt.metadata(path).custom_metadata == {"epoch": 2}
  r.result()  # calling again is harmless


def test_done_polls_until_committed(ckpt_dir):
  path = ckpt_dir / "ckpt"
  big = np.random.default_rng(0).random(16 << 20, dtype=np.float32)  # 64 MiB
  r = flax_ckpt.save_async(path, {"big": big})
  deadline = time.monotonic() + 60
  polls = 0
  while not r.done():
    polls += 1
    # Whatever is visible at the path while the save runs is a complete checkpoint.
    if os.path.exists(path):
      assert (path / "_CHECKPOINT").is_file()
    assert time.monotonic() < deadline, "save_async never finished"
    time.sleep(0.002)
  assert r.done()
  assert "done" in repr(r)
  r.result(timeout=0)
  assert (path / "_CHECKPOINT").is_file()
  assert _siblings(path) == []
  np.testing.assert_array_equal(flax_ckpt.load(path)["big"], big)


def test_result_timeout_while_pending(ckpt_dir):
  gate = threading.Event()
  handler = _GatedHandler(gate)
  flax_ckpt.register_type_handler(_Box, handler, override=True)
  try:
    r = flax_ckpt.save_async(ckpt_dir / "ckpt", {"box": _Box(3)})
    assert not r.done()
    assert "pending" in repr(r)
    with pytest.raises(TimeoutError):
      r.result(timeout=0.05)
    assert not os.path.exists(ckpt_dir / "ckpt")
    gate.set()
    r.result(timeout=60)
  finally:
    gate.set()
    flax_ckpt.register_type_handler(_Box, _BoxHandler(), override=True)
  assert flax_ckpt.load(ckpt_dir / "ckpt")["box"] == _Box(3)


# ----------------------------------------------------- values are captured at call time


def test_numpy_sources_mutated_in_place_after_call(ckpt_dir):
  path = ckpt_dir / "ckpt"
  rng = np.random.default_rng(1)
  state = {
      "big": rng.random(8 << 20, dtype=np.float32),  # 32 MiB: still writing when mutated
      "small": rng.integers(0, 100, (3, 5)),
      "nested": [rng.standard_normal(7), {"v": np.arange(4, dtype=np.int8)}],
      "scalar": np.float32(2.5),
  }
  want = jax.tree.map(np.copy, state)
  r = flax_ckpt.save_async(path, state)
  state["big"][...] = 0
  state["small"][...] = 0
  state["nested"][0][...] = 0
  state["nested"][1]["v"][...] = 0
  r.result()
  got = flax_ckpt.load(path)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(g, w)


def _jax_state():
  mesh = Mesh(np.array(jax.devices()), ("d",))
  sharded = NamedSharding(mesh, PartitionSpec("d"))
  rng = np.random.default_rng(2)
  return {
      "w": jnp.asarray(rng.random((1024, 1024), dtype=np.float32)),
      "s": jax.device_put(rng.random((64, 256), dtype=np.float32), sharded),
      "i": jnp.arange(100, dtype=jnp.int32),
  }


def test_jax_sources_deleted_after_call(ckpt_dir):
  path = ckpt_dir / "ckpt"
  state = _jax_state()
  want = {k: np.array(v) for k, v in state.items()}
  r = flax_ckpt.save_async(path, state)
  for v in state.values():
    v.delete()
  assert all(v.is_deleted() for v in state.values())
  r.result()
  got = flax_ckpt.load(path)
  for k, w in want.items():
    assert isinstance(got[k], jax.Array)
    np.testing.assert_array_equal(np.asarray(got[k]), w, err_msg=k)


def test_jax_sources_donated_after_call(ckpt_dir):
  path = ckpt_dir / "ckpt"
  state = _jax_state()
  want = {k: np.array(v) for k, v in state.items()}
  step = jax.jit(lambda p: jax.tree.map(lambda a: a * 0 - 1, p), donate_argnums=0)
  r = flax_ckpt.save_async(path, state)
  new = jax.block_until_ready(step(state))
  # Run a few more donating steps, so any buffer reuse would show.
  for _ in range(3):
    new = jax.block_until_ready(step(new))
  r.result()
  for v in new.values():
    np.testing.assert_array_equal(np.asarray(v), -np.ones(v.shape, v.dtype))
  got = flax_ckpt.load(path)
  for k, w in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), w, err_msg=k)


def test_mutate_delete_and_donate_together(ckpt_dir):
  path = ckpt_dir / "ckpt"
  params = _jax_state()
  host = {"buf": np.random.default_rng(3).random((512, 512))}
  want = {"params": {k: np.array(v) for k, v in params.items()},
          "host": {"buf": host["buf"].copy()}}
  r = flax_ckpt.save_async(path, {"params": params, "host": host})
  host["buf"][...] = -1
  params["i"].delete()
  step = jax.jit(lambda a, b: (a + 1, b * 2), donate_argnums=(0, 1))
  jax.block_until_ready(step(params["w"], params["s"]))
  r.result()
  got = flax_ckpt.load(path)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(g), w)


# ------------------------------------------------------------------- failing writes


class _Box:
  """A small custom leaf type used by these tests."""

  def __init__(self, v):
    self.v = v

  def __eq__(self, other):
    return isinstance(other, _Box) and other.v == self.v

  __hash__ = None


class _BoxError(RuntimeError):
  pass


class _BoxHandler:
  """A working handler: the value goes inline into the leaf record."""

  def typestr(self):
    return "test_async._Box"

  async def serialize(self, values, infos, args=None):
    for v, info in zip(values, infos, strict=True):
      info.record["v"] = v.v
    return []

  async def deserialize(self, infos, args=None):
    return [_Box(info.record["v"]) for info in infos]

  async def metadata(self, infos):
    return [flax_ckpt.Metadata(name=info.name) for info in infos]


class _FailingHandler(_BoxHandler):
  """Returns futures that fail a little later, from another thread."""

  async def serialize(self, values, infos, args=None):
    futures = []
    for info in infos:
      fut = concurrent.futures.Future()
      err = _BoxError(f"disk on fire while writing {info.name}")
      threading.Timer(0.05, fut.set_exception, (err,)).start()
      futures.append(fut)
    return futures


class _GatedHandler(_BoxHandler):
  """Its futures complete only once ``gate`` is set."""

  def __init__(self, gate):
    self._gate = gate

  async def serialize(self, values, infos, args=None):
    await super().serialize(values, infos, args)
    fut = concurrent.futures.Future()

    def wait_then_finish():
      self._gate.wait(60)
      fut.set_result(None)

    threading.Thread(target=wait_then_finish, daemon=True).start()
    return [fut]


@pytest.fixture
def failing_box_handler():
  flax_ckpt.register_type_handler(_Box, _FailingHandler(), override=True)
  try:
    yield
  finally:
    flax_ckpt.register_type_handler(_Box, _BoxHandler(), override=True)


def test_failing_background_write_surfaces_from_result(ckpt_dir, failing_box_handler):
  path = ckpt_dir / "ckpt"
  r = flax_ckpt.save_async(path, {"w": np.ones((4, 4)), "box": _Box(1)})
  with pytest.raises(_BoxError, match=r"disk on fire while writing \['box'\]"):
    r.result(timeout=60)
  assert r.done()
  assert not os.path.lexists(path)
  assert _siblings(path) == []
  with pytest.raises(flax_ckpt.CheckpointNotFoundError):
    flax_ckpt.load(path)
  with pytest.raises(_BoxError):  # the failure is kept, not forgotten after one call
    r.result()


def test_failing_overwrite_keeps_old_checkpoint(ckpt_dir, failing_box_handler):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"w": np.arange(3)})
  r = flax_ckpt.save_async(path, {"w": np.zeros(3), "box": _Box(2)}, overwrite=True)
  with pytest.raises(_BoxError):
    r.result(timeout=60)
  assert _siblings(path) == []
  got = flax_ckpt.load(path)
  assert set(got) == {"w"}
  np.testing.assert_array_equal(got["w"], np.arange(3))


def test_failing_write_in_sync_save_raises(ckpt_dir, failing_box_handler):
  path = ckpt_dir / "ckpt"
  with pytest.raises(_BoxError):
    flax_ckpt.save(path, {"box": _Box(3)})
  assert not os.path.lexists(path)
  assert _siblings(path) == []


def test_handler_restored_after_failure_tests(ckpt_dir):
  flax_ckpt.register_type_handler(_Box, _BoxHandler(), override=True)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_async(path, {"box": _Box(9)}).result()
  assert flax_ckpt.load(path) == {"box": _Box(9)}


# ------------------------------------------------------------------- interpreter exit


_CHILD_PENDING_AT_EXIT = """
import sys
import numpy as np
import flax_ckpt

state = {"big": np.random.default_rng(1234).random(50 << 20, dtype=np.float32),  # 200 MiB
         "step": 5}
r = flax_ckpt.save_async(sys.argv[1], state)
print("PENDING" if not r.done() else "DONE", flush=True)
# the script ends here, without r.result()
"""


def test_pending_save_is_finished_at_exit(ckpt_dir):
  path = ckpt_dir / "ckpt"
  rc, out, err = _run_child(_CHILD_PENDING_AT_EXIT, path)
  assert rc == 0, err
  assert out.split() == ["PENDING"], (out, err)
  assert "FAILED" not in err, err
  assert _siblings(path) == []
  got = flax_ckpt.load(path)
  assert got["step"] == 5
  want = np.random.default_rng(1234).random(50 << 20, dtype=np.float32)
  np.testing.assert_array_equal(got["big"], want)


_CHILD_FAILING_AT_EXIT = """
import concurrent.futures
import sys
import threading
import numpy as np
import flax_ckpt


class Boom:
  pass


class BoomHandler:
  def typestr(self):
    return "child.Boom"

  async def serialize(self, values, infos, args=None):
    fut = concurrent.futures.Future()
    err = OSError(28, "No space left on device (simulated by BoomHandler)")
    threading.Timer(0.2, fut.set_exception, (err,)).start()
    return [fut]

  async def deserialize(self, infos, args=None):
    raise NotImplementedError

  async def metadata(self, infos):
    raise NotImplementedError


flax_ckpt.register_type_handler(Boom, BoomHandler())
r = flax_ckpt.save_async(sys.argv[1], {"w": np.ones(1000), "boom": Boom()})
print("PENDING" if not r.done() else "DONE", flush=True)
"""


def test_failing_pending_save_at_exit_is_reported(ckpt_dir):
  path = ckpt_dir / "ckpt"
  rc, out, err = _run_child(_CHILD_FAILING_AT_EXIT, path)
  assert out.split() == ["PENDING"], (out, err)
  assert "FAILED" in err, err
  assert "No space left on device (simulated by BoomHandler)" in err, err
  assert os.fspath(path) in err, err
  assert not os.path.lexists(path)
  assert _siblings(path) == []


def test_a_pending_background_save_holds_no_reference_to_the_callers_arrays(ckpt_dir):
  """What a background save writes lives in its own snapshot: once save_async returned, the
  caller's arrays can be freed even while the save is still writing (no host memory held
  twice for the length of the save)."""
  import gc
  import weakref

  gate = threading.Event()
  flax_ckpt.register_type_handler(_Box, _GatedHandler(gate), override=True)
  try:
    w = np.random.default_rng(0).random(1 << 16)
    ref = weakref.ref(w)
    r = flax_ckpt.save_async(ckpt_dir / "ckpt", {"w": w, "box": _Box(1)})
    del w
    gc.collect()
    freed_while_pending = ref() is None and not r.done()
    gate.set()
    r.result(timeout=60)
  finally:
    gate.set()
    flax_ckpt.register_type_handler(_Box, _BoxHandler(), override=True)
  assert freed_while_pending
  np.testing.assert_array_equal(flax_ckpt.load(ckpt_dir / "ckpt")["w"],
                                np.random.default_rng(0).random(1 << 16))
