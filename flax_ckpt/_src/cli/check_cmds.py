"""``flax-ckpt verify`` and ``flax-ckpt diff``: the commands whose exit status is a check
(1 when the checkpoint is damaged, or the two checkpoints differ).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import numpy as np

import flax_ckpt
from flax_ckpt._src.cli import common
from flax_ckpt._src.format import KIND_PYTREE

VERIFY_EXAMPLE = """example:
  $ flax-ckpt verify /ckpts/run1
  /ckpts/run1/100: OK; 4 files, 12 chunks, 1288.5 MB checked in 0.91 s
  /ckpts/run1/200: 1 problem(s); 4 files, 12 chunks, 1288.5 MB checked in 0.93 s
    /ckpts/run1/200/state/data.p0.bin (part 'state' leaf ['params']['w']): ...
  $ echo $?
  1
"""

DIFF_EXAMPLE = """example:
  $ flax-ckpt diff /ckpts/run1/100 /ckpts/run1/200 --values --atol 1e-6
  values differ: state['params']['w']  max abs 0.0312  max rel 0.0421
  1 leaves differ beyond atol 1e-06, 3 bitwise equal, 1 close
  $ echo $?
  1
"""


def _report_json(report: flax_ckpt.VerifyReport) -> dict[str, Any]:
  return {"path": report.path, "ok": report.ok, "has_checksums": report.has_checksums,
          "problems": [dataclasses.asdict(p) for p in report.problems],
          "files_checked": report.files_checked, "chunks_checked": report.chunks_checked,
          "bytes_checked": report.bytes_checked, "seconds": report.seconds}


def run_verify(args: argparse.Namespace) -> int:
  """``flax-ckpt verify PATH``: ``flax_ckpt.verify`` of a checkpoint, or of every step."""
  path = common.norm(args.path)
  # every committed step, those whose commit marker is damaged too: verify reports them
  targets = [path] if common.is_checkpoint(path) else [p for _, p in common.step_entries(path)]
  if not targets:
    raise common.nothing_there(path)
  reports = [flax_ckpt.verify(t) for t in targets]
  ok = all(r.ok for r in reports)
  if args.json:
    common.print_json({"ok": ok, "checkpoints": [_report_json(r) for r in reports]})
  else:
    for r in reports:
      print(r)
    if len(reports) > 1:
      bad = sum(not r.ok for r in reports)
      print(f"{len(reports)} checkpoints, {bad} with problems")
  return common.OK if ok else common.FAILED


# ---------------------------------------------------------------------------------------
# diff


@dataclasses.dataclass
class _Diff:
  """What ``diff`` found, as it prints it."""

  structure: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  values: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  bitwise_equal: int = 0
  close: int = 0  # not bitwise equal, but within atol

  def differ(self) -> bool:
    return bool(self.structure) or any(v["differs"] for v in self.values)


def _leaf_map(md: Any) -> dict[str, dict[str, common.Leaf]]:
  """``{part: {leaf path: leaf}}`` of the PyTree parts."""
  return {n: {x.path: x for x in common.leaves(md.parts.get(n))}
          for n, e in md.checkpointables.items() if e.get("kind") == KIND_PYTREE}


def _compare_structure(a: Any, b: Any, out: _Diff) -> None:
  for name in [n for n in a.checkpointables if n not in b.checkpointables]:
    out.structure.append({"part": name, "leaf": "", "what": "only in A"})
  for name in [n for n in b.checkpointables if n not in a.checkpointables]:
    out.structure.append({"part": name, "leaf": "", "what": "only in B"})
  for name in [n for n in a.checkpointables if n in b.checkpointables]:
    ka, kb = a.checkpointables[name].get("kind"), b.checkpointables[name].get("kind")
    if ka != kb:
      out.structure.append({"part": name, "leaf": "", "what": f"kind {ka} != {kb}"})
  la, lb = _leaf_map(a), _leaf_map(b)
  for name in [n for n in la if n in lb]:
    for path in [p for p in la[name] if p not in lb[name]]:
      out.structure.append({"part": name, "leaf": path, "what": "only in A"})
    for path in [p for p in lb[name] if p not in la[name]]:
      out.structure.append({"part": name, "leaf": path, "what": "only in B"})
    for path in [p for p in la[name] if p in lb[name]]:
      x, y = la[name][path], lb[name][path]
      for attr in ("type", "shape", "dtype"):
        if getattr(x, attr) != getattr(y, attr):
          out.structure.append({"part": name, "leaf": path,
                                "what": f"{attr} {getattr(x, attr)} != {getattr(y, attr)}"})


def _value_diff(x: Any, y: Any, atol: float) -> dict[str, Any]:
  """One leaf pair's comparison (arrays as numpy, other leaves by ``==``)."""
  if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
    try:
      same = bool(x == y)
    except Exception:  # noqa: BLE001 - an odd type's == : compare its repr
      same = repr(x) == repr(y)
    return {"bitwise_equal": same, "max_abs": None, "max_rel": None, "differs": not same}
  if x.shape != y.shape:
    return {"bitwise_equal": False, "max_abs": None, "max_rel": None, "differs": True}
  bitwise = x.dtype == y.dtype and x.tobytes() == y.tobytes()
  if bitwise or x.size == 0:
    return {"bitwise_equal": bitwise, "max_abs": 0.0, "max_rel": 0.0, "differs": False}
  try:
    fx, fy = _as_float(x), _as_float(y)
  except (TypeError, ValueError):  # e.g. strings, objects: no distance, just unequal
    return {"bitwise_equal": False, "max_abs": None, "max_rel": None, "differs": True}
  with np.errstate(all="ignore"):  # inf - inf: handled below, not a warning
    d = np.abs(fx - fy)
  d[(fx == fy) | (np.isnan(fx) & np.isnan(fy))] = 0.0  # equal infs, NaN on both sides
  max_abs = float("inf") if np.isnan(d).any() else float(d.max())  # NaN on one side
  # relative to the largest finite magnitude on either side: one number per leaf, stable
  # where elementwise ratios blow up at zeros
  scale = float(max(np.abs(np.where(np.isfinite(v), v, 0)).max() for v in (fx, fy)))
  max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
  return {"bitwise_equal": False, "max_abs": max_abs, "max_rel": max_rel,
          "differs": not max_abs <= atol}


