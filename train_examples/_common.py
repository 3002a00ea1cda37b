"""What the training examples share: workdir, config record, logging, checkpoint manager.

Kept small on purpose: each example reads top to bottom on its own; this module only holds
the parts that would otherwise be copied word for word.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

import flax_ckpt
from flax_ckpt import policies

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def use_cpu_devices(n: int) -> None:
  """Simulates ``n`` CPU devices (``jax_num_cpu_devices``) when running on the CPU.

  Must run before jax creates its backends (before the first ``jax.devices()``); a no-op
  for ``n <= 0``, on GPU/TPU hosts, and once the backend exists (then the mesh check that
  follows gives the error).
  """
  if n <= 0 or jax.config.jax_num_cpu_devices == n:
    return
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return  # the user chose the device count with XLA_FLAGS: theirs wins
  platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
  if platforms and "cpu" not in platforms.split(","):
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:  # backends already initialized: keep what exists
    logging.warning("could not set %d CPU devices (%s); using %d", n, e, jax.device_count())


def define_flags(default_config: str) -> None:
  """``--workdir`` and ``--config`` (+ ``--config.<field>=value``).

  Called only when an example runs as a program, so that other modules (the evaluator,
  tests) can import every example without duplicate flags.
  """
  from absl import flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries, config.json.")
  config_flags.DEFINE_config_file("config", default_config, "The training config file.",
                                  lock_config=True)


def define_distributed_flags() -> None:
  """``--coordinator_address``, ``--num_processes``, ``--process_id`` for multi-process runs."""
  from absl import flags

  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0; set to run with jax.distributed (every "
                      "process runs the same command with its own --process_id).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize`` from the flags of :func:`define_distributed_flags`.

  Without ``--coordinator_address`` nothing happens (one process). On clusters that JAX
  detects by itself (Cloud TPU, SLURM, ...) ``--coordinator_address=auto`` lets it fill in
  everything.
  """
  from absl import flags

  f = flags.FLAGS
  addr = f["coordinator_address"].value if "coordinator_address" in f else None
  if not addr:
    return
  if signal.getsignal(signal.SIGTERM) is _startup_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # JAX's preemption notifier takes SIGTERM
  if addr == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(addr, f.num_processes, f.process_id)
  logging.info("process %d of %d (%d local devices)", jax.process_index(),
               jax.process_count(), jax.local_device_count())


def make_mesh(shape: tuple[int, ...] | list[int], axis_names: tuple[str, ...]) -> Any:
  """A ``jax.sharding.Mesh`` of the first ``prod(shape)`` devices, with a clear error."""
  shape = tuple(int(s) for s in shape)
  need = int(np.prod(shape))
  devices = jax.devices()
  if need > len(devices):
    raise ValueError(
        f"mesh {shape} needs {need} devices but jax sees {len(devices)} "
        f"({devices[0].platform}); on CPU set --config.num_cpu_devices={need}, or pick a "
        "smaller mesh")
  return jax.sharding.Mesh(np.array(devices[:need]).reshape(shape), axis_names)


# Config fields that may change when a run is resumed: they change neither the model, the
# optimizer nor the data order. (A longer num_train_steps also stretches the learning-rate
# schedule, so the result differs from a run that had the longer schedule from the start;
# another mesh gives other float rounding. Both resume fine, just not bitwise.)
RESUMABLE_CHANGES = ("num_train_steps", "log_every_steps", "eval_batches", "mesh_shape",
                     "num_cpu_devices", "checkpoint.")


def record_config(workdir: str, config: ml_collections.ConfigDict, example: str, *,
                  resuming: bool) -> None:
  """Writes ``config.json`` (the example name and the config) for the evaluator.

  Call it once the data loaded (so a mistyped path is never recorded) and before restoring.
  Without a checkpoint yet (``resuming=False``) it just (over)writes the file. On a resume,
  changes to :data:`RESUMABLE_CHANGES` are logged and recorded; any other change would
  silently break the resume (the saved iterator position and optimizer state belong to the
  old data and model), so it raises, naming the fields and the fix.

  Args:
    workdir: the run's directory.
    config: the config of this run.
    example: the example's name (a workdir holds one example's runs).
    resuming: whether the workdir already holds a checkpoint of this run.

  Raises:
    ValueError: the workdir holds another example's run, or the config changed in a field
      that a resume cannot take.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  now = {"example": example, "config": json.loads(config.to_json())}
  recorded = _read_workdir_file(workdir, CONFIG_FILE) if resuming else None
  if recorded is not None:
    before = json.loads(recorded)
    if before.get("example") != example:
      raise ValueError(f"{workdir} holds a run of {before.get('example')!r}, not "
                       f"{example!r}: use another --workdir")
    diff = _diff(before["config"], now["config"])
    bad = [d for d in diff if not d.startswith(RESUMABLE_CHANGES)]
    if bad:
      raise ValueError(
          f"resuming {workdir} with a different config: {'; '.join(bad)}. The checkpoint's "
          "data position and optimizer state belong to the recorded config. Use a new "
          f"--workdir, or delete {path} to resume anyway (not bit for bit).")
    if not diff:
      return
    logging.warning("config changed since the recorded run: %s", "; ".join(diff))
  if jax.process_index() != 0:
    return
  _workdir_store(workdir).write(
      CONFIG_FILE, json.dumps(now, indent=2, sort_keys=True).encode()).result()


def _workdir_store(workdir: str) -> Any:
  """The workdir as a tensorstore kvstore: a local directory, or an ``s3://``/``gs://``
  prefix configured the way flax_ckpt opens it (one file write is atomic on both)."""
  import tensorstore as ts

  return ts.KvStore.open(flax_ckpt.kvstore_spec(workdir)).result()


def _read_workdir_file(workdir: str, name: str) -> bytes | None:
  r = _workdir_store(workdir).read(name).result()
  return bytes(r.value) if r.state == "value" else None


def is_object_store(workdir: str) -> bool:
  """Whether ``workdir`` is an ``s3://`` or ``gs://`` URL."""
  return workdir.startswith(("s3://", "gs://"))


