"""Layer 5: the parts of a checkpoint.

The part protocol and kinds (pytree, stateful, handler) and the CheckpointHandler API.
"""
