"""Single-file formats ``flax_ckpt.load`` reads besides its own checkpoint directories.

``load(path, template)`` on a *file* (not a directory) comes here: a ``.safetensors``
file, or a flax.serialization msgpack file (``flax.training.checkpoints`` legacy
``checkpoint_<step>`` files and ``to_bytes`` output).
"""

from __future__ import annotations

from typing import Any

from flax_ckpt._src.io import paths


def is_single_file(path: paths.PathLike) -> bool:
  """Whether ``path`` names a file (not a checkpoint directory)."""
  del path
  return False  # until the single-file readers land (issue 15)


def load_file(path: paths.PathLike, abstract_state: Any, *, partial: bool,
              restore_type: type | None) -> Any:
  """Loads a safetensors or msgpack file (see the module docstring)."""
  raise NotImplementedError  # filled in by the interop work of issue 15
