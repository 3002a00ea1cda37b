"""Default config of ``train_examples.nnx_lm`` (a byte-level nnx Transformer LM).

Trains on the Python standard library's own source files (offline, always there) unless
``data_path`` names your text. Override fields on the command line, e.g.
``--config.num_train_steps=2000 --config.model.num_layers=4``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default config of the nnx LM (every field is a ``--config.<field>`` flag)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # '' = the .py files of this Python's standard library; else a text file, a directory
  # (every file under it, sorted) or a glob pattern. Bytes are the tokens (vocabulary 256).
  config.data_path = ""
  config.max_bytes = 2_000_000  # read at most this many bytes
  config.val_fraction = 0.05  # the last bytes are held out
  config.seq_len = 64
  config.batch_size = 32  # global; split over the 'data' mesh axis and over processes
  config.num_train_steps = 500
  config.learning_rate = 3e-3
  config.warmup_steps = 50
  config.weight_decay = 0.01
  config.log_every_steps = 50
  config.eval_batches = 8  # held-out batches per evaluation (always the same ones)

  config.model = ml_collections.ConfigDict()
  config.model.d_model = 128
  config.model.num_heads = 4
  config.model.num_layers = 2
  config.model.mlp_dim = 512
  config.model.dropout_rate = 0.1

  # Parameters are sharded over the 'model' axis, batches over 'data'. On CPU,
  # num_cpu_devices simulated devices are created (0: leave jax's default).
  config.mesh_shape = (2, 4)
  config.num_cpu_devices = 8

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100  # also evaluates then (metrics for best-N)
  config.checkpoint.async_save = True
  config.checkpoint.keep_latest = 2
  config.checkpoint.keep_best = 1
  config.checkpoint.best_metric = "eval_loss"
  config.checkpoint.best_mode = "min"
  return config
