"""A local checkpoint's data files as object-store segments, for ``flax-ckpt cp``.

A save to an object store writes each data file as segment objects
(``data.p<i>.bin.<k>``, ``segment_bytes`` long each but the last) and records the size in
the chunk index (``_CHUNKS.p<i>.json``, see docs/format.md); a local save writes one file.
Readers of either storage read either layout, so a copy could keep the local one, but one
object per data file would hold a process's whole share of the checkpoint in one upload
(and in memory). Copied to an object store, a local data file (and every reused data file its
chunks refer to) is split as a save there would split it, and its chunk index gains
``segment_bytes``; the manifest's checksum of
that index is updated to match. Nothing else changes.

Example:
  >>> segment_ranges(10, 4)
  [(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Any

from flax_ckpt._src.format import (
    CHUNKS_PREFIX,
    DATA_FILE_RE,
    KIND_PYTREE,
    REUSED_FILE_RE,
    ROOT_DIR,
    Manifest,
    dump_json_bytes,
    parse_json_object,
    segment_file,
)
from flax_ckpt._src.io import storage
from flax_ckpt._src.io.storage import checksums


@dataclasses.dataclass
class Resegmenting:
  """What a copy to an object store writes differently.

  Attributes:
    rewritten: ``{chunk index path: its new bytes}`` (with ``segment_bytes``).
    segmented: the data files written as segments (paths in the checkpoint).
    segment_bytes: the segment size.
    checksums: the manifest's checksums, those of the rewritten indexes updated.
  """

  rewritten: dict[str, bytes]
  segmented: set[str]
  segment_bytes: int
  checksums: dict[str, str] | None


def segment_ranges(size: int, segment_bytes: int) -> list[tuple[int, int]]:
  """``(start, end)`` of each segment of a file of ``size`` bytes."""
  return [(lo, min(lo + segment_bytes, size)) for lo in range(0, size, segment_bytes)]


def _pytree_dirs(manifest: Manifest) -> list[str]:
  """The directories (relative, ``""`` for the checkpoint itself) of the PyTree parts."""
  out = []
  for name, entry in manifest.parts.items():
    if entry.kind == KIND_PYTREE:
      d = entry.directory(name, where="the source")
      out.append("" if d == ROOT_DIR else d)
  return out


def plan(manifest: Manifest, base: str, files: list[str], segment_bytes: int
         ) -> Resegmenting:
  """Which chunk indexes of the checkpoint at ``base`` (its files ``files``) to rewrite
  and which data files to split, for a copy to an object store."""
  out = Resegmenting({}, set(), segment_bytes,
                     None if manifest.checksums is None else dict(manifest.checksums))
  listed = set(files)
  backend = storage.backend_for(base)
  for d in _pytree_dirs(manifest):
    for rel in [f for f in files if posixpath.dirname(f) == d]:
      name = posixpath.basename(rel)
      if not (name.startswith(CHUNKS_PREFIX) and name.endswith(".json")):
        continue
      index: dict[str, Any] = parse_json_object(backend.read_bytes(posixpath.join(base, rel)),
                                                rel)
      data = index.get("data_file")
      data_rel = posixpath.join(d, data) if isinstance(data, str) else ""
      if index.get("segment_bytes") or not DATA_FILE_RE.fullmatch(str(data)) or (
          data_rel not in listed):
        continue  # already segments, or not a layout this knows: copied as it is
      new = dump_json_bytes({**index, "segment_bytes": segment_bytes})
      out.rewritten[rel] = new
      out.segmented.add(data_rel)
      out.segmented.update(f for f in _reused_files(index, d) if f in listed)
      if out.checksums is not None and rel in out.checksums:
        out.checksums[rel] = checksums.digest(new)
  return out


def _reused_files(index: dict[str, Any], d: str) -> set[str]:
  """The reused data files (``f``, format version 3) the chunks of ``index`` refer to:
  segmented with the index's own data file, whose ``segment_bytes`` they share."""
  chunks = index.get("chunks")
  found = {c.get("f") for v in (chunks.values() if isinstance(chunks, dict) else ())
           if isinstance(v, list) for c in v if isinstance(c, dict)}
  return {posixpath.join(d, f) for f in found
          if isinstance(f, str) and REUSED_FILE_RE.fullmatch(f)}


def write_segments(source: str, target: str, segment_bytes: int) -> int:
  """Writes the local file ``source`` as the segment objects of ``target``; its size.
  One segment at a time is held in memory."""
  dst = storage.backend_for(target)
  size = os.path.getsize(source)
  with open(source, "rb") as f:
    for k, (lo, hi) in enumerate(segment_ranges(size, segment_bytes)):
      f.seek(lo)
      dst.write_bytes(segment_file(target, k), f.read(hi - lo), fsync=False)
  return size
