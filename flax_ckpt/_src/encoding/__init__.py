"""Layer 1: encodings the format shares.

Dtype names, tagged JSON, sharding descriptions.
"""
