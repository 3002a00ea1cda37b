"""``flax-ckpt ls`` and ``flax-ckpt show``: what a directory or a checkpoint holds, from
metadata only (commit markers, ``_TREE.json``): no array byte is read.
"""

from __future__ import annotations

import argparse
import collections
import re
from typing import Any

import jax

import flax_ckpt
from flax_ckpt._src import errors
from flax_ckpt._src.cli import common
from flax_ckpt._src.format import KIND_PYTREE
from flax_ckpt._src.training import metrics_codec

LS_EXAMPLE = """example:
  $ flax-ckpt ls /ckpts/run1
  step  time                 size     parts           metrics
  100   2026-12-03 19:44:21  2.1 MiB  state, dataset  loss=0.52 acc=0.48
  200   2026-12-03 19:44:21  2.1 MiB  state, dataset  loss=0.31 acc=0.69  best
  300   2026-12-03 19:44:22  2.1 MiB  state, dataset  loss=0.35 acc=0.65  latest
  $ flax-ckpt ls /ckpts/run1/200 --json
"""

SHOW_EXAMPLE = """example:
  $ flax-ckpt show /ckpts/run1/200 --depth 2 --filter kernel
  $ flax-ckpt show gs://bucket/ckpt --part params --json
"""


def _part_sizes(path: str) -> dict[str, tuple[str, int, int]]:
  """``{part: (kind, leaves, bytes)}`` of the checkpoint at ``path`` (PyTree parts only
  have leaves and bytes; other kinds count 0)."""
  md = flax_ckpt.metadata(path)
  out = {}
  for name, entry in md.checkpointables.items():
    kind = entry.get("kind", "?")
    if kind == KIND_PYTREE and md.parts.get(name) is not None:
      ls = list(common.leaves(md.parts[name]))
      out[name] = (kind, len(ls), sum(x.nbytes for x in ls))
    else:
      out[name] = (kind, 0, 0)
  return out


def _best(steps: list[common.Step]) -> tuple[int | None, str | None]:
  """The best step by the scores the manager recorded, and the mode; without any score
  the latest step, as ``CheckpointManager.best_step`` without ``best_fn``."""
  scored = [(s.record["score"], s.step, s.record.get("best_mode")) for s in steps
            if isinstance(s.record.get("score"), (int, float))]
  if not scored:
    return (steps[-1].step if steps else None), None
  mode = scored[-1][2] or "max"  # the newest record's mode is the manager's current one
  sign = -1.0 if mode == "max" else 1.0
  # the newer step wins a tie, as the newest of equally good checkpoints is kept
  best = min(scored, key=lambda x: (sign * x[0], -x[1]))
  return best[1], mode


def _metrics_str(metrics: dict | None) -> str:
  if not metrics:
    return "-"
  return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in metrics.items())


def _ls_dir(root: str, steps: list[common.Step], as_json: bool) -> int:
  latest = steps[-1].step
  best, mode = _best(steps)
  rows = []
  for s in steps:
    try:
      nbytes: int | None = sum(v[2] for v in _part_sizes(s.path).values())
    except (OSError, errors.CheckpointError):  # deleted meanwhile, or a damaged tree:
      nbytes = None  # still listed (flax-ckpt verify says what is wrong)
    rows.append({"step": s.step, "path": s.path,
                 "time": s.record.get("time", s.manifest.created_at),
                 "bytes": nbytes, "parts": list(s.manifest.parts),
                 "metrics": _decode(s.record.get("metrics")),
                 "score": s.record.get("score")})
  if as_json:
    common.print_json({"directory": root, "steps": rows, "latest_step": latest,
                       "best_step": best, "best_mode": mode})
    return common.OK
  table = []
  for r in rows:
    tags = [t for t, hit in (("best", r["step"] == best), ("latest", r["step"] == latest))
            if hit]
    size = "?" if r["bytes"] is None else common.human_bytes(r["bytes"])
    table.append([r["step"], common.human_time(r["time"]), size,
                  ", ".join(r["parts"]), _metrics_str(r["metrics"]), " ".join(tags)])
  common.print_table(["step", "time", "size", "parts", "metrics", ""], table)
  return common.OK


def _decode(stored: Any) -> dict | None:
  """The metrics as the manager stored them, non-finite floats decoded."""
  if not isinstance(stored, dict):
    return None
  return metrics_codec.decode(stored)


def _ls_checkpoint(path: str, as_json: bool) -> int:
  m = common.manifest(path)
  sizes = _part_sizes(path)
  parts = [{"name": n, "kind": k, "leaves": c, "bytes": b} for n, (k, c, b) in sizes.items()]
  if as_json:
    common.print_json({"checkpoint": path, "created_at": m.created_at,
                       "format_version": m.version, "parts": parts,
                       "custom_metadata": m.custom_metadata, "manager": m.manager})
    return common.OK
  print(f"{path}  (committed {common.human_time(m.created_at)}, format v{m.version})")
  common.print_table(["part", "kind", "leaves", "size"], [
      [p["name"], p["kind"], p["leaves"] if p["kind"] == KIND_PYTREE else "-",
       common.human_bytes(p["bytes"]) if p["kind"] == KIND_PYTREE else "-"] for p in parts])
  if m.manager:
    metrics = _metrics_str(_decode(m.manager.get("metrics")))
    print(f"step {m.manager.get('step')}: metrics {metrics}")
  return common.OK


def run_ls(args: argparse.Namespace) -> int:
  """``flax-ckpt ls PATH``: a directory's steps, or a checkpoint's parts."""
  path = common.norm(args.path)
  is_ckpt, steps = common.checkpoint_or_steps(path)
  if is_ckpt:
    return _ls_checkpoint(path, args.json)
  return _ls_dir(path, steps, args.json)


