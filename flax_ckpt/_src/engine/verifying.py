"""``flax_ckpt.verify``: read a whole checkpoint and check everything, listing every problem.

A load stops at the first damaged byte it reads; ``verify`` goes on and reports them all:
the commit marker, every file against the checksum the marker records, every PyTree
part's tree and chunk index (shapes, dtypes, chunk boxes, byte counts, file lengths), and
every array chunk against its block checksums. It reads every byte once, a staging buffer
at a time (bounded memory), and never builds a value: nothing in the checkpoint is run.

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'w': np.ones(1000)})
  >>> report = flax_ckpt.verify(path)
  >>> bool(report), report.problems
  (True, [])
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.engine.loading import (
    CommittedCheckpoint,
    part_files,
    read_committed,
    refuse_outside_links,
)
from flax_ckpt._src.format import (
    CHUNKS_PREFIX,
    KIND_HANDLER,
    KIND_PYTREE,
    LEAVES_DIR,
    ROOT_DIR,
    STATE_FILE_RE,
    TREE_FILE,
    chunk_file,
)
from flax_ckpt._src.io import paths, storage
from flax_ckpt._src.leaves.arrays import ARRAY_TYPESTRS, check_array_record
from flax_ckpt._src.leaves.chunk_reads import ReadPlan, chunks_tile
from flax_ckpt._src.parts import pytree_io
from flax_ckpt._src.tree import treespec


@dataclasses.dataclass(frozen=True)
class Problem:
  """One thing :func:`verify` found wrong.

  Attributes:
    file: the file concerned (or the checkpoint directory).
    message: what is wrong.
    part: the part it belongs to ("" for the checkpoint as a whole).
    leaf: the leaf path ("" when not about one leaf).
  """

  file: str
  message: str
  part: str = ""
  leaf: str = ""

  def __str__(self) -> str:
    where = " ".join(x for x in (f"part {self.part!r}" if self.part else "",
                                 f"leaf {self.leaf}" if self.leaf else "") if x)
    return f"{self.file}{f' ({where})' if where else ''}: {self.message}"


@dataclasses.dataclass
class VerifyReport:
  """What :func:`verify` found. Falsy when there is any problem.

  Attributes:
    path: the checkpoint verified.
    problems: every problem found, in the order found (empty: the checkpoint is sound).
    has_checksums: whether the checkpoint carries checksums; one saved by a flax_ckpt
      before checksums existed can only be checked for structure and file lengths. None
      when its commit marker could not be read.
    files_checked: files compared against their checksums.
    chunks_checked: array chunks read and compared against their checksums.
    bytes_checked: bytes read and checksummed.
    seconds: how long the verification took.
  """

  path: str
  problems: list[Problem] = dataclasses.field(default_factory=list)
  has_checksums: bool | None = None
  files_checked: int = 0
  chunks_checked: int = 0
  bytes_checked: int = 0
  seconds: float = 0.0

  def __bool__(self) -> bool:
    return not self.problems

  @property
  def ok(self) -> bool:
    """No problem found (the same as ``bool(report)``)."""
    return not self.problems

  def add(self, file: Any, message: str, part: str = "", leaf: str = "") -> None:
    self.problems.append(Problem(os.fspath(file), message, part, leaf))

  def __str__(self) -> str:
    head = (f"{self.path}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}; "
            f"{self.files_checked} files, {self.chunks_checked} chunks, "
            f"{self.bytes_checked / 1e6:.1f} MB checked in {self.seconds:.2f} s")
    lines = [head]
    if self.has_checksums is False:
      lines.append("  no checksums: saved by a flax_ckpt without them; only the structure "
                   "and file lengths were checked")
    lines += [f"  {p}" for p in self.problems]
    return "\n".join(lines)


def verify_checkpoint(path: paths.PathLike) -> VerifyReport:
  """:func:`flax_ckpt.verify`'s engine."""
  t0 = time.perf_counter()

  def read(ckpt: CommittedCheckpoint) -> VerifyReport:
    report = VerifyReport(os.fspath(ckpt.path), has_checksums=ckpt.manifest.checksums
                          is not None)
    for name, entry in ckpt.manifest.parts.items():
      try:
        part_dir = ckpt.part_dir(name)
        refuse_outside_links(ckpt, name)  # before a byte of the part is read
      except errors.FormatError as e:
        report.add(ckpt.path, str(e), name)
        continue
      _check_files(ckpt, name, report)
      if entry.kind == KIND_PYTREE:
        _check_tree(part_dir, name, report)
    _check_unlisted(ckpt, report)
    return report

  try:
    report = read_committed(path, read)
  except errors.FormatError as e:  # the commit marker itself is damaged
    report = VerifyReport(os.fspath(paths.to_path(path)))
    report.add(report.path, str(e))
  report.seconds = time.perf_counter() - t0
  return report


