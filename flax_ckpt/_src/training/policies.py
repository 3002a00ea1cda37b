"""When to save (save-decision policies) and what to keep (preservation policies).

Both kinds are small classes combined with "any of": a step is saved if any decision policy
says so, and a checkpoint is kept if any preservation policy keeps it. The newest committed
checkpoint is always kept by the manager, whatever the policies say.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What the policies know about one committed checkpoint.

  Attributes:
    step: the training step.
    time: when it was saved (seconds, from the manager's clock).
    metrics: the metrics passed to ``save`` (None if none).
  """

  step: int
  time: float
  metrics: dict | None = None


@dataclasses.dataclass(frozen=True)
class DecisionContext:
  """What a save-decision policy knows when asked about ``step``.

  Attributes:
    step: the step being considered.
    now: the manager's clock.
    last_saved: the newest committed (or in-flight) checkpoint, or None.
    reached_preemption: the job is being preempted.
  """

  step: int
  now: float
  last_saved: StepInfo | None
  reached_preemption: bool = False


@runtime_checkable
class SaveDecisionPolicy(Protocol):
  """Decides whether ``context.step`` should be saved."""

  def should_save(self, context: DecisionContext) -> bool:
    ...


@runtime_checkable
class PreservationPolicy(Protocol):
  """Chooses which of the committed checkpoints to keep."""

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    ...


# --- save decisions ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FixedIntervalPolicy:
  """Saves every ``interval`` steps (steps divisible by it).

  Example:
    >>> from flax_ckpt.policies import DecisionContext, FixedIntervalPolicy
    >>> FixedIntervalPolicy(10).should_save(DecisionContext(step=20, now=0.0, last_saved=None))
    True
  """

  interval: int

  def should_save(self, context: DecisionContext) -> bool:
    return self.interval > 0 and context.step % self.interval == 0


@dataclasses.dataclass(frozen=True)
class SpecificStepsPolicy:
  """Saves exactly the listed steps."""

  steps: Sequence[int]

  def __post_init__(self):
    _ = self._set  # bad steps fail here, at construction

  @functools.cached_property
  def _set(self) -> frozenset[int]:  # not a field: dataclasses.fields/asdict stay as they are
    return frozenset(int(s) for s in self.steps)

  def should_save(self, context: DecisionContext) -> bool:
    return context.step in self._set


@dataclasses.dataclass(frozen=True)
class TimeIntervalPolicy:
  """Saves when at least ``seconds`` passed since the last checkpoint (and the first time)."""

  seconds: float

  def should_save(self, context: DecisionContext) -> bool:
    last = context.last_saved
    return last is None or context.now - last.time >= self.seconds


@dataclasses.dataclass(frozen=True)
class PreemptionPolicy:
  """Saves when the job is being preempted (SIGTERM or JAX's preemption sync point)."""

  def should_save(self, context: DecisionContext) -> bool:
    return context.reached_preemption


@dataclasses.dataclass(frozen=True)
class AnySavePolicy:
  """Saves when any of ``policies`` says so."""

  policies: Sequence[SaveDecisionPolicy]

  def should_save(self, context: DecisionContext) -> bool:
    return any(p.should_save(context) for p in self.policies)


def is_step_determined(policy: SaveDecisionPolicy) -> bool:
  """Whether ``policy`` decides by the step alone (no clock, no custom rule), so every
  process reaches the same decision without asking process 0."""
  if isinstance(policy, AnySavePolicy):
    return all(is_step_determined(p) for p in policy.policies)
  return isinstance(policy, (FixedIntervalPolicy, SpecificStepsPolicy, PreemptionPolicy))


# --- preservation ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatestN:
  """Keeps the ``n`` newest checkpoints."""

  n: int

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    steps = sorted(c.step for c in checkpoints)
    return set(steps[-self.n:]) if self.n > 0 else set()


@dataclasses.dataclass(frozen=True)
class EveryNSteps:
  """Keeps every checkpoint whose step is a multiple of ``n``, forever."""

  n: int

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    return {c.step for c in checkpoints if self.n > 0 and c.step % self.n == 0}


@dataclasses.dataclass(frozen=True)
class EveryNSeconds:
  """Keeps the first checkpoint of every ``seconds``-long stretch of time, forever.

  Walking checkpoints in step order, one is kept when at least ``seconds`` passed since
  the previously kept one (the first is always kept).
  """

  seconds: float

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    kept, last = set(), -math.inf
    for c in sorted(checkpoints, key=lambda c: c.step):
      if c.time - last >= self.seconds:
        kept.add(c.step)
        last = c.time
    return kept


_MODES = ("'max' keeps the checkpoints with the highest metric (an accuracy; Orbax's "
          "default), 'min' the lowest (a loss)")
BEST_MODE_REQUIRED = (
    f"best_fn needs best_mode: {_MODES}. Pass best_mode='max' or best_mode='min'; with a "
    "default, a ported accuracy best_fn could silently keep the worst checkpoints.")


@dataclasses.dataclass(frozen=True)
class BestN:
  """Keeps the ``n`` checkpoints with the best metric.

  Attributes:
    get_metric: ``metrics -> float`` (e.g. ``lambda m: m['loss']``).
    n: how many to keep.
    mode: ``'min'`` (lower is better) or ``'max'``; required (Orbax's default is ``'max'``,
      so no default could be right for a port).
    keep_checkpoints_without_metrics: keep checkpoints saved without metrics (default);
      otherwise they compete like any other and are dropped first.
  """

  get_metric: Callable[[dict], float]
  n: int
  mode: str | None = None
  keep_checkpoints_without_metrics: bool = True

  def __post_init__(self):
    if self.mode is None:
      raise ValueError(f"BestN needs mode: {_MODES}. Pass mode='max' or mode='min'.")
    if self.mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', not {self.mode!r}")

  def ranked(self, checkpoints: Sequence[StepInfo]) -> list[tuple[float, int]]:
    """``(metric, step)`` of the checkpoints it can score, best first (NaN last; ties: the
    newer checkpoint first)."""
    scored = [(v, c.step) for c in checkpoints if (v := self._value(c.metrics)) is not None]
    sign = 1.0 if self.mode == "min" else -1.0
    return sorted(scored, key=lambda vs: (math.isnan(vs[0]),
                                          0.0 if math.isnan(vs[0]) else sign * vs[0], -vs[1]))

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    kept = ({c.step for c in checkpoints if self._value(c.metrics) is None}
            if self.keep_checkpoints_without_metrics else set())
    kept.update(s for _, s in self.ranked(checkpoints)[:max(self.n, 0)])
    return kept

  def _value(self, metrics: dict | None) -> float | None:
    """The metric, or None when there are none or ``get_metric`` fails on them."""
    if metrics is None:
      return None
    try:
      return float(self.get_metric(metrics))
    except Exception:  # noqa: BLE001 - counted as "without metrics", never fatal
      return None


@dataclasses.dataclass(frozen=True)
class AnyPreservationPolicy:
  """Keeps a checkpoint if any of ``policies`` keeps it."""

  policies: Sequence[PreservationPolicy]

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    out: set[int] = set()
    for p in self.policies:
      out |= set(p.keep(checkpoints))
    return out


@dataclasses.dataclass(frozen=True)
class KeepAll:
  """Keeps every checkpoint (the default when no retention option is set)."""

  def keep(self, checkpoints: Sequence[StepInfo]) -> set[int]:
    return {c.step for c in checkpoints}
