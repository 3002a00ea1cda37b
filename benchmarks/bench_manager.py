"""Training stall per checkpoint with CheckpointManager (async) vs a memcpy and vs orbax.

A ~100M-parameter MLP in a flax TrainState with adamw (params + mu + nu: ~1.2 GB) trains
with a jitted step. Every ``--every`` steps the manager saves; we measure

* the stall: how long ``save`` blocks, as a ratio to a plain memcpy of the whole state
  (copying every leaf into preallocated host buffers, best of 3);
* the overlap slowdown: the median time of steps that run while the write is in flight,
  as a ratio to the median step time without any save in flight.

Targets (issue 6): stall <= 2x memcpy, overlapped steps slowed by < 10%.

Usage:
  python -m benchmarks.bench_manager [--params 100e6] [--saves 3] [--every 6]
                                     [--dir /tmp/flax_ckpt_bench_mngr] [--no-orbax]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import warnings

import numpy as np


def build_state(n_params: float, seed: int = 0):
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  rng = np.random.default_rng(seed)
  d = 4096
  layers = max(1, round(n_params / (d * d)))
  params = {f"layer{i}": {"w": jnp.asarray(rng.standard_normal((d, d), np.float32) * 0.01)}
            for i in range(layers)}

  def apply(p, x):
    for i in range(layers):
      x = jnp.tanh(x @ p[f"layer{i}"]["w"])
    return x

  tx = optax.adamw(1e-4)
  state = train_state.TrainState.create(apply_fn=apply, params=params, tx=tx)
  # random moments: realistic bytes (zeros would flatter any writer)
  adam = state.opt_state[0]
  mu = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape, np.float32)), params)
  nu = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape, np.float32)), params)
  state = state.replace(opt_state=(adam._replace(mu=mu, nu=nu),) + tuple(state.opt_state[1:]))

  @jax.jit
  def step(state, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(state.apply_fn(p, x) ** 2))(
        state.params)
    return state.apply_gradients(grads=grads), loss

  return state, step, layers * d * d


def memcpy_time(state) -> float:
  import jax

  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "shape")]
  dst = [np.empty(x.shape, x.dtype) for x in leaves]
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for x, y in zip(leaves, dst):
      np.copyto(y, np.asarray(x))
    best = min(best, time.perf_counter() - t)
  return best


def run(name, state, step, x, saves, every, start_save, pending):
  """Trains; starts a save every ``every`` steps; returns stalls and step times."""
  import jax

  base, overlapped, stalls = [], [], []
  total = every * (saves + 1)
  for i in range(total):
    in_flight = pending()
    t = time.perf_counter()
    state, loss = step(state, x)
    jax.block_until_ready(loss)
    jax.block_until_ready(state.params)
    dt = time.perf_counter() - t
    if i > 1:  # skip compilation and warm-up
      (overlapped if in_flight else base).append(dt)
    if i % every == every - 1 and i < total - 1:
      jax.block_until_ready(state)
      t = time.perf_counter()
      start_save(i, state)
      stalls.append(time.perf_counter() - t)
  return stalls, base, overlapped


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--params", type=float, default=100e6)
  ap.add_argument("--saves", type=int, default=3)
  ap.add_argument("--every", type=int, default=6)
  ap.add_argument("--dir", default="/tmp/flax_ckpt_bench_mngr")
  ap.add_argument("--no-orbax", action="store_true")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  import flax_ckpt

  state, step, n = build_state(args.params)
  x = jnp.ones((8, 4096), jnp.float32)
  size = sum(v.nbytes for v in jax.tree.leaves(state) if hasattr(v, "nbytes"))
  t_copy = memcpy_time(state)
  print(f"state: {n / 1e6:.0f}M params + adamw = {size / 2**30:.2f} GiB; "
        f"memcpy of the state: {t_copy * 1e3:.0f} ms")
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)
  results = {}

  root = os.path.join(args.dir, "flax_ckpt")
  mngr = flax_ckpt.CheckpointManager(root, max_to_keep=2, enable_async=True)
  results["flax_ckpt"] = run(
      "flax_ckpt", state, step, x, args.saves, args.every,
      lambda i, s: mngr.save(i, s, force=True),
      lambda: mngr._pending is not None and not mngr._pending.done())
  mngr.close()

  if not args.no_orbax:
    warnings.filterwarnings("ignore")
    import orbax.checkpoint as ocp

    oroot = os.path.join(args.dir, "orbax")
    omngr = ocp.CheckpointManager(oroot, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True))
    results["orbax"] = run(
        "orbax", state, step, x, args.saves, args.every,
        lambda i, s: omngr.save(i, args=ocp.args.StandardSave(s), force=True),
        lambda: omngr.is_saving_in_progress())
    omngr.wait_until_finished()
    omngr.close()

  print(f"{'':10} {'stall ms':>9} {'stall/memcpy':>13} {'step ms':>8} "
        f"{'overlapped ms':>14} {'slowdown':>9} {'n overlapped':>13}")
  for name, (stalls, base, over) in results.items():
    st = statistics.median(stalls)
    b = statistics.median(base)
    o = statistics.median(over) if over else float("nan")
    print(f"{name:10} {st * 1e3:9.1f} {st / t_copy:13.2f} {b * 1e3:8.0f} {o * 1e3:14.0f} "
          f"{(o / b - 1) * 100:8.1f}% {len(over):13d}")
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
