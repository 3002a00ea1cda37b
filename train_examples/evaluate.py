r"""Evaluates a checkpoint of a training example, reading no optimizer state.

  python -m train_examples.evaluate --workdir /tmp/lm                # newest step, 1 device
  python -m train_examples.evaluate --workdir /tmp/lm --mesh 2x2 --step 400
  python -m train_examples.evaluate --workdir /tmp/digits --output_json /tmp/eval.json

The example and its config are read from ``WORKDIR/config.json`` (written by the training
run), the checkpoint from ``WORKDIR/checkpoints``; the run may still be going (the manager
is opened read-only). For the nnx LM only the ``params`` part is read, straight into the
shardings of the evaluation mesh (``--mesh``: ``1``, ``4``, ``2x2``, ...; its axes are
(data, model) and missing axes are 1): each device reads just its own slice, whatever mesh
the run trained on. For the linen classifier, whose BatchNorm needs its running statistics,
``params`` and the small ``extra`` part (step, batch statistics, dropout key) are read; the
classifier is not sharded, so it evaluates on the default device.

Prints one line ``EVAL {json}`` with the step and the metrics (and writes the same JSON to
``--output_json``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

import flax_ckpt
from train_examples import _common, linen_classifier, nnx_lm

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.")
flags.DEFINE_integer("step", None, "The step to evaluate (default: the newest).")
flags.DEFINE_string("mesh", "1", "Evaluation mesh shape, e.g. 1, 4 or 2x2 (data x model).")
flags.DEFINE_string("output_json", None, "Also write the result to this file.")


def parse_mesh(text: str) -> tuple[int, int]:
  """``'2x2'`` -> (2, 2); ``'4'`` -> (1, 4) (all on the model axis); ``'1'`` -> (1, 1)."""
  try:
    dims = tuple(int(t) for t in text.lower().replace(",", "x").split("x") if t)
  except ValueError:
    dims = ()
  if not dims or len(dims) > 2 or min(dims) < 1:
    raise app.UsageError(f"--mesh={text!r}: want e.g. 1, 4 or 2x2")
  return dims if len(dims) == 2 else (1, dims[0])


def evaluate_lm(config: Any, mngr: flax_ckpt.CheckpointManager, step: int,
                mesh_shape: tuple[int, int]) -> dict[str, Any]:
  """Loads the LM's params at ``step`` onto a ``mesh_shape`` mesh and evaluates them."""
  mesh = _common.make_mesh(mesh_shape, nnx_lm.AXES)
  try:
    nnx_lm.check_model_fits(config, mesh)
  except ValueError as e:
    raise app.UsageError(f"--mesh {FLAGS.mesh}: {e}") from None
  batch = config.batch_size
  if batch % mesh.shape["data"]:
    raise app.UsageError(f"--mesh {FLAGS.mesh}: batch_size {batch} does not divide by the "
                         f"mesh's data axis ({mesh.shape['data']})")
  model, template = nnx_lm.abstract_params(config, mesh)
  params = mngr.restore(step, template, only="params")  # reads params/ only
  nnx.update(model, params)  # the abstract model now holds the loaded arrays
  _, val = nnx_lm.load_tokens(config)
  out = nnx_lm.evaluate(model, nnx_lm.eval_windows(val, config), batch, mesh)
  # where the parameters actually are: e.g. the qkv kernel (d, 3d) split over 'model'
  kernel = params["blocks"][0]["qkv"]["kernel"].get_value()
  out["param_sharding"] = str(kernel.sharding.spec)
  out["devices"] = len(kernel.sharding.device_set)
  out["kernel_shape"] = list(kernel.shape)
  out["kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
  return out


def evaluate_classifier(config: Any, mngr: flax_ckpt.CheckpointManager,
                        step: int) -> dict[str, Any]:
  """Loads the classifier's params and BatchNorm statistics at ``step`` and evaluates them."""
  data = linen_classifier.load_data(config)
  num_classes = int(max(data["train_y"].max(), data["test_y"].max())) + 1
  abstract = jax.eval_shape(lambda: linen_classifier.create_train_state(
      config, data["train_x"].shape[1:], num_classes))
  parts = mngr.restore(step, abstract, only=("params", "extra"))  # no opt_state byte
  return linen_classifier.evaluate(abstract, parts["params"], parts["extra"]["batch_stats"],
                                   data)


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  mesh_shape = parse_mesh(FLAGS.mesh)
  try:
    example, config = _common.read_config(FLAGS.workdir)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  if example == nnx_lm.NAME:
    _common.use_cpu_devices(max(int(np.prod(mesh_shape)), 1))  # before jax's backend starts
  ckpt_dir = os.path.join(FLAGS.workdir, _common.CHECKPOINT_DIR)
  try:
    mngr = flax_ckpt.CheckpointManager(ckpt_dir, read_only=True)
  except flax_ckpt.CheckpointNotFoundError:
    raise app.UsageError(f"{ckpt_dir} does not exist: no checkpoint was saved yet") from None
  steps = mngr.all_steps()
  if not steps:
    raise app.UsageError(f"no committed checkpoint in {mngr.directory} yet")
  step = FLAGS.step if FLAGS.step is not None else steps[-1]
  if step not in steps:
    raise app.UsageError(f"--step {step}: no such checkpoint; {mngr.directory} holds steps "
                         f"{steps}")
  if example == linen_classifier.NAME and mesh_shape != (1, 1):
    raise app.UsageError("--mesh: the linen classifier is not sharded; it evaluates on the "
                         "default device (leave --mesh out)")
  if example == nnx_lm.NAME:
    metrics = evaluate_lm(config, mngr, step, mesh_shape)
  elif example == linen_classifier.NAME:
    metrics = evaluate_classifier(config, mngr, step)
  else:
    raise app.UsageError(f"{FLAGS.workdir} is a run of {example!r}, which this evaluator "
                         "does not know")
  mngr.close()
  result = {"example": example, "step": int(step), **metrics}
  logging.info("Evaluated step %d of %s: %s", step, FLAGS.workdir, metrics)
  print("EVAL " + json.dumps(result, sort_keys=True), flush=True)
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  app.run(main)