# ---------------------------------------------------------------------------------------
# show


def _leaf_json(part: str, leaf: common.Leaf) -> dict[str, Any]:
  out: dict[str, Any] = {"part": part, "path": leaf.path, "type": leaf.type,
                         "bytes": leaf.nbytes}
  if leaf.is_array:
    out.update(shape=list(leaf.meta.shape), dtype=leaf.dtype, sharding=leaf.meta.sharding)
  return out


def _grouped(part: str, found: list[common.Leaf], depth: int) -> list[list[Any]]:
  """Rows of the subtrees ``depth`` keys deep: leaves, parameters and bytes summed."""
  groups: dict[str, list[int]] = collections.OrderedDict()
  for leaf in found:
    key = part + (_keystr(leaf.keys[:depth]) if depth else "")
    g = groups.setdefault(key, [0, 0, 0])
    g[0] += 1
    g[1] += leaf.count
    g[2] += leaf.nbytes
  return [[k, n, f"{c:,}", common.human_bytes(b)] for k, (n, c, b) in groups.items()]


def _keystr(keys: tuple[Any, ...]) -> str:
  return jax.tree_util.keystr(keys)


def _select(md: Any, part: str | None, pattern: str | None
            ) -> dict[str, list[common.Leaf]]:
  """The leaves of each PyTree part shown (``--part``), filtered by ``--filter``."""
  pytrees = [n for n, e in md.checkpointables.items() if e.get("kind") == KIND_PYTREE]
  if part is not None and part not in md.checkpointables:
    raise common.CliError(f"no part {part!r}; the parts are "
                          f"{', '.join(md.checkpointables)}")
  if part is not None and part not in pytrees:
    raise common.CliError(f"part {part!r} is not a PyTree (it is "
                          f"{md.checkpointables[part].get('kind')}); nothing to show")
  try:
    regex = re.compile(pattern) if pattern else None
  except re.error as e:
    raise common.CliError(f"--filter {pattern!r}: {e}") from None
  out = {}
  for name in [part] if part else pytrees:
    found = list(common.leaves(md.parts.get(name)))
    out[name] = [x for x in found if regex is None or regex.search(x.path)]
  return out


def _totals(selected: dict[str, list[common.Leaf]]) -> dict[str, Any]:
  by_dtype: dict[str, int] = collections.Counter()
  for found in selected.values():
    for leaf in found:
      by_dtype[leaf.dtype if leaf.is_array else leaf.type] += leaf.nbytes
  return {
      "leaves": sum(len(f) for f in selected.values()),
      "parameters": sum(x.count for f in selected.values() for x in f),
      "bytes": sum(x.nbytes for f in selected.values() for x in f),
      "bytes_per_part": {n: sum(x.nbytes for x in f) for n, f in selected.items()},
      "bytes_per_dtype": dict(by_dtype)}


def run_show(args: argparse.Namespace) -> int:
  """``flax-ckpt show CKPT``: the tree of each PyTree part, and totals."""
  path = common.norm(args.path)
  steps = [] if common.is_checkpoint(path) else common.steps_of(path)
  if steps:
    raise common.CliError(f"{path} is a directory of steps; show one of them "
                          f"(e.g. {steps[-1].path})")
  selected = _select(flax_ckpt.metadata(path), args.part, args.filter)
  totals = _totals(selected)
  if args.json:
    common.print_json({"checkpoint": path, "leaves": [
        _leaf_json(p, x) for p, f in selected.items() for x in f], "totals": totals})
    return common.OK
  if args.depth is not None:
    rows = [r for p, f in selected.items() for r in _grouped(p, f, args.depth)]
    common.print_table(["subtree", "leaves", "parameters", "size"], rows)
  else:
    common.print_table(["leaf", "type", "shape", "dtype", "size", "sharding"], [
        [p + x.path, x.type, x.shape, x.dtype, common.human_bytes(x.nbytes),
         common.sharding_str(x.meta.sharding) if x.is_array else "-"]
        for p, f in selected.items() for x in f])
  _print_totals(totals)
  return common.OK


def _print_totals(totals: dict[str, Any]) -> None:
  print(f"\ntotal: {totals['leaves']} leaves, {totals['parameters']:,} parameters, "
        f"{common.human_bytes(totals['bytes'])}")
  for title, key in (("per part", "bytes_per_part"), ("per dtype", "bytes_per_dtype")):
    items = ", ".join(f"{k} {common.human_bytes(v)}" for k, v in totals[key].items())
    print(f"  {title}: {items or '-'}")


def add_parsers(sub: Any) -> None:
  """Adds ``ls`` and ``show`` to the subcommands ``sub``."""
  p = common.command(sub, "ls", run_ls,
                     help="list the steps of a directory, or the parts of a checkpoint",
                     description="On a CheckpointManager directory: one row per step (time, "
                     "size, parts, metrics; the latest and best steps marked). On a "
                     "checkpoint: its parts with kinds and sizes.",
                     example=LS_EXAMPLE)
  p.add_argument("path", help="a directory of steps or a checkpoint (local, gs://, s3://)")
  p = common.command(sub, "show", run_show,
                     help="the tree of a checkpoint: shapes, dtypes, sizes",
                     description="The leaves of a checkpoint's PyTree parts with shapes, "
                     "dtypes, sizes, saved shardings and types, and totals. Reads metadata "
                     "only, never array data.",
                     example=SHOW_EXAMPLE)
  p.add_argument("path", help="a checkpoint")
  p.add_argument("--part", help="only this part (default: every PyTree part)")
  p.add_argument("--depth", type=int, help="sum the subtrees this many keys deep")
  p.add_argument("--filter", help="only the leaves whose path matches this regex")
