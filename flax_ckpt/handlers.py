"""``flax_ckpt.handlers``: whole-object handlers and the checkpointers that drive them.

A :class:`CheckpointHandler` saves one object into a directory and restores it; a
:class:`Checkpointer` (or :class:`AsyncCheckpointer`) makes that atomic. The built-in
:class:`PyTreeCheckpointHandler` and :class:`StatefulCheckpointHandler` are what
:func:`flax_ckpt.save_checkpointables` uses for PyTrees and for objects with
``get_state``/``set_state``. The argument classes that select a handler live in
:mod:`flax_ckpt.args`; :func:`register_checkpointable_handler` makes objects of a type saved
by a handler when given to :func:`flax_ckpt.save_checkpointables`.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> from flax_ckpt import args, handlers
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> with handlers.Checkpointer(handlers.PyTreeCheckpointHandler()) as ckptr:
  ...   ckptr.save(path, args=args.PyTreeSave({'step': 3}))
  ...   ckptr.restore(path, args=args.PyTreeRestore())
  {'step': 3}
"""

from flax_ckpt._src.checkpointer import AsyncCheckpointer as AsyncCheckpointer
from flax_ckpt._src.checkpointer import Checkpointer as Checkpointer
from flax_ckpt._src.parts.handlers import AsyncCheckpointHandler as AsyncCheckpointHandler
from flax_ckpt._src.parts.handlers import CheckpointHandler as CheckpointHandler
from flax_ckpt._src.parts.handlers import (
  register_checkpointable_handler as register_checkpointable_handler,
)
from flax_ckpt._src.parts.pytree import PyTreeCheckpointHandler as PyTreeCheckpointHandler
from flax_ckpt._src.parts.stateful import (
  StatefulCheckpointHandler as StatefulCheckpointHandler,
)

__all__ = [
  "AsyncCheckpointHandler",
  "AsyncCheckpointer",
  "CheckpointHandler",
  "Checkpointer",
  "PyTreeCheckpointHandler",
  "StatefulCheckpointHandler",
  "register_checkpointable_handler",
]
