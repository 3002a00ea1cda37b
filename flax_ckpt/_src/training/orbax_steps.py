"""Steps an Orbax ``CheckpointManager`` wrote into a directory a flax_ckpt manager opens.

A running Orbax job switches to flax_ckpt by pointing a ``flax_ckpt.CheckpointManager`` at
its directory: the committed Orbax steps are listed with the manager's own, ``restore()``
resumes from the latest of either kind, new saves are flax_ckpt checkpoints next to them,
and retention counts (and deletes) both. Orbax step directories are named ``<step>`` or
``<prefix>_<step>`` (any prefix, any zero padding), committed when their
``_CHECKPOINT_METADATA`` has a commit time (docs/orbax_format.md §1, §4).

Example:
  >>> import tempfile
  >>> list_steps(tempfile.mkdtemp())
  {}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.format import parse_json_object
from flax_ckpt._src.interop import orbax_reading
from flax_ckpt._src.io import orbax_layout, storage
from flax_ckpt._src.training import policies, step_dirs

_STEP_NAME = re.compile(r"(?:.+_)?(\d+)")
_METRICS_ITEM = "metrics"


def list_steps(root: str) -> dict[int, str]:
  """``{step: directory name}`` of the committed Orbax steps under ``root``."""
  backend = storage.backend_for(root)
  out: dict[int, str] = {}
  for name in sorted(backend.listdir(root)):
    m = _STEP_NAME.fullmatch(name)
    if m is None or orbax_layout.ORBAX_TMP_TAG in name:
      continue
    path = f"{root.rstrip('/')}/{name}"
    if not backend.is_dir(path) or orbax_layout.orbax_marker(backend, path) is None:
      continue
    out.setdefault(int(m.group(1)), name)
  return out


def step_info(root: str, step: int, name: str) -> policies.StepInfo:
  """What the policies know of an Orbax step: its commit time and its metrics."""
  backend = storage.backend_for(root)
  path = f"{root.rstrip('/')}/{name}"
  meta: dict = {}
  where = f"{path}/{orbax_layout.ORBAX_CHECKPOINT_METADATA}"
  try:
    meta = parse_json_object(backend.read_bytes(where), where)
  except (FileNotFoundError, errors.FormatError):
    pass
  ns = meta.get("commit_timestamp_nsecs")
  t = ns / 1e9 if isinstance(ns, (int, float)) and not isinstance(ns, bool) else 0.0
  metrics = _metrics(backend, path, meta)
  return policies.StepInfo(step, float(t), metrics)


def _metrics(backend: storage.StorageBackend, path: str, meta: dict) -> dict | None:
  """Orbax keeps ``save(..., metrics=)`` in the ``metrics`` item (a JSON file)."""
  try:
    kind = orbax_reading.item_kind(backend, f"{path}/{_METRICS_ITEM}")
  except (FileNotFoundError, NotADirectoryError):
    kind = None
  if kind is not None and kind.startswith("json:"):
    try:
      got = orbax_reading.load_items(f"{path}", {_METRICS_ITEM: None}, partial=False,
                                     restore_type=None)[_METRICS_ITEM]
    except (OSError, errors.CheckpointError):
      got = None
    if isinstance(got, dict):
      return got
  m = meta.get("metrics")
  return m if isinstance(m, dict) and m else None


def restore(path: str, abstract_state: Any, *, dataset: Any,
            only: str | Sequence[str] | None, partial: bool) -> Any:
  """A manager's ``restore`` of an Orbax step.

  The state item (``state``, ``default`` or the only PyTree item) loads into
  ``abstract_state``; ``only`` picks top-level keys of it (Orbax saves a train state as one
  tree: ``only='params'`` reads its ``params`` subtree alone). A step of several named
  PyTree items (``args.Composite(params=..., ema=...)``) is like a flax_ckpt step saved
  with ``parts=``: ``restore()`` gives ``{item: tree}`` (``abstract_state`` a dict of
  templates), ``only='ema'`` one item. ``dataset`` receives the grain iterator item(s).
  """
  backend = storage.backend_for(path)
  items = orbax_reading.step_items(backend, path)
  trees = [n for n, k in items.items() if k == "pytree"]
  try:
    main: str | None = orbax_reading.pick_item(path, items, None)
  except errors.StructureMismatchError:
    main = None  # several named items

  def item(name: str) -> orbax_reading.PyTreeItem:
    return orbax_reading.PyTreeItem(backend, f"{path}/{name}")

  if isinstance(only, str) and only in trees and only != main:
    out = item(only).load(abstract_state, partial=partial, restore_type=None)
  elif main is None:
    names = [only] if isinstance(only, str) else list(only) if only is not None else trees
    unknown = [n for n in names if n not in trees]
    if unknown:
      raise errors.StructureMismatchError(f"{path} (an Orbax step) has no item(s) {unknown};"
                                          f" its PyTree items are {trees}")
    templates = abstract_state if isinstance(abstract_state, Mapping) else {}
    if isinstance(only, str):
      templates = {only: abstract_state}
    got = {n: item(n).load(templates.get(n), partial=partial, restore_type=None)
           for n in names}
    out = got[only] if isinstance(only, str) else got
  elif only is not None:
    keys = [only] if isinstance(only, str) else list(only)
    if isinstance(only, str):
      template = {only: abstract_state}
    else:
      template = {k: None for k in keys} if abstract_state is None else abstract_state
    got = item(main).load(template, partial=True, restore_type=None)
    out = got[only] if isinstance(only, str) else got
  else:
    out = item(main).load(abstract_state, partial=partial, restore_type=None)
  if dataset is not None:
    _restore_datasets(path, items, dataset)
  return out


def _restore_datasets(path: str, items: Mapping[str, str | None], dataset: Any) -> None:
  grains = [n for n, k in items.items() if k == "grain"]
  targets = dict(dataset) if isinstance(dataset, Mapping) else None
  if targets is None:
    if len(grains) != 1:
      raise errors.StructureMismatchError(
          f"{path} (an Orbax step) holds {len(grains)} data-iterator items {grains}; pass "
          "dataset={item name: iterator}")
    targets = {grains[0]: dataset}
  missing = [n for n in targets if n not in grains]
  if missing:
    raise errors.StructureMismatchError(
        f"{path} (an Orbax step) has no data-iterator item(s) {missing}; it has {grains}")
  orbax_reading.load_items(path, targets, partial=False, restore_type=None)


def remove(path: str) -> None:
  """Deletes an Orbax step so that it is never listed half-deleted: a local one is
  renamed to a leftover name first (as flax_ckpt's own), an object-store one loses its
  ``_CHECKPOINT_METADATA`` first (from then on it is not a committed Orbax step)."""
  if "://" not in path:
    step_dirs.remove(path)
    return
  backend = storage.backend_for(path)
  try:
    backend.remove_file(f"{path}/{orbax_layout.ORBAX_CHECKPOINT_METADATA}")
  except FileNotFoundError:
    pass
  backend.remove_tree(path)
