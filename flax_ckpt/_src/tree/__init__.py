"""Layer 3: PyTree structure.

The structure codec, the class registry, Optax/Flax classes, restore templates.
"""
