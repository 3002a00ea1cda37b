"""Writing and reading one step's checkpoint: the manager's only calls into the engine.

A step is a checkpoint of named parts (``params``, ``opt_state``, ``extra``, ``state``,
``dataset``) whose manifest also holds the manager's record of the step: its number, the
manager's clock at the save, and the metrics (see :mod:`metrics_codec`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.engine.loading import (
    CheckpointMetadata,
    checkpoint_metadata,
    load_parts,
    read_committed,
)
from flax_ckpt._src.engine.saving import PendingSave, SaveOptions, parts_from
from flax_ckpt._src.engine.verifying import VerifyReport, verify_checkpoint

__all__ = ["CheckpointMetadata", "VerifyReport", "load", "metadata", "part_names",
           "parts_and_layout", "read_record", "start_save", "verify"]


def start_save(path: str, parts: Mapping[str, Any], record: dict, *,
               custom_metadata: dict | None, is_async: bool, fsync: bool,
               barrier_timeout_s: float | None,
               before_commit: Callable[[], None] | None = None,
               reuse_unchanged: bool = False, reuse_from: str | None = None
               ) -> tuple[str, Callable[[], None]]:
  """Snapshots ``parts`` for the step directory ``path``; returns it and ``finish()``.

  ``finish()`` writes the parts and commits the checkpoint, with ``record`` (the
  manager's record of the step) in its manifest; ``before_commit`` runs right before the
  commit marker is written; ``reuse_unchanged``: chunks equal to those of ``reuse_from``
  (a committed step) are hard-linked, not written again. A step is never overwritten.
  """
  save = PendingSave.start(path, parts_from(parts), SaveOptions(
      overwrite=False, custom_metadata=custom_metadata, is_async=is_async, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s, manager=record, before_commit=before_commit,
      reuse_unchanged=reuse_unchanged, reuse_from=reuse_from))
  return os.fspath(save.final), save.commit


def read_record(path: str) -> dict | None:
  """The manager's record of the committed step at ``path``; None when unreadable.

  A checkpoint saved without a manager has no record: its ``time`` is the manifest's
  ``created_at``.
  """
  try:
    manifest = read_committed(path, lambda ckpt: ckpt.manifest)
  except (OSError, errors.CheckpointError):
    return None
  return {"time": manifest.created_at or 0.0, **(manifest.manager or {})}


def part_names(path: str) -> list[str]:
  """The parts of the committed step at ``path``, from its manifest (no part is opened)."""
  return read_committed(path, lambda ckpt: list(ckpt.manifest.parts))


def parts_and_layout(path: str) -> tuple[list[str], str | None]:
  """The parts of the committed step at ``path`` and the ``layout`` its manager recorded
  (None if none), from its manifest (no part is opened)."""
  return read_committed(path, lambda ckpt: (list(ckpt.manifest.parts),
                                            (ckpt.manifest.manager or {}).get("layout")))


def load(path: str, requests: Mapping[str, Any], *, verify: bool = True,
         partial: bool = False) -> dict[str, Any]:
  """Loads the named parts (``{name: template or None}``) of the step at ``path``;
  ``partial``: templates may be subsets of what was saved."""
  return load_parts(path, requests, verify=verify, partial=partial)


def verify(path: str) -> VerifyReport:
  """:func:`flax_ckpt.verify` of the step at ``path``."""
  return verify_checkpoint(path)


def metadata(path: str) -> CheckpointMetadata:
  """:func:`flax_ckpt.metadata` of the step at ``path``."""
  return checkpoint_metadata(path)
