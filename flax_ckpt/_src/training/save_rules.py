"""What ``CheckpointManager.save`` checks before it writes anything.

The arguments (a step number, a dataset it can save), and the order of steps: a directory
only ever grows newer steps, so a resumed run never mixes with the steps it abandoned.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.parts import handlers
from flax_ckpt._src.parts.stateful import is_stateful


def check_step(step: Any) -> int:
  """``step`` as an int; raises unless it is a non-negative integer."""
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"step must be a non-negative int, not {step!r}")
  try:
    step = operator.index(step)  # ints, numpy / jax integer scalars; not 2.7
  except TypeError:
    if hasattr(step, "dtype") and np.issubdtype(step.dtype, np.integer):
      step = int(step)
    else:
      raise TypeError(f"step must be a non-negative int, not {step!r}") from None
  if step < 0:
    raise ValueError(f"step must be non-negative, not {step}")
  return step


def check_dataset(dataset: Any) -> None:
  """Raises unless ``dataset`` (if given) is something the ``dataset`` part can save."""
  if dataset is not None and not (is_stateful(dataset)
                                  or isinstance(dataset, handlers.CheckpointArgs)
                                  or handlers.type_handler_for(dataset) is not None):
    raise TypeError(
        f"dataset must have get_state()/set_state() (e.g. a grain DatasetIterator), not a "
        f"{type(dataset).__qualname__}; put other data in the state instead.")


def check_order(step: int, newest: int | None, rolled_back_to: int | None, root: str) -> None:
  """Raises when saving ``step`` would put it before (or among) newer steps in ``root``.

  Args:
    step: the step about to be saved.
    newest: the newest committed (or in-flight) step, or None.
    rolled_back_to: the step the manager restored, when older than the newest; else None.
    root: the manager's directory (for the message).
  """
  rb = rolled_back_to
  if rb is not None and newest is not None and rb < step <= newest:
    raise errors.CheckpointError(
        f"this manager restored step {rb}, but steps up to {newest} exist in "
        f"{root}; saving step {step} would mix the new training with the abandoned "
        f"one. Delete the later steps first (mngr.delete(s) for s in mngr.all_steps() if "
        f"s > {rb}) or save to a new directory.")
  if newest is not None and step < newest:
    raise errors.CheckpointError(
        f"step {step} is older than the newest checkpoint ({newest}) in {root}. "
        f"After going back to an earlier step, delete the later ones first "
        f"(mngr.delete(s) for s in mngr.all_steps() if s > {step}) or save to a new "
        "directory; otherwise the newer, abandoned steps would be the ones resumed from.")
