"""Child processes of the object-store crash and multi-process tests.

  python tests/_objstore_worker.py save PATH OVERWRITE SEED       (prints SAVING, SAVED)
  python tests/_objstore_worker.py manager ROOT STEP SEED         (prints SAVING, SAVED)
  python tests/_objstore_worker.py overwrite_loop PATH N          (prints DONE)
  python tests/_objstore_worker.py hold ROOT STALE_AFTER_S        (prints HELD, then sleeps)
  python tests/_objstore_worker.py hold_then_save ROOT STALE_AFTER_S STEP
                                   (prints HELD; after a line on stdin, SAVED or REFUSED ...)
  python tests/_objstore_worker.py mp PORT NPROC PID NDEV SCENARIO PATH

The object store's configuration (AWS_* / STORAGE_EMULATOR_HOST, FLAX_CKPT_OBJECT_BYTES) comes
from the environment the test sets. ``mp`` runs one process of a jax.distributed job on
127.0.0.1 and prints one ``RESULT {...}`` JSON line.
"""

import json
import os
import signal
import sys
import time

import numpy as np

BIG_ELEMS = 16 << 20  # 64 MiB of uint32
SHAPE_W, SHAPE_B = (512, 1024), (32, 16)


def big_tree(seed: int, n: int = BIG_ELEMS) -> dict:
  """~64 MiB, cheap to rebuild in the parent for an exact comparison."""
  x = np.arange(n, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(seed)
  return {"big": x, "seed": seed, "tag": f"big{seed}"}


def host_data() -> dict:
  rng = np.random.default_rng(0)
  return {"w": rng.standard_normal(SHAPE_W).astype(np.float32),
          "b": rng.integers(-1000, 1000, SHAPE_B).astype(np.int32),
          "scale": np.float32(2.5)}


def _crash_child(mode: str) -> None:
  import flax_ckpt

  if mode == "save":
    path, overwrite, seed = sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    tree = big_tree(seed)
    print("SAVING", flush=True)
    flax_ckpt.save(path, tree, overwrite=overwrite)
    print("SAVED", flush=True)
  elif mode == "manager":
    root, step, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tree = big_tree(seed)
    mngr = flax_ckpt.CheckpointManager(root)  # an async save, as in training
    print("SAVING", flush=True)
    mngr.save(step, tree, force=True)
    mngr.wait_until_finished()
    print("SAVED", flush=True)
    mngr.close()
  elif mode == "overwrite_loop":  # overwrites PATH with seeds 1..N (16 MiB each)
    path, n = sys.argv[2], int(sys.argv[3])
    for seed in range(1, n + 1):
      flax_ckpt.save(path, big_tree(seed, BIG_ELEMS // 4), overwrite=True)
    print("DONE", flush=True)
  elif mode == "hold":
    root, stale = sys.argv[2], float(sys.argv[3])
    mngr = flax_ckpt.CheckpointManager(root, lock_stale_after_s=stale)
    print("HELD", flush=True)
    time.sleep(300)
    mngr.close()
  elif mode == "hold_then_save":  # holds ROOT; on a line on stdin, saves step STEP
    root, stale, step = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    mngr = flax_ckpt.CheckpointManager(root, lock_stale_after_s=stale, enable_async=False,
                                       max_to_keep=1)
    print("HELD", flush=True)
    sys.stdin.readline()
    try:
      mngr.save(step, {"w": np.full(4, step, np.float32)}, force=True)
      print("SAVED", flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the test
      print(f"REFUSED {type(e).__name__}: {e}".replace("\n", " "), flush=True)
    try:
      mngr.close()
    except Exception:  # noqa: BLE001
      pass
    print("CLOSED", flush=True)
  else:
    raise SystemExit(f"unknown mode {mode}")


def result(**kw) -> None:
  print("RESULT " + json.dumps(kw), flush=True)


def _mp() -> None:
  port, nproc, pid = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
  scenario, path = sys.argv[6], sys.argv[7]
  import jax

  jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60,
                             heartbeat_timeout_seconds=60, shutdown_timeout_seconds=10)
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import flax_ckpt
  from flax_ckpt._src.io import storage

  host = host_data()

  def saved_tree():  # 2 processes x 2 devices: w sharded over all 4 devices
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    w = jax.make_array_from_callback(SHAPE_W, NamedSharding(mesh, P("x", "y")),
                                     lambda i: host["w"][i])
    b = jax.make_array_from_callback(SHAPE_B, NamedSharding(mesh, P()), lambda i: host["b"][i])
    scale = jax.make_array_from_callback((), NamedSharding(mesh, P()),
                                         lambda i: np.asarray(host["scale"]))
    return {"w": w, "b": b, "scale": scale, "step": 7}

  if scenario == "save":
    flax_ckpt.save(path, saved_tree(), barrier_timeout_s=60)
    result(saved=True)
  elif scenario == "die":  # process 1 is SIGKILLed while its segments upload
    tree = saved_tree()
    t = time.time()
    if pid == 1:
      from flax_ckpt._src.io.storage import objstore

      flax_ckpt.save_async(path, tree, barrier_timeout_s=8)
      deadline = time.time() + 20
      while time.time() < deadline:  # die once some of its own segments are stored
        if any("/data.p1.bin." in k for k in objstore.list_keys(path)):
          print("P1_UPLOADED", flush=True)
          break
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    try:
      flax_ckpt.save(path, tree, barrier_timeout_s=8)
    except Exception as e:  # noqa: BLE001 - reported to the test
      from flax_ckpt._src.io.storage import objstore

      result(raised=type(e).__name__, message=str(e)[:300], seconds=time.time() - t,
             keys=objstore.list_keys(path))
      sys.stdout.flush()
      os._exit(0)  # do not wait for the dead peer at shutdown
    result(raised=None)
    sys.stdout.flush()
    os._exit(1)
  elif scenario == "load":  # 4 processes x 2 devices: w's rows over 4 processes
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    target = NamedSharding(mesh, P("x", None))
    repl = NamedSharding(mesh, P())
    template = {"w": jax.ShapeDtypeStruct(SHAPE_W, np.float32, sharding=target),
                "b": jax.ShapeDtypeStruct(SHAPE_B, np.int32, sharding=repl),
                "scale": jax.ShapeDtypeStruct((), np.float32, sharding=repl), "step": 0}
    before = storage.READ_STATS.bytes
    out = flax_ckpt.load(path, template)
    read = storage.READ_STATS.bytes - before
    boxes = {tuple((s.start or 0, s.stop or n) for s, n in zip(idx, SHAPE_W))
             for idx in target.addressable_devices_indices_map(SHAPE_W).values()}
    share = sum(int(np.prod([e - s for s, e in box])) * 4 for box in boxes)
    for shard in out["w"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host["w"][shard.index])
    for shard in out["b"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host["b"])
    for shard in out["scale"].addressable_shards:
      assert np.asarray(shard.data) == host["scale"]
    assert out["w"].sharding == target and out["step"] == 7, out
    result(read=read, share_w=share, other=host["b"].nbytes + 4, rows=sorted(b[0] for b in boxes))
  else:
    raise SystemExit(f"unknown scenario {scenario}")
  sys.stdout.flush()


if __name__ == "__main__":
  if sys.argv[1] == "mp":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[5])}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    _mp()
  else:
    os.environ.pop("XLA_FLAGS", None)  # one CPU device is plenty
    os.environ["JAX_PLATFORMS"] = "cpu"
    _crash_child(sys.argv[1])
