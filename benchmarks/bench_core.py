"""Save / save_async / load of three states vs. the raw disk and orbax, in one run.

Usage:
  python -m benchmarks.bench_core [--states large,many_small,train_state] [--reps 3]
                                  [--dir /tmp/flax_ckpt_bench] [--no-orbax]

Prints, per state and method: median time, throughput, files on disk, the median of the
per-repetition ratios to the raw baseline (same bytes as one file + fsync; read cold, i.e.
after evicting the file from the page cache, and warm), and the ratio of best times (this
VM's memory and disk timings are noisy; the best of several repetitions is the steadiest).
"load cold" verifies checksums (the default); "load cold verify=False" is the same load
without, so their ratio is what verification costs; "verify() cold" is flax_ckpt.verify
reading and checking the whole checkpoint, against a cold raw read of the same bytes.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings

import numpy as np

from benchmarks import common as C


def _orbax():
  warnings.filterwarnings("ignore")
  import orbax.checkpoint as ocp
  return ocp


def bench_state(name, state, root, reps, use_orbax):
  import jax

  import flax_ckpt

  bufs = C.host_buffers(state)
  size = C.nbytes(bufs)
  abstract = jax.eval_shape(lambda: state)
  rows: dict[str, dict[str, list]] = {}

  def add(method, t, base, files=None):
    r = rows.setdefault(method, {"t": [], "ratio": [], "files": files})
    r["t"].append(t)
    r["ratio"].append(t / base)
    if files is not None:
      r["files"] = files

  raw = os.path.join(root, "raw.bin")
  fc = os.path.join(root, "fc")
  ob = os.path.join(root, "orbax")
  ocp = _orbax() if use_orbax else None
  for rep in range(reps + 1):  # rep 0 warms up and is discarded
    t_raw_w, t_raw_rc, t_raw_rw = C.raw_baselines(raw, bufs, fc, ob)

    t_save, _ = C.timed(lambda: flax_ckpt.save(fc, state))
    files = C.count_files(fc)
    C.drop_cache(fc)
    t_load_c, out = C.timed(lambda: jax.block_until_ready(flax_ckpt.load(fc, abstract)))
    del out
    t_load_w, out = C.timed(lambda: jax.block_until_ready(flax_ckpt.load(fc, abstract)))
    del out
    C.drop_cache(fc)  # the same cold load without checksum checks: what verifying costs
    t_load_nv, out = C.timed(lambda: jax.block_until_ready(
        flax_ckpt.load(fc, abstract, verify=False)))
    del out
    C.drop_cache(fc)
    t_verify, report = C.timed(lambda: flax_ckpt.verify(fc))
    assert report, report
    C.rm(fc)
    resp = None
    def start():
      nonlocal resp
      resp = flax_ckpt.save_async(fc, state)
    t_block, _ = C.timed(start)
    t_async_total = t_block + C.timed(resp.result)[0]

    if ocp is not None:
      ck = ocp.StandardCheckpointer()
      t_ob_block, _ = C.timed(lambda ck=ck: ck.save(ob, state))
      t_ob_save = t_ob_block + C.timed(ck.wait_until_finished)[0]
      ob_files = C.count_files(ob)
      C.drop_cache(ob)
      t_ob_load_c, out = C.timed(lambda ck=ck: jax.block_until_ready(ck.restore(ob, abstract)))
      del out
      t_ob_load_w, out = C.timed(lambda ck=ck: jax.block_until_ready(ck.restore(ob, abstract)))
      del out
      ck.close()
    if rep == 0:
      continue
    add("raw write+fsync", t_raw_w, t_raw_w, 1)
    add("raw read cold", t_raw_rc, t_raw_rc, 1)
    add("raw read warm", t_raw_rw, t_raw_rw, 1)
    add("flax_ckpt save", t_save, t_raw_w, files)
    add("flax_ckpt save_async blocking", t_block, t_raw_w)
    add("flax_ckpt save_async total", t_async_total, t_raw_w)
    add("flax_ckpt load cold", t_load_c, t_raw_rc)
    add("flax_ckpt load warm", t_load_w, t_raw_rw)
    add("flax_ckpt load cold verify=False", t_load_nv, t_raw_rc)
    add("flax_ckpt verify() cold", t_verify, t_raw_rc)
    if ocp is not None:
      add("orbax save", t_ob_save, t_raw_w, ob_files)
      add("orbax save blocking", t_ob_block, t_raw_w)
      add("orbax load cold", t_ob_load_c, t_raw_rc)
      add("orbax load warm", t_ob_load_w, t_raw_rw)
  for p in (raw, fc, ob):
    C.rm(p)
  print(f"\n## {name}: {len(bufs)} arrays, {size / C.MiB:.1f} MiB, median of {reps} reps")
  base_of = {m: ("raw read cold" if "cold" in m else "raw read warm" if "warm" in m
                  else "raw write+fsync") for m in rows}
  print("| method | median s | MB/s | files | ratio to raw (median of reps) | best / best raw |")
  print("|---|---|---|---|---|---|")
  for method, r in rows.items():
    t = C.med(r["t"])
    files = "" if r["files"] is None else r["files"]
    best = min(r["t"]) / min(rows[base_of[method]]["t"])
    print(f"| {method} | {t:.4f} | {size / t / 1e6:.0f} | {files} | {C.med(r['ratio']):.2f}x "
          f"| {best:.2f}x |")


def main():
  # Keep freed memory in the process (glibc would hand big blocks back to the OS, and on this
  # VM re-touching returned memory costs ~2.5 s/GiB at random). Applies to every method alike.
  env = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
         "MALLOC_TOP_PAD_": str(256 << 20)}
  if any(os.environ.get(k) != v for k, v in env.items()):
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_core", *sys.argv[1:]],
              {**os.environ, **env})
  ap = argparse.ArgumentParser()
  ap.add_argument("--states", default="large,many_small,train_state")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--dir", default="/tmp/flax_ckpt_bench")
  ap.add_argument("--no-orbax", action="store_true")
  a = ap.parse_args()
  os.makedirs(a.dir, exist_ok=True)
  rng = np.random.default_rng(0)
  makers = {"large": C.state_large, "many_small": C.state_many_small,
            "train_state": C.state_train}
  for name in a.states.split(","):
    state = makers[name](rng)
    bench_state(name, state, a.dir, a.reps, not a.no_orbax)
    del state
    gc.collect()


if __name__ == "__main__":
  main()
