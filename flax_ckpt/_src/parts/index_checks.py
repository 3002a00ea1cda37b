"""Reading a tree part's metadata files (hostile input): ``_TREE.json`` and every
``_CHUNKS.p<i>.json``, each value checked before anything uses it.

Why the checks are written as flat loops over ``type(x) is ...``: they run once per leaf
and per chunk of every load, and with 5000 small leaves nested ``all()`` generators cost
as much as reading the bytes.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath

from flax_ckpt._src import errors
from flax_ckpt._src.format import (
  CHECKSUM_ALGORITHM,
  CHECKSUM_RE,
  CHUNKS_PREFIX,
  REUSED_FILE_RE,
  TREE_FILE,
  TREE_VERSION,
  ChunkRecord,
  parse_json_object,
)
from flax_ckpt._src.io import storage
from flax_ckpt._src.tree import treespec


def read_tree(files: storage.CheckpointDir, cp_dir: epath.Path) -> dict:
  """``_TREE.json``, validated as far as the structure decoder relies on it."""
  where = os.fspath(cp_dir / TREE_FILE)
  try:
    tree = parse_json_object(files.read_bytes(TREE_FILE), where)
  except FileNotFoundError as e:
    raise errors.FormatError(f"{cp_dir} has no {TREE_FILE}; the checkpoint is damaged.") from e
  if tree.get("version") != TREE_VERSION:
    raise errors.FormatError(
        f"{where}: tree format version {tree.get('version')} is not supported by this "
        f"flax_ckpt (knows {TREE_VERSION}); upgrade flax_ckpt.")
  leaves = tree.get("leaves")
  if not isinstance(tree.get("root"), dict) or not isinstance(leaves, list) or not all(
      type(leaf) is dict and _path_ok(leaf.get("path"))
      and type(leaf.get("typestr")) is str and type(leaf.get("record")) is dict
      for leaf in leaves):
    raise errors.FormatError(f"{where}: malformed tree (root, leaves, or a leaf's path, "
                             "typestr or record); the checkpoint is damaged.")
  treespec.check_structure(tree["root"], len(leaves), where)
  return tree


_KINDS = frozenset(("d", "a", "i", "f"))


def _path_ok(path: Any) -> bool:
  """A leaf path: a list of ``[kind, key]`` (kind d/a/i/f, key a str or an int)."""
  if type(path) is not list:
    return False
  for e in path:  # a loop, not nested all(): this runs for every leaf of every load
    if type(e) is not list or len(e) != 2 or type(e[0]) is not str or e[0] not in _KINDS:
      return False
    k = type(e[1])
    if k is not str and k is not int:  # JSON makes no int subclasses; bool is refused
      return False
  return True


def _reused_ok(name: Any) -> bool:
  """A chunk's ``f`` is absent or names a reused data file of this part directory (a
  crafted one must not point a read at another file or outside the checkpoint)."""
  return name is None or (isinstance(name, str) and REUSED_FILE_RE.fullmatch(name) is not None)


_MAX_COUNT = 1 << 62  # offsets, sizes and indexes beyond this are crafted (and overflow)


def _is_count(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < _MAX_COUNT


def _sums_ok(c: dict, summed: bool) -> bool:
  """A chunk's checksums (``x``, ``xb``) are absent, or one well-formed digest per block."""
  x = c.get("x")
  if x is None:
    return "xb" not in c
  if summed and type(x) is list and len(x) == 1 and "xb" not in c:  # one block: most chunks
    d = x[0]
    return type(d) is str and CHECKSUM_RE.fullmatch(d) is not None
  n, h, xb = c["n"], c["h"], c.get("xb", c["n"])
  row = n // h[0] if h and h[0] else n  # blocks are whole rows
  return (summed and isinstance(x, list) and _is_count(xb) and xb > 0
          and (xb >= n or (row > 0 and xb % row == 0)) and len(x) == max(1, -(-n // xb))
          and all(isinstance(d, str) and CHECKSUM_RE.fullmatch(d) for d in x))


def _counts(xs: Any) -> bool:
  """A list of counts (type(x) is int: JSON makes no int subclasses, and it excludes bool).
  A loop: ~0.5 us less than ``all()`` over a generator, twice per chunk of every load."""
  if type(xs) is not list:
    return False
  for x in xs:
    if type(x) is not int or not 0 <= x < _MAX_COUNT:
      return False
  return True


def _chunk_ok(c: Any, summed: bool) -> bool:
  """One chunk record of a ``_CHUNKS`` file (hostile input) is well-formed. Written out
  flat: it runs once per chunk of every load."""
  if type(c) is not dict:
    return False
  o, n, p = c.get("o"), c.get("n"), c.get("p")
  if not (type(o) is int and type(n) is int and type(p) is int
          and 0 <= o < _MAX_COUNT and 0 <= n < _MAX_COUNT and 0 <= p < _MAX_COUNT
          and _counts(c.get("s")) and _counts(c.get("h"))):
    return False
  return _sums_ok(c, summed) and ("f" not in c or _reused_ok(c["f"]))


def read_chunk_index(files: storage.CheckpointDir, cp_dir: epath.Path, n_leaves: int
                      ) -> tuple[dict[int, list[ChunkRecord]], dict[int, int]]:
  """Every ``_CHUNKS.p<i>.json``, merged by leaf id; and each process's segment size."""
  chunks: dict[int, list[ChunkRecord]] = {}
  segments: dict[int, int] = {}
  for name in sorted(files.listdir()):
    if not (name.startswith(CHUNKS_PREFIX) and name.endswith(".json")):
      continue
    where = os.fspath(cp_dir / name)
    data = parse_json_object(files.read_bytes(name), where)
    by_leaf = data.get("chunks")
    if not isinstance(by_leaf, dict) or not _is_count(data.get("process_index")):
      raise errors.FormatError(f"{where}: malformed chunk index; the checkpoint is damaged.")
    summed = data.get("checksum")
    if summed is not None and summed != CHECKSUM_ALGORITHM:
      raise errors.FormatError(
          f"{where}: checksum algorithm {summed!r} is not known to this flax_ckpt (knows "
          f"{CHECKSUM_ALGORITHM}); upgrade flax_ckpt.")
    for k, v in by_leaf.items():
      leaf = int(k) if isinstance(k, str) and k.isdigit() else -1
      if not 0 <= leaf < n_leaves or type(v) is not list or not all(
          _chunk_ok(c, summed is not None) for c in v):
        raise errors.FormatError(f"{where}: leaf id {k!r} is out of range or its chunk "
                                 "records are malformed; the checkpoint is damaged.")
      chunks.setdefault(leaf, []).extend(v)
    seg = data.get("segment_bytes")
    if seg is not None:
      if not _is_count(seg) or not 4096 <= seg <= (1 << 30):
        raise errors.FormatError(f"{where}: invalid segment_bytes {seg!r}; the checkpoint "
                                 "is damaged.")
      segments[data["process_index"]] = seg
  return chunks, segments
