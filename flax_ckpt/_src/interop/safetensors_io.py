"""safetensors export and import (the optional extra ``flax_ckpt[safetensors]``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax_ckpt._src.io import paths


def export_safetensors(src: Any, dst: paths.PathLike, *, part: str = "params",
                       name_fn: Callable[[tuple], str] | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes the params of a checkpoint (or an in-memory PyTree) as safetensors files."""
  raise NotImplementedError  # filled in by the interop work of issue 15
