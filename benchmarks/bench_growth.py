"""How save, load and metadata times grow with the number of leaves, the bytes and the steps.

Usage:
  python -m benchmarks.bench_growth [--quick] [--reps 3] [--no-orbax]
                                    [--dir /tmp/flax_ckpt_bench_growth] [--max-gib 8]
                                    [--orbax-max-leaves 10000] [--orbax-max-gib 1]
                                    [--total-mib 256]

Three sweeps, each point measured in a fresh directory (removed afterwards), median of
``--reps`` repetitions, random float32 data (constants would compress):

* leaves: 100, 1k, 10k, 100k arrays sharing ``--total-mib`` MiB (default 256; ``--quick``:
  16 MiB and at most 10k leaves), in a nested dict of groups of 100;
* bytes: 64 MiB, 256 MiB, 1 GiB, 4 GiB, 8 GiB in 16 arrays, capped by ``--max-gib``
  (``--quick``: 64 and 128 MiB). Points that do not fit in the free disk space of ``--dir``
  or in the free memory are skipped with the reason;
* manager listing: a ``CheckpointManager`` directory holding 10, 100, 1000 steps of a tiny
  state; opening the manager (which lists the steps), ``reload``, ``all_steps`` and
  ``latest_step``, in microseconds per step.

For each point of the first two: the same bytes written as one file with fsync, and read
back cold (``raw w``, ``raw rc``); ``flax_ckpt.save``; ``flax_ckpt.metadata`` and
``flax_ckpt.load`` with the page cache of the checkpoint dropped first (cold); orbax's
``StandardCheckpointer`` save (+ wait) and cold restore, skipped above
``--orbax-max-leaves`` leaves or ``--orbax-max-gib`` GiB (``n/a`` without orbax).

Fits: a least-squares line ``t = a * x + b`` of each time against the leaf count (per-leaf
cost ``a`` in microseconds, intercept ``b``) and against the bytes (``a`` in s/GiB). The
superlinearity check compares the cost per unit above the intercept, ``(t - b) / x``, at the
largest point with the smallest (noisy when the intercept dominates the smallest point: ``n/a``
when it is not above it), and the slope of the last segment (e.g. 10k -> 100k leaves) with the
one before it (1k -> 10k); both are about 1 when the time grows linearly, and well above 1
when it grows faster.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import warnings

import numpy as np

from benchmarks import common as C

GiB = 1 << 30
PIECE = 1 << 30  # one writev moves at most ~2 GiB: write big buffers in pieces of <= 1 GiB


def _orbax():
  try:
    warnings.filterwarnings("ignore")
    import orbax.checkpoint as ocp
  except ImportError:
    return None
  return ocp


def raw_write(path: str, bufs: list[np.ndarray]) -> None:
  """Writes ``bufs`` into one file and fsyncs it; buffers of any size, short writes resumed."""
  views = []
  for b in bufs:
    v = memoryview(b.reshape(-1).view(np.uint8))
    views += [v[i:i + PIECE] for i in range(0, v.nbytes, PIECE)]
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    batch: list = []
    for v in views:
      batch.append(v)
      if len(batch) == 512 or sum(x.nbytes for x in batch) >= PIECE:
        _writev_all(fd, batch)
        batch = []
    _writev_all(fd, batch)
    os.fsync(fd)
  finally:
    os.close(fd)


def _writev_all(fd: int, views: list) -> None:
  while views:
    n = os.writev(fd, views)
    while views and n >= views[0].nbytes:
      n -= views[0].nbytes
      views = views[1:]
    if views and n:
      views[0] = views[0][n:]


def raw_baseline(raw: str, bufs: list[np.ndarray]) -> tuple[float, float]:
  """Times a raw write+fsync of ``bufs`` and a cold read of the file; removes it."""
  C.rm(raw)
  gc.collect()
  t_w, _ = C.timed(lambda: raw_write(raw, bufs))
  C.drop_cache(raw)
  t_rc, out = C.timed(lambda: C.raw_read(raw))
  del out
  C.rm(raw)
  return t_w, t_rc


def leaf_state(rng, total: int, leaves: int) -> dict:
  """``leaves`` float32 arrays of ``total`` bytes in all, in groups of 100."""
  import jax.numpy as jnp
  n = max(1, total // 4 // leaves)
  out: dict = {}
  for i in range(leaves):
    out.setdefault(f"g{i // 100}", {})[f"a{i}"] = jnp.asarray(C.rand_f32(rng, (n,)))
  return out


def measure(state, root: str, ocp) -> dict[str, float]:
  """One repetition of every measurement of one point, each in a fresh directory."""
  import jax

  import flax_ckpt
  bufs = C.host_buffers(state)
  abstract = jax.eval_shape(lambda: state)
  r: dict[str, float] = {}
  r["raw_w"], r["raw_rc"] = raw_baseline(os.path.join(root, "raw.bin"), bufs)
  del bufs
  fc = os.path.join(root, "fc")
  C.rm(fc)
  gc.collect()
  r["save"], _ = C.timed(lambda: flax_ckpt.save(fc, state))
  C.drop_cache(fc)
  r["meta"], _ = C.timed(lambda: flax_ckpt.metadata(fc))
  C.drop_cache(fc)
  r["load"], out = C.timed(lambda: jax.block_until_ready(flax_ckpt.load(fc, abstract)))
  del out
  C.rm(fc)
  gc.collect()
  if ocp is not None:
    r["ob_save"], r["ob_load"] = _orbax_times(ocp, state, abstract, os.path.join(root, "ob"))
  return r


def _orbax_times(ocp, state, abstract, ob: str) -> tuple[float, float]:
  import jax
  C.rm(ob)
  gc.collect()
  ck = ocp.StandardCheckpointer()
  try:
    t_block, _ = C.timed(lambda: ck.save(ob, state))
    t_save = t_block + C.timed(ck.wait_until_finished)[0]
    C.drop_cache(ob)
    t_load, out = C.timed(lambda: jax.block_until_ready(ck.restore(ob, abstract)))
    del out
  finally:
    ck.close()
  C.rm(ob)
  gc.collect()
  return t_save, t_load


def run_point(state, root: str, reps: int, ocp) -> dict[str, float]:
  runs = [measure(state, root, ocp) for _ in range(reps)]
  return {k: C.med([r[k] for r in runs]) for k in runs[0]}


def _f(x) -> str:
  return "n/a" if x is None else x if isinstance(x, str) else f"{x:.4f}"


def print_table(title: str, key: str, rows: list[tuple]) -> None:
  """rows: (x, bytes, times or None, why skipped or orbax note)."""
  print(f"\n## {title}")
  print(f"| {key} | MiB | save s | load s | metadata s | raw w s | raw rc s | save/raw "
        "| load/raw-cold | orbax save s | orbax load s |")
  print("|" + "---|" * 11)
  for x, size, t, note in rows:
    if t is None:
      print(f"| {x} | {size / C.MiB:.0f} | skipped: {note} |" + " |" * 8)
      continue
    ob_s = t.get("ob_save", note or None)
    ob_l = t.get("ob_load", note or None)
    print(f"| {x} | {size / C.MiB:.0f} | {t['save']:.4f} | {t['load']:.4f} | {t['meta']:.4f} "
          f"| {t['raw_w']:.4f} | {t['raw_rc']:.4f} | {t['save'] / t['raw_w']:.2f}x "
          f"| {t['load'] / t['raw_rc']:.2f}x | {_f(ob_s)} | {_f(ob_l)} |")


def fit(xs, ts, unit: float, unit_name: str, label: str) -> None:
  """Least-squares line of ``ts`` against ``xs / unit``; prints slope, intercept, checks."""
  if len(xs) < 2:
    print(f"{label}: fewer than 2 points, no fit")
    return
  x = np.asarray(xs, float) / unit
  t = np.asarray(ts, float)
  a, b = np.polyfit(x, t, 1)
  per = (t - b) / x
  ratio = f"{per[-1] / per[0]:.2f}" if per[0] > 0 else "n/a"
  seg = np.diff(t) / np.diff(x)
  seg_ratio = f"{seg[-1] / seg[-2]:.2f}" if len(seg) > 1 and seg[-2] > 0 else "n/a"
  scale = 1e6 if unit == 1 else 1.0
  print(f"{label}: {a * scale:.3f} {unit_name} + {b:.4f} s; superlinearity "
        f"(t-b)/x largest/smallest {ratio}, slope of last/previous segment {seg_ratio}")


def fits(rows: list[tuple], by_leaves: bool) -> None:
  done = [(x, size, t) for x, size, t, _ in rows if t is not None]
  xs = [x if by_leaves else size for x, size, _ in done]
  unit, name = (1, "us/leaf") if by_leaves else (GiB, "s/GiB")
  for key, label in (("save", "save"), ("load", "load cold"), ("meta", "metadata cold"),
                     ("raw_w", "raw write"), ("ob_save", "orbax save"),
                     ("ob_load", "orbax load")):
    pts = [(x, t[key]) for x, (_, _, t) in zip(xs, done) if key in t]
    if not pts:
      continue
    fit([p[0] for p in pts], [p[1] for p in pts], unit, name, f"  {label}")


def leaf_sweep(a, rng, ocp) -> None:
  total = a.total_mib * C.MiB
  counts = [100, 1000, 10_000] + ([] if a.quick else [100_000])
  rows = []
  for n in counts:
    state = leaf_state(rng, total, n)
    skip = ocp is None or n > a.orbax_max_leaves or total > a.orbax_max_gib * GiB
    t = run_point(state, a.dir, a.reps, None if skip else ocp)
    rows.append((n, total, t, "skipped" if skip and ocp is not None else None))
    del state
    gc.collect()
  print_table(f"leaf sweep: {a.total_mib} MiB in all, median of {a.reps} reps", "leaves", rows)
  print("fits against the leaf count:")
  fits(rows, by_leaves=True)




def why_not(size: int, root: str, orbax: bool) -> str | None:
  """Why a point of ``size`` bytes cannot run here, or None."""
  disk, ram = shutil.disk_usage(root).free, C.free_ram()
  need_disk = size * (2 if orbax else 1) + GiB  # raw file, then flax_ckpt/orbax one at a time
  need_ram = int(size * 2.5)  # the state, a loaded copy, orbax's staging
  if disk < need_disk:
    return f"needs {need_disk / GiB:.1f} GiB of disk, {disk / GiB:.1f} free"
  if ram < need_ram:
    return f"needs {need_ram / GiB:.1f} GiB of RAM, {ram / GiB:.1f} available"
  return None


def size_sweep(a, rng, ocp) -> None:
  sizes = [64 * C.MiB, 128 * C.MiB] if a.quick else [
      64 * C.MiB, 256 * C.MiB, GiB, 4 * GiB, 8 * GiB]
  sizes = [s for s in sizes if s <= a.max_gib * GiB]
  rows = []
  for size in sizes:
    skip_ob = ocp is None or size > a.orbax_max_gib * GiB
    why = why_not(size, a.dir, not skip_ob)
    if why is not None:
      print(f"size {size / C.MiB:.0f} MiB skipped: {why}")
      rows.append((16, size, None, why))
      continue
    state = leaf_state(rng, size, 16)
    t = run_point(state, a.dir, a.reps, None if skip_ob else ocp)
    rows.append((16, size, t, "skipped" if skip_ob and ocp is not None else None))
    del state
    gc.collect()
  print_table(f"size sweep: 16 arrays, median of {a.reps} reps", "leaves", rows)
  print("fits against the bytes:")
  fits(rows, by_leaves=False)


def _time_listing(path: str, reps: int) -> dict[str, float]:
  import flax_ckpt
  runs = []
  for _ in range(reps):
    r = {}
    r["open"], m = C.timed(lambda: flax_ckpt.CheckpointManager(path, enable_async=False))
    r["reload"], _ = C.timed(m.reload)
    r["all_steps"], _ = C.timed(m.all_steps)
    r["latest_step"], _ = C.timed(m.latest_step)
    m.close()
    runs.append(r)
  return {k: C.med([r[k] for r in runs]) for k in runs[0]}


def manager_listing(a) -> None:
  import flax_ckpt
  path = os.path.join(a.dir, "mngr")
  C.rm(path)
  tiny = {"w": np.arange(4, dtype=np.float32), "step": 0}
  rows = []
  saved = 0
  for n in (10, 100, 1000):
    with flax_ckpt.CheckpointManager(path, enable_async=False, max_to_keep=None,
                                     fsync=False) as m:
      for s in range(saved, n):
        m.save(s, {**tiny, "step": s})
    saved = n
    rows.append((n, _time_listing(path, a.reps)))
  C.rm(path)
  print(f"\n## manager listing: median of {a.reps} reps (us per step)")
  print("| steps | open ms | open us/step | reload us/step | all_steps us/step "
        "| latest_step us/step |")
  print("|---|---|---|---|---|---|")
  for n, t in rows:
    print(f"| {n} | {t['open'] * 1e3:.2f} | {t['open'] * 1e6 / n:.1f} "
          f"| {t['reload'] * 1e6 / n:.1f} | {t['all_steps'] * 1e6 / n:.3f} "
          f"| {t['latest_step'] * 1e6 / n:.3f} |")
  fit([n for n, _ in rows], [t["open"] for _, t in rows], 1, "us/step", "  open (fit)")


def warm_up(root: str, ocp) -> None:
  """One small untimed round, so imports and first-call costs stay out of the sweeps."""
  state = leaf_state(np.random.default_rng(1), 4 * C.MiB, 10)
  measure(state, root, ocp)


def main() -> None:
  # as bench_core: keep freed memory in the process, the same for every method
  env = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
         "MALLOC_TOP_PAD_": str(256 << 20)}
  if any(os.environ.get(k) != v for k, v in env.items()):
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_growth", *sys.argv[1:]],
              {**os.environ, **env})
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--no-orbax", action="store_true")
  ap.add_argument("--dir", default="/tmp/flax_ckpt_bench_growth")
  ap.add_argument("--max-gib", type=float, default=8)
  ap.add_argument("--orbax-max-leaves", type=int, default=10_000)
  ap.add_argument("--orbax-max-gib", type=float, default=1)
  ap.add_argument("--total-mib", type=int, default=None)
  ap.add_argument("--sweeps", default="leaves,bytes,manager")
  a = ap.parse_args()
  if a.total_mib is None:
    a.total_mib = 16 if a.quick else 256
  os.makedirs(a.dir, exist_ok=True)
  ocp = None if a.no_orbax else _orbax()
  if ocp is None:
    print("orbax: n/a (--no-orbax or not installed)")
  rng = np.random.default_rng(0)
  sweeps = a.sweeps.split(",")
  warm_up(a.dir, ocp)
  if "leaves" in sweeps:
    leaf_sweep(a, rng, ocp)
  if "bytes" in sweeps:
    size_sweep(a, rng, ocp)
  if "manager" in sweeps:
    manager_listing(a)


if __name__ == "__main__":
  main()
