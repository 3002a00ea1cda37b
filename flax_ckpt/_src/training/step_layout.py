"""Which parts a manager's step holds, and how ``save``'s and ``restore``'s arguments map
onto them.

Three layouts, told apart by the manager's record of the step (``layout``) and the part
names:

- a train state: ``params``, ``opt_state``, ``extra`` (see :mod:`train_state_parts`);
- any other state: the one part ``state``;
- user-named parts (``save(step, parts={'params': p, 'ema': e})``): one part per name,
  recorded as ``layout: 'parts'`` so a plain dict state keeps meaning one state.

Data iterators go alongside, per process: one as the part ``dataset``, several
(``dataset={'train': it, 'eval': it2}``) as ``dataset.train`` and ``dataset.eval``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.parts.stateful import is_stateful
from flax_ckpt._src.training import orbax_habits, save_rules
from flax_ckpt._src.training import train_state_parts as tsp

DATASET = "dataset"
LAYOUT = "layout"  # key of the manager's record
USER_PARTS = "parts"  # its value for user-named parts
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def is_dataset(name: str) -> bool:
  return name == DATASET or name.startswith(DATASET + ".")


def _check_name(name: Any, what: str) -> str:
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f"{what} name {name!r} is not allowed: use 1-100 characters from "
                     "[A-Za-z0-9_.-], starting with a letter or digit.")
  return name


def _is_several(dataset: Any) -> bool:
  return isinstance(dataset, Mapping) and not is_stateful(dataset)


def dataset_parts(dataset: Any) -> dict[str, Any]:
  """The parts of ``dataset=``: one iterator, or a dict of named iterators."""
  if dataset is None:
    return {}
  if not _is_several(dataset):
    save_rules.check_dataset(dataset)
    return {DATASET: dataset}
  if not dataset:
    raise ValueError("dataset={} names no iterator; pass None or {'train': it, ...}")
  out = {}
  for k, it in dataset.items():
    save_rules.check_dataset(it)
    out[f"{DATASET}.{_check_name(k, 'dataset')}"] = it
  return out


def check_save_args(state: Any, parts: Mapping[str, Any] | None, dataset: Any) -> None:
  """The cheap checks of ``save``'s state, ``parts`` and ``dataset``, made on every call
  (also for steps the policies skip), so an Orbax habit fails at its first use."""
  if state is not None and parts is not None:
    raise ValueError("pass either a state or parts={'name': value, ...}, not both (a "
                     "state that is a dict is saved as one state; parts= names the parts)")
  if parts is not None:
    orbax_habits.refuse(parts, "parts")
    if not isinstance(parts, Mapping) or not parts:
      raise TypeError("parts must be a non-empty dict {'name': value, ...}")
    for name, value in parts.items():
      if is_dataset(_check_name(name, "part")):
        raise ValueError(f"part name {name!r} is the data iterators'; pass iterators as "
                         "dataset= and name the part otherwise")
      orbax_habits.refuse_state(value, f"parts[{name!r}]")
  elif state is not None:
    orbax_habits.refuse_state(state, "state")
  dataset_parts(dataset)
  if state is None and parts is None and dataset is None:
    raise ValueError("save needs a state, parts= and/or dataset= to save")


def save_parts(state: Any, parts: Mapping[str, Any] | None,
               dataset: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """The parts to write for ``save(step, state, parts=..., dataset=...)`` (checked by
  :func:`check_save_args`), and what the manager's record of the step says about them.

  A data iterator inside the state is refused here, when a step is saved: finding one
  walks the whole tree, which skipped steps need not pay for.
  """
  if parts is not None:
    for name, value in parts.items():
      orbax_habits.refuse_iterators(value, f"parts[{name!r}]")
    out, record = dict(parts), {LAYOUT: USER_PARTS}
  elif state is not None:
    orbax_habits.refuse_iterators(state, "state")
    out, record = tsp.split(state), {}
  else:
    out, record = {}, {}
  out.update(dataset_parts(dataset))
  return out, record


@dataclasses.dataclass
class RestorePlan:
  """What to load from one step, and how to hand it back."""

  requests: dict[str, Any]  # {part: template, or the iterator to set_state}
  only: str | Sequence[str] | None
  layout: str  # "train_state", "state" or USER_PARTS
  template: Any

  def result(self, loaded: dict[str, Any]) -> Any:
    out = {n: v for n, v in loaded.items() if not is_dataset(n)}
    if isinstance(self.only, str):
      return out[self.only]
    if self.only is not None or self.layout == USER_PARTS:
      return out
    return tsp.merge(self.template if self.layout == "train_state" else None, out)


def plan_restore(step: int, entries: Sequence[str], layout: str | None, template: Any,
                 only: str | Sequence[str] | None, dataset: Any) -> RestorePlan:
  """The parts ``restore(step, template, only=..., dataset=...)`` loads from a step holding
  the parts ``entries`` (``layout``: the manager's record of it)."""
  orbax_habits.refuse_state(template, "abstract_state")
  saved = [n for n in entries if not is_dataset(n)]
  kind = (USER_PARTS if layout == USER_PARTS else
          "train_state" if tsp.PARAMS in saved else "state")
  if (only is None and kind == "train_state" and template is not None
      and not tsp.is_train_state(template)):
    only = tsp.PARAMS  # a params-only template
  names = [only] if isinstance(only, str) else list(only) if only is not None else saved
  missing = [n for n in names if n not in saved]
  if missing:
    raise errors.StructureMismatchError(
        f"step {step} has no part {missing}; its parts are {saved}")
  requests = {n: t for n, t in _templates(kind, template, only, names).items()}
  requests.update(_dataset_requests(step, entries, dataset))
  return RestorePlan(requests, only, kind, template)


def _templates(kind: str, template: Any, only: str | Sequence[str] | None,
               names: list[str]) -> dict[str, Any]:
  """``{part: template or None}`` for the parts ``names``."""
  if template is None:
    return dict.fromkeys(names)
  if isinstance(only, str):
    return {only: template}
  if kind == "train_state" and tsp.is_train_state(template):
    split = tsp.split(template)
    return {n: split.get(n) for n in names}
  if kind != USER_PARTS:
    return dict.fromkeys(names, template)
  if not isinstance(template, Mapping):
    raise TypeError("this step holds named parts; its template is a dict {part: template} "
                    "(or pass only='name' with that part's template)")
  unknown = [k for k in template if k not in names]
  if unknown:
    raise errors.StructureMismatchError(
        f"the template names parts {unknown} that are not being restored; parts: {names}")
  return {n: template.get(n) for n in names}


def _dataset_requests(step: int, entries: Sequence[str], dataset: Any) -> dict[str, Any]:
  """``{part: iterator}`` for ``restore(..., dataset=...)``."""
  if dataset is None:
    return {}
  saved = [n for n in entries if is_dataset(n)]
  if not _is_several(dataset):
    if DATASET not in entries:
      several = [n[len(DATASET) + 1:] for n in saved]
      raise errors.StructureMismatchError(
          f"step {step} was saved without a dataset" if not several else
          f"step {step} holds several iterators {several}; pass dataset={{name: it, ...}}")
    return {DATASET: dataset}
  out = {}
  for k, it in dataset.items():
    name = f"{DATASET}.{k}"
    if name not in entries:
      raise errors.StructureMismatchError(
          f"step {step} has no iterator {k!r}; it holds "
          f"{[n[len(DATASET) + 1:] or '(one, unnamed: dataset=it)' for n in saved]}")
    out[name] = it
  return out
