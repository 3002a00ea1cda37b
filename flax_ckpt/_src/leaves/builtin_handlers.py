"""The built-in leaf TypeHandlers, registered by one function.

``arrays.py``: ``jax.Array``, ``np.ndarray`` and typed PRNG keys; ``scalars.py``: numpy
and Python scalars, ``str``, ``bytes`` and ``None``. :func:`register_builtins` puts them in
the default :class:`~flax_ckpt._src.leaves.registry.TypeHandlerRegistry`.
"""

from __future__ import annotations

import jax
import numpy as np

from flax_ckpt._src.leaves.arrays import ArrayHandler as ArrayHandler
from flax_ckpt._src.leaves.arrays import PRNGKeyHandler as PRNGKeyHandler
from flax_ckpt._src.leaves.arrays import is_prng_key as is_prng_key
from flax_ckpt._src.leaves.arrays import key_dtype as key_dtype
from flax_ckpt._src.leaves.arrays import load_arrays as load_arrays
from flax_ckpt._src.leaves.registry import TypeHandlerRegistry, default_registry
from flax_ckpt._src.leaves.scalars import BytesHandler as BytesHandler
from flax_ckpt._src.leaves.scalars import NumpyScalarHandler as NumpyScalarHandler
from flax_ckpt._src.leaves.scalars import ScalarHandler as ScalarHandler


def register_builtins(registry: TypeHandlerRegistry | None = None) -> None:
  """Registers the built-in handlers (in the default registry unless one is given)."""
  reg = registry if registry is not None else default_registry()
  reg.register(jax.Array, ArrayHandler("jax"), override=True, builtin=True)
  reg.register(np.ndarray, ArrayHandler("numpy"), override=True, builtin=True)
  reg.register(np.generic, NumpyScalarHandler(), override=True, builtin=True)
  for t in (int, float, bool, complex, str, type(None)):
    reg.register(t, ScalarHandler(t), override=True, builtin=True)
  reg.register(bytes, BytesHandler(), override=True, builtin=True)
  reg.register_predicate(is_prng_key, PRNGKeyHandler())
