"""``CheckpointManager``: step-numbered checkpoints for a training loop.

Hand it the train state every step: it decides whether to save, saves asynchronously (the
step only waits for the copy of what may change), keeps the checkpoints the retention
policies want (never deleting the newest), and after a crash or preemption gives back the
latest committed state.

Its options are in :mod:`options`, its listing of steps in :mod:`step_listing`, the parts
of a step in :mod:`step_layout`, the checks before a save in :mod:`save_rules`, the
metrics' encoding in :mod:`metrics_codec`, and every read or write of a step's checkpoint in
:mod:`step_io`. :func:`checkpoints_iterator` and :func:`wait_for_new_checkpoint` (for eval
jobs) are in :mod:`polling` and importable from here too.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.io import background, multihost, observe, paths, storage
from flax_ckpt._src.training import (
    dir_lock,
    metrics_codec,
    orbax_habits,
    orbax_steps,
    policies,
    preemption,
    save_rules,
    step_dirs,
    step_io,
    step_layout,
    step_listing,
)
from flax_ckpt._src.training.options import CheckpointManagerOptions as CheckpointManagerOptions
from flax_ckpt._src.training.polling import checkpoints_iterator as checkpoints_iterator
from flax_ckpt._src.training.polling import wait_for_new_checkpoint as wait_for_new_checkpoint

_log = observe.child("manager")


def _release(lock: dir_lock.DirectoryLock | None,
             watcher: preemption.SigtermWatcher | None, grace_s: float) -> None:
  if watcher is not None:
    preemption.release_watcher(watcher, grace_s)
  if lock is not None:
    lock.release()


class CheckpointManager(step_listing.StepListing):
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
    orbax_habits.refuse(options, "options")
    self._opts = options if options is not None else CheckpointManagerOptions(**kwargs)
    self._root = os.fspath(paths.to_path(directory))
    self._naming = step_dirs.StepNaming(self._opts.step_prefix,
                                        self._opts.step_format_fixed_length)
    self._clock = self._opts.clock
    self._decide = self._opts.decision_policy()
    self._deterministic = policies.is_step_determined(self._decide)
    self._retain = self._opts.retention_policy()
    self._lock = threading.RLock()
    self._save_lock = threading.Lock()
    self._infos: dict[int, policies.StepInfo] = {}
    self._orbax: dict[int, str] = {}
    self._pending: background.AsyncResponse | None = None
    self._pending_info: policies.StepInfo | None = None
    self._closed = False
    self._primary = multihost.process_index() == 0
    self._op_prefix = f"flax_ckpt/manager/{multihost.path_digest(self._root, 12)}"
    self._ops = itertools.count()
    self._dir_lock: dir_lock.DirectoryLock | None = None
    self._sigterm: preemption.SigtermWatcher = preemption.SigtermWatcher()  # passive
    self._rolled_back_to: int | None = None
    self._open()

  def _open(self) -> None:
    """Creates the directory if asked, takes its lock and the SIGTERM handler, and lists
    the committed steps."""
    backend = storage.backend_for(self._root)
    if not backend.is_dir(self._root):
      if self._opts.read_only or not self._opts.create:
        raise errors.CheckpointNotFoundError(
            f"checkpoint directory {self._root} does not exist (create=True makes it)")
      if self._primary:
        backend.makedirs(self._root)
    try:
      if not self._opts.read_only and self._primary:
        self._dir_lock = dir_lock.DirectoryLock(self._root,
                                                stale_after_s=self._opts.lock_stale_after_s)
        self._dir_lock.acquire()
        if self._opts.cleanup_tmp_directories:
          step_dirs.cleanup_leftovers(self._root)
      if not self._opts.read_only:
        self._sigterm = preemption.acquire_watcher(self._opts.sigterm_grace_s)
      # a manager dropped without close() (or alive at exit) still lets go of both
      self._finalizer = weakref.finalize(self, _release, self._dir_lock,
                                         None if self._opts.read_only else self._sigterm,
                                         self._opts.sigterm_grace_s)
      self.reload()
    except BaseException:
      _release(self._dir_lock, None if self._opts.read_only else self._sigterm,
               self._opts.sigterm_grace_s)
      raise

  # --- deciding ----------------------------------------------------------------------

  def reached_preemption(self, step: int) -> bool:
    """Whether the job is being preempted: after SIGTERM (single process), or at JAX's
    multi-host preemption sync point (all processes agree on the step).

    A loop that calls this (any manager, once) ends itself after SIGTERM: the manager only
    sets the flag. In a loop that never calls it, SIGTERM (with its default action) still
    ends the process: the next ``save`` is forced and waited for, then SIGTERM's default
    action ends the process (status -15); without a save within ``sigterm_grace_s``, it
    ends then. A SIGTERM handler of the program's own is called after the flag is set;
    ``SIG_IGN`` is respected. Under ``jax.distributed``, JAX owns SIGTERM.

    Example:
      >>> import flax_ckpt, tempfile
      >>> with flax_ckpt.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...   mngr.reached_preemption(0)
      False
    """
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

  def _agree(self, what: str, local: Any) -> Any:
    """Process 0's value of ``local``, the same in every process."""
    if multihost.process_count() == 1 or (what == "decide" and self._deterministic):
      return local
    key = f"{self._op_prefix}/{next(self._ops)}/{what}"
    timeout = multihost.timeout_s(self._opts.barrier_timeout_s)
    return json.loads(multihost.share(key, json.dumps(local) if self._primary else None,
                                      timeout))

  # --- saving ------------------------------------------------------------------------

  def save(self, step: int, state: Any = None, *, parts: Mapping[str, Any] | None = None,
           dataset: Any = None, metrics: Mapping[str, Any] | None = None,
           force: bool = False, custom_metadata: dict | None = None,
           **unexpected: Any) -> bool:
    """Saves ``state`` (and ``dataset``) as checkpoint ``step`` if the policies say so.

    A train state (``params``, ``opt_state``, ``step`` fields: ``TrainState``, a
    flax.struct/dataclass or a dict) is stored as the parts ``params``, ``opt_state`` and
    ``extra``, so ``restore(only='params')`` reads no optimizer byte; anything else as the
    part ``state``. ``parts={'params': p, 'ema': e}`` instead stores each as a part of its
    own name (``restore(only='ema')`` reads one, ``restore()`` gives the dict). ``dataset``
    (an object with ``get_state``/``set_state``, e.g. a grain iterator, or a dict of them)
    is stored per process, as the part ``dataset`` (``dataset.<name>`` for a dict).

    Orbax's spellings (``args=``, ``items=``, ``ocp.args.StandardSave(...)`` as the state)
    are refused with the flax_ckpt one, and so is a data iterator inside the state.

    Args:
      step: the training step (a non-negative int).
      state: the PyTree to save.
      parts: instead of ``state``, named parts ``{'name': value}``.
      dataset: the data iterator (or ``{'name': iterator}``) to save alongside.
      metrics: a dict of numbers for ``best_fn`` and :meth:`metrics`.
      force: save even if the policies would skip this step (not if it is already saved).
      custom_metadata: a JSON-serializable dict stored with the checkpoint.

    Returns:
      Whether a save was started (False: skipped by the policies or already saved).

    Example:
      >>> import numpy as np, flax_ckpt, tempfile
      >>> with flax_ckpt.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...   _ = mngr.save(1, parts={'params': {'w': np.ones(2)}, 'ema': {'w': np.zeros(2)}})
      ...   mngr.restore(only='ema')['w']
      array([0., 0.])
    """
    orbax_habits.refuse_keywords("save", unexpected)
    if not self._sigterm.ending:
      return self._save(step, state, parts, dataset, metrics, force, custom_metadata)
    # SIGTERM in a loop that never asks reached_preemption(): this step is saved (forced),
    # committed, and then the process ends by SIGTERM as it would have without a manager.
    try:
      self._sigterm.save_started(ending=True)
      self._save(step, state, parts, dataset, metrics, True, custom_metadata)
      self.wait_until_finished()
    finally:
      self._sigterm.save_finished()
    self._sigterm.wait_for_saves()  # another manager's save in flight commits too
    preemption.end_process()
    return True  # (not reached)

  def _save(self, step: int, state: Any, parts: Mapping[str, Any] | None, dataset: Any,
            metrics: Mapping[str, Any] | None, force: bool,
            custom_metadata: dict | None) -> bool:
    step = self._check_save_args(step, metrics)
    step_layout.check_save_args(state, parts, dataset)
    if not self._agree("decide", self._wants_to_save(step, force)):
      return False
    newest = self._last_saved()
    save_rules.check_order(step, None if newest is None else newest.step,
                           self._rolled_back_to, self._root)
    written, layout = step_layout.save_parts(state, parts, dataset)
    self._rolled_back_to = None  # the new run's first save: later steps are its own
    stored = metrics_codec.encode(metrics)
    info = policies.StepInfo(step, float(self._clock()), metrics_codec.decode(stored))
    record = {"metrics": stored, **layout, **metrics_codec.score_record(
        self._opts.best_fn, self._opts.best_mode, info.metrics)}
    self._start_save(info, record, written, custom_metadata)
    return True

  def _check_writable(self) -> None:
    if self._opts.read_only:
      raise errors.CheckpointError(f"this CheckpointManager of {self._root} is read_only")

  def _check_save_args(self, step: Any, metrics: Any) -> int:
    """The checks that need no other process; returns the step as an int."""
    self._check_writable()
    if self._closed:
      raise errors.CheckpointError("this CheckpointManager is closed")
    step = save_rules.check_step(step)
    if metrics is not None and self._opts.best_fn is not None:
      metrics_codec.check_best_fn(self._opts.best_fn, metrics)
    return step

  def _wants_to_save(self, step: int, force: bool) -> bool:
    """This process's decision on saving ``step``, before the processes agree on one."""
    rb = self._rolled_back_to
    if rb is not None and step > rb and self._already_saved(step):
      return True  # not "already saved": that checkpoint belongs to the abandoned run
    return bool((not self._already_saved(step)) and (force or self.should_save(step)))

  def _start_save(self, info: policies.StepInfo, record: dict[str, Any],
                  parts: dict[str, Any], custom_metadata: dict | None) -> None:
    """Starts writing the step (in the background with ``enable_async``); the retention
    policies run once it is committed. ``record``: the metrics and layout to record."""
    with self._save_lock:
      self.wait_until_finished()  # at most one save in flight
      self._ensure_owner()
      record = {"step": info.step, "time": info.time, **record}
      self._sigterm.save_started(ending=False)  # a SIGTERM grace timer waits for it
      self._write(info, record, parts, custom_metadata)

  def _write(self, info: policies.StepInfo, record: dict[str, Any], parts: dict[str, Any],
             custom_metadata: dict | None) -> None:
    """``_start_save``'s snapshot and write; tells the SIGTERM watcher when it is done."""
    try:
      final, finish = step_io.start_save(
          self._step_path(info.step), parts, record, custom_metadata=custom_metadata,
          is_async=self._opts.enable_async, fsync=self._opts.fsync,
          barrier_timeout_s=self._opts.barrier_timeout_s,
          # a background save may outlive the lock (a paused process): check again last
          before_commit=self._ensure_owner, reuse_unchanged=self._opts.reuse_unchanged,
          reuse_from=self._reuse_source())
    except BaseException:
      self._sigterm.save_finished()
      raise

    def finish_and_retain() -> None:
      try:
        finish()
        with self._lock:
          self._infos[info.step] = info
        self._apply_retention()
      finally:
        self._sigterm.save_finished()

    if self._opts.enable_async:
      with self._lock:
        self._pending_info = info
      self._pending = background.start_background(finish_and_retain, final)
    else:
      finish_and_retain()

  def _reuse_source(self) -> str | None:
    """The newest committed step, whose unchanged bytes the next save links (no save is
    in flight here: ``_start_save`` waited for it)."""
    if not self._opts.reuse_unchanged:
      return None
    with self._lock:
      newest = max(self._infos, default=None)
    return None if newest is None else self._step_path(newest)

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
        self._ensure_owner()
        self._remove_step(s)
        _log.info("retention: deleted step %d of %s (kept %s)", s, self._root, sorted(keep))
      with self._lock:
        self._infos.pop(s, None)
        self._orbax.pop(s, None)

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
    self._check_writable()
    self.wait_until_finished()
    if self._primary:
      self._ensure_owner()
      self._remove_step(step)
      _log.info("deleted step %d of %s", step, self._root)
    with self._lock:
      self._infos.pop(step, None)
      self._orbax.pop(step, None)

  def _ensure_owner(self) -> None:
    """Raises unless this manager still holds its directory's owner lock."""
    if self._dir_lock is not None:
      self._dir_lock.ensure_held()

  # --- restoring ---------------------------------------------------------------------

  def restore(self, step: int | None = None, abstract_state: Any = None, *,
              dataset: Any = None, only: str | Sequence[str] | None = None,
              partial: bool = False, verify: bool = True, **unexpected: Any) -> Any:
    """Loads a checkpoint: the latest one unless ``step`` is given (a save still in
    flight is waited for).

    Args:
      step: which step (default: the latest).
      abstract_state: the template: e.g. ``jax.eval_shape(create_train_state)`` with
        shardings. A TrainState template gives back a TrainState (``apply_fn`` and ``tx``
        taken from the template), each array in its target sharding. For a checkpoint of
        a train state, a template that is not one is taken as the ``params`` template.
        For a checkpoint saved with ``parts=``, a dict ``{part: template}`` (parts not in
        it are loaded as saved); with ``only='name'``, that part's template.
      dataset: an iterator (or ``{'name': iterator}``, as saved) to restore in place
        (``set_state``).
      only: a part name (``'params'``) or names to load; nothing else is read. With one
        name that part is returned, with several a dict of them.
      partial: the template may be a subset of what was saved; only its leaves are read.
      verify: check every byte read against its recorded checksum (a
        :class:`CorruptCheckpointError` on a mismatch); False skips the checks.

    Returns:
      The state (or the requested part; for a checkpoint saved with ``parts=``, the dict
      of its parts).

    Raises:
      CheckpointNotFoundError: no committed checkpoint (or not that step).

    Example:
      >>> import numpy as np, flax_ckpt, tempfile
      >>> with flax_ckpt.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...   _ = mngr.save(1, {'w': np.ones(2), 'b': np.zeros(1)})
      ...   sorted(mngr.restore(1, {'w': np.zeros(2)}, partial=True))
      ['w']
    """
    orbax_habits.refuse_keywords("restore", unexpected)
    self.wait_until_finished()
    if step is not None:
      return self._restore(step, abstract_state, dataset, only, partial, verify)
    for attempt in range(5):  # the latest may be deleted by its writer's retention meanwhile
      self.reload()
      latest = self.latest_step()
      if latest is None:
        raise errors.CheckpointNotFoundError(f"no committed checkpoint in {self._root}")
      try:
        return self._restore(latest, abstract_state, dataset, only, partial, verify)
      except (errors.CheckpointNotFoundError, errors.CheckpointReplacedError,
              FileNotFoundError):
        if attempt == 4 or step_dirs.is_committed(self._step_path(latest)):
          raise
    raise AssertionError("unreachable")

  def _restore(self, step: int, abstract_state: Any, dataset: Any,
               only: str | Sequence[str] | None, partial: bool, verify: bool) -> Any:
    latest = self.latest_step()
    self._rolled_back_to = step if latest is not None and step < latest else None
    path = self._step_path(step)
    if self._is_orbax_step(step):  # written by Orbax before this job moved to flax_ckpt
      return orbax_steps.restore(path, abstract_state, dataset=dataset, only=only,
                                 partial=partial)
    entries, layout = step_io.parts_and_layout(path)  # the manifest only: no part is opened
    plan = step_layout.plan_restore(step, entries, layout, abstract_state, only, dataset)
    return plan.result(step_io.load(path, plan.requests, verify=verify, partial=partial))

  def metadata(self, step: int | None = None) -> step_io.CheckpointMetadata:
    """:func:`flax_ckpt.metadata` of a step (default: the latest): parts, custom metadata."""
    return step_io.metadata(self._finished_step_path(step))

  def verify(self, step: int | None = None) -> step_io.VerifyReport:
    """:func:`flax_ckpt.verify` of a step (default: the latest): every checksum and
    structural invariant checked, every problem listed; the report is falsy if any.

    Example:
      >>> import numpy as np, flax_ckpt, tempfile
      >>> with flax_ckpt.CheckpointManager(tempfile.mkdtemp()) as mngr:
      ...   _ = mngr.save(1, {'w': np.ones(3)}, force=True)
      ...   bool(mngr.verify())
      True
    """
    return step_io.verify(self._finished_step_path(step))

  def _finished_step_path(self, step: int | None) -> str:
    """The path of ``step`` (default: the latest), once the save in flight finished."""
    self.wait_until_finished()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise errors.CheckpointNotFoundError(f"no committed checkpoint in {self._root}")
    return self._step_path(step)

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

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> None:
    if exc is None:
      self.close()
      return
    try:
      self.close()
    except Exception as e:  # noqa: BLE001 - the block's own error wins
      add_note = getattr(exc, "add_note", None)  # Python >= 3.11
      if add_note:
        add_note(f"flax_ckpt: the pending save failed too: {type(e).__name__}: {e}")

  @property
  def directory(self) -> str:
    return self._root

