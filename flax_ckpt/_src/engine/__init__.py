"""Layer 6: the engine.

The save transaction (saving.py) and the committed-checkpoint reader (loading.py).
"""
