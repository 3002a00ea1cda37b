"""Sharded save / load / resharding load on 8 simulated CPU devices, against the raw disk and
orbax-checkpoint in the same run, plus the peak RSS of a resharding load.

Usage:
  python -m benchmarks.bench_sharded [--gib 1] [--reps 3] [--dir /tmp/flax_ckpt_bench]
                                     [--no-orbax] [--rss-gib 2]

The state: float32 arrays of 8192 x 8192 (256 MiB each) saved as P('x', None) on an 8-device
mesh. "load" restores with the same sharding; "reshard" restores as P(None, 'y') on a 2x4
mesh, so every device's box cuts across every saved chunk. Ratios are per repetition
(method time / raw time in that repetition): the raw baselines write the same bytes as one
file with fsync, and read them back cold (after evicting the page cache) and warm.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import textwrap
import warnings

N_DEVICES = 8


def _reexec_with_devices(module: str) -> None:
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}",
         "JAX_PLATFORMS": "cpu", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
         "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TOP_PAD_": str(256 << 20)}
  if any(os.environ.get(k) != v for k, v in env.items()):
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
              {**os.environ, **env})


def _state(gib: float):
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  sharding = NamedSharding(mesh, P("x", None))
  rng = np.random.default_rng(0)
  n = max(1, round(gib * 4))
  return {f"w{i}": jax.device_put(rng.random((8192, 8192), np.float32), sharding)
          for i in range(n)}


def _reshard_template(state):
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
  target = NamedSharding(mesh, P(None, "y"))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target) for k, v in state.items()}


def bench(gib: float, root: str, reps: int, use_orbax: bool) -> None:
  import jax

  import flax_ckpt
  from benchmarks import common as C

  state = _state(gib)
  bufs = C.host_buffers(state)
  size = C.nbytes(bufs)
  same = jax.eval_shape(lambda: state)
  same = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=state[k].sharding)
          for k, v in same.items()}
  reshard = _reshard_template(state)
  ocp = None
  if use_orbax:
    warnings.filterwarnings("ignore")
    import orbax.checkpoint as ocp
  raw, fc, ob = (os.path.join(root, n) for n in ("raw.bin", "fc", "orbax"))
  rows: dict[str, dict[str, list]] = {}

  def add(method, t, base, files=None):
    r = rows.setdefault(method, {"t": [], "ratio": [], "files": files})
    r["t"].append(t)
    r["ratio"].append(t / base)

  def load_cold(fn, path):
    C.drop_cache(path)
    t, out = C.timed(lambda: jax.block_until_ready(fn()))
    del out
    return t

  for rep in range(reps + 1):  # rep 0 warms up
    t_w, t_rc, t_rw = C.raw_baselines(raw, bufs, fc, ob)
    t_save, _ = C.timed(lambda: flax_ckpt.save(fc, state))
    files = C.count_files(fc)
    t_load = load_cold(lambda: flax_ckpt.load(fc, same), fc)
    t_resh = load_cold(lambda: flax_ckpt.load(fc, reshard), fc)
    t_resh_w, out = C.timed(lambda: jax.block_until_ready(flax_ckpt.load(fc, reshard)))
    del out
    if ocp is not None:
      ck = ocp.StandardCheckpointer()
      t_ob = C.timed(lambda ck=ck: (ck.save(ob, state), ck.wait_until_finished()))[0]
      ob_files = C.count_files(ob)
      t_ob_load = load_cold(lambda ck=ck: ck.restore(ob, same), ob)
      t_ob_resh = load_cold(lambda ck=ck: ck.restore(ob, reshard), ob)
      ck.close()
    if rep == 0:
      continue
    add("raw write+fsync", t_w, t_w, 1)
    add("raw read cold", t_rc, t_rc, 1)
    add("raw read warm", t_rw, t_rw, 1)
    add("flax_ckpt save", t_save, t_w, files)
    rows["flax_ckpt save"]["files"] = files
    add("flax_ckpt load, same sharding, cold", t_load, t_rc)
    add("flax_ckpt reshard 8 -> 2x4 P(None,'y'), cold", t_resh, t_rc)
    add("flax_ckpt reshard 8 -> 2x4 P(None,'y'), warm", t_resh_w, t_rw)
    if ocp is not None:
      add("orbax save", t_ob, t_w)
      rows["orbax save"]["files"] = ob_files
      add("orbax load, same sharding, cold", t_ob_load, t_rc)
      add("orbax reshard 8 -> 2x4, cold", t_ob_resh, t_rc)
  for p in (raw, fc, ob):
    C.rm(p)
  print(f"\n## sharded: {len(bufs)} arrays of 8192x8192 float32 over {N_DEVICES} devices, "
        f"{size / C.MiB:.0f} MiB, median of {reps} reps")
  base_of = {m: ("raw read warm" if "warm" in m else "raw read cold" if "cold" in m
                  else "raw write+fsync") for m in rows}
  print("| method | median s | MB/s | files | time ratio to raw (median) | bandwidth vs raw "
        "| best / best raw |")
  print("|---|---|---|---|---|---|---|")
  for method, r in rows.items():
    t = C.med(r["t"])
    ratio = C.med(r["ratio"])
    best = min(r["t"]) / min(rows[base_of[method]]["t"])
    files = "" if r["files"] is None else r["files"]
    print(f"| {method} | {t:.3f} | {size / t / 1e6:.0f} | {files} | {ratio:.2f}x | "
          f"{100 / ratio:.0f}% | {best:.2f}x |")


_RSS_CHILD = textwrap.dedent("""
    import sys
    import jax, numpy as np, flax_ckpt
    from benchmarks.bench_sharded import _reshard_template
    path, n = sys.argv[1], int(sys.argv[2])
    shape = (8192, 8192)
    tmpl = _reshard_template({f"w{i}": jax.ShapeDtypeStruct(shape, np.float32)
                              for i in range(n)})
    def hwm():  # this process's peak RSS (ru_maxrss would include the parent's, see exec)
      for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
    base = hwm()
    out = jax.block_until_ready(flax_ckpt.load(path, tmpl))
    peak = hwm()
    print(peak - base, sum(x.nbytes for x in out.values()))