def read_config(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
  """The example name and config recorded in a workdir by :func:`record_config`."""
  raw = _read_workdir_file(workdir, CONFIG_FILE)
  if raw is None:
    raise FileNotFoundError(f"{os.path.join(workdir, CONFIG_FILE)} not found: is {workdir} "
                            "the --workdir of a training run?")
  rec = json.loads(raw)
  return rec["example"], ml_collections.ConfigDict(rec["config"])


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def exit_cleanly_on_sigterm_until_the_manager_starts() -> None:
  """SIGTERM before the ``CheckpointManager`` exists (imports, data loading) exits 0.

  Nothing was trained yet, so there is nothing to save: a clean exit is all a scheduler
  needs. :func:`make_manager` hands SIGTERM to the manager (which saves, then the loop
  exits 0).
  """
  signal.signal(signal.SIGTERM, _startup_sigterm)


def _startup_sigterm(signum: int, frame: Any) -> None:
  del signum, frame
  logging.warning("SIGTERM before training started: exiting")
  raise SystemExit(0)


def flat_hparams(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """The config as flat ``{'a.b': value}`` hyperparameters (non-scalars as strings)."""
  out: dict[str, Any] = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flat_hparams(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
  return out


def make_writer(workdir: str) -> Any:
  """clu's default writer: TensorBoard summaries in ``workdir`` plus log lines (process 0).

  For an ``s3://``/``gs://`` workdir the summaries go to a local directory (named in the
  log): TensorBoard's writer cannot write to S3, nor to a GCS emulator.
  """
  from clu import metric_writers

  logdir = workdir
  if is_object_store(workdir):
    logdir = os.path.join(tempfile.gettempdir(), "flax_ckpt_summaries",
                          workdir.replace("://", "/"))
    logging.info("TensorBoard summaries of %s go to %s", workdir, logdir)
  return metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)


def make_manager(workdir: str, ckpt: ml_collections.ConfigDict) -> flax_ckpt.CheckpointManager:
  """The run's ``CheckpointManager`` from the config's ``checkpoint`` section.

  Saves every ``every_steps`` steps (asynchronously unless ``async_save`` is false) and on
  SIGTERM; keeps the newest ``keep_latest`` checkpoints plus the ``keep_best`` best by the
  metric ``best_metric`` (``best_mode`` 'min' or 'max'), whichever keeps a step.

  Each committed checkpoint is logged (path, step, bytes, parts, time, throughput), as are
  the steps retention deletes: flax_ckpt logs them at INFO under the ``flax_ckpt`` logger,
  which propagates to the handler ``absl.app.run`` installs (``--verbosity`` applies).
  """
  keep: list[Any] = [policies.LatestN(int(ckpt.keep_latest))]
  if int(ckpt.get("keep_best", 0)) > 0:
    metric = ckpt.best_metric
    keep.append(policies.BestN(get_metric=lambda m: m[metric], n=int(ckpt.keep_best),
                               mode=ckpt.best_mode, keep_checkpoints_without_metrics=False))
  if (threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGTERM) is _startup_sigterm):
    # the manager's own SIGTERM handler chains to the previous one: not the start-up one
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  options = flax_ckpt.CheckpointManagerOptions(
      save_interval_steps=int(ckpt.every_steps),
      preservation_policy=policies.AnyPreservationPolicy(keep),
      enable_async=bool(ckpt.async_save))
  return flax_ckpt.CheckpointManager(os.path.join(workdir, CHECKPOINT_DIR), options=options)


def tree_digest(tree: Any) -> str:
  """sha256 over every leaf's dtype, shape and bytes, in the tree's flattening order.

  Two states have the same digest exactly when they are bitwise equal, leaf for leaf (how
  the examples show that a resumed run ends where an uninterrupted one does).
  """
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(jax.device_get(leaf))
    h.update(f"{a.dtype.str}{a.shape};".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()
