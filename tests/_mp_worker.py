"""One process of a multi-process test job (launched by tests/test_multiprocess.py).

  python tests/_mp_worker.py PORT NPROC PID NDEV SCENARIO PATH MESH SPEC

Every process builds the same global data from a fixed seed, so each can check its own
shards. Prints one ``RESULT {...}`` JSON line; exits non-zero on a failed check.
"""

import json
import os
import signal
import sys
import time

port, nproc, pid, ndev = (int(a) for a in sys.argv[1:5])
scenario, path, mesh_arg, spec_arg = sys.argv[5:9]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, initialization_timeout=60,
                           heartbeat_timeout_seconds=60, shutdown_timeout_seconds=10)

import flax_ckpt  # noqa: E402
from flax_ckpt._src.io import storage  # noqa: E402

SHAPE_W, SHAPE_B = (64, 1024), (32, 16)


def host_data():
  rng = np.random.default_rng(0)
  return {"w": rng.standard_normal(SHAPE_W).astype(np.float32),
          "b": rng.integers(-1000, 1000, SHAPE_B).astype(np.int32)}


def mesh_and_spec():
  shape = tuple(int(n) for n in mesh_arg.split("x"))
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), ("x", "y")[:len(shape)])
  spec = P(*[None if a == "-" else a for a in spec_arg.split(",")])
  return mesh, spec


def result(**kw):
  print("RESULT " + json.dumps(kw), flush=True)


def global_tree():
  mesh, spec = mesh_and_spec()
  host = host_data()
  w = jax.make_array_from_callback(SHAPE_W, NamedSharding(mesh, spec), lambda i: host["w"][i])
  b = jax.make_array_from_callback(SHAPE_B, NamedSharding(mesh, P()), lambda i: host["b"][i])
  return {"w": w, "b": b, "step": 7, "note": "mp", "host": np.arange(5)}


