r"""A byte-level Flax nnx Transformer language model, sharded over a device mesh and
checkpointed with flax_ckpt: preemption-safe, and resumed bit for bit.

  python -m train_examples.nnx_lm --workdir /tmp/lm
  python -m train_examples.nnx_lm --workdir /tmp/lm --config.data_path=~/my_corpus.txt

By default it trains on the Python standard library's own source files, on 8 simulated CPU
devices arranged as a (data=2, model=4) mesh: every weight matrix is split over 'model',
every batch over 'data'. Running the same command again resumes from the newest checkpoint
in ``WORKDIR/checkpoints``: parameters, AdamW state, the dropout RNG stream and the grain
iterator's position, so the resumed run ends exactly (bitwise) where an uninterrupted one
would. SIGTERM saves the current step and exits 0. Each process writes only its own shards.

``python -m train_examples.evaluate --workdir WORKDIR --mesh 2x2`` (or ``--mesh 1``) loads
only the parameters, straight into another mesh, and reports loss and perplexity.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from train_examples import _common

NAME = "nnx_lm"
VOCAB = 256  # bytes
AXES = ("data", "model")
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", f"{NAME}.py")


def _init(init: Any, names: tuple[str | None, ...]) -> Any:
  return nnx.with_partitioning(init, names)


_DENSE = nnx.initializers.lecun_normal()


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention + MLP; weights split over the 'model' axis."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    d = cfg.d_model
    self.num_heads = cfg.num_heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, kernel_init=_init(_DENSE, (None, "model")),
                          bias_init=_init(nnx.initializers.zeros_init(), ("model",)),
                          rngs=rngs)
    self.out = nnx.Linear(d, d, kernel_init=_init(_DENSE, ("model", None)), rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, cfg.mlp_dim, kernel_init=_init(_DENSE, (None, "model")),
                         bias_init=_init(nnx.initializers.zeros_init(), ("model",)),
                         rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_dim, d, kernel_init=_init(_DENSE, ("model", None)),
                           rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h).astype(np.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))
    attn = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d)
    x = x + self._drop(self.out(y), key, 0)
    return x + self._drop(self.down(nnx.gelu(self.up(self.ln2(x)))), key, 1)

  def _drop(self, x: jax.Array, key: jax.Array | None, i: int) -> jax.Array:
    if key is None:
      return x
    return self.dropout(x, deterministic=False, rngs=jax.random.fold_in(key, i))


class TransformerLM(nnx.Module):
  """Token + position embeddings, ``num_layers`` blocks, a final LayerNorm and a head.

  The model holds parameters only: dropout keys are passed in (``key=None``: evaluation),
  so an evaluation job needs nothing but the checkpoint's ``params``.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, seq_len: int, rngs: nnx.Rngs):
    d = cfg.d_model
    emb = nnx.initializers.normal(0.02)
    self.tokens = nnx.Embed(VOCAB, d, embedding_init=_init(emb, (None, "model")), rngs=rngs)
    self.positions = nnx.Embed(seq_len, d, embedding_init=_init(emb, (None, "model")),
                               rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, VOCAB, kernel_init=_init(_DENSE, ("model", None)), rngs=rngs)

  def __call__(self, tokens: jax.Array, key: jax.Array | None = None) -> jax.Array:
    x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))[None]
    for i, block in enumerate(self.blocks):
      x = block(x, None if key is None else jax.random.fold_in(key, i))
    return self.head(self.ln(x))


# --------------------------------------------------------------------------------- data


def _files(path: str) -> list[str]:
  """The text files ``data_path`` names (see configs/nnx_lm.py), sorted."""
  if not path:
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
  elif any(c in path for c in "*?["):
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
  elif os.path.isfile(path):
    files = [path]
  else:
    raise ValueError(f"--config.data_path={path}: no such file or directory")
  if not files:
    raise ValueError(f"--config.data_path={path}: matched no files")
  return files


