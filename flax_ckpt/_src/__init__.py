"""Private implementation of flax_ckpt. Import from ``flax_ckpt`` instead."""
