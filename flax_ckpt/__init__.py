"""flax_ckpt: fast, atomic, type-faithful checkpoints for JAX, Flax and Optax.

Example:
  >>> import jax.numpy as jnp, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'params': {'w': jnp.ones((2, 2))}, 'step': 3})
  >>> flax_ckpt.load(path)['step']
  3
"""

from flax_ckpt import (
    args,  # CheckpointArgs, register_with_handler and the built-in args classes
    metadata,  # callable module: metadata(path) and the metadata classes
    policies,  # save-decision and preservation policies of the CheckpointManager
    type_handlers,  # the TypeHandler extension API in one namespace
)
from flax_ckpt._src import registration as _registration
from flax_ckpt._src.api import (
    CheckpointMetadata,
    load,
    load_checkpointables,
    save,
    save_async,
    save_checkpointables,
    save_checkpointables_async,
)
from flax_ckpt._src.checkpointer import AsyncCheckpointer, Checkpointer
from flax_ckpt._src.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    FormatError,
    IncompleteCheckpointError,
    StructureMismatchError,
    UnsupportedLeafError,
)
from flax_ckpt._src.io.background import AsyncResponse
from flax_ckpt._src.leaves.builtin_handlers import ArrayHandler, ScalarHandler
from flax_ckpt._src.leaves.type_handlers import (
    ArrayMetadata,
    ArrayRestoreArgs,
    Metadata,
    ParamInfo,
    RestoreArgs,
    SaveArgs,
    TypeHandler,
    ValueMetadata,
    get_type_handler,
    has_type_handler,
    register_type_handler,
)
from flax_ckpt._src.parts.handlers import (
    AsyncCheckpointHandler,
    CheckpointArgs,
    CheckpointHandler,
    RegistrationError,
    register_checkpointable_handler,
    register_with_handler,
)
from flax_ckpt._src.parts.pytree import PyTreeCheckpointHandler, PyTreeRestore, PyTreeSave
from flax_ckpt._src.parts.stateful import (
    StatefulCheckpointHandler,
    StatefulMetadata,
    StatefulRestore,
    StatefulSave,
)
from flax_ckpt._src.training.manager import (
    CheckpointManager,
    CheckpointManagerOptions,
    checkpoints_iterator,
    wait_for_new_checkpoint,
)
from flax_ckpt._src.tree.templates import abstract_with_sharding
from flax_ckpt._src.tree.treespec import UnregisteredClassWarning, register_class

_registration.register_builtins()  # every built-in, registered in one file

__version__ = "0.1.0"

__all__ = [
    "abstract_with_sharding",
    "args",
    "AsyncCheckpointer",
    "AsyncCheckpointHandler",
    "CheckpointArgs",
    "Checkpointer",
    "CheckpointHandler",
    "CheckpointManager",
    "CheckpointManagerOptions",
    "checkpoints_iterator",
    "wait_for_new_checkpoint",
    "policies",
    "load_checkpointables",
    "PyTreeCheckpointHandler",
    "PyTreeRestore",
    "PyTreeSave",
    "register_checkpointable_handler",
    "register_with_handler",
    "RegistrationError",
    "save_checkpointables",
    "save_checkpointables_async",
    "StatefulCheckpointHandler",
    "StatefulMetadata",
    "StatefulRestore",
    "StatefulSave",
    "ArrayHandler",
    "ArrayMetadata",
    "ArrayRestoreArgs",
    "AsyncResponse",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointMetadata",
    "CheckpointNotFoundError",
    "CheckpointReplacedError",
    "FormatError",
    "IncompleteCheckpointError",
    "Metadata",
    "ParamInfo",
    "RestoreArgs",
    "SaveArgs",
    "ScalarHandler",
    "StructureMismatchError",
    "TypeHandler",
    "UnregisteredClassWarning",
    "UnsupportedLeafError",
    "ValueMetadata",
    "get_type_handler",
    "has_type_handler",
    "load",
    "metadata",
    "register_class",
    "register_type_handler",
    "save",
    "save_async",
    "type_handlers",
]
