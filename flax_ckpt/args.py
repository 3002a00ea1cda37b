"""``flax_ckpt.args``: argument classes that select a CheckpointHandler, and their registry.

A :class:`CheckpointArgs` subclass carries what one handler needs to save or restore an
object; :func:`register_with_handler` binds it to its handler (see
:mod:`flax_ckpt.handlers`). The built-in ones select the PyTree and the stateful handlers.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> ckptr = flax_ckpt.handlers.Checkpointer(flax_ckpt.handlers.PyTreeCheckpointHandler())
  >>> ckptr.save(path, args=flax_ckpt.args.PyTreeSave({'step': 3}))
  >>> ckptr.restore(path, args=flax_ckpt.args.PyTreeRestore())
  {'step': 3}
"""

from flax_ckpt._src.parts.handlers import CheckpointArgs as CheckpointArgs
from flax_ckpt._src.parts.handlers import get_registered_handler_cls as get_registered_handler_cls
from flax_ckpt._src.parts.handlers import register_with_handler as register_with_handler
from flax_ckpt._src.parts.pytree import PyTreeRestore as PyTreeRestore
from flax_ckpt._src.parts.pytree import PyTreeSave as PyTreeSave
from flax_ckpt._src.parts.stateful import StatefulRestore as StatefulRestore
from flax_ckpt._src.parts.stateful import StatefulSave as StatefulSave

# isort: split
# Kept for compatibility, not in __all__: its home is flax_ckpt.RegistrationError.
from flax_ckpt._src.parts.handlers import RegistrationError as RegistrationError

__all__ = [
  "CheckpointArgs",
  "PyTreeRestore",
  "PyTreeSave",
  "StatefulRestore",
  "StatefulSave",
  "get_registered_handler_cls",
  "register_with_handler",
]
