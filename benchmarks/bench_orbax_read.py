"""Loading an Orbax checkpoint with flax_ckpt vs. with Orbax itself, in one run (issue 15).

Usage:
  python -m benchmarks.bench_orbax_read [--states large,many_small,train_state] [--reps 3]
                                        [--formats standard,zarr3] [--dir /tmp/...] [--quick]

For each state of benchmarks/bench_core.py (1 GiB in 8 arrays, 5000 small arrays, a
25M-parameter train state; ``--quick``: small versions of the three), Orbax saves one
checkpoint per format:

- ``standard``: ``StandardCheckpointer`` with its defaults (OCDBT, zarr v2, zstd); in
  orbax-checkpoint 0.12 this is also what ``CheckpointManager`` + ``StandardSave`` writes;
- ``zarr3``: ``PyTreeCheckpointHandler(use_zarr3=True)`` (OCDBT, zarr3, zstd).

Then each repetition loads it with flax_ckpt and with Orbax, with a template (the state's
abstract tree with its shardings) and without one, cold (the checkpoint's files evicted
from the page cache first, as bench_core does) and warm. Printed per state and format:
median time, throughput (of the state's array bytes), the median of the per-repetition
ratios flax_ckpt / Orbax for the same kind of load, and each load vs. a raw read of the
same bytes from one file (cold vs. cold, warm vs. warm). Until flax_ckpt reads Orbax
checkpoints, its rows say why they are missing.
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
  warnings.filterwarnings("ignore", module="orbax")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import orbax.checkpoint as ocp
  return ocp


# ---- small versions of bench_core's states, for --quick ----

def quick_large(rng):
  import jax.numpy as jnp
  return {f"w{i}": jnp.asarray(C.rand_f32(rng, (1 << 20,))) for i in range(8)}  # 32 MiB


def quick_many_small(rng):
  import jax.numpy as jnp
  sizes = np.exp(rng.uniform(np.log(1024), np.log(16 * 1024), size=300)).astype(int)
  out: dict = {}
  for i, n in enumerate(sizes):
    out.setdefault(f"group{i // 100}", {}).setdefault(f"sub{(i // 10) % 10}", {})[f"a{i}"] = (
        jnp.asarray(C.rand_f32(rng, (int(n),))))
  return out


def quick_train(rng):
  """A small MLP in a TrainState with adamw state (random values, like state_train)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for d in (256, 256, 10):
        x = nn.Dense(d)(nn.relu(x))
      return x

  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 128)))["params"]
  params = jax.tree.map(lambda p: jnp.asarray(C.rand_f32(rng, p.shape)), params)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adamw(1e-3))
  mu = jax.tree.map(lambda p: jnp.asarray(C.rand_f32(rng, p.shape)), params)
  nu = jax.tree.map(lambda p: jnp.asarray(C.rand_f32(rng, p.shape)), params)
  adam = state.opt_state[0]._replace(mu=mu, nu=nu, count=jnp.asarray(7, jnp.int32))
  return state.replace(opt_state=(adam,) + tuple(state.opt_state[1:]), step=7)


MAKERS = {"large": C.state_large, "many_small": C.state_many_small,
          "train_state": C.state_train}
QUICK = {"large": quick_large, "many_small": quick_many_small, "train_state": quick_train}


# ---- saving and loading ----

def orbax_save(ocp, fmt, path, state):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if fmt == "standard":
      with ocp.StandardCheckpointer() as ck:
        ck.save(path, state)
        ck.wait_until_finished()
    else:
      with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_zarr3=True)) as ck:
        ck.save(path, args=ocp.args.PyTreeSave(state))


def abstract_of(state):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, state)


def same_values(got, want) -> bool:
  import jax
  gl = [x for x in jax.tree.leaves(got) if hasattr(x, "shape")]
  wl = [x for x in jax.tree.leaves(want) if hasattr(x, "shape")]
  return len(gl) == len(wl) and all(
      np.asarray(g).dtype == np.asarray(w).dtype and np.array_equal(np.asarray(g), np.asarray(w))
      for g, w in zip(gl, wl))


def loaders(ocp, path, abstract):
  """{method: () -> loaded tree} for flax_ckpt and Orbax, with and without a template."""
  import jax

  import flax_ckpt

  def fc_template():
    return jax.block_until_ready(flax_ckpt.load(path, abstract))

  def fc_plain():
    with warnings.catch_warnings():  # "Orbax does not record class types": known here
      warnings.simplefilter("ignore", UserWarning)
      return jax.block_until_ready(flax_ckpt.load(path))

  def ob_template():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with ocp.StandardCheckpointer() as ck:
        return jax.block_until_ready(ck.restore(path, abstract))

  def ob_plain():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with ocp.PyTreeCheckpointer() as ck:
        return jax.block_until_ready(ck.restore(path))

  return {("template", "flax_ckpt"): fc_template, ("template", "orbax"): ob_template,
          ("no template", "flax_ckpt"): fc_plain, ("no template", "orbax"): ob_plain}


