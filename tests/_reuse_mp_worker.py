"""One process of tests/test_reuse.py's two-process job.

  python tests/_reuse_mp_worker.py PORT PID ROOT

Two processes x 4 CPU devices save two steps of a sharded state with a manager: three
frozen leaves and a head that changes. Each process checks its own shards of the restored
steps; process 0 writes ROOT/expected.json (the seeds) for the parent to check the bytes.
Prints ``RESULT ok``; exits non-zero on a failed check.
"""

import json
import os
import sys

port, pid = int(sys.argv[1]), int(sys.argv[2])
root = sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60,
                           heartbeat_timeout_seconds=60, shutdown_timeout_seconds=10)

import flax_ckpt  # noqa: E402

SHAPE = (256, 512)


def seeds(step):
  return {"a": 1, "b": 2, "c": 3, "head": 10 + step}


def host(seed):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def state(step):
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
  out = {}
  for name, seed in seeds(step).items():
    h = host(seed)
    spec = P("x", "y") if name != "b" else P("y")
    out[name] = jax.make_array_from_callback(SHAPE, NamedSharding(mesh, spec),
                                             lambda i, h=h: h[i])
  return out


def check(got, step):
  for name, seed in seeds(step).items():
    h = host(seed)
    for shard in got[name].addressable_shards:
      a = np.asarray(shard.data)
      if a.tobytes() != h[shard.index].tobytes():
        raise SystemExit(f"step {step}: {name} shard {shard.index} differs")


def main():
  with flax_ckpt.CheckpointManager(root, enable_async=False, fsync=False) as m:
    for step in (1, 2):
      m.save(step, state(step))
    for step in (1, 2):
      template = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(step))
      check(m.restore(step, template), step)
  if pid == 0:
    with open(os.path.join(root, "expected.json"), "w") as f:
      json.dump({n: {"seed": s, "shape": list(SHAPE)} for n, s in seeds(2).items()}, f)
  print("RESULT ok", flush=True)


main()