def _as_float(x: np.ndarray) -> np.ndarray:
  """``x`` in a dtype wide enough to subtract exactly enough (bfloat16, ints, bools ...)."""
  return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _compare_values(pa: str, pb: str, part: str, out: _Diff, atol: float) -> None:
  """Loads part ``part`` of both checkpoints as numpy (one part at a time, so at most two
  parts are in memory) and compares the leaves present in both."""
  va = flax_ckpt.load_checkpointables(pa, {part: None}, restore_type=np.ndarray)[part]
  vb = flax_ckpt.load_checkpointables(pb, {part: None}, restore_type=np.ndarray)[part]
  fa = dict(_flat(va))
  for path, y in _flat(vb):
    if path not in fa:
      continue
    r = _value_diff(fa[path], y, atol)
    out.bitwise_equal += r["bitwise_equal"]
    out.close += not r["bitwise_equal"] and not r["differs"]
    if not r["bitwise_equal"]:
      out.values.append({"part": part, "leaf": path, **r})


def _flat(tree: Any) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(tuple(k)), v) for k, v in flat]


def run_diff(args: argparse.Namespace) -> int:
  """``flax-ckpt diff A B``: structure, shapes and dtypes; with ``--values`` the values."""
  pa, pb = common.norm(args.a), common.norm(args.b)
  ma, mb = flax_ckpt.metadata(pa), flax_ckpt.metadata(pb)
  out = _Diff()
  _compare_structure(ma, mb, out)
  if args.values:
    for name in [n for n in _leaf_map(ma) if n in _leaf_map(mb)]:
      _compare_values(pa, pb, name, out, args.atol)
  if args.json:
    common.print_json({"a": pa, "b": pb, "differ": out.differ(), "structure": out.structure,
                       "values": out.values if args.values else None,
                       "bitwise_equal": out.bitwise_equal if args.values else None,
                       "close": out.close if args.values else None, "atol": args.atol})
  else:
    _print_diff(out, args)
  return common.FAILED if out.differ() else common.OK


def _print_diff(out: _Diff, args: argparse.Namespace) -> None:
  for s in out.structure:
    print(f"{s['part']}{s['leaf']}: {s['what']}")
  for v in out.values:
    nums = ("" if v["max_abs"] is None else
            f"  max abs {v['max_abs']:.6g}  max rel {v['max_rel']:.6g}")
    word = "differs" if v["differs"] else "close"
    print(f"{word}: {v['part']}{v['leaf']}{nums}")
  if args.values:
    n = sum(v["differs"] for v in out.values)
    print(f"{n} leaves differ beyond atol {args.atol:g}, {out.bitwise_equal} bitwise equal, "
          f"{out.close} close")
  print("the checkpoints differ" if out.differ() else "no differences")


def add_parsers(sub: Any) -> None:
  """Adds ``verify`` and ``diff`` to the subcommands ``sub``."""
  p = common.command(sub, "verify", run_verify,
                     help="check every checksum and invariant (exit 1 on a problem)",
                     description="flax_ckpt.verify of a checkpoint, or of every step of a "
                     "directory: every problem is listed; exit status 1 on any.",
                     example=VERIFY_EXAMPLE)
  p.add_argument("path", help="a checkpoint or a directory of steps")
  p = common.command(sub, "diff", run_diff,
                     help="compare two checkpoints (exit 1 when they differ)",
                     description="Structure, shape and dtype differences; with --values, "
                     "each leaf's max absolute and relative difference, and the number of "
                     "bitwise-equal leaves. Exit 1 when they differ (beyond --atol).",
                     example=DIFF_EXAMPLE)
  p.add_argument("a", help="the first checkpoint")
  p.add_argument("b", help="the second checkpoint")
  p.add_argument("--values", action="store_true", help="compare the values too (reads them)")
  p.add_argument("--atol", type=float, default=0.0,
                 help="values within this absolute difference count as equal (default 0)")
