"""Layer 4: leaves.

The TypeHandler contract and registry, and the built-in array and scalar handlers.
"""
