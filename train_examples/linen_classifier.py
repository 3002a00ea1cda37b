r"""A Flax linen CNN with BatchNorm and dropout on scikit-learn's 8x8 digits, checkpointed
with flax_ckpt: preemption-safe, and resumed bit for bit.

  python -m train_examples.linen_classifier --workdir /tmp/digits
  python -m train_examples.linen_classifier --workdir /tmp/digits \
      --config configs/linen_classifier.py --config.num_train_steps=1200

Running the same command again resumes from the newest checkpoint in ``WORKDIR/checkpoints``:
the ``TrainState`` (params, optimizer state, step, BatchNorm statistics, dropout key) and
the position of the grain data iterator, so the resumed run ends exactly (bitwise) where an
uninterrupted one would. SIGTERM (e.g. a preemption notice) saves the current step and exits
0. Checkpoints are saved every ``checkpoint.every_steps`` steps, asynchronously, together
with the held-out accuracy; the newest ``keep_latest`` and the ``keep_best`` most accurate
are kept. TensorBoard summaries go to ``WORKDIR``. ``python -m train_examples.evaluate
--workdir WORKDIR`` evaluates a checkpoint without loading its optimizer state.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax.training import train_state

from train_examples import _common

NAME = "linen_classifier"
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", f"{NAME}.py")


class CNN(nn.Module):
  """Conv -> BatchNorm -> ReLU blocks, average pooling, a dropout MLP head."""

  features: tuple[int, ...]
  dense: int
  num_classes: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for f in self.features:
      x = nn.Conv(f, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 4:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
  """flax's TrainState plus what else training needs to resume exactly."""

  batch_stats: Any
  dropout_key: jax.Array  # typed PRNG key; step t uses fold_in(dropout_key, t)


# --------------------------------------------------------------------------------- data


def load_data(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """``train_x/train_y/test_x/test_y`` as float32 NHWC images in [0, 1] and int32 labels.

  The split is fixed (seeded by 0, not by ``config.seed``), so every run and every
  evaluation sees the same held-out images.
  """
  if config.dataset == "digits":
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.float32) / 16.0, d.target
  else:
    with np.load(os.path.expanduser(config.dataset), allow_pickle=False) as f:
      if "x" not in f or "y" not in f:
        raise ValueError(f"--config.dataset={config.dataset}: the .npz must hold arrays 'x' "
                         f"(images) and 'y' (labels); it holds {sorted(f.keys())}")
      x, y = f["x"].astype(np.float32), f["y"]
    if x.size and x.max() > 1.0:
      x = x / np.float32(x.max())
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or y.shape != (x.shape[0],):
    raise ValueError(f"--config.dataset={config.dataset}: want x (N, H, W[, C]) and y (N,), "
                     f"got x {x.shape}, y {y.shape}")
  if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
    raise ValueError(f"--config.dataset={config.dataset}: labels y must be integers >= 0 "
                     f"(class indices), got dtype {y.dtype}")
  if len(np.unique(y)) < 2:
    raise ValueError(f"--config.dataset={config.dataset}: labels y hold one class only")
  order = np.random.default_rng(0).permutation(len(x))
  n_test = max(1, int(round(len(x) * config.test_fraction)))
  if n_test >= len(x):
    raise ValueError(f"--config.test_fraction={config.test_fraction} leaves no training "
                     f"examples of {len(x)}")
  test, train = order[:n_test], order[n_test:]
  return {"train_x": x[train], "train_y": y[train].astype(np.int32),
          "test_x": x[test], "test_y": y[test].astype(np.int32)}


def train_iterator(data: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> Any:
  """An endless, per-epoch reshuffled grain iterator of this process's batches.

  Its position is checkpointed with the model (``get_state``/``set_state``), so a resumed
  run continues with exactly the batch that came next.
  """
  n = len(data["train_y"])
  per_process = config.batch_size // jax.process_count()
  x, y = data["train_x"], data["train_y"]
  ds = (grain.MapDataset.range(n)[jax.process_index()::jax.process_count()]
        .shuffle(seed=config.seed)
        .repeat()
        .map(lambda i: (x[i], y[i]))
        .batch(per_process, drop_remainder=True))
  return iter(ds.to_iter_dataset())


# -------------------------------------------------------------------------------- model


def create_train_state(config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                       num_classes: int) -> TrainState:
  """A fresh TrainState (also used under ``jax.eval_shape`` as the restore template)."""
  model = CNN(tuple(config.features), config.dense, num_classes, config.dropout_rate)
  root = jax.random.key(config.seed)
  init_key, dropout_key = jax.random.split(root)
  variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate,
                                                config.warmup_steps,
                                                max(config.num_train_steps,
                                                    config.warmup_steps + 1))
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], dropout_key=dropout_key)


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, dict]:
  """One AdamW step on a batch; BatchNorm statistics updated, dropout keyed by the step.

  Args:
    state: the train state before the step.
    x: images (B, H, W, C).
    y: integer labels (B,).

  Returns:
    The new state and the batch's ``loss`` and ``accuracy``.
  """
  key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, rngs={"dropout": key},
                                     mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