def load_tokens(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) byte tokens as int32; val is the last ``val_fraction`` of the text."""
  chunks, total = [], 0
  for f in _files(config.data_path):
    if total >= config.max_bytes:
      break
    with open(f, "rb") as fh:
      b = fh.read(config.max_bytes - total)
    chunks.append(b)
    total += len(b)
  tokens = np.frombuffer(b"".join(chunks), np.uint8).astype(np.int32)
  n_val = int(len(tokens) * config.val_fraction)
  window, vf = config.seq_len + 1, config.val_fraction
  need = int(np.ceil(max(window / max(vf, 1e-9), 4 * window / max(1 - vf, 1e-9)))) + 1
  if len(tokens) - n_val < 4 * (config.seq_len + 1) or n_val < config.seq_len + 1:
    raise ValueError(f"{config.data_path or 'the standard library'}: {len(tokens)} bytes "
                     f"is too little text for seq_len={config.seq_len} and val_fraction="
                     f"{config.val_fraction}; it needs at least {need} bytes")
  return tokens[:-n_val], tokens[-n_val:]


def train_iterator(train: np.ndarray, config: ml_collections.ConfigDict) -> Any:
  """An endless, per-epoch reshuffled grain iterator over this process's windows of
  ``seq_len + 1`` bytes (its position is checkpointed as the ``dataset`` part)."""
  length = config.seq_len + 1
  n = (len(train) - 1) // config.seq_len  # window i is train[i*L : i*L + L + 1], all full
  per_process = config.batch_size // jax.process_count()
  ds = (grain.MapDataset.range(n)[jax.process_index()::jax.process_count()]
        .shuffle(seed=config.seed)
        .repeat()
        .map(lambda i: train[i * config.seq_len:i * config.seq_len + length])
        .batch(per_process, drop_remainder=True))
  return iter(ds.to_iter_dataset())


def eval_windows(val: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """The fixed held-out windows: up to ``eval_batches * batch_size`` of them."""
  length = config.seq_len + 1
  n = min((len(val) - 1) // config.seq_len, config.eval_batches * config.batch_size)
  n -= n % config.batch_size or 0
  if n == 0:
    raise ValueError("the held-out text is shorter than one batch: raise val_fraction")
  return np.stack([val[i * config.seq_len:i * config.seq_len + length] for i in range(n)])


def global_batch(local: np.ndarray, mesh: Any) -> jax.Array:
  """This process's rows as one array split over the mesh's 'data' axis."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), local)


# ------------------------------------------------------------------------- model + steps


def check_model_fits(config: ml_collections.ConfigDict, mesh: Any) -> None:
  """Raises a clear error when the model's sizes do not split over ``mesh``."""
  m = config.model
  if m.d_model % m.num_heads:
    raise ValueError(f"model.d_model={m.d_model} must be divisible by model.num_heads="
                     f"{m.num_heads}")
  n = mesh.shape["model"]
  bad = [f"model.{k}={m[k]}" for k in ("d_model", "mlp_dim") if m[k] % n]
  if bad:
    raise ValueError(f"{', '.join(bad)} must be divisible by the mesh's 'model' axis ({n}): "
                     "change the sizes or the mesh")


def create(config: ml_collections.ConfigDict, mesh: Any) -> tuple[TransformerLM, Any]:
  """The model and its AdamW optimizer, every array created in its sharding on ``mesh``."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate,
                                                config.warmup_steps,
                                                max(config.num_train_steps,
                                                    config.warmup_steps + 1))
  with jax.set_mesh(mesh):
    model = TransformerLM(config.model, config.seq_len, nnx.Rngs(config.seed))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=config.weight_decay),
                              wrt=nnx.Param)
  return model, optimizer


def _loss(model: TransformerLM, windows: jax.Array, key: jax.Array | None) -> jax.Array:
  logits = model(windows[:, :-1], key)
  return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()


@nnx.jit
def train_step(model: TransformerLM, optimizer: Any, rngs: nnx.Rngs,
               windows: jax.Array) -> jax.Array:
  """One AdamW step on a batch of windows (model and optimizer are updated in place).

  Args:
    model: the sharded model.
    optimizer: its ``nnx.Optimizer``.
    rngs: the dropout stream (advanced by one key per step; checkpointed).
    windows: (B, seq_len + 1) byte tokens, split over the mesh's 'data' axis.

  Returns:
    The batch's mean next-byte loss.
  """
  key = rngs.dropout()
  loss, grads = nnx.value_and_grad(lambda m: _loss(m, windows, key))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _eval_loss(model: TransformerLM, windows: jax.Array) -> jax.Array:
  return _loss(model, windows, None)


def evaluate(model: TransformerLM, windows: np.ndarray, batch_size: int,
             mesh: Any) -> dict[str, float]:
  """Mean next-byte loss (nats) over the held-out windows, and its perplexity.

  Args:
    model: the model (dropout off).
    windows: (N, seq_len + 1) held-out windows of this process.
    batch_size: rows per evaluation batch of this process.
    mesh: the mesh whose 'data' axis splits each batch.

  Returns:
    ``{'eval_loss': ..., 'eval_perplexity': ...}`` as floats.
  """
  losses = [_eval_loss(model, global_batch(windows[i:i + batch_size], mesh))
            for i in range(0, len(windows), batch_size)]
  loss = float(np.mean([float(x) for x in losses]))
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}


def abstract_params(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """The params template on ``mesh``: shapes and dtypes from ``nnx.eval_shape``, shardings
  from the Variables' partitioning names (each device then reads only its own slice)."""
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: TransformerLM(config.model, config.seq_len, nnx.Rngs(0)))
  return model, flax_ckpt.abstract_with_sharding(nnx.state(model, nnx.Param), mesh)