def _check_files(ckpt: CommittedCheckpoint, part: str, report: VerifyReport) -> None:
  """Every file of ``part`` the marker lists, against its checksum."""
  want = part_files(ckpt, part)
  if not want:
    return
  base = ckpt.path if ckpt.manifest.generation is None else ckpt.path / ckpt.manifest.generation
  got = storage.backend_for(base).file_digests(os.fspath(base), list(want))
  for rel, digest in want.items():
    report.files_checked += 1
    if got.get(rel) is None:
      report.add(base / rel, "missing (listed in the commit marker)", part)
    elif got[rel] != digest:
      report.add(base / rel, "its bytes do not match their checksum (damaged)", part)


def _check_unlisted(ckpt: CommittedCheckpoint, report: VerifyReport) -> None:
  """Files the save did not write (or wrote under another name): a checksummed
  checkpoint lists every file but its data files, whose chunks carry their own."""
  sums = ckpt.manifest.checksums
  if sums is None:
    return
  base = ckpt.path if ckpt.manifest.generation is None else ckpt.path / ckpt.manifest.generation
  data_dirs = {e.directory(n, where=os.fspath(ckpt.path)) for n, e in
               ckpt.manifest.parts.items() if e.kind != KIND_HANDLER}  # handlers: any files
  for rel in storage.backend_for(base).list_files(os.fspath(base)):
    head, _, name = rel.rpartition("/")
    in_leaves = f"/{LEAVES_DIR}/" in f"/{head}/"
    if rel in sums or ((head or ROOT_DIR) not in data_dirs and not in_leaves):
      continue  # listed, or not where a reader looks (a user's notes, a blob cache)
    if name == TREE_FILE or name.startswith(CHUNKS_PREFIX) or in_leaves or (
        STATE_FILE_RE.fullmatch(name)):
      report.add(base / rel, "a file readers use that the save did not write (its commit "
                 "marker has no checksum for it): added or renamed after the commit")


def _check_tree(part_dir: Any, part: str, report: VerifyReport) -> None:
  """A PyTree part: its metadata, every leaf's structure, every chunk's bytes."""
  try:
    saved = pytree_io.read_saved_tree(part_dir)
  except (errors.FormatError, OSError, errors.CheckpointReplacedError) as e:
    report.add(part_dir, str(e), part)
    return
  try:
    plan = ReadPlan(os.fspath(part_dir), saved.files, saved.backend, saved.segments)
    dead: set[str] = set()  # data files that cannot be read: reported once
    for i, leaf in enumerate(saved.leaves):
      name = treespec.path_str(leaf["path"])
      chunks = saved.chunks.get(i, [])
      if _leaf_structure(plan, name, leaf, chunks, part, report):
        for c in chunks:
          _check_chunk(plan, c, name, part, report, dead)
  finally:
    saved.close()


def _leaf_structure(plan: ReadPlan, name: str, leaf: Any, chunks: list[Any], part: str,
                    report: VerifyReport) -> bool:
  """Checks a leaf's record against its chunks and the files; whether to read them."""
  record = leaf["record"]
  try:
    key = ARRAY_TYPESTRS.get(leaf["typestr"])
    if key is not None:  # a built-in array leaf: its record must be well formed
      check_array_record(record, name, plan.state_dir, key)
      if not chunks_tile(chunks, record["shape"]):
        raise errors.FormatError(f"leaf {name}: its chunks do not tile its shape "
                                 f"{record['shape']}")
    plan.check_extents([(name, record, chunks)])
  except OSError as e:  # a missing or short data file: reported once, not once per leaf
    file = os.fspath(getattr(e, "path", None) or e.filename or plan.state_dir)
    if not any(p.file == file for p in report.problems):
      what = ("missing" if isinstance(e, FileNotFoundError) else f"truncated ({e})")
      report.add(file, f"{what}: the data file of this leaf and maybe others", part, name)
    return False
  except (errors.FormatError, TypeError) as e:
    report.add(plan.state_dir, str(e), part, name)
    return False
  return True


def _check_chunk(plan: ReadPlan, c: Any, name: str, part: str, report: VerifyReport,
                 dead: set[str]) -> None:
  f = chunk_file(c)
  if "x" not in c or f in dead:
    return
  file = os.path.join(plan.state_dir, f)
  try:
    bad = plan.verify_chunk(c)
  except OSError as e:
    dead.add(f)
    report.add(file, f"cannot be read ({e})", part, name)
    return
  report.chunks_checked += 1
  report.bytes_checked += c["n"]
  if bad:
    xb = c.get("xb", c["n"])
    report.add(file, f"{len(bad)} of {len(c['x'])} checksum block(s) of the chunk at index "
               f"{c['s']} differ (first: bytes {c['o'] + bad[0] * xb}.."
               f"{min(c['o'] + (bad[0] + 1) * xb, c['o'] + c['n'])})", part, name)
