"""Runnable Flax training loops that checkpoint with flax_ckpt (see README.md).

- ``python -m train_examples.linen_classifier --workdir DIR``: a linen CNN on digits.
- ``python -m train_examples.nnx_lm --workdir DIR``: a sharded nnx Transformer LM.
- ``python -m train_examples.evaluate --workdir DIR``: evaluate a run's checkpoint.
- ``python -m train_examples.quickstart --workdir DIR``: the core save/load API in brief.
"""

import os

# clu's metric writers import TensorFlow (only to write TensorBoard summaries); keep its C++
# start-up chatter out of the training log unless the user asked for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
