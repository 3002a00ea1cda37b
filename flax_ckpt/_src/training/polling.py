"""Waiting for new checkpoints in a directory another job writes, e.g. for an eval job.

Both functions poll the listing of committed steps in one loop (:func:`_new_steps`); a save
in progress is never seen before it commits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

from flax_ckpt._src.io import paths
from flax_ckpt._src.training import step_dirs


def _new_steps(root: str, naming: step_dirs.StepNaming, newer_than: Callable[[], int | None],
               *, timeout: float | None, poll_interval_s: float,
               clock: Callable[[], float]) -> Iterator[list[int]]:
  """Yields the committed steps newer than ``newer_than()`` (None: all) whenever there are
  some; returns after ``timeout`` seconds without any (None: never). The timeout counts
  from the start, and again from each time the caller asks for more."""
  idle_since = clock()
  while True:
    last = newer_than()
    new = [s for s in step_dirs.committed_steps(root, naming) if last is None or s > last]
    if new:
      yield new
      idle_since = clock()
      continue
    if timeout is not None and clock() - idle_since >= timeout:
      return
    time.sleep(poll_interval_s if timeout is None else
               max(0.0, min(poll_interval_s, timeout - (clock() - idle_since))))


def checkpoints_iterator(directory: paths.PathLike, *, timeout: float | None = None,
                         poll_interval_s: float = 1.0, start_after: int | None = None,
                         step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None,
                         clock: Callable[[], float] = time.monotonic) -> Iterator[int]:
  """Yields the steps of newly committed checkpoints in ``directory``, for an eval job.

  Each committed step newer than the last one yielded (and than ``start_after``) is
  yielded once, in order; a save in progress is never yielded before it commits. Stops
  after ``timeout`` seconds without a new checkpoint (None: waits forever).

  Example:
    >>> import numpy as np, flax_ckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with flax_ckpt.CheckpointManager(d, enable_async=False) as m:
    ...   _ = m.save(1, {'w': np.ones(2)}); _ = m.save(2, {'w': np.ones(2)})
    >>> list(flax_ckpt.checkpoints_iterator(d, timeout=0))
    [1, 2]
  """
  root = os.fspath(paths.to_path(directory))
  naming = step_dirs.StepNaming(step_prefix, step_format_fixed_length)
  last = -1 if start_after is None else start_after

  def newer_than() -> int:
    return last  # the latest one yielded

  for new in _new_steps(root, naming, newer_than, timeout=timeout,
                        poll_interval_s=poll_interval_s, clock=clock):
    for s in new:
      if not step_dirs.is_committed(os.path.join(root, naming.name(s))):
        continue  # deleted by the writer's retention since the listing
      last = s
      yield s


def wait_for_new_checkpoint(directory: paths.PathLike, last_step: int | None = None, *,
                            timeout: float | None = None, poll_interval_s: float = 1.0,
                            step_prefix: str | None = None,
                            step_format_fixed_length: int | None = None) -> int | None:
  """Waits until a checkpoint newer than ``last_step`` is committed; returns its step.

  Returns the newest committed step after ``last_step`` (None: any), or None after
  ``timeout`` seconds without one.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> flax_ckpt.wait_for_new_checkpoint(d, timeout=0) is None
    True
  """
  root = os.fspath(paths.to_path(directory))
  naming = step_dirs.StepNaming(step_prefix, step_format_fixed_length)
  for new in _new_steps(root, naming, lambda: last_step, timeout=timeout,
                        poll_interval_s=poll_interval_s, clock=time.monotonic):
    return new[-1]
  return None