def bench_format(ocp, name, fmt, state, root, reps):
  bufs = C.host_buffers(state)
  size = C.nbytes(bufs)
  abstract = abstract_of(state)
  raw = os.path.join(root, "raw.bin")
  path = os.path.join(root, f"orbax_{fmt}")
  C.rm(path)
  orbax_save(ocp, fmt, path, state)
  files = C.count_files(path)
  fns = loaders(ocp, path, abstract)
  times: dict[tuple, list[float]] = {}
  errors: dict[tuple, str] = {}
  # once, untimed: the values must be the saved ones (without a template: Orbax's own tree)
  reference = {"template": state, "no template": fns[("no template", "orbax")]()}
  for key, fn in fns.items():
    try:
      out = fn()
      if not same_values(out, reference[key[0]]):
        errors[key] = "values differ from the saved state"
      del out
    except Exception as e:  # noqa: BLE001 - reported in the table
      errors[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
  del reference
  raw_t: dict[str, list[float]] = {"cold": [], "warm": []}
  for _ in range(reps):
    _, t_rc, t_rw = C.raw_baselines(raw, bufs)
    raw_t["cold"].append(t_rc)
    raw_t["warm"].append(t_rw)
    for key, fn in fns.items():
      if key in errors:
        continue
      gc.collect()
      C.drop_cache(path)
      t_cold, out = C.timed(fn)
      del out
      t_warm, out = C.timed(fn)
      del out
      times.setdefault(key + ("cold",), []).append(t_cold)
      times.setdefault(key + ("warm",), []).append(t_warm)
  C.rm(raw)
  C.rm(path)

  print(f"\n## {name}, Orbax {fmt} ({files} files): {len(bufs)} arrays, "
        f"{size / C.MiB:.1f} MiB, median of {reps} reps")
  print("| load | by | median s | MB/s | flax_ckpt / orbax | vs raw read (same cache) |")
  print("|---|---|---|---|---|---|")
  for kind in ("template", "no template"):
    for cache in ("cold", "warm"):
      raw_row = raw_t[cache]
      for who in ("flax_ckpt", "orbax"):
        key = (kind, who, cache)
        label = f"{kind}, {cache}"
        if (kind, who) in errors:
          print(f"| {label} | {who} | n/a | | | {errors[(kind, who)]} |")
          continue
        ts = times[key]
        t = C.med(ts)
        vs_raw = C.med([a / b for a, b in zip(ts, raw_row)])
        other = times.get((kind, "orbax", cache))
        ratio = (f"{C.med([a / b for a, b in zip(ts, other)]):.2f}x"
                 if who == "flax_ckpt" and other else "")
        print(f"| {label} | {who} | {t:.4f} | {size / t / 1e6:.0f} | {ratio} | {vs_raw:.2f}x |")
  print(f"| raw read, cold | one file | {C.med(raw_t['cold']):.4f} | "
        f"{size / C.med(raw_t['cold']) / 1e6:.0f} | | 1.00x |")
  print(f"| raw read, warm | one file | {C.med(raw_t['warm']):.4f} | "
        f"{size / C.med(raw_t['warm']) / 1e6:.0f} | | 1.00x |")


def main():
  # as bench_core: keep freed memory in the process (same for every method)
  env = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
         "MALLOC_TOP_PAD_": str(256 << 20)}
  if any(os.environ.get(k) != v for k, v in env.items()):
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_orbax_read",
                               *sys.argv[1:]], {**os.environ, **env})
  ap = argparse.ArgumentParser()
  ap.add_argument("--states", default="large,many_small,train_state")
  ap.add_argument("--formats", default="standard,zarr3")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--dir", default="/tmp/flax_ckpt_bench_orbax_read")
  ap.add_argument("--quick", action="store_true", help="small states (a smoke run)")
  a = ap.parse_args()
  os.makedirs(a.dir, exist_ok=True)
  ocp = _orbax()
  makers = QUICK if a.quick else MAKERS
  rng = np.random.default_rng(0)
  for name in a.states.split(","):
    state = makers[name](rng)
    for fmt in a.formats.split(","):
      bench_format(ocp, name, fmt, state, a.dir, a.reps)
    del state
    gc.collect()


if __name__ == "__main__":
  main()
