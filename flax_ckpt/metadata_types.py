"""``flax_ckpt.metadata_types``: the classes that describe what a checkpoint holds.

:func:`flax_ckpt.metadata` returns a :class:`flax_ckpt.CheckpointMetadata`; its ``tree``
holds one :class:`Metadata` per leaf (:class:`ArrayMetadata`, :class:`ValueMetadata` or a
custom TypeHandler's subclass), and its ``parts`` a :class:`StatefulMetadata` for each
stateful part.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> from flax_ckpt import metadata_types
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'w': np.zeros((2, 3), np.float32), 'step': 7})
  >>> md = flax_ckpt.metadata(path)
  >>> isinstance(md['w'], metadata_types.ArrayMetadata), md['w'].shape
  (True, (2, 3))
  >>> isinstance(md['step'], metadata_types.ValueMetadata), md['step'].type
  (True, 'int')
"""

from flax_ckpt._src.leaves.type_handlers import ArrayMetadata as ArrayMetadata
from flax_ckpt._src.leaves.type_handlers import Metadata as Metadata
from flax_ckpt._src.leaves.type_handlers import ValueMetadata as ValueMetadata
from flax_ckpt._src.parts.stateful import StatefulMetadata as StatefulMetadata

__all__ = ["ArrayMetadata", "Metadata", "StatefulMetadata", "ValueMetadata"]
