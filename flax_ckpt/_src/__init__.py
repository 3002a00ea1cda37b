"""flax_ckpt internals.

The layers are the sub-packages, lowest first: encoding, io, tree, leaves, parts,
engine; then api.py, checkpointer.py and registration.py; then training. Nothing imports
a higher layer (tests/test_structure.py checks it; docs/design.md draws it).
"""
