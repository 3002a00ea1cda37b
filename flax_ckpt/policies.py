"""``flax_ckpt.policies``: when a CheckpointManager saves, and which checkpoints it keeps.

Example:
  >>> from flax_ckpt import policies
  >>> keep = policies.AnyPreservationPolicy([policies.LatestN(2), policies.EveryNSteps(10)])
  >>> sorted(keep.keep([policies.StepInfo(s, float(s)) for s in range(0, 25, 5)]))
  [0, 10, 15, 20]
"""

from flax_ckpt._src.training.policies import AnyPreservationPolicy as AnyPreservationPolicy
from flax_ckpt._src.training.policies import AnySavePolicy as AnySavePolicy
from flax_ckpt._src.training.policies import BestN as BestN
from flax_ckpt._src.training.policies import DecisionContext as DecisionContext
from flax_ckpt._src.training.policies import EveryNSeconds as EveryNSeconds
from flax_ckpt._src.training.policies import EveryNSteps as EveryNSteps
from flax_ckpt._src.training.policies import FixedIntervalPolicy as FixedIntervalPolicy
from flax_ckpt._src.training.policies import KeepAll as KeepAll
from flax_ckpt._src.training.policies import LatestN as LatestN
from flax_ckpt._src.training.policies import PreemptionPolicy as PreemptionPolicy
from flax_ckpt._src.training.policies import PreservationPolicy as PreservationPolicy
from flax_ckpt._src.training.policies import SaveDecisionPolicy as SaveDecisionPolicy
from flax_ckpt._src.training.policies import SpecificStepsPolicy as SpecificStepsPolicy
from flax_ckpt._src.training.policies import StepInfo as StepInfo
from flax_ckpt._src.training.policies import TimeIntervalPolicy as TimeIntervalPolicy

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