@functools.partial(jax.jit, static_argnums=0)
def eval_metrics(apply_fn: Any, params: Any, batch_stats: Any, x: jax.Array,
                 y: jax.Array) -> dict:
  """Loss and accuracy of the model in inference mode (running BatchNorm statistics)."""
  logits = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)
  return {"eval_loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
          "eval_accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def evaluate(state_or_model: Any, params: Any, batch_stats: Any,
             data: dict[str, np.ndarray]) -> dict[str, float]:
  """Loss and accuracy on the held-out split.

  Args:
    state_or_model: anything with ``apply_fn`` (a TrainState, also an abstract one), or a
      linen module.
    params: the parameters.
    batch_stats: the BatchNorm running statistics.
    data: :func:`load_data`'s arrays.

  Returns:
    ``{'eval_loss': ..., 'eval_accuracy': ...}`` as floats.

  Example:
    >>> m = evaluate(state, state.params, state.batch_stats, load_data(config))  # doctest: +SKIP
  """
  apply_fn = getattr(state_or_model, "apply_fn", None) or state_or_model.apply
  m = eval_metrics(apply_fn, params, batch_stats, data["test_x"], data["test_y"])
  return {k: float(v) for k, v in m.items()}


# ------------------------------------------------------------------------------ training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``; returns the final metrics and the state digest."""
  data = load_data(config)
  num_classes = int(max(data["train_y"].max(), data["test_y"].max())) + 1
  image_shape = data["train_x"].shape[1:]
  train_iter = train_iterator(data, config)
  mngr = _common.make_manager(workdir, config.checkpoint)  # from here on SIGTERM saves
  _common.record_config(workdir, config, NAME, resuming=mngr.latest_step() is not None)
  writer = _common.make_writer(workdir)

  if mngr.latest_step() is None:
    state = create_train_state(config, image_shape, num_classes)
    logging.info("Starting from scratch in %s", workdir)
  else:
    # The template is the restore spec: shapes, dtypes (and shardings) from eval_shape;
    # apply_fn and tx come from it too, the arrays and the iterator position from disk.
    abstract = jax.eval_shape(
        lambda: create_train_state(config, image_shape, num_classes))
    state = mngr.restore(abstract_state=abstract, dataset=train_iter)
    logging.info("Resumed from step %d of %s (data iterator state %s)", int(state.step),
                 mngr.directory, train_iter.get_state())
  step = int(state.step)
  if step == 0:
    writer.write_hparams(_common.flat_hparams(config))

  from clu import metric_writers, periodic_actions  # imports TensorFlow: only when training

  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           writer=writer, every_steps=config.log_every_steps)
  summed: dict[str, Any] = {}
  count = 0
  preempted = False
  with metric_writers.ensure_flushes(writer):
    while step < config.num_train_steps:
      x, y = next(train_iter)
      state, metrics = train_step(state, x, y)
      step += 1
      report(step)
      summed = metrics if not summed else jax.tree.map(jnp.add, summed, metrics)
      count += 1
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        writer.write_scalars(step, {f"train_{k}": float(v) / count for k, v in summed.items()})
        summed, count = {}, 0
      eval_m = None
      if mngr.should_save(step) or last:
        eval_m = evaluate(state, state.params, state.batch_stats, data)
        writer.write_scalars(step, eval_m)
      mngr.save(step, state, dataset=train_iter, metrics=eval_m, force=last)
      if mngr.reached_preemption(step):
        mngr.save(step, state, dataset=train_iter, force=True)  # no-op when just saved
        mngr.wait_until_finished()
        logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved, exiting", step)
        preempted = True
        break
  mngr.wait_until_finished()
  digest = _common.tree_digest({"params": state.params, "opt_state": state.opt_state})
  final = evaluate(state, state.params, state.batch_stats, data)
  mngr.close()  # SIGTERM from here on ends the process at once: everything is saved
  logging.info("%s at step %d: eval_loss %.4f, eval_accuracy %.4f; params+opt_state sha256 %s",
               "Stopped" if preempted else "Finished", step, final["eval_loss"],
               final["eval_accuracy"], digest)
  return {"step": step, "preempted": preempted, "digest": digest, **final}


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  _common.exit_cleanly_on_sigterm_until_the_manager_starts()
  t0 = time.time()
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.info("Took %.1f s", time.time() - t0)


if __name__ == "__main__":
  _common.define_flags(_DEFAULT_CONFIG)
  app.run(main)
