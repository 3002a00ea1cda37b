"""The ``flax-ckpt`` command line (``python -m flax_ckpt``): ``ls``, ``show``, ``verify``,
``diff``, ``cp``, ``rm`` and ``convert``; see docs/cli.md.

It sits on top of every other layer and only calls the public API and the engine's
read-only views of a checkpoint (its manifest); :mod:`main` builds the parser.
"""
