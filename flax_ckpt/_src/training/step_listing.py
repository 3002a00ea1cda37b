"""The listing half of ``CheckpointManager``: which steps there are, and their metrics.

The manager keeps the committed steps' :class:`StepInfo` in ``_infos`` and the save in
flight's in ``_pending_info``; the listing includes that save, as Orbax's does.
"""

from __future__ import annotations

import math
import os
import threading

from flax_ckpt._src import errors
from flax_ckpt._src.training import metrics_codec, orbax_steps, policies, step_dirs, step_io
from flax_ckpt._src.training.options import CheckpointManagerOptions


class StepListing:
  """A mixin of :class:`CheckpointManager`: the methods that list its steps."""

  _root: str
  _naming: step_dirs.StepNaming
  _opts: CheckpointManagerOptions
  _lock: threading.RLock
  _infos: dict[int, policies.StepInfo]
  _pending_info: policies.StepInfo | None
  _orbax: dict[int, str]  # steps written by Orbax: step -> directory name

  def _step_path(self, step: int) -> str:
    with self._lock:
      orbax_name = self._orbax.get(step)
    return os.path.join(self._root, orbax_name or self._naming.name(step))

  def _is_orbax_step(self, step: int) -> bool:
    with self._lock:
      return step in self._orbax

  def _remove_step(self, step: int) -> None:
    """Deletes a step's directory, of either kind, so it is never listed half-deleted."""
    path = self._step_path(step)
    (orbax_steps.remove if self._is_orbax_step(step) else step_dirs.remove)(path)

  def _read_info(self, step: int) -> policies.StepInfo | None:
    record = step_io.read_record(self._step_path(step))
    if record is None:
      return None
    return policies.StepInfo(step, float(record["time"]),
                             metrics_codec.decode(record.get("metrics")))

  def reload(self) -> None:
    """Lists the committed checkpoints on disk again (e.g. written by another job).

    Steps an Orbax ``CheckpointManager`` committed in the same directory are listed too
    (a job moving from Orbax resumes from its last Orbax step); a flax_ckpt checkpoint
    wins over an Orbax one of the same step number.
    """
    infos = {}
    with self._lock:
      self._orbax = {}
    for s in step_dirs.committed_steps(self._root, self._naming):
      info = self._read_info(s)
      if info is not None:
        infos[s] = info
    orbax = {s: n for s, n in orbax_steps.list_steps(self._root).items() if s not in infos}
    for s, name in orbax.items():
      infos[s] = orbax_steps.step_info(self._root, s, name)
    with self._lock:
      self._infos = infos
      self._orbax = orbax

  def _known_infos(self) -> dict[int, policies.StepInfo]:
    """The committed steps, and the one in flight."""
    with self._lock:
      infos = dict(self._infos)
      if self._pending_info is not None:
        infos[self._pending_info.step] = self._pending_info
    return infos

  def all_steps(self) -> list[int]:
    """The saved steps, ascending, with a save still in flight (as Orbax lists them).

    A save in flight is listed from the moment ``save`` starts it; should it fail, it
    drops out (and :meth:`wait_until_finished` raises its error). :meth:`restore` of it
    waits for it to commit. Retention only ever considers committed steps.

    Example:
      >>> import numpy as np, flax_ckpt, tempfile
      >>> with flax_ckpt.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...   _ = mngr.save(1, {'w': np.ones(3)})
      ...   mngr.all_steps()
      [1]
    """
    return sorted(self._known_infos())

  def latest_step(self) -> int | None:
    """The newest saved step, or None; a save still in flight counts, as in Orbax.

    ``restore(mngr.latest_step())`` (and ``restore()``) wait for that save to commit.

    Example:
      >>> import numpy as np, flax_ckpt, tempfile
      >>> with flax_ckpt.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...   _ = mngr.save(5, {'w': np.ones(3)})  # may still be writing
      ...   mngr.latest_step()
      5
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step`` (None if none)."""
    info = self._known_infos().get(step)
    if info is None:
      raise errors.CheckpointNotFoundError(f"no committed checkpoint for step {step} in "
                                           f"{self._root}; steps: {self.all_steps()}")
    return info.metrics

  def best_step(self) -> int | None:
    """The step with the best metric by ``best_fn`` (the latest without ``best_fn``)."""
    fn = self._opts.best_fn
    with self._lock:
      infos = list(self._infos.values())
    if fn is None:
      return self.latest_step()
    ranked = policies.BestN(fn, 1, self._opts.best_mode).ranked(infos)
    return ranked[0][1] if ranked and not math.isnan(ranked[0][0]) else None
