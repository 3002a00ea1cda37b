"""Default config of ``train_examples.linen_classifier`` (a CNN on scikit-learn's digits).

Override any field on the command line, e.g. ``--config.num_train_steps=2000`` or
``--config.checkpoint.every_steps=50``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default config of the linen classifier (every field is a ``--config.<field>`` flag)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # 'digits' (scikit-learn's bundled 8x8 digits, 1797 images) or the path of an .npz file
  # with 'x' (N, H, W) or (N, H, W, C) images and 'y' (N,) integer labels.
  config.dataset = "digits"
  config.test_fraction = 0.2  # held out (a fixed split, the same on every run)
  config.batch_size = 64
  config.num_train_steps = 600
  config.learning_rate = 3e-3
  config.warmup_steps = 50
  config.weight_decay = 1e-4
  config.features = (32, 64)  # conv widths; each conv is followed by BatchNorm and ReLU
  config.dense = 128
  config.dropout_rate = 0.1
  config.log_every_steps = 50

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100  # also evaluates then (metrics for best-N)
  config.checkpoint.async_save = True
  config.checkpoint.keep_latest = 2
  config.checkpoint.keep_best = 2
  config.checkpoint.best_metric = "eval_accuracy"
  config.checkpoint.best_mode = "max"
  return config
