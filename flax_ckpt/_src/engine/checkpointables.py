"""Temporary: the old engine entry points the manager calls, over saving/loading (merge aid)."""

from __future__ import annotations

from typing import Any

from flax_ckpt._src.engine.loading import (  # noqa: F401
    CheckpointMetadata,
    checkpoint_metadata,
    read_committed,
)
from flax_ckpt._src.engine.loading import load_parts as load_checkpointables  # noqa: F401
from flax_ckpt._src.engine.saving import PendingSave, SaveOptions, parts_from  # noqa: F401


def start_save(path: Any, parts: Any, *, overwrite: bool, custom_metadata: Any,
               is_async: bool, fsync: bool, barrier_timeout_s: Any = None,
               manifest_extra: Any = None) -> Any:
  save = PendingSave.start(path, parts, SaveOptions(
      overwrite=overwrite, custom_metadata=custom_metadata, is_async=is_async, fsync=fsync,
      barrier_timeout_s=barrier_timeout_s, manager=(manifest_extra or {}).get("manager")))
  return save.final, save.commit


def committed(path: Any) -> Any:
  return read_committed(path, lambda c: (c.path, {"checkpointables": c.manifest.checkpointables()}))
