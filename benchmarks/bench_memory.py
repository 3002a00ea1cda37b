"""Peak host memory of saving and loading, each case in a fresh process, against the bounds.

Usage:
  python -m benchmarks.bench_memory [--gib 1 8] [--no-orbax] [--quick]
                                    [--dir /tmp/flax_ckpt_bench_memory]

A state of ``--gib`` GiB (``--quick``: 0.0625) of random float32 in 16 arrays. Each case
runs in a fresh child process (``--child CASE``) that builds what it needs, drops its numpy
copies, resets the kernel's peak-RSS mark (``VmHWM``, by writing ``5`` to
``/proc/self/clear_refs``) and runs the case; the peak is ``VmHWM`` afterwards and the
baseline the RSS at the reset, so ``added`` is what the case itself needed on top of the
state. Where the reset is refused, the baseline is the RSS before the case and the peak
includes building the state (the row says ``no reset``). The child prints one line
``RESULT {json}``.

Cases and bounds (issue: no second copy of the state, bounded staging):

* ``save``: ``flax_ckpt.save`` of jax arrays: adds at most 64 MiB;
* ``save_async``: ``flax_ckpt.save_async`` of jax arrays, then ``result()``: adds at most
  one copy of the snapshot (1.0x the state + 64 MiB);
* ``save_async_numpy``: the same with numpy leaves (copied when the call returns): same bound;
* ``load``: ``flax_ckpt.load`` with a template, in a fresh process: adds at most 1.1x the
  result + 64 MiB (the default staging budget);
* ``reshard_load``: a load into a ``NamedSharding`` over 8 simulated CPU devices (2x4 mesh,
  both dimensions split) of the single-device checkpoint ``save`` wrote: same bound;
* ``orbax_save``, ``orbax_load``: orbax ``StandardCheckpointer``, for comparison only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys

from benchmarks import common as C

MiB = 1 << 20
GiB = 1 << 30
ARRAYS = 16
COLS = 1024  # columns of every array (rows split across the mesh's x, columns across y)
SLACK = 64 * MiB  # the bounded staging every bound allows on top
CASES = ["save", "save_async", "save_async_numpy", "load", "reshard_load", "orbax_save",
         "orbax_load"]
# case -> (factor of the state/result bytes, slack bytes); None: informational
BOUNDS: dict[str, tuple[float, int] | None] = {
    "save": (0.0, SLACK), "save_async": (1.0, SLACK), "save_async_numpy": (1.0, SLACK),
    "load": (1.1, SLACK), "reshard_load": (1.1, SLACK), "orbax_save": None,
    "orbax_load": None}


def _status(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {key} in /proc/self/status")




def shape(gib: float) -> tuple[int, int]:
  rows = int(gib * GiB) // 4 // ARRAYS // COLS // 8 * 8  # divisible by the mesh's axes
  return max(8, rows), COLS


def _numpy_state(gib: float) -> dict:
  import numpy as np
  rng = np.random.default_rng(0)
  return {f"w{i}": rng.random(shape(gib), dtype=np.float32) for i in range(ARRAYS)}


def _jax_state(gib: float) -> dict:
  import jax.numpy as jnp
  out = {}
  for k, v in _numpy_state(gib).items():
    out[k] = jnp.array(v, copy=True)  # never an alias of the numpy buffer
    del v
  return out


def _template(gib: float, reshard: bool) -> dict:
  import jax
  import numpy as np
  sharding = None
  if reshard:
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
  return {f"w{i}": jax.ShapeDtypeStruct(shape(gib), np.float32, sharding=sharding)
          for i in range(ARRAYS)}


def _prepare(case: str, gib: float):
  """What the case works on: the state to save, or the template to load into."""
  if case in ("save", "save_async", "orbax_save"):
    return _jax_state(gib)
  if case == "save_async_numpy":
    return _numpy_state(gib)
  return _template(gib, case == "reshard_load")


def _run(case: str, obj, root: str):
  """Runs the case; returns what it produced (kept alive until the peak is read)."""
  import jax

  import flax_ckpt
  fc, ob = os.path.join(root, "fc"), os.path.join(root, "ob")
  if case == "save":
    return flax_ckpt.save(fc, obj, overwrite=True)
  if case in ("save_async", "save_async_numpy"):
    return flax_ckpt.save_async(os.path.join(root, case), obj, overwrite=True).result()
  if case in ("load", "reshard_load"):
    return jax.block_until_ready(flax_ckpt.load(fc, obj))
  import orbax.checkpoint as ocp
  ck = ocp.StandardCheckpointer()
  try:
    if case == "orbax_save":
      shutil.rmtree(ob, ignore_errors=True)
      ck.save(ob, obj)
      return ck.wait_until_finished()
    return jax.block_until_ready(ck.restore(ob, obj))
  finally:
    ck.close()


def child(case: str, gib: float, root: str) -> dict:
  """Measures one case in this (fresh) process; returns the RESULT record."""
  os.environ["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={8 if case == 'reshard_load' else 1}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  import flax_ckpt  # noqa: F401  (imported before the baseline, like jax)
  if case.startswith("orbax"):
    import warnings
    warnings.filterwarnings("ignore")
    import orbax.checkpoint  # noqa: F401
  obj = _prepare(case, gib)
  jax.block_until_ready(obj)
  gc.collect()
  state = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(obj))
  rss0 = _status("VmRSS")
  reset = C.reset_hwm()
  base = _status("VmRSS") if reset else rss0
  out = _run(case, obj, root)
  peak = _status("VmHWM")
  if case in ("save_async", "save_async_numpy"):
    shutil.rmtree(os.path.join(root, case), ignore_errors=True)
  del out
  return {"case": case, "state": state, "base": base, "peak": peak, "added": peak - base,
          "hwm_reset": reset, "devices": jax.device_count()}


def check(r: dict) -> tuple[int | None, bool | None]:
  """(bound in bytes on ``added``, whether it holds); None for informational rows."""
  b = BOUNDS[r["case"]]
  if b is None:
    return None, None
  bound = int(b[0] * r["state"] + b[1])
  return bound, r["added"] <= bound


def run_child(case: str, gib: float, root: str, env: dict | None = None) -> dict:
  r = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child", case,
                      "--gib", str(gib), "--dir", root], capture_output=True, text=True,
                     env=env, timeout=3600)
  lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
  if r.returncode != 0 or not lines:
    raise RuntimeError(f"child {case} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])




def why_not(gib: float, root: str) -> str | None:
  size = gib * GiB
  disk, ram = shutil.disk_usage(root).free, C.free_ram()
  if disk < 3 * size + GiB:  # flax_ckpt's, an async save's and orbax's checkpoint
    return f"needs {(3 * size + GiB) / GiB:.1f} GiB of disk, {disk / GiB:.1f} free"
  if ram < 2.5 * size + GiB:  # the state and at most one more copy, plus slack
    return f"needs {(2.5 * size + GiB) / GiB:.1f} GiB of RAM, {ram / GiB:.1f} available"
  return None


def print_rows(rows: list[dict]) -> None:
  print("| case | state GiB | baseline MiB | peak MiB | added MiB | added/state | bound MiB "
        "| result |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    bound, ok = check(r)
    verdict = "info" if ok is None else "PASS" if ok else "FAIL"
    if not r["hwm_reset"]:
      verdict += " (no reset)"
    print(f"| {r['case']} | {r['state'] / GiB:.3f} | {r['base'] / MiB:.0f} "
          f"| {r['peak'] / MiB:.0f} | {r['added'] / MiB:.1f} "
          f"| {r['added'] / r['state']:.2f}x | {'-' if bound is None else bound // MiB} "
          f"| {verdict} |")


def bench(gib: float, root: str, orbax: bool) -> None:
  why = why_not(gib, root)
  if why is not None:
    print(f"\n## {gib} GiB skipped: {why}")
    return
  cases = [c for c in CASES if orbax or not c.startswith("orbax")]
  d = os.path.join(root, f"g{gib}")
  shutil.rmtree(d, ignore_errors=True)
  os.makedirs(d)
  rows = []
  try:
    for case in cases:  # save first: the loads read its checkpoint, orbax_load orbax_save's
      rows.append(run_child(case, gib, d))
  finally:
    shutil.rmtree(d, ignore_errors=True)
  print(f"\n## peak host memory, {gib} GiB in {ARRAYS} arrays, fresh process per case")
  print_rows(rows)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--gib", type=float, nargs="+", default=[1.0, 8.0])
  ap.add_argument("--no-orbax", action="store_true")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--dir", default="/tmp/flax_ckpt_bench_memory")
  ap.add_argument("--child", choices=CASES)
  a = ap.parse_args()
  if a.child:
    print("RESULT " + json.dumps(child(a.child, a.gib[0], a.dir)), flush=True)
    return
  os.makedirs(a.dir, exist_ok=True)
  orbax = not a.no_orbax
  if orbax:
    try:
      import orbax.checkpoint  # noqa: F401
    except ImportError:
      print("orbax: n/a (not installed)")
      orbax = False
  for gib in [0.0625] if a.quick else a.gib:
    bench(gib, a.dir, orbax)


if __name__ == "__main__":
  main()