def main():
  if scenario == "save":
    t = time.time()
    flax_ckpt.save(path, global_tree(), barrier_timeout_s=60)
    result(saved=True, seconds=time.time() - t)
  elif scenario == "save_async":
    tree = global_tree()
    resp = flax_ckpt.save_async(path, tree, barrier_timeout_s=60)
    for x in jax.tree_util.tree_leaves(tree):  # the save holds its own references
      if isinstance(x, jax.Array):
        x.delete()
    resp.result(timeout=60)
    result(saved=True)
  elif scenario == "load":
    mesh, spec = mesh_and_spec()
    host = host_data()
    target = NamedSharding(mesh, spec)
    template = {"w": jax.ShapeDtypeStruct(SHAPE_W, np.float32, sharding=target),
                "b": jax.ShapeDtypeStruct(SHAPE_B, np.int32, sharding=NamedSharding(mesh, P())),
                "step": 0, "note": None, "host": None}
    before = storage.READ_STATS.bytes
    out = flax_ckpt.load(path, template)
    read = storage.READ_STATS.bytes - before
    boxes = {tuple((s.start or 0, s.stop or n) for s, n in zip(idx, SHAPE_W))
             for idx in target.addressable_devices_indices_map(SHAPE_W).values()}
    share = sum(int(np.prod([b - a for a, b in box])) * 4 for box in boxes)
    for shard in out["w"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host["w"][shard.index])
    for shard in out["b"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host["b"][shard.index])
    assert out["step"] == 7 and out["note"] == "mp", out
    np.testing.assert_array_equal(out["host"], np.arange(5))
    assert out["w"].sharding == target
    result(read=read, share_w=share, b_bytes=host["b"].nbytes)
  elif scenario == "overwrite":
    tree = global_tree()
    flax_ckpt.save(path, tree, barrier_timeout_s=60)
    flax_ckpt.save(path, {**tree, "step": 8}, overwrite=True, barrier_timeout_s=60)
    result(saved=True)
  elif scenario == "desync":
    # process 1's first save fails a local check; the two processes must still agree on
    # which save is which: the first fails everywhere, the second commits intact
    tree = global_tree()
    errors = []
    try:
      flax_ckpt.save(path + "/d0", tree, barrier_timeout_s=6,
                     custom_metadata={"x": object()} if pid == 1 else None)
    except Exception as e:  # noqa: BLE001
      errors.append(type(e).__name__)
    flax_ckpt.save(path + "/d1", tree, barrier_timeout_s=60)
    result(errors=errors)
  elif scenario == "submesh":
    # arrays living on one process's devices only, and typed keys sharded over all
    mesh, _ = mesh_and_spec()
    host = host_data()
    own = jax.sharding.Mesh(np.array(jax.local_devices() if pid == 1 else
                                     [d for d in jax.devices() if d.process_index == 1]),
                            ("x",))
    on1 = jax.make_array_from_callback(SHAPE_B, NamedSharding(own, P("x")),
                                       lambda i: host["b"][i], dtype=np.int32)
    key_sh = NamedSharding(mesh, P(("x", "y")))
    keys = jax.jit(lambda: jax.random.split(jax.random.key(5), 8), out_shardings=key_sh)()
    flax_ckpt.save(path, {"on1": on1, "keys": keys}, barrier_timeout_s=60)
    out = flax_ckpt.load(path, {"on1": None,
                                "keys": jax.ShapeDtypeStruct((8,), keys.dtype,
                                                             sharding=key_sh)})
    np.testing.assert_array_equal(np.asarray(out["on1"]), host["b"])
    want = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(5), 8)))
    for shard in out["keys"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(jax.random.key_data(shard.data)),
                                    want[shard.index])
    result(ok=True)
  elif scenario == "stateful":
    # each process's data iterator state round-trips to that process, next to sharded params
    import grain.python as gp

    def make_iter():
      ds = gp.MapDataset.range(pid, 200, nproc).shuffle(seed=3).map(lambda x: x * 10)
      return iter(ds.to_iter_dataset())

    it = make_iter()
    for _ in range(5 + 3 * pid):  # the processes stop at different positions
      next(it)
    params = global_tree()
    r = flax_ckpt.save_checkpointables_async(
        path, {"params": params, "dataset": it}, barrier_timeout_s=60)
    following = [int(next(it)) for _ in range(6)]  # advancing after the call is safe
    r.result()
    out = flax_ckpt.load_checkpointables(path, {"dataset": make_iter()})
    restored = [int(next(out["dataset"])) for _ in range(6)]
    swapped = flax_ckpt.load_checkpointables(
        path, {"dataset": flax_ckpt.StatefulRestore(None, process_mapping={0: 1, 1: 0})})
    params_back = flax_ckpt.load_checkpointables(path, {"params": None})["params"]
    np.testing.assert_array_equal(np.asarray(params_back["w"]), host_data()["w"])
    result(following=following, restored=restored, state=out["dataset"].get_state(),
           swapped=swapped["dataset"], files=sorted(os.listdir(os.path.join(path, "dataset"))))
  elif scenario == "manager":
    # periodic async saves and retention by two processes, then a restore onto another mesh
    host = host_data()
    mngr = flax_ckpt.CheckpointManager(path, save_interval_steps=2, max_to_keep=2,
                                       barrier_timeout_s=60)
    saved = []
    for step in range(8):
      tree = global_tree()
      tree["w"] = tree["w"] + step
      if mngr.save(step, tree, metrics={"loss": float(10 - step)}):
        saved.append(step)
    mngr.wait_until_finished()
    steps = mngr.all_steps()
    mesh, _ = mesh_and_spec()
    other = NamedSharding(mesh, P("y", "x"))  # another layout than the one saved
    template = {"w": jax.ShapeDtypeStruct(SHAPE_W, np.float32, sharding=other),
                "b": jax.ShapeDtypeStruct(SHAPE_B, np.int32,
                                          sharding=NamedSharding(mesh, P())),
                "step": 0, "note": "", "host": np.zeros(5, np.int64)}
    out = mngr.restore(abstract_state=template)
    for shard in out["w"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), (host["w"] + 6)[shard.index])
    assert out["w"].sharding == other
    mngr.close()
    result(saved=saved, steps=steps, latest=mngr.latest_step(),
           dirs=sorted(os.listdir(path)) if pid == 0 else None)
  elif scenario in ("die", "raise"):
    tree = global_tree()
    t = time.time()
    if pid == 1:
      if scenario == "die":
        flax_ckpt.save_async(path, tree, barrier_timeout_s=8)
        os.kill(os.getpid(), signal.SIGKILL)
      tree["bad"] = object()  # fails validation in this process only
    try:
      flax_ckpt.save(path, tree, barrier_timeout_s=8)
    except Exception as e:  # noqa: BLE001 - reported to the test
      result(raised=type(e).__name__, message=str(e)[:500], seconds=time.time() - t,
             exists=os.path.exists(path))
      sys.stdout.flush()
      os._exit(0)  # do not wait for a dead peer at shutdown
    result(raised=None)
    os._exit(1)
  else:
    raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
  main()
