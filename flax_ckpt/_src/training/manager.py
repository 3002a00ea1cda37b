"""``CheckpointManager``: step-numbered checkpoints for a training loop.

Hand it the train state every step: it decides whether to save, saves asynchronously (the
step only waits for the copy of what may change), keeps the checkpoints the retention
policies want (never deleting the newest), and after a crash or preemption gives back the
latest committed state.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flax_ckpt._src import errors
from flax_ckpt._src.encoding import jsontags
from flax_ckpt._src.engine import checkpointables
from flax_ckpt._src.format import COMMIT_MARKER
from flax_ckpt._src.io import background, multihost, paths
from flax_ckpt._src.parts import handlers
from flax_ckpt._src.parts.stateful import is_stateful
from flax_ckpt._src.training import dir_lock, policies, preemption, step_dirs
from flax_ckpt._src.training import train_state_parts as tsp

DATASET = "dataset"


@dataclasses.dataclass(frozen=True)
class CheckpointManagerOptions:
  """How a :class:`CheckpointManager` saves and what it keeps.

  When to save (a step is saved if any applies; with none of the first three set, every
  step is saved; preemption always triggers a save):

  Attributes:
    save_interval_steps: save steps divisible by this.
    save_on_steps: also save exactly these steps.
    save_interval_secs: also save when this many seconds passed since the last save.
    save_decision_policy: a custom :class:`~flax_ckpt.policies.SaveDecisionPolicy`
      (e.g. ``AnySavePolicy([...])``); replaces the three options above.
    max_to_keep: keep at most this many (the newest, or with ``best_fn`` the best);
      None keeps all.
    keep_period: additionally keep every checkpoint whose step is a multiple of this.
    keep_time_interval: additionally keep the first checkpoint of every stretch of this
      many seconds.
    best_fn: ``metrics -> float``; with ``max_to_keep``, keep the best ones by it.
    best_mode: ``'min'`` or ``'max'`` for ``best_fn``.
    keep_checkpoints_without_metrics: with ``best_fn``, never delete checkpoints saved
      without metrics.
    preservation_policy: a custom :class:`~flax_ckpt.policies.PreservationPolicy`;
      replaces the retention options above. Whatever it says, the newest committed
      checkpoint is never deleted.
    step_prefix: directory names ``<prefix>_<step>`` instead of ``<step>``.
    step_format_fixed_length: zero-pad step numbers to this width.
    create: create the directory if it does not exist.
    read_only: never write, delete, clean up or lock; for evaluation jobs.
    enable_async: ``save`` returns once the state is captured; the write continues in the
      background (at most one save in flight; the next waits for it).
    cleanup_tmp_directories: remove leftovers of crashed saves when opening.
    barrier_timeout_s: multi-process only: how long processes wait for each other.
    lock_stale_after_s: a directory lock whose owner stopped refreshing it this long ago
      (e.g. a dead job on another host) is taken over.
    fsync: make checkpoints durable before committing them.
    clock: the time source (injectable for tests); defaults to ``time.time``.
  """

  save_interval_steps: int | None = None
  save_on_steps: Sequence[int] = ()
  save_interval_secs: float | None = None
  save_decision_policy: Any = None
  max_to_keep: int | None = None
  keep_period: int | None = None
  keep_time_interval: float | None = None
  best_fn: Callable[[dict], float] | None = None
  best_mode: str = "min"
  keep_checkpoints_without_metrics: bool = True
  preservation_policy: Any = None
  step_prefix: str | None = None
  step_format_fixed_length: int | None = None
  create: bool = True
  read_only: bool = False
  enable_async: bool = True
  cleanup_tmp_directories: bool = True
  barrier_timeout_s: float | None = None
  lock_stale_after_s: float = 600.0
  fsync: bool = True
  clock: Callable[[], float] = time.time

  def __post_init__(self):
    if self.best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', not {self.best_mode!r}")
    for name in ("save_interval_steps", "max_to_keep", "keep_period",
                 "step_format_fixed_length"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ValueError(f"{name} must be a positive int or None, not {v!r}")
    for name in ("save_interval_secs", "keep_time_interval"):
      v = getattr(self, name)
      if v is not None and not v > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {v!r}")
    if self.preservation_policy is not None and (
        self.max_to_keep is not None or self.keep_period is not None
        or self.keep_time_interval is not None or self.best_fn is not None):
      raise ValueError("preservation_policy replaces max_to_keep/keep_period/"
                       "keep_time_interval/best_fn; pass either the policy or those options")
    if self.save_decision_policy is not None and (
        self.save_interval_steps is not None or self.save_on_steps
        or self.save_interval_secs is not None):
      raise ValueError("save_decision_policy replaces save_interval_steps/save_on_steps/"
                       "save_interval_secs; pass either the policy or those options")

  def decision_policy(self) -> Any:
    if self.save_decision_policy is not None:
      return policies.AnySavePolicy([self.save_decision_policy, policies.PreemptionPolicy()])
    rules: list[Any] = [policies.PreemptionPolicy()]
    if self.save_interval_steps is not None:
      rules.append(policies.FixedIntervalPolicy(self.save_interval_steps))
    if self.save_on_steps:
      rules.append(policies.SpecificStepsPolicy(tuple(self.save_on_steps)))
    if self.save_interval_secs is not None:
      rules.append(policies.TimeIntervalPolicy(self.save_interval_secs))
    if len(rules) == 1:
      rules.append(policies.FixedIntervalPolicy(1))
    return policies.AnySavePolicy(rules)

  def retention_policy(self) -> Any:
    if self.preservation_policy is not None:
      return self.preservation_policy
    rules: list[Any] = []
    if self.max_to_keep is not None:
      if self.best_fn is not None:
        rules.append(policies.BestN(self.best_fn, self.max_to_keep, self.best_mode,
                                    self.keep_checkpoints_without_metrics))
      else:
        rules.append(policies.LatestN(self.max_to_keep))
    if self.keep_period is not None:
      rules.append(policies.EveryNSteps(self.keep_period))
    if self.keep_time_interval is not None:
      rules.append(policies.EveryNSeconds(self.keep_time_interval))
    if self.max_to_keep is None and not rules:
      return policies.KeepAll()
    if self.max_to_keep is None:  # periods alone add to "keep everything"
      rules.append(policies.KeepAll())
    return policies.AnyPreservationPolicy(rules)


def _release(lock: Any, watcher: Any) -> None:
  if watcher is not None:
    preemption.release_watcher(watcher)
  if lock is not None:
    lock.release()


def _jsonable_metrics(metrics: Any) -> dict | None:
  if metrics is None:
    return None
  if not isinstance(metrics, Mapping):
    raise TypeError(f"metrics must be a dict of numbers, not {type(metrics).__qualname__}")
  out = {}
  for k, v in metrics.items():
    if not isinstance(k, str):
      raise TypeError(f"metrics keys must be str, got {k!r}")
    if isinstance(v, str) or v is None:
      out[k] = v
      continue
    if isinstance(v, (bool, np.bool_)):
      out[k] = bool(v)
      continue
    try:
      f = float(v)  # python/numpy/jax scalars
    except (TypeError, ValueError) as e:
      raise TypeError(f"metric {k!r} is not a number: {v!r}") from e
    out[k] = jsontags.encode(f)
  return out


def _restore_metric(v: Any) -> Any:
  return jsontags.decode(v)  # non-finite floats are tagged


def _check_step(step: Any) -> int:
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


def _check_best_fn(fn: Callable, metrics: dict) -> None:
  """Raises before anything is written when ``best_fn`` cannot score ``metrics``."""
  try:
    float(fn({k: _restore_metric(v) for k, v in metrics.items()}))
  except Exception as e:  # noqa: BLE001 - reported with the fix
    raise ValueError(f"best_fn failed on the metrics {metrics} ({type(e).__name__}: {e}); "
                     "fix best_fn or pass the metrics it needs. Nothing was saved.") from e


class CheckpointManager:
  """Step-numbered checkpoints in one directory, saved by policy and kept by policy.

  Args:
    directory: where the step directories live.
    options: a :class:`CheckpointManagerOptions`; or pass its fields as keyword arguments.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with flax_ckpt.CheckpointManager(d, save_interval_steps=2, max_to_keep=2) as mngr:
    ...   for step in range(7):
    ...     _ = mngr.save(step, {'w': np.full(3, step)})
    ...   mngr.wait_until_finished()
    ...   print(mngr.all_steps(), mngr.restore()['w'])
    [4, 6] [6 6 6]
  """

  def __init__(self, directory: paths.PathLike, *,
               options: CheckpointManagerOptions | None = None, **kwargs: Any):
    if options is not None and kwargs:
      raise TypeError("pass either options=CheckpointManagerOptions(...) or keyword "
                      "arguments, not both")
    self._opts = options if options is not None else CheckpointManagerOptions(**kwargs)
    self._root = os.fspath(paths.to_path(directory))
    self._naming = step_dirs.StepNaming(self._opts.step_prefix,
                                        self._opts.step_format_fixed_length)
    self._clock = self._opts.clock
    self._decide = self._opts.decision_policy()
    self._deterministic = self._step_determined()
    self._retain = self._opts.retention_policy()
    self._lock = threading.RLock()
    self._save_lock = threading.Lock()
    self._infos: dict[int, policies.StepInfo] = {}
    self._pending: background.AsyncResponse | None = None
    self._pending_info: policies.StepInfo | None = None
    self._closed = False
    self._primary = multihost.process_index() == 0
    self._op_prefix = f"flax_ckpt/manager/{multihost.path_digest(self._root, 12)}"
    self._ops = itertools.count()
    self._dir_lock: dir_lock.DirectoryLock | None = None
    self._sigterm: preemption.SigtermWatcher = preemption.SigtermWatcher()  # passive

    if not os.path.isdir(self._root):
      if self._opts.read_only or not self._opts.create:
        raise errors.CheckpointNotFoundError(
            f"checkpoint directory {self._root} does not exist (create=True makes it)")
      if self._primary:
        os.makedirs(self._root, exist_ok=True)
    self._rolled_back_to: int | None = None
    try:
      if not self._opts.read_only and self._primary:
        self._dir_lock = dir_lock.DirectoryLock(self._root,
                                                stale_after_s=self._opts.lock_stale_after_s)
        self._dir_lock.acquire()
        if self._opts.cleanup_tmp_directories:
          step_dirs.cleanup_leftovers(self._root)
      if not self._opts.read_only:
        self._sigterm = preemption.acquire_watcher()
      # a manager dropped without close() (or alive at exit) still lets go of both
      self._finalizer = weakref.finalize(self, _release, self._dir_lock,
                                         None if self._opts.read_only else self._sigterm)
      self.reload()
    except BaseException:
      _release(self._dir_lock, None if self._opts.read_only else self._sigterm)
      raise

  # --- listing -----------------------------------------------------------------------

  def _step_path(self, step: int) -> str:
    return os.path.join(self._root, self._naming.name(step))

  def _read_info(self, step: int) -> policies.StepInfo | None:
    try:
      manifest = paths.read_json(os.path.join(self._step_path(step), COMMIT_MARKER))
    except (OSError, ValueError):
      return None
    m = manifest.get("manager") or {}
    metrics = m.get("metrics")
    if metrics is not None:
      metrics = {k: _restore_metric(v) for k, v in metrics.items()}
    return policies.StepInfo(step, float(m.get("time", manifest.get("created_at", 0.0))),
                             metrics)

  def reload(self) -> None:
    """Lists the committed checkpoints on disk again (e.g. written by another job)."""
    infos = {}
    for s in step_dirs.committed_steps(self._root, self._naming):
      info = self._read_info(s)
      if info is not None:
        infos[s] = info
    with self._lock:
      self._infos = infos

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (a save still in flight is not listed)."""
    with self._lock:
      return sorted(self._infos)

  def latest_step(self) -> int | None:
    """The newest committed step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with ``step`` (None if none)."""
    with self._lock:
      info = self._infos.get(step)
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

  # --- deciding ----------------------------------------------------------------------

  def reached_preemption(self, step: int) -> bool:
    """Whether the job is being preempted: after SIGTERM (single process), or at JAX's
    multi-host preemption sync point (all processes agree on the step)."""
    return preemption.reached(step, self._sigterm)

  def _last_saved(self) -> policies.StepInfo | None:
    with self._lock:
      cands = list(self._infos.values())
      if self._pending_info is not None:
        cands.append(self._pending_info)
    return max(cands, key=lambda i: i.step) if cands else None

  def _already_saved(self, step: int) -> bool:
    with self._lock:
      return step in self._infos or (self._pending_info is not None
                                     and self._pending_info.step == step)

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` would save (the policies, or preemption)."""
    if self._opts.read_only or self._already_saved(step):
      return False
    ctx = policies.DecisionContext(step=step, now=self._clock(), last_saved=self._last_saved(),
                                   reached_preemption=self._sigterm.triggered)
    return bool(self._decide.should_save(ctx))

  def _step_determined(self) -> bool:
    """Whether the save decision depends on the step alone (no clock, no custom rule), so
    every process reaches the same one without asking process 0."""
    def det(p: Any) -> bool:
      if isinstance(p, policies.AnySavePolicy):
        return all(det(q) for q in p.policies)
      return isinstance(p, (policies.FixedIntervalPolicy, policies.SpecificStepsPolicy,
                            policies.PreemptionPolicy))
    return det(self._decide)

  def _agree(self, what: str, local: Any) -> Any:
    """Process 0's value of ``local``, the same in every process."""
    if multihost.process_count() == 1 or (what == "decide" and self._deterministic):
      return local
    key = f"{self._op_prefix}/{next(self._ops)}/{what}"
    timeout = multihost.timeout_s(self._opts.barrier_timeout_s)
    return json.loads(multihost.share(key, json.dumps(local) if self._primary else None,
                                      timeout))

  # --- saving ------------------------------------------------------------------------

  def save(self, step: int, state: Any = None, *, dataset: Any = None, metrics: Any = None,
           force: bool = False, custom_metadata: dict | None = None) -> bool:
    """Saves ``state`` (and ``dataset``) as checkpoint ``step`` if the policies say so.

    A train state (``params``, ``opt_state``, ``step`` fields: ``TrainState``, a
    flax.struct/dataclass or a dict) is stored as the parts ``params``, ``opt_state`` and
    ``extra``, so ``restore(only='params')`` reads no optimizer byte; anything else as the
    part ``state``. ``dataset`` (an object with ``get_state``/``set_state``, e.g. a grain
    iterator) is stored per process as the part ``dataset``.

    Args:
      step: the training step (a non-negative int).
      state: the PyTree to save.
      dataset: the data iterator to save alongside.
      metrics: a dict of numbers for ``best_fn`` and :meth:`metrics`.
      force: save even if the policies would skip this step (not if it is already saved).
      custom_metadata: a JSON-serializable dict stored with the checkpoint.

    Returns:
      Whether a save was started (False: skipped by the policies or already saved).
    """
    if self._opts.read_only:
      raise errors.CheckpointError(f"this CheckpointManager of {self._root} is read_only")
    if self._closed:
      raise errors.CheckpointError("this CheckpointManager is closed")
    step = _check_step(step)
    if dataset is not None and not (is_stateful(dataset)
                                    or isinstance(dataset, handlers.CheckpointArgs)
                                    or handlers.type_handler_for(dataset) is not None):
      raise TypeError(
          f"dataset must have get_state()/set_state() (e.g. a grain DatasetIterator), not a "
          f"{type(dataset).__qualname__}; put other data in the state instead.")
    if metrics is not None and self._opts.best_fn is not None:
      _check_best_fn(self._opts.best_fn, _jsonable_metrics(metrics))
    rb = self._rolled_back_to
    if rb is not None and step > rb and self._already_saved(step):
      local = True  # not "already saved": that checkpoint belongs to the abandoned run
    else:
      local = (not self._already_saved(step)) and (force or self.should_save(step))
    if not self._agree("decide", bool(local)):
      return False
    newest = self._last_saved()
    rb = self._rolled_back_to
    if rb is not None and newest is not None and rb < step <= newest.step:
      raise errors.CheckpointError(
          f"this manager restored step {rb}, but steps up to {newest.step} exist in "
          f"{self._root}; saving step {step} would mix the new training with the abandoned "
          f"one. Delete the later steps first (mngr.delete(s) for s in mngr.all_steps() if "
          f"s > {rb}) or save to a new directory.")
    if newest is not None and step < newest.step:
      raise errors.CheckpointError(
          f"step {step} is older than the newest checkpoint ({newest.step}) in {self._root}. "
          f"After going back to an earlier step, delete the later ones first "
          f"(mngr.delete(s) for s in mngr.all_steps() if s > {step}) or save to a new "
          "directory; otherwise the newer, abandoned steps would be the ones resumed from.")
    if state is None and dataset is None:
      raise ValueError("save needs a state (and/or dataset) to save")
    self._rolled_back_to = None  # the new run's first save: later steps are its own
    parts = tsp.split(state) if state is not None else {}
    if dataset is not None:
      parts[DATASET] = dataset
    stored = _jsonable_metrics(metrics)
    info = policies.StepInfo(step, float(self._clock()), None if stored is None else {
        k: _restore_metric(v) for k, v in stored.items()})
    with self._save_lock:
      self.wait_until_finished()  # at most one save in flight
      if self._dir_lock is not None:
        self._dir_lock.touch()
      extra = {"manager": {"step": step, "time": info.time, "metrics": stored}}
      final, finish = checkpointables.start_save(
          self._step_path(step), checkpointables.parts_from(parts), overwrite=False,
          custom_metadata=custom_metadata, is_async=self._opts.enable_async,
          fsync=self._opts.fsync, barrier_timeout_s=self._opts.barrier_timeout_s,
          manifest_extra=extra)

      def finish_and_retain() -> None:
        finish()
        with self._lock:
          self._infos[step] = info
        self._apply_retention()

      if self._opts.enable_async:
        with self._lock:
          self._pending_info = info
        self._pending = background.start_background(finish_and_retain, os.fspath(final))
      else:
        finish_and_retain()
    return True

  def _apply_retention(self) -> None:
    with self._lock:
      infos = list(self._infos.values())
    if not infos:
      return
    keep = set(self._retain.keep(infos))
    keep.add(max(i.step for i in infos))  # the newest committed is never deleted
    doomed = sorted(i.step for i in infos if i.step not in keep)
    for s in doomed:
      if self._primary:
        step_dirs.remove(self._step_path(s))
      with self._lock:
        self._infos.pop(s, None)

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight is committed; raises its error if it failed."""
    with self._lock:
      r = self._pending
    if r is None:
      return
    try:
      r.result()  # every waiter (any thread) sees the outcome; the slot frees when done
    finally:
      with self._lock:
        if self._pending is r:
          self._pending = None
          self._pending_info = None

  def delete(self, step: int) -> None:
    """Deletes the checkpoint of ``step`` (the directory is never seen half-deleted)."""
    if self._opts.read_only:
      raise errors.CheckpointError(f"this CheckpointManager of {self._root} is read_only")
    self.wait_until_finished()
    if self._primary:
      step_dirs.remove(self._step_path(step))
    with self._lock:
      self._infos.pop(step, None)

  # --- restoring ---------------------------------------------------------------------

  def restore(self, step: int | None = None, abstract_state: Any = None, *,
              dataset: Any = None, only: str | Sequence[str] | None = None) -> Any:
    """Loads a checkpoint: the latest committed one unless ``step`` is given.

    Args:
      step: which step (default: the latest).
      abstract_state: the template: e.g. ``jax.eval_shape(create_train_state)`` with
        shardings. A TrainState template gives back a TrainState (``apply_fn`` and ``tx``
        taken from the template), each array in its target sharding. For a checkpoint of
        a train state, a template that is not one is taken as the ``params`` template.
      dataset: an iterator to restore in place (``set_state``) from the saved ``dataset``.
      only: a part name (``'params'``) or names to load; nothing else is read. With
        ``'params'`` the params tree is returned.

    Returns:
      The state (or the requested part).

    Raises:
      CheckpointNotFoundError: no committed checkpoint (or not that step).
    """
    self.wait_until_finished()
    if step is not None:
      return self._restore(step, abstract_state, dataset, only)
    for attempt in range(5):  # the latest may be deleted by its writer's retention meanwhile
      self.reload()
      latest = self.latest_step()
      if latest is None:
        raise errors.CheckpointNotFoundError(f"no committed checkpoint in {self._root}")
      try:
        return self._restore(latest, abstract_state, dataset, only)
      except (errors.CheckpointNotFoundError, errors.CheckpointReplacedError,
              FileNotFoundError):
        if attempt == 4 or os.path.exists(self._step_path(latest)):
          raise
    raise AssertionError("unreachable")

  def _restore(self, step: int, abstract_state: Any, dataset: Any, only: Any) -> Any:
    latest = self.latest_step()
    self._rolled_back_to = step if latest is not None and step < latest else None
    path = self._step_path(step)
    _, manifest = checkpointables.committed(path)  # the part list only: no part is opened
    entries = manifest["checkpointables"]
    saved = [n for n in entries if n != DATASET]
    layout_ts = tsp.PARAMS in saved
    if only is None and layout_ts and abstract_state is not None and not tsp.is_train_state(
        abstract_state):
      only = tsp.PARAMS  # a params-only template
    names = [only] if isinstance(only, str) else list(only) if only is not None else saved
    missing = [n for n in names if n not in entries]
    if missing:
      raise errors.StructureMismatchError(
          f"step {step} has no part {missing}; its parts are {list(entries)}")
    if layout_ts and abstract_state is not None and tsp.is_train_state(abstract_state):
      templates = tsp.split(abstract_state)
    elif abstract_state is not None:
      templates = {n: abstract_state for n in names}
    else:
      templates = {}
    req = {n: templates.get(n) for n in names}
    if dataset is not None:
      if DATASET not in entries:
        raise errors.StructureMismatchError(f"step {step} was saved without a dataset")
      req[DATASET] = dataset
    out = checkpointables.load_checkpointables(path, req)
    out.pop(DATASET, None)
    if isinstance(only, str):
      return out[only]
    if only is not None:
      return out
    return tsp.merge(abstract_state if layout_ts else None, out)

  def metadata(self, step: int | None = None) -> checkpointables.CheckpointMetadata:
    """:func:`flax_ckpt.metadata` of a step (default: the latest): parts, custom metadata."""
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise errors.CheckpointNotFoundError(f"no committed checkpoint in {self._root}")
    return checkpointables.checkpoint_metadata(self._step_path(step))

  # --- lifecycle ---------------------------------------------------------------------

  def close(self) -> None:
    """Waits for the save in flight, releases the directory and the SIGTERM handler."""
    if self._closed:
      return
    try:
      self.wait_until_finished()
    finally:
      self._closed = True
      self._finalizer()  # releases the lock and the SIGTERM handler, once

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
    if exc is None:
      self.close()
      return
    try:
      self.close()
    except Exception as e:  # noqa: BLE001 - the block's own error wins
      if hasattr(exc, "add_note"):
        exc.add_note(f"flax_ckpt: the pending save failed too: {type(e).__name__}: {e}")

  @property
  def directory(self) -> str:
    return self._root


def checkpoints_iterator(directory: paths.PathLike, *, timeout: float | None = None,
                         poll_interval_s: float = 1.0, start_after: int | None = None,
                         step_prefix: str | None = None,
                         step_format_fixed_length: int | None = None,
                         clock: Callable[[], float] = time.monotonic):
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
  idle_since = clock()
  while True:
    new = [s for s in step_dirs.committed_steps(root, naming) if s > last]
    for s in new:
      if not os.path.exists(os.path.join(root, naming.name(s), COMMIT_MARKER)):
        continue  # deleted by the writer's retention since the listing
      last = s
      yield s
    if new:
      idle_since = clock()
      continue
    if timeout is not None and clock() - idle_since >= timeout:
      return
    time.sleep(poll_interval_s if timeout is None else
               max(0.0, min(poll_interval_s, timeout - (clock() - idle_since))))


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
  start = time.monotonic()
  while True:
    steps = [s for s in step_dirs.committed_steps(root, naming)
             if last_step is None or s > last_step]
    if steps:
      return steps[-1]
    if timeout is not None and time.monotonic() - start >= timeout:
      return None
    time.sleep(poll_interval_s if timeout is None else
               max(0.0, min(poll_interval_s, timeout - (time.monotonic() - start))))