# ------------------------------------------------------------------------------ training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``; returns the final metrics and the state digest."""
  _common.use_cpu_devices(int(config.num_cpu_devices))
  mesh = _common.make_mesh(config.mesh_shape, AXES)
  if config.batch_size % (mesh.shape["data"] * jax.process_count()):
    raise ValueError(f"batch_size {config.batch_size} must divide by the 'data' axis "
                     f"({mesh.shape['data']}) times the process count")
  check_model_fits(config, mesh)
  train, val = load_tokens(config)
  windows = eval_windows(val, config)[jax.process_index()::jax.process_count()]
  train_iter = train_iterator(train, config)
  mngr = _common.make_manager(workdir, config.checkpoint)  # from here on SIGTERM saves
  _common.record_config(workdir, config, NAME, resuming=mngr.latest_step() is not None)
  writer = _common.make_writer(workdir)
  logging.info("%d train / %d held-out bytes; mesh %s", len(train), len(val),
               dict(mesh.shape))

  model, optimizer = create(config, mesh)
  rngs = nnx.Rngs(dropout=config.seed + 1)

  def saveable() -> dict[str, Any]:
    # model and optimizer as objects (split into params / opt_state / extra by the
    # manager); the RNG stream as its nnx.State, which loads back without a template too
    return {"model": model, "optimizer": optimizer, "rngs": nnx.state(rngs)}

  if mngr.latest_step() is not None:
    # model and optimizer are updated in place (each array read into its sharding), the
    # iterator is set in place; the RNG stream's state is copied into ``rngs``.
    restored = mngr.restore(abstract_state=saveable(), dataset=train_iter)
    nnx.update(rngs, restored["rngs"])
    logging.info("Resumed from step %d of %s (data iterator state %s)",
                 int(optimizer.step.get_value()), mngr.directory, train_iter.get_state())
  else:
    logging.info("Starting from scratch in %s", workdir)
  step = int(optimizer.step.get_value())
  if step == 0:
    writer.write_hparams(_common.flat_hparams(config))

  from clu import metric_writers, periodic_actions  # imports TensorFlow: only when training

  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           writer=writer, every_steps=config.log_every_steps)
  losses: list[jax.Array] = []
  preempted = False
  with metric_writers.ensure_flushes(writer):
    while step < config.num_train_steps:
      losses.append(train_step(model, optimizer, rngs, global_batch(next(train_iter), mesh)))
      step += 1
      report(step)
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        writer.write_scalars(step, {"train_loss": float(np.mean(jax.device_get(losses)))})
        losses = []
      eval_m = None
      if mngr.should_save(step) or last:
        eval_m = evaluate(model, windows, config.batch_size // jax.process_count(), mesh)
        writer.write_scalars(step, eval_m)
      mngr.save(step, saveable(), dataset=train_iter, metrics=eval_m, force=last)
      if mngr.reached_preemption(step):
        mngr.save(step, saveable(), dataset=train_iter, force=True)  # no-op if just saved
        mngr.wait_until_finished()
        logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved, exiting", step)
        preempted = True
        break
  mngr.wait_until_finished()
  digest = _common.tree_digest({"params": nnx.state(model, nnx.Param),
                                "opt_state": nnx.state(optimizer)})
  final = evaluate(model, windows, config.batch_size // jax.process_count(), mesh)
  mngr.close()  # SIGTERM from here on ends the process at once: everything is saved
  logging.info("%s at step %d: eval_loss %.4f, eval_perplexity %.3f; params+opt_state "
               "sha256 %s", "Stopped" if preempted else "Finished", step,
               final["eval_loss"], final["eval_perplexity"], digest)
  return {"step": step, "preempted": preempted, "digest": digest, **final}


def main(argv: list[str]) -> None:
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS.coordinator_address:  # (with jax.distributed, JAX handles SIGTERM)
    _common.exit_cleanly_on_sigterm_until_the_manager_starts()
  t0 = time.time()
  _common.use_cpu_devices(int(flags.FLAGS.config.num_cpu_devices))  # per process
  _common.maybe_initialize_distributed()
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.info("Took %.1f s", time.time() - t0)


if __name__ == "__main__":
  _common.define_flags(_DEFAULT_CONFIG)
  _common.define_distributed_flags()
  app.run(main)
