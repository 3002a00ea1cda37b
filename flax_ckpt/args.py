"""``flax_ckpt.args``: argument classes that select a CheckpointHandler.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> ckptr = flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
  >>> ckptr.save(path, args=flax_ckpt.args.PyTreeSave({'step': 3}))
  >>> ckptr.restore(path, args=flax_ckpt.args.PyTreeRestore())
  {'step': 3}
"""

from flax_ckpt._src.parts.handlers import (
    CheckpointArgs,
    RegistrationError,
    get_registered_handler_cls,
    register_with_handler,
)
from flax_ckpt._src.parts.pytree import PyTreeRestore, PyTreeSave
from flax_ckpt._src.parts.stateful import StatefulRestore, StatefulSave

__all__ = [
    "CheckpointArgs",
    "PyTreeRestore",
    "PyTreeSave",
    "RegistrationError",
    "StatefulRestore",
    "StatefulSave",
    "get_registered_handler_cls",
    "register_with_handler",
]
