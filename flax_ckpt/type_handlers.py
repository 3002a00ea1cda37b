"""``flax_ckpt.type_handlers``: the per-leaf extension API.

A :class:`TypeHandler` saves and loads every leaf of one type, in batches;
:func:`register_type_handler` binds it to the type. :class:`ArrayHandler` and
:class:`ScalarHandler` are the built-in handlers of arrays and Python scalars, and
:class:`SaveArgs` / :class:`RestoreArgs` the per-leaf options. The metadata classes that
handlers return live in :mod:`flax_ckpt.metadata_types`.

Example:
  >>> import numpy as np
  >>> from flax_ckpt import type_handlers
  >>> type_handlers.get_type_handler(np.ndarray).typestr()
  'np.ndarray'
  >>> class Opaque: ...
  >>> type_handlers.has_type_handler(Opaque)  # register_type_handler(Opaque, handler) to save it
  False
"""

import typing as _typing
import warnings as _warnings

from flax_ckpt._src.leaves.builtin_handlers import ArrayHandler as ArrayHandler
from flax_ckpt._src.leaves.builtin_handlers import ScalarHandler as ScalarHandler
from flax_ckpt._src.leaves.registry import get_type_handler as get_type_handler
from flax_ckpt._src.leaves.registry import has_type_handler as has_type_handler
from flax_ckpt._src.leaves.registry import register_type_handler as register_type_handler
from flax_ckpt._src.leaves.type_handlers import ParamInfo as ParamInfo
from flax_ckpt._src.leaves.type_handlers import RestoreArgs as RestoreArgs
from flax_ckpt._src.leaves.type_handlers import SaveArgs as SaveArgs
from flax_ckpt._src.leaves.type_handlers import TypeHandler as TypeHandler

# isort: split
# Kept for compatibility, not in __all__: their home is flax_ckpt.metadata_types.
from flax_ckpt.metadata_types import ArrayMetadata as ArrayMetadata
from flax_ckpt.metadata_types import Metadata as Metadata
from flax_ckpt.metadata_types import ValueMetadata as ValueMetadata

__all__ = [
  "ArrayHandler",
  "ParamInfo",
  "RestoreArgs",
  "SaveArgs",
  "ScalarHandler",
  "TypeHandler",
  "get_type_handler",
  "has_type_handler",
  "register_type_handler",
]

if _typing.TYPE_CHECKING:
  ArrayRestoreArgs = RestoreArgs  # deprecated: use RestoreArgs
else:

  def __getattr__(name: str) -> type[RestoreArgs]:
    # Deprecated names resolve here, so that using them warns. Type checkers see the alias
    # above instead, and keep reporting misspelled attributes of this module.
    if name == "ArrayRestoreArgs":
      _warnings.warn("flax_ckpt.type_handlers.ArrayRestoreArgs is deprecated: use "
                    "flax_ckpt.type_handlers.RestoreArgs (the same class)",
                    DeprecationWarning, stacklevel=2)
      return RestoreArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
