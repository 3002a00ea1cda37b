"""``flax_ckpt.metadata``: describe a checkpoint, and the metadata classes handlers return.

``flax_ckpt.metadata(path)`` is the function (this module is callable); the module also
holds the classes, so both ``flax_ckpt.metadata(path)`` and
``class MyMetadata(flax_ckpt.metadata.Metadata)`` (or ``from flax_ckpt.metadata import
Metadata``) work.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'w': np.zeros((2, 3), np.float32)})
  >>> flax_ckpt.metadata(path)['w'].shape
  (2, 3)
"""

import sys
import types

from flax_ckpt._src.api import CheckpointMetadata
from flax_ckpt._src.api import metadata as _metadata
from flax_ckpt._src.io.paths import PathLike
from flax_ckpt._src.leaves.type_handlers import ArrayMetadata, Metadata, ValueMetadata

__all__ = ["ArrayMetadata", "CheckpointMetadata", "Metadata", "ValueMetadata"]


class _CallableModule(types.ModuleType):
  def __call__(self, path: PathLike) -> CheckpointMetadata:
    return _metadata(path)


_CallableModule.__call__.__doc__ = _metadata.__doc__
sys.modules[__name__].__class__ = _CallableModule
