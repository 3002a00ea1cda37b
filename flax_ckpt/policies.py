"""``flax_ckpt.policies``: when a CheckpointManager saves, and which checkpoints it keeps.

Example:
  >>> from flax_ckpt import policies
  >>> keep = policies.AnyPreservationPolicy([policies.LatestN(2), policies.EveryNSteps(10)])
  >>> sorted(keep.keep([policies.StepInfo(s, float(s)) for s in range(0, 25, 5)]))
  [0, 10, 15, 20]
"""

from flax_ckpt._src.training.policies import (
    AnyPreservationPolicy,
    AnySavePolicy,
    BestN,
    DecisionContext,
    EveryNSeconds,
    EveryNSteps,
    FixedIntervalPolicy,
    KeepAll,
    LatestN,
    PreemptionPolicy,
    PreservationPolicy,
    SaveDecisionPolicy,
    SpecificStepsPolicy,
    StepInfo,
    TimeIntervalPolicy,
)

__all__ = [
    "AnyPreservationPolicy",
    "AnySavePolicy",
    "BestN",
    "DecisionContext",
    "EveryNSeconds",
    "EveryNSteps",
    "FixedIntervalPolicy",
    "KeepAll",
    "LatestN",
    "PreemptionPolicy",
    "PreservationPolicy",
    "SaveDecisionPolicy",
    "SpecificStepsPolicy",
    "StepInfo",
    "TimeIntervalPolicy",
]
