"""Runnable training examples that checkpoint with flax_ckpt."""
