"""The metrics saved with a step: checked, stored as JSON in the manifest, and read back.

Numbers are stored as floats (non-finite ones tagged by :mod:`jsontags`), strings, bools and
None as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, overload

import numpy as np

from flax_ckpt._src.encoding import jsontags


@overload
def encode(metrics: None) -> None: ...


@overload
def encode(metrics: Mapping[str, Any]) -> dict: ...


def encode(metrics: Any) -> dict | None:
  """The JSON form of ``metrics`` (None stays None); raises TypeError for a non-number."""
  if metrics is None:
    return None
  if not isinstance(metrics, Mapping):
    raise TypeError(f"metrics must be a dict of numbers, not {type(metrics).__qualname__}")
  out = {}
  for k, v in metrics.items():
    if not isinstance(k, str):
      raise TypeError(f"metrics keys must be str, got {k!r}")
    if isinstance(v, str) or v is None:
      out[k] = v
      continue
    if isinstance(v, (bool, np.bool_)):
      out[k] = bool(v)
      continue
    try:
      f = float(v)  # python/numpy/jax scalars
    except (TypeError, ValueError) as e:
      raise TypeError(f"metric {k!r} is not a number: {v!r}") from e
    out[k] = jsontags.encode(f)
  return out


@overload
def decode(stored: None) -> None: ...


@overload
def decode(stored: Mapping[str, Any]) -> dict: ...


def decode(stored: Mapping[str, Any] | None) -> dict | None:
  """The metrics :func:`encode` stored (None stays None)."""
  if stored is None:
    return None
  return {k: jsontags.decode(v) for k, v in stored.items()}  # non-finite floats are tagged


def check_best_fn(fn: Callable[[dict], float], metrics: Mapping[str, Any]) -> None:
  """Raises before anything is written when ``best_fn`` cannot score ``metrics``."""
  stored = encode(metrics)
  try:
    float(fn(decode(stored)))
  except Exception as e:  # noqa: BLE001 - reported with the fix
    raise ValueError(f"best_fn failed on the metrics {stored} ({type(e).__name__}: {e}); "
                     "fix best_fn or pass the metrics it needs. Nothing was saved.") from e


def score_record(best_fn: Callable[[dict], float] | None, best_mode: str | None,
                 metrics: dict | None) -> dict:
  """``{"score": best_fn(metrics), "best_mode": mode}`` for the step's manifest, so tools
  (``flax-ckpt ls``) can rank steps without the ``best_fn`` lambda; empty without one.

  Example:
    >>> score_record(lambda m: m['acc'], 'max', {'acc': 0.9})
    {'score': 0.9, 'best_mode': 'max'}
  """
  if best_fn is None or metrics is None:
    return {}
  score = float(best_fn(metrics))
  return {"score": score if math.isfinite(score) else None, "best_mode": best_mode}
