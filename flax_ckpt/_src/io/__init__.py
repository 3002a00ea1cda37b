"""Layer 2: storage and processes.

Data-file backends, the commit protocol on paths, jax.distributed barriers and
key-value sharing, background threads.
"""
