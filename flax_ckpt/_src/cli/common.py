"""What every command shares: finding checkpoints and steps, flattening metadata trees,
and printing (tables for people, JSON for scripts).

Example:
  >>> human_bytes(1536), human_bytes(3)
  ('1.5 KiB', '3 B')
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from flax_ckpt._src import errors
from flax_ckpt._src.engine.loading import read_committed
from flax_ckpt._src.format import Manifest
from flax_ckpt._src.io import paths, storage
from flax_ckpt.metadata_types import ArrayMetadata, Metadata

# Exit statuses: 0 all good, 1 a check failed (verify found problems, diff found
# differences), 2 the command could not run (bad arguments, nothing at the path ...),
# as argparse itself exits 2 on a usage error.
OK, FAILED, ERROR = 0, 1, 2


class CliError(Exception):
  """A command cannot run; ``main`` prints the message and exits with status 2."""


def command(sub: Any, name: str, run: Callable[[argparse.Namespace], int], *, help: str,
            description: str, example: str) -> argparse.ArgumentParser:
  """Adds the subcommand ``name`` (run by ``run``, with ``--json`` and an example in its
  ``--help``) to ``sub``; the caller adds its other arguments to the returned parser."""
  p = sub.add_parser(name, help=help, description=description, epilog=example,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", action="store_true", help="machine-readable output")
  p.set_defaults(run=run)
  return p


def human_bytes(n: float) -> str:
  """``n`` bytes in binary units, for people (``--json`` gives exact counts)."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def human_time(t: float | None) -> str:
  """A UNIX time as UTC ``YYYY-MM-DD HH:MM:SS`` (``-`` when unknown)."""
  if t is None:
    return "-"
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def print_json(obj: Any) -> None:
  """``obj`` as indented JSON on stdout; non-finite floats become null (JSON has none)."""
  print(json.dumps(_finite(obj), indent=2, sort_keys=False, default=str))


def _finite(obj: Any) -> Any:
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {str(k): _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  """Left-aligned columns, two spaces apart; the last column is not padded."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  for r in cells:
    line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths[:-1]))
    print((line + "  " + r[-1]).rstrip() if len(r) > 1 else r[0])


def err(message: str) -> None:
  """A line on stderr, prefixed with the program's name."""
  print(f"flax-ckpt: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# Checkpoints and directories of steps


def norm(path: str) -> str:
  """``path`` as the storage layer spells it (absolute locally, URLs unchanged)."""
  return os.fspath(paths.to_path(path))


def join(root: str, name: str) -> str:
  """``root/name`` for local paths and URLs alike."""
  return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.join(root, name)


def is_checkpoint(path: str) -> bool:
  """Whether ``path`` holds a committed flax_ckpt checkpoint (its commit marker)."""
  return storage.backend_for(path).is_committed(path)


def manifest(path: str) -> Manifest:
  """The validated commit marker of the checkpoint at ``path`` (never any part's data)."""
  return read_committed(path, lambda ckpt: ckpt.manifest)


@dataclasses.dataclass(frozen=True)
class Step:
  """One committed step of a directory: its number, path and manifest."""

  step: int
  path: str
  manifest: Manifest

  @property
  def record(self) -> dict[str, Any]:
    """The manager's record of the step (empty for a checkpoint saved without one)."""
    return self.manifest.manager or {}


_TRAILING_DIGITS = re.compile(r"(\d+)$")


def step_entries(root: str) -> list[tuple[int, str]]:
  """``(step, path)`` of the committed checkpoints directly under ``root`` whose names end
  in a step number (``<step>``, ``<prefix>_<step>``, zero-padded), ascending; none of them
  is opened, so a step with a damaged commit marker is listed too.

  The names are not parsed by a manager's naming so that any ``step_prefix`` and fixed
  width are found.
  """
  out: dict[int, str] = {}
  for name in sorted(storage.backend_for(root).committed_entries(root)):
    match = _TRAILING_DIGITS.search(name)
    if match is not None:  # a manager names every step with its number last
      out.setdefault(int(match.group(1)), join(root, name))
  return sorted(out.items())


def steps_of(root: str) -> list[Step]:
  """The steps of :func:`step_entries` with their manifests; a step whose marker cannot
  be read (deleted meanwhile, damaged) is left out (``verify`` lists it)."""
  out = []
  for step, path in step_entries(root):
    try:
      out.append(Step(step, path, manifest(path)))
    except (OSError, errors.CheckpointError):
      continue
  return out


def checkpoint_or_steps(path: str) -> tuple[bool, list[Step]]:
  """``(True, [])`` for a checkpoint; ``(False, steps)`` for a directory of steps.

  Raises:
    CliError: neither (nothing committed there).
  """
  if is_checkpoint(path):
    return True, []
  steps = steps_of(path)
  if not steps:
    raise nothing_there(path)
  return False, steps


def nothing_there(path: str) -> CliError:
  """The error for a path that holds no checkpoint and no step."""
  return CliError(f"{path} is neither a flax_ckpt checkpoint nor a directory of committed "
                  "steps")


def step_path(root: str, step: int) -> str:
  """The path of ``step`` in the directory ``root`` (whatever its naming)."""
  for s, path in step_entries(root):
    if s == step:
      return path
  raise CliError(f"{root} has no committed step {step}")


# ---------------------------------------------------------------------------------------
# Metadata trees


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One leaf of a PyTree part's metadata, flattened."""

  keys: tuple[Any, ...]  # the JAX key path
  path: str  # the key path as text (``['params']['w']``)
  meta: Any  # an ArrayMetadata, ValueMetadata or a custom handler's Metadata

  @property
  def is_array(self) -> bool:
    return isinstance(self.meta, ArrayMetadata)

  @property
  def nbytes(self) -> int:
    return int(getattr(self.meta, "nbytes", 0) or 0)

  @property
  def count(self) -> int:
    """The number of elements of an array leaf (0 for other leaves)."""
    return math.prod(self.meta.shape) if self.is_array else 0

  @property
  def dtype(self) -> str:
    return str(self.meta.dtype) if self.is_array else "-"

  @property
  def shape(self) -> str:
    return str(tuple(self.meta.shape)) if self.is_array else "-"

  @property
  def type(self) -> str:
    t = getattr(self.meta, "type", "")
    return t or type(self.meta).__name__


def leaves(tree: Any) -> Iterator[Leaf]:
  """The leaves of a metadata tree (``flax_ckpt.metadata(...).parts[name]``), in order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, Metadata))
  for keys, meta in flat:
    if isinstance(meta, Metadata):
      yield Leaf(tuple(keys), jax.tree_util.keystr(tuple(keys)), meta)


def sharding_str(sharding: dict | None) -> str:
  """The saved sharding of an array, short: ``NamedSharding x,y mesh 4x2 (x,y)``."""
  if not sharding:
    return "-"
  kind = str(sharding.get("type", "?"))
  if "spec" in sharding:
    spec = ",".join("None" if s is None else (s if isinstance(s, str) else "+".join(s))
                    for s in sharding["spec"])
    mesh = "x".join(map(str, sharding.get("mesh_shape", [])))
    names = ",".join(map(str, sharding.get("axis_names", [])))
    return f"{kind} P({spec}) mesh {mesh} ({names})"
  return kind
