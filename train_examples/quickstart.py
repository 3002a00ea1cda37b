"""Quickstart: train a small Flax model, checkpoint it with flax_ckpt, and load it back.

  python -m train_examples.quickstart --workdir /tmp/flax_ckpt_quickstart
  python -m train_examples.quickstart --workdir s3://my-bucket/quickstart  # or gs://

Trains a linen MLP on a synthetic regression task for a few steps, saves the whole
TrainState (params, adam state, step) synchronously and asynchronously, loads it back with
and without a template, and checks that training continues bit for bit. The full
preemption-safe examples (CheckpointManager, resume after kill) come with later issues.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import flax_ckpt


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(1)(x)


def create_state(rng: jax.Array) -> train_state.TrainState:
  model = MLP()
  params = model.init(rng, jnp.zeros((1, 8)))["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adamw(1e-2))


@jax.jit
def train_step(state, x, y):
  def loss_fn(p):
    return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def batches(seed: int):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(8, 1)).astype(np.float32)
  while True:
    x = rng.normal(size=(32, 8)).astype(np.float32)
    yield x, x @ w


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--workdir", default="/tmp/flax_ckpt_quickstart")
  ap.add_argument("--steps", type=int, default=200)
  args = ap.parse_args(argv)
  path = os.path.join(args.workdir, "ckpt")  # a local path, s3://bucket/x or gs://bucket/x

  state = create_state(jax.random.key(0))
  data = batches(0)
  for _ in range(args.steps):
    state, loss = train_step(state, *next(data))
  print(f"trained {int(state.step)} steps, loss {float(loss):.4f}")

  t = time.perf_counter()
  # overwrite=True: a previous run's checkpoint stays loadable until this one commits
  flax_ckpt.save(path, state, custom_metadata={"loss": float(loss)}, overwrite=True)
  print(f"saved {path} in {time.perf_counter() - t:.3f}s")

  # Without a template: the structure comes back, TrainState's static fields cannot.
  md = flax_ckpt.metadata(path)
  n = sum(m.nbytes for m in jax.tree_util.tree_leaves(md.tree))
  print(f"metadata: {n} bytes of arrays, custom_metadata={md.custom_metadata}")

  # With a template: exactly the TrainState type back (apply_fn and tx from the template).
  abstract = jax.eval_shape(lambda: create_state(jax.random.key(0)))
  restored = flax_ckpt.load(path, abstract)
  restored = restored.replace(apply_fn=state.apply_fn, tx=state.tx)
  assert type(restored) is type(state)

  # Continue both for a few steps: bitwise identical.
  data_a, data_b = batches(1), batches(1)
  for _ in range(10):
    state, _ = train_step(state, *next(data_a))
    restored, _ = train_step(restored, *next(data_b))
  same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree_util.tree_leaves(state.params),
                 jax.tree_util.tree_leaves(restored.params)))
  print(f"resumed training is bitwise identical: {same}")

  # Async save: returns once the state is safe to change; commit happens in the background.
  t = time.perf_counter()
  resp = flax_ckpt.save_async(path, state, overwrite=True)
  blocked = time.perf_counter() - t
  resp.result()
  print(f"save_async blocked for {blocked * 1e3:.1f} ms; committed")
  if not same:
    raise SystemExit("resume mismatch")


if __name__ == "__main__":
  main()
