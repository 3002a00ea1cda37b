"""flax_ckpt: fast, atomic, type-faithful checkpoints for JAX, Flax and Optax.

The top level holds the everyday API: saving and loading (``save``, ``load``,
``save_checkpointables`` ...), ``metadata``, the ``CheckpointManager``, and the errors. The
extension APIs live in namespaces:

- ``flax_ckpt.args``: the argument classes that select a CheckpointHandler;
- ``flax_ckpt.handlers``: ``CheckpointHandler``, ``Checkpointer`` and the built-in handlers;
- ``flax_ckpt.type_handlers``: the per-leaf ``TypeHandler`` API;
- ``flax_ckpt.metadata_types``: the classes ``metadata`` describes leaves and parts with;
- ``flax_ckpt.policies``: when a CheckpointManager saves and what it keeps.

Each public name has one home and is listed in that module's ``__all__``. Names that older
code reads from the top level (``flax_ckpt.Checkpointer``, ``flax_ckpt.ArrayHandler`` ...)
stay importable here as aliases of the same objects, but are not in ``__all__``: ``help()``,
documentation tools and ``from flax_ckpt import *`` show the current surface only.

Example:
  >>> import jax.numpy as jnp, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'params': {'w': jnp.ones((2, 2))}, 'step': 3})
  >>> flax_ckpt.load(path)['step']
  3
"""

import typing as _typing
import warnings as _warnings

from flax_ckpt import args as args
from flax_ckpt import handlers as handlers
from flax_ckpt import metadata_types as metadata_types
from flax_ckpt import policies as policies
from flax_ckpt import type_handlers as type_handlers
from flax_ckpt._src import registration as _registration
from flax_ckpt._src.api import CheckpointMetadata as CheckpointMetadata
from flax_ckpt._src.api import is_orbax_checkpoint as is_orbax_checkpoint
from flax_ckpt._src.api import kvstore_spec as kvstore_spec
from flax_ckpt._src.api import load as load
from flax_ckpt._src.api import load_checkpointables as load_checkpointables
from flax_ckpt._src.api import save as save
from flax_ckpt._src.api import save_async as save_async
from flax_ckpt._src.api import save_checkpointables as save_checkpointables
from flax_ckpt._src.api import (
  save_checkpointables_async as save_checkpointables_async,
)
from flax_ckpt._src.api import verify as verify
from flax_ckpt._src.engine.verifying import Problem as Problem
from flax_ckpt._src.engine.verifying import VerifyReport as VerifyReport
from flax_ckpt._src.errors import CheckpointError as CheckpointError
from flax_ckpt._src.errors import CheckpointExistsError as CheckpointExistsError
from flax_ckpt._src.errors import CheckpointNotFoundError as CheckpointNotFoundError
from flax_ckpt._src.errors import CheckpointReplacedError as CheckpointReplacedError
from flax_ckpt._src.errors import CorruptCheckpointError as CorruptCheckpointError
from flax_ckpt._src.errors import FormatError as FormatError
from flax_ckpt._src.errors import IncompleteCheckpointError as IncompleteCheckpointError
from flax_ckpt._src.errors import LossyCastWarning as LossyCastWarning
from flax_ckpt._src.errors import StorageError as StorageError
from flax_ckpt._src.errors import StructureMismatchError as StructureMismatchError
from flax_ckpt._src.errors import UnsupportedLeafError as UnsupportedLeafError
from flax_ckpt._src.interop.safetensors_io import export_safetensors as export_safetensors
from flax_ckpt._src.io.background import AsyncResponse as AsyncResponse
from flax_ckpt._src.parts.handlers import RegistrationError as RegistrationError
from flax_ckpt._src.training.manager import CheckpointManager as CheckpointManager
from flax_ckpt._src.training.manager import CheckpointManagerOptions as CheckpointManagerOptions
from flax_ckpt._src.training.manager import checkpoints_iterator as checkpoints_iterator
from flax_ckpt._src.training.manager import wait_for_new_checkpoint as wait_for_new_checkpoint
from flax_ckpt._src.tree.class_registry import register_class as register_class
from flax_ckpt._src.tree.templates import abstract_with_sharding as abstract_with_sharding
from flax_ckpt._src.tree.treespec import UnregisteredClassWarning as UnregisteredClassWarning

