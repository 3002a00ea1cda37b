"""Refusing, at once, what a port from Orbax passes to a ``CheckpointManager``.

Orbax's policy objects, its ``args=``/``items=`` keywords and its ``ocp.args`` wrappers look
like they could work, and would otherwise fail late (``'LatestN' object has no attribute
'keep'`` at the first save) or, worse, be saved as a state. Each is refused when it is
passed, with the flax_ckpt spelling in the error. Orbax is never imported: its objects are
recognised by the module their type comes from.

A data iterator inside the state is refused here too: it belongs in ``dataset=``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from flax_ckpt._src.parts import handlers
from flax_ckpt._src.parts.stateful import is_stateful

# Orbax class name -> the flax_ckpt spelling of the same intent.
_SPELLINGS = {
    "LatestN": "max_to_keep=n (or flax_ckpt.policies.LatestN(n))",
    "BestN": "best_fn=..., best_mode='max' or 'min', max_to_keep=n (or "
             "flax_ckpt.policies.BestN(get_metric, n, mode))",
    "EveryNSteps": "keep_period=n (or flax_ckpt.policies.EveryNSteps(n))",
    "EveryNSeconds": "keep_time_interval=seconds (or flax_ckpt.policies.EveryNSeconds(s))",
    "AnyPreservationPolicy": "flax_ckpt.policies.AnyPreservationPolicy([...])",
    "FixedIntervalPolicy": "save_interval_steps=n (or "
                           "flax_ckpt.policies.FixedIntervalPolicy(n))",
    "SpecificStepsPolicy": "save_on_steps=[...] (or "
                           "flax_ckpt.policies.SpecificStepsPolicy([...]))",
    "ContinuousCheckpointingPolicy": "save_interval_secs=s (or "
                                     "flax_ckpt.policies.TimeIntervalPolicy(s))",
    "PreemptionCheckpointingPolicy": "nothing: preemption always triggers a save",
    "AnySavePolicy": "flax_ckpt.policies.AnySavePolicy([...])",
    "CheckpointManagerOptions": "flax_ckpt.CheckpointManagerOptions(...) (or its fields "
                                "as keyword arguments of CheckpointManager)",
    "StandardSave": "mngr.save(step, state)",
    "PyTreeSave": "mngr.save(step, state)",
    "StandardRestore": "mngr.restore(step, abstract_state)",
    "PyTreeRestore": "mngr.restore(step, abstract_state)",
    "Composite": "mngr.save(step, parts={'name': value, ...}) and "
                 "mngr.restore(step, {'name': template, ...}) or restore(only='name')",
    "JsonSave": "custom_metadata={...} (or a part: parts={'name': value})",
    "JsonRestore": "mngr.metadata(step).custom_metadata",
}


def is_orbax(obj: Any) -> bool:
  """Whether ``obj`` is an instance of one of Orbax's classes."""
  return type(obj).__module__.split(".")[0] == "orbax"


def _name(obj: Any) -> str:
  """The name users write: ``ocp.args.StandardSave`` is the class ``StandardSaveArgs``."""
  name = type(obj).__name__
  return name[:-4] if name.endswith("Args") and name[:-4] in _SPELLINGS else name


def refuse(obj: Any, where: str) -> None:
  """Raises TypeError if ``obj`` is an Orbax object; ``where`` names the argument."""
  if is_orbax(obj):
    spelling = _SPELLINGS.get(_name(obj),
                              "the flax_ckpt equivalent (see flax_ckpt.CheckpointManager)")
    raise TypeError(f"{where} is an Orbax {_name(obj)}; flax_ckpt does not take Orbax "
                    f"objects. Use {spelling}.")


def refuse_keywords(method: str, kwargs: Mapping[str, Any]) -> None:
  """Raises TypeError for Orbax's ``args=``/``items=`` (with the flax_ckpt spelling), and for
  any other unknown keyword as Python would."""
  for name in ("args", "items"):
    if name in kwargs:
      hint = ("mngr.save(step, state) or mngr.save(step, parts={'name': value, ...})"
              if method == "save" else
              "mngr.restore(step, abstract_state), restore(only='name') for one part, "
              "partial=True for a subset")
      raise TypeError(
          f"CheckpointManager.{method}() takes no {name}= (that is Orbax's spelling); use "
          f"{hint}.")
  if kwargs:
    raise TypeError(f"CheckpointManager.{method}() got an unexpected keyword argument "
                    f"{next(iter(kwargs))!r}")


def refuse_state(state: Any, where: str) -> None:
  """Refuses an Orbax object as ``state`` or as one of its top-level entries."""
  refuse(state, where)
  if isinstance(state, Mapping):
    for k, v in state.items():
      refuse(v, f"{where}[{k!r}]")


def refuse_iterators(state: Any, where: str) -> None:
  """Raises TypeError if a leaf of ``state`` is a data iterator (``get_state``/
  ``set_state``) that no leaf handler saves: it belongs in ``dataset=``."""
  if state is None:
    return
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  for kp, leaf in flat:
    # the state itself may be a stateful object (saved whole, as before); a leaf may not
    if kp and is_stateful(leaf) and handlers.type_handler_for(leaf) is None:
      raise TypeError(
          f"{where}{jax.tree_util.keystr(kp)} is a data iterator "
          f"({type(leaf).__qualname__} with get_state/set_state); pass it as "
          "mngr.save(step, state, dataset=it) (several: dataset={'train': it, ...}) and "
          "restore it with mngr.restore(step, ..., dataset=it).")
