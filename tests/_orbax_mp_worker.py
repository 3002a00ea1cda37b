"""One process of a multi-process job for tests/test_orbax_read.py.

  python tests/_orbax_mp_worker.py PORT NPROC PID NDEV SCENARIO PATH

``save``: orbax-checkpoint saves, from every process, a NamedSharding array over all devices
(w: P('x', 'y') on a 2x2 mesh with 2 processes x 2 devices), a replicated array and a
Python int, as ``PATH/std`` (StandardCheckpointer), ``PATH/z3`` (zarr3) and a
CheckpointManager run ``PATH/run`` (steps 2 and 4, item ``state``, w + step).
``load``: flax_ckpt (orbax is never imported) loads ``PATH`` onto a 2x4 mesh of another
layout and checks this process's shards and how many bytes it read.
``manager``: a flax_ckpt CheckpointManager on a copy of ``run`` resumes from the latest
Orbax step, saves a new step next to the Orbax ones and applies retention to both.

Every process builds the same global data from a fixed seed. Prints one ``RESULT {...}``
JSON line; exits non-zero on a failed check.
"""

import json
import os
import sys
import warnings

port, nproc, pid, ndev = (int(a) for a in sys.argv[1:5])
scenario, path = sys.argv[5:7]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

if scenario == "save":  # orbax's barriers are collectives: gloo on CPU
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60,
                           heartbeat_timeout_seconds=60, shutdown_timeout_seconds=10)


def host_data():
  w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
  b = np.arange(-6, 6, dtype=np.int32)
  return w, b


def result(**kw):
  print("RESULT " + json.dumps(kw), flush=True)


def rchar():
  with open("/proc/self/io") as f:
    return int(next(ln for ln in f if ln.startswith("rchar:")).split()[1])


def save():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import orbax.checkpoint as ocp
  w, b = host_data()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))

  def tree(plus=0):
    return {"w": jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("x", "y")),
                                              lambda i: w[i] + np.float32(plus)),
            "b": jax.make_array_from_callback(b.shape, NamedSharding(mesh, P()),
                                              lambda i: b[i]),
            "step": 7}

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.StandardCheckpointer() as ck:
      ck.save(os.path.join(path, "std"), tree())
      ck.wait_until_finished()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as ck:
      ck.save(os.path.join(path, "z3"), args=ocp.args.PyTreeSave(tree()))
    with ocp.CheckpointManager(os.path.join(path, "run")) as mngr:
      for step in (2, 4):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree(step))))
      mngr.wait_until_finished()
  result(saved=True)


def load():
  import flax_ckpt
  w, b = host_data()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
  target = NamedSharding(mesh, P("y", "x"))  # saved as P('x', 'y') on 2x2
  template = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=target),
              "b": jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=NamedSharding(mesh, P())),
              "step": 0}
  # a first load without w: imports and metadata reads, which rchar counts too
  flax_ckpt.load(path, {"b": template["b"], "step": 0}, partial=True)
  # rchar counts every read of the process (the distributed runtime's sockets too): the
  # least of three loads is the one with the least of that noise
  reads = []
  for _ in range(3):
    before = rchar()
    out = flax_ckpt.load(path, template)
    reads.append(rchar() - before)
  read = min(reads)
  assert out["w"].sharding == target
  for shard in out["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index])
  for shard in out["b"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), b[shard.index])
  assert out["step"] == 7, out["step"]
  assert "orbax" not in sys.modules
  result(ok=True, read=read, w_bytes=w.nbytes)


def manager():
  """The Orbax job of ``save`` switched to flax_ckpt: both processes open a
  flax_ckpt.CheckpointManager on PATH (a copy of its ``run``), resume from step 4 onto
  another layout, save step 6 and keep 2 steps."""
  import flax_ckpt
  w, b = host_data()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
  target = NamedSharding(mesh, P("y", "x"))
  template = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=target),
              "b": jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=NamedSharding(mesh, P())),
              "step": 0}
  with flax_ckpt.CheckpointManager(path, max_to_keep=2, barrier_timeout_s=60) as mngr:
    steps = mngr.all_steps()
    latest = mngr.latest_step()
    out = mngr.restore(abstract_state=template)
    assert out["w"].sharding == target
    for shard in out["w"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), (w + np.float32(4))[shard.index])
    assert out["step"] == 7
    new = {"w": out["w"] + 2, "b": out["b"], "step": 6}
    mngr.save(6, new)
    mngr.wait_until_finished()
    after = mngr.all_steps()
    back = mngr.restore(6, template)
    want6 = w + np.float32(4) + np.float32(2)  # what the job computed, in float32
    for shard in back["w"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want6[shard.index])
  assert "orbax" not in sys.modules
  result(ok=True, steps=steps, latest=latest, after=after)


if __name__ == "__main__":
  {"save": save, "load": load, "manager": manager}[scenario]()
