"""Layer 8: training loops.

CheckpointManager, its policies, step directories, the owner lock, preemption.
"""
