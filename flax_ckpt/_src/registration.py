"""Every built-in registration, in one place (like Orbax v1's ``global_registration.py``).

``flax_ckpt/__init__.py`` calls :func:`register_builtins` once. Registered here:

- the part kinds, in the order a value to save is tried: ``handler`` (CheckpointArgs and
  types registered with ``register_checkpointable_handler``), ``stateful`` (objects with
  ``get_state``/``set_state``), ``pytree`` (everything else);
- the built-in handlers' args classes (``PyTreeSave``/``PyTreeRestore``,
  ``StatefulSave``/``StatefulRestore``);
- the built-in leaf TypeHandlers (arrays, scalars, str/bytes/None, PRNG keys);
- the resolvers that find Optax and Flax classes by their saved names.

Example:
  >>> from flax_ckpt._src.parts.protocol import part_kinds
  >>> [k.name for k in part_kinds().kinds()]
  ['handler', 'stateful', 'pytree']
"""

from __future__ import annotations

from flax_ckpt._src.leaves import builtin_handlers
from flax_ckpt._src.parts import custom, pytree, stateful
from flax_ckpt._src.parts.handlers import register_with_handler
from flax_ckpt._src.parts.protocol import part_kinds
from flax_ckpt._src.tree import library_types

_done = False


def register_builtins() -> None:
  """Registers the built-ins (idempotent)."""
  global _done
  if _done:
    return
  kinds = part_kinds()
  for kind in (custom.HandlerKind(), stateful.StatefulKind(), pytree.PyTreeKind()):
    kinds.register(kind)
  for handler, save_args, restore_args in (
      (pytree.PyTreeCheckpointHandler, pytree.PyTreeSave, pytree.PyTreeRestore),
      (stateful.StatefulCheckpointHandler, stateful.StatefulSave, stateful.StatefulRestore)):
    register_with_handler(handler, for_save=True)(save_args)
    register_with_handler(handler, for_restore=True)(restore_args)
  builtin_handlers.register_builtins()
  library_types.register_resolvers()
  _done = True
