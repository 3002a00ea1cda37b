"""``flax_ckpt.metadata(path)``: describe a checkpoint without reading any array bytes.

``flax_ckpt.metadata`` is a plain function, defined here. The metadata classes live in
:mod:`flax_ckpt.metadata_types` (and :class:`flax_ckpt.CheckpointMetadata` at the top level).

Kept for compatibility with code written when ``flax_ckpt.metadata`` was a callable module
that also held the classes:

- ``from flax_ckpt.metadata import Metadata`` (and ``ArrayMetadata``, ``ValueMetadata``,
  ``CheckpointMetadata``) imports them from this module, which stays in ``sys.modules``;
- ``flax_ckpt.metadata.Metadata`` reads them from the function, which carries them as
  attributes; its declared type (a Protocol) lists them, so type checkers accept it in
  code (``isinstance``, a base class), though not in an annotation: annotate with
  ``flax_ckpt.metadata_types.Metadata``.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'w': np.zeros((2, 3), np.float32)})
  >>> flax_ckpt.metadata(path)['w'].shape
  (2, 3)
  >>> flax_ckpt.metadata.ArrayMetadata is flax_ckpt.metadata_types.ArrayMetadata
  True
"""

from collections.abc import Callable
from typing import Protocol, cast

from flax_ckpt import metadata_types
from flax_ckpt._src import api
from flax_ckpt._src.io.paths import PathLike

# isort: split
# Kept for compatibility (``from flax_ckpt.metadata import Metadata``): the home of
# CheckpointMetadata is flax_ckpt, that of the others flax_ckpt.metadata_types.
from flax_ckpt._src.api import CheckpointMetadata as CheckpointMetadata
from flax_ckpt.metadata_types import ArrayMetadata as ArrayMetadata
from flax_ckpt.metadata_types import Metadata as Metadata
from flax_ckpt.metadata_types import ValueMetadata as ValueMetadata

# What this module exported when it was the callable module, unchanged for
# ``from flax_ckpt.metadata import *``. The function is listed in flax_ckpt.__all__.
__all__ = ["ArrayMetadata", "CheckpointMetadata", "Metadata", "ValueMetadata"]


class _MetadataFunction(Protocol):
  """The type of :func:`flax_ckpt.metadata`: the function, and the classes it carries."""

  ArrayMetadata: type[metadata_types.ArrayMetadata]
  CheckpointMetadata: type[api.CheckpointMetadata]
  Metadata: type[metadata_types.Metadata]
  ValueMetadata: type[metadata_types.ValueMetadata]

  def __call__(self, path: PathLike) -> api.CheckpointMetadata: ...


def _carrying_the_classes(fn: Callable[[PathLike], CheckpointMetadata]) -> _MetadataFunction:
  """Returns ``fn`` itself, with the classes the callable module used to hold as attributes."""
  for cls in (ArrayMetadata, CheckpointMetadata, Metadata, ValueMetadata):
    setattr(fn, cls.__name__, cls)
  return cast(_MetadataFunction, fn)


@_carrying_the_classes
def metadata(path: PathLike) -> CheckpointMetadata:
  """Describes a checkpoint without reading any array bytes.

  Args:
    path: the checkpoint directory.

  Returns:
    A :class:`flax_ckpt.CheckpointMetadata`: ``checkpointables`` lists the parts and their
    kinds (``pytree``, ``stateful``, ``handler``), ``parts`` holds each part's metadata, and
    ``tree`` mirrors the ``state`` part (what :func:`flax_ckpt.save` writes) with one
    :mod:`flax_ckpt.metadata_types` object per leaf (shape, dtype, type, size in bytes, saved
    sharding); ``md[key]`` indexes it.

  Raises:
    CheckpointNotFoundError, IncompleteCheckpointError: nothing committed at ``path``.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.save(path, {'w': np.zeros((2, 3), np.float32)}, custom_metadata={'lr': 0.1})
    >>> md = flax_ckpt.metadata(path)
    >>> md['w'].shape, md.custom_metadata
    ((2, 3), {'lr': 0.1})
  """
  return api.metadata(path)