""")


def rss(gib: float, root: str) -> None:
  """Peak RSS growth of a resharding load, measured in a fresh process."""
  import flax_ckpt

  state = _state(gib)
  path = os.path.join(root, "rss")
  from benchmarks import common as C

  C.rm(path)
  flax_ckpt.save(path, state)
  n = len(state)
  del state
  gc.collect()
  r = subprocess.run([sys.executable, "-c", _RSS_CHILD, path, str(n)], capture_output=True,
                     text=True, check=True, env=os.environ)
  grown, result = (int(x) for x in r.stdout.split()[-2:])
  C.rm(path)
  staging = int(os.environ.get("FLAX_CKPT_STAGING_BYTES", 64 << 20))
  print(f"\n## peak RSS of a resharding load (8 -> 2x4), fresh process\n"
        f"result {result / C.MiB:.0f} MiB; RSS grew by {grown / C.MiB:.0f} MiB "
        f"({grown / result:.2f}x the result; staging budget {staging / C.MiB:.0f} MiB)")


def main() -> None:
  _reexec_with_devices("benchmarks.bench_sharded")
  ap = argparse.ArgumentParser()
  ap.add_argument("--gib", type=float, default=1.0)
  ap.add_argument("--rss-gib", type=float, default=2.0)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--dir", default="/tmp/flax_ckpt_bench")
  ap.add_argument("--no-orbax", action="store_true")
  a = ap.parse_args()
  os.makedirs(a.dir, exist_ok=True)
  bench(a.gib, a.dir, a.reps, not a.no_orbax)
  gc.collect()
  if a.rss_gib > 0:
    rss(a.rss_gib, a.dir)


if __name__ == "__main__":
  main()
