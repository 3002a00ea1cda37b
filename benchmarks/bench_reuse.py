"""Saving a mostly frozen state: bytes reused from the previous step vs. written again.

Usage:
  python -m benchmarks.bench_reuse [--gib 1] [--frozen 0.9] [--reps 3] [--no-orbax]
                                   [--dir /tmp/flax_ckpt_bench_reuse]

A state of ``--gib`` GiB of random float32 arrays (20 of them), ``--frozen`` of whose
bytes never change (frozen base weights); the rest changes at every step. Each
repetition, in one run:

* raw: the same bytes written as one file with fsync (the disk's speed);
* full: a ``CheckpointManager`` with ``reuse_unchanged=False`` saves step 1 (every byte);
* reuse: a manager with the default ``reuse_unchanged=True`` saves step 1 after step 0,
  so the frozen arrays' chunks are hard-linked from step 0. Two variants: the frozen
  arrays are the very same jax arrays at both steps (nothing is hashed), or equal copies
  (new arrays, as a jitted train step returns them: every frozen byte is hashed);
* orbax: ``StandardCheckpointer`` saving the same state (it writes every byte);
* cold loads of the full and the reused step (loading must be unchanged).

Prints the median times, the bytes each save wrote (``write_bytes`` of /proc/self/io:
what reached the disk, fsync included), and the ratios: reuse/full time (target
<= 0.2x), reused bytes written / state bytes (target <= 12%), reuse load / full load.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings

import numpy as np

from benchmarks import common as C


def _written() -> int:
  with open("/proc/self/io") as f:
    for line in f:
      if line.startswith("write_bytes:"):
        return int(line.split()[1])
  return 0


def _state(rng, gib: float, frozen: float, arrays: int = 20):
  import jax.numpy as jnp
  n = int(gib * (1 << 30)) // 4 // arrays
  n_frozen = max(1, min(arrays - 1, round(arrays * frozen)))
  base = {f"w{i}": jnp.asarray(C.rand_f32(rng, (n,))) for i in range(n_frozen)}
  head = {f"h{i}": jnp.asarray(C.rand_f32(rng, (n,))) for i in range(arrays - n_frozen)}
  return {"base": base, "head": head}


def _step(state, k: int, copies: bool = False):
  import jax
  base = jax.tree.map(lambda x: x + 0, state["base"]) if copies else state["base"]
  return {"base": base, "head": jax.tree.map(lambda x: x + k, state["head"])}


def _manager(path: str, reuse: bool):
  import flax_ckpt
  return flax_ckpt.CheckpointManager(path, options=flax_ckpt.CheckpointManagerOptions(
      enable_async=False, reuse_unchanged=reuse))


def _timed_save(path: str, state, next_state, reuse: bool) -> tuple[float, int]:
  """Saves step 0 (untimed), then times step 1; returns (seconds, bytes written)."""
  with _manager(path, reuse) as m:
    m.save(0, state)
    gc.collect()
    w0 = _written()
    t, _ = C.timed(lambda: m.save(1, next_state))
    return t, _written() - w0


def _cold_load(path: str, abstract) -> float:
  import jax

  import flax_ckpt
  C.drop_cache(path)
  t, out = C.timed(lambda: jax.block_until_ready(flax_ckpt.load(
      os.path.join(path, "1"), abstract, checkpointable_name="state")))
  del out
  return t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gib", type=float, default=1.0)
  p.add_argument("--frozen", type=float, default=0.9)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dir", default="/tmp/flax_ckpt_bench_reuse")
  p.add_argument("--no-orbax", action="store_true")
  a = p.parse_args()
  import jax

  os.makedirs(a.dir, exist_ok=True)
  rng = np.random.default_rng(0)
  state = _state(rng, a.gib, a.frozen)
  bufs = C.host_buffers(state)
  size = C.nbytes(bufs)
  frozen_bytes = C.nbytes(C.host_buffers(state["base"]))
  abstract = jax.eval_shape(lambda: state)
  ocp = None
  if not a.no_orbax:
    warnings.filterwarnings("ignore")
    import orbax.checkpoint as ocp
  raw, full, reuse, copies, ob = (os.path.join(a.dir, n) for n in (
      "raw.bin", "full", "reuse", "copies", "orbax"))
  rows: dict[str, list[float]] = {}
  for rep in range(a.reps + 1):  # rep 0 warms up and is discarded
    nxt = _step(state, rep + 1)
    nxt_copies = _step(state, rep + 1, copies=True)
    jax.block_until_ready((nxt, nxt_copies))
    t_raw, _, _ = C.raw_baselines(raw, bufs, full, reuse, copies, ob)
    t_full, w_full = _timed_save(full, state, nxt, reuse=False)
    t_reuse, w_reuse = _timed_save(reuse, state, nxt, reuse=True)
    t_copies, w_copies = _timed_save(copies, state, nxt_copies, reuse=True)
    t_ob = float("nan")
    if ocp is not None:
      with ocp.StandardCheckpointer() as ck:
        t_ob, _ = C.timed(lambda ck=ck, nxt=nxt: (ck.save(ob, nxt), ck.wait_until_finished()))
    # alternate which step loads first: the second load reuses memory the first just
    # freed, and a VM may charge the first touch of fresh memory much more than a reuse
    if rep % 2:
      l_full, l_reuse = _cold_load(full, abstract), _cold_load(reuse, abstract)
    else:
      l_reuse, l_full = _cold_load(reuse, abstract), _cold_load(full, abstract)
    if rep == 0:
      continue
    for k, v in (("raw", t_raw), ("full", t_full), ("reuse", t_reuse), ("orbax", t_ob),
                 ("copies", t_copies), ("w_copies", w_copies),
                 ("r_copies", t_copies / t_full),
                 ("w_full", w_full), ("w_reuse", w_reuse), ("l_full", l_full),
                 ("l_reuse", l_reuse), ("r_time", t_reuse / t_full),
                 ("r_raw", t_reuse / t_raw), ("r_load", l_reuse / l_full),
                 ("r_orbax", t_reuse / t_ob)):
      rows.setdefault(k, []).append(v)
  m = {k: C.med(v) for k, v in rows.items()}
  mib = 1 << 20
  print(f"state: {size / mib:.0f} MiB in 20 arrays, {frozen_bytes / size:.0%} frozen; "
        f"medians of {a.reps} repetitions")
  print(f"{'save of step 1':<34}{'time':>9}{'vs raw':>9}{'written':>12}{'of state':>10}")
  print(f"{'raw write + fsync':<34}{m['raw']:>8.3f}s{1:>8.2f}x{size / mib:>10.0f}Mi{1:>10.0%}")
  print(f"{'flax_ckpt, reuse_unchanged=False':<34}{m['full']:>8.3f}s"
        f"{m['full'] / m['raw']:>8.2f}x{m['w_full'] / mib:>10.0f}Mi{m['w_full'] / size:>10.0%}")
  print(f"{'flax_ckpt, reuse, same arrays':<34}{m['reuse']:>8.3f}s{m['r_raw']:>8.2f}x"
        f"{m['w_reuse'] / mib:>10.0f}Mi{m['w_reuse'] / size:>10.0%}")
  print(f"{'flax_ckpt, reuse, equal copies':<34}{m['copies']:>8.3f}s"
        f"{m['copies'] / m['raw']:>8.2f}x{m['w_copies'] / mib:>10.0f}Mi"
        f"{m['w_copies'] / size:>10.0%}")
  if ocp is not None:
    print(f"{'orbax StandardCheckpointer':<34}{m['orbax']:>8.3f}s"
          f"{m['orbax'] / m['raw']:>8.2f}x{'':>12}")
  print(f"reuse / full save time: {m['r_time']:.3f}x same arrays, {m['r_copies']:.3f}x "
        f"equal copies (medians of per-repetition ratios; target <= 0.2x); bytes written: "
        f"{m['w_reuse'] / size:.1%} / {m['w_copies'] / size:.1%} of the state "
        f"(target <= 12%)")
  if ocp is not None:
    print(f"reuse / orbax save time: {m['r_orbax']:.3f}x")
  print(f"cold load of the reused step / of the full step: {m['r_load']:.2f}x "
        f"({m['l_reuse']:.3f}s vs {m['l_full']:.3f}s)")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