# The function, bound over the submodule of the same name (which stays in sys.modules for
# ``from flax_ckpt.metadata import Metadata``); see flax_ckpt/metadata.py.
from flax_ckpt.metadata import metadata as metadata

# isort: split
# Kept for compatibility, not in __all__: the names older code reads from the top level.
# Each is the same object as in its home namespace.
from flax_ckpt.args import CheckpointArgs as CheckpointArgs
from flax_ckpt.args import PyTreeRestore as PyTreeRestore
from flax_ckpt.args import PyTreeSave as PyTreeSave
from flax_ckpt.args import StatefulRestore as StatefulRestore
from flax_ckpt.args import StatefulSave as StatefulSave
from flax_ckpt.args import register_with_handler as register_with_handler
from flax_ckpt.handlers import AsyncCheckpointer as AsyncCheckpointer
from flax_ckpt.handlers import AsyncCheckpointHandler as AsyncCheckpointHandler
from flax_ckpt.handlers import Checkpointer as Checkpointer
from flax_ckpt.handlers import CheckpointHandler as CheckpointHandler
from flax_ckpt.handlers import PyTreeCheckpointHandler as PyTreeCheckpointHandler
from flax_ckpt.handlers import StatefulCheckpointHandler as StatefulCheckpointHandler
from flax_ckpt.handlers import register_checkpointable_handler as register_checkpointable_handler
from flax_ckpt.metadata_types import ArrayMetadata as ArrayMetadata
from flax_ckpt.metadata_types import Metadata as Metadata
from flax_ckpt.metadata_types import StatefulMetadata as StatefulMetadata
from flax_ckpt.metadata_types import ValueMetadata as ValueMetadata
from flax_ckpt.type_handlers import ArrayHandler as ArrayHandler
from flax_ckpt.type_handlers import ParamInfo as ParamInfo
from flax_ckpt.type_handlers import RestoreArgs as RestoreArgs
from flax_ckpt.type_handlers import SaveArgs as SaveArgs
from flax_ckpt.type_handlers import ScalarHandler as ScalarHandler
from flax_ckpt.type_handlers import TypeHandler as TypeHandler
from flax_ckpt.type_handlers import get_type_handler as get_type_handler
from flax_ckpt.type_handlers import has_type_handler as has_type_handler
from flax_ckpt.type_handlers import register_type_handler as register_type_handler

_registration.register_builtins()  # every built-in, registered in one file

__version__ = "0.1.0"

__all__ = [
  "AsyncResponse",
  "CheckpointError",
  "CheckpointExistsError",
  "CheckpointManager",
  "CheckpointManagerOptions",
  "CheckpointMetadata",
  "CheckpointNotFoundError",
  "CheckpointReplacedError",
  "CorruptCheckpointError",
  "FormatError",
  "IncompleteCheckpointError",
  "LossyCastWarning",
  "Problem",
  "RegistrationError",
  "StorageError",
  "StructureMismatchError",
  "UnregisteredClassWarning",
  "UnsupportedLeafError",
  "VerifyReport",
  "abstract_with_sharding",
  "args",
  "checkpoints_iterator",
  "export_safetensors",
  "handlers",
  "is_orbax_checkpoint",
  "kvstore_spec",
  "load",
  "load_checkpointables",
  "metadata",
  "metadata_types",
  "policies",
  "register_class",
  "save",
  "save_async",
  "save_checkpointables",
  "save_checkpointables_async",
  "type_handlers",
  "verify",
  "wait_for_new_checkpoint",
]

if _typing.TYPE_CHECKING:
  ArrayRestoreArgs = RestoreArgs  # deprecated: use flax_ckpt.type_handlers.RestoreArgs
else:

  def __getattr__(name: str) -> type[RestoreArgs]:
    # Deprecated names resolve here, so that using them warns. Type checkers see the alias
    # above instead, and keep reporting misspelled attributes of this module.
    if name == "ArrayRestoreArgs":
      _warnings.warn("flax_ckpt.ArrayRestoreArgs is deprecated: use "
                    "flax_ckpt.type_handlers.RestoreArgs (the same class)",
                    DeprecationWarning, stacklevel=2)
      return RestoreArgs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
