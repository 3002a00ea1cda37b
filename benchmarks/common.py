"""Shared helpers for the benchmarks: states, the raw-disk baseline, page-cache control."""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import time

import numpy as np

MiB = 1 << 20


def rand_f32(rng: np.random.Generator, shape) -> np.ndarray:
  return rng.random(shape, dtype=np.float32)


def state_large(rng):
  import jax.numpy as jnp
  return {f"w{i}": jnp.asarray(rand_f32(rng, (32 * MiB,))) for i in range(8)}


def state_many_small(rng):
  import jax.numpy as jnp
  # 4..64 KiB of float32, log-uniform: ~105 MiB in all
  sizes = np.exp(rng.uniform(np.log(1024), np.log(16 * 1024), size=5000)).astype(int)
  out: dict = {}
  for i, n in enumerate(sizes):
    out.setdefault(f"group{i // 100}", {}).setdefault(f"sub{(i // 10) % 10}", {})[f"a{i}"] = (
        jnp.asarray(rand_f32(rng, (int(n),))))
  return out


def state_train(rng, params: int = 25_000_000):
  """A ~25M-parameter linen Transformer LM in a TrainState with adamw state."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  class Block(nn.Module):
    d: int
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      h = nn.SelfAttention(num_heads=8)(h)
      x = x + h
      h = nn.LayerNorm()(x)
      h = nn.Dense(4 * self.d)(h)
      return x + nn.Dense(self.d)(nn.gelu(h))

  class LM(nn.Module):
    vocab: int = 8192
    d: int = 512
    layers: int = 6
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(self.vocab, self.d)(tokens)
      for _ in range(self.layers):
        x = Block(self.d)(x)
      return nn.Dense(self.vocab)(nn.LayerNorm()(x))

  model = LM()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  # random values everywhere (zeros / constants compress and flatter the numbers)
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  leaves = [jnp.asarray(rand_f32(rng, x.shape)) for x in leaves]
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adamw(1e-3))
  mu = jax.tree_util.tree_map(lambda p: jnp.asarray(rand_f32(rng, p.shape)), params)
  nu = jax.tree_util.tree_map(lambda p: jnp.asarray(rand_f32(rng, p.shape)), params)
  adam = state.opt_state[0]._replace(mu=mu, nu=nu, count=jnp.asarray(7, jnp.int32))
  state = state.replace(opt_state=(adam,) + tuple(state.opt_state[1:]), step=7)
  return state


def host_buffers(state) -> list[np.ndarray]:
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape")]


def raw_write(path: str, bufs: list[np.ndarray]) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    for i in range(0, len(bufs), 512):
      views = [memoryview(b.reshape(-1).view(np.uint8)) for b in bufs[i:i + 512]]
      total = sum(v.nbytes for v in views)
      n = os.writev(fd, views)
      assert n == total, "short write"
    os.fsync(fd)
  finally:
    os.close(fd)


def raw_read(path: str) -> np.ndarray:
  size = os.path.getsize(path)
  buf = np.empty(size, np.uint8)
  with open(path, "rb", buffering=0) as f:
    view = memoryview(buf)
    while view:
      n = f.readinto(view)
      view = view[n:]
  return buf


def drop_cache(path: str) -> None:
  """Evicts a file's (clean) pages from the page cache, so the next read is cold."""
  paths = [path] if os.path.isfile(path) else [
      os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def count_files(path: str) -> int:
  if os.path.isfile(path):
    return 1
  return sum(len(fs) for _, _, fs in os.walk(path))


def nbytes(bufs) -> int:
  return sum(b.nbytes for b in bufs)


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def rm(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def med(xs):
  return statistics.median(xs)


def raw_baselines(raw: str, bufs: list[np.ndarray], *cleanup: str) -> tuple[float, float, float]:
  """Removes ``raw`` and ``cleanup`` paths, then times raw write+fsync, cold and warm read."""
  for p in (raw, *cleanup):
    rm(p)
  gc.collect()
  t_w, _ = timed(lambda: raw_write(raw, bufs))
  drop_cache(raw)
  t_rc, _ = timed(lambda: raw_read(raw))
  t_rw, _ = timed(lambda: raw_read(raw))
  return t_w, t_rc, t_rw


def reset_hwm() -> bool:
  """Resets this process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def free_ram() -> int:
  """Bytes of memory available to a new allocation (``MemAvailable``), 0 if unknown."""
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0
