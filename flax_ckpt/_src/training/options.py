"""``CheckpointManagerOptions``: when a :class:`CheckpointManager` saves and what it keeps.

The options are checked when constructed, and turned into the two policies the manager
asks: one save-decision policy and one preservation policy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from flax_ckpt._src.training import orbax_habits, policies


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
    best_mode: ``'min'`` (lower is better) or ``'max'`` for ``best_fn``; required with
      ``best_fn``, since Orbax defaults to ``'max'`` and flax_ckpt once defaulted to
      ``'min'``: a ported ``best_fn`` must say which it means.
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
    sigterm_grace_s: in a loop that never calls ``reached_preemption``, how long after
      SIGTERM the process waits for its next ``save`` (which is forced, and ends the
      process by SIGTERM once committed) before it ends anyway (after any save in flight
      commits). Loops that call ``reached_preemption`` end themselves; see
      ``CheckpointManager.reached_preemption``.
    reuse_unchanged: an array chunk whose bytes equal the same chunk of the newest step
      already committed is not written again: the new step hard-links that step's data
      file (local directories; object stores write every byte). Every step stays a
      complete checkpoint: deleting the older one (retention) leaves it whole, and a
      copy copies the bytes. For frozen weights, EMA copies and other repeated bytes.
      Steps that share a file share its damage (detected by the checksums); ``False``
      writes every byte, so every step is an independent copy. See docs/format.md,
      "Reused bytes".
  """

  save_interval_steps: int | None = None
  save_on_steps: Sequence[int] = ()
  save_interval_secs: float | None = None
  save_decision_policy: policies.SaveDecisionPolicy | None = None
  max_to_keep: int | None = None
  keep_period: int | None = None
  keep_time_interval: float | None = None
  best_fn: Callable[[dict], float] | None = None
  best_mode: str | None = None
  keep_checkpoints_without_metrics: bool = True
  preservation_policy: policies.PreservationPolicy | None = None
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
  sigterm_grace_s: float = 30.0
  reuse_unchanged: bool = True

  def __post_init__(self):
    self._check_orbax()
    if self.best_mode not in (None, "min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', not {self.best_mode!r}")
    if self.best_fn is not None and self.best_mode is None:
      raise ValueError(policies.BEST_MODE_REQUIRED)
    if not (isinstance(self.sigterm_grace_s, (int, float)) and self.sigterm_grace_s >= 0):
      raise ValueError(f"sigterm_grace_s must be a number of seconds >= 0, not "
                       f"{self.sigterm_grace_s!r}")
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

  def _check_orbax(self) -> None:
    """Refuses Orbax policy objects now rather than at the first save."""
    for name in ("save_decision_policy", "preservation_policy"):
      value = getattr(self, name)
      orbax_habits.refuse(value, name)
      for i, p in enumerate(getattr(value, "policies", None) or ()):
        orbax_habits.refuse(p, f"{name}.policies[{i}]")

  def decision_policy(self) -> policies.SaveDecisionPolicy:
    if self.save_decision_policy is not None:
      return policies.AnySavePolicy([self.save_decision_policy, policies.PreemptionPolicy()])
    rules: list[policies.SaveDecisionPolicy] = [policies.PreemptionPolicy()]
    if self.save_interval_steps is not None:
      rules.append(policies.FixedIntervalPolicy(self.save_interval_steps))
    if self.save_on_steps:
      rules.append(policies.SpecificStepsPolicy(tuple(self.save_on_steps)))
    if self.save_interval_secs is not None:
      rules.append(policies.TimeIntervalPolicy(self.save_interval_secs))
    if len(rules) == 1:
      rules.append(policies.FixedIntervalPolicy(1))
    return policies.AnySavePolicy(rules)

  def retention_policy(self) -> policies.PreservationPolicy:
    if self.preservation_policy is not None:
      return self.preservation_policy
    rules: list[policies.PreservationPolicy] = []
    if self.max_to_keep is not None:
      if self.best_fn is not None:
        assert self.best_mode is not None  # __post_init__: best_fn needs best_mode
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
