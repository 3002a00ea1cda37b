"""The on-disk format in code: every name, version and record of docs/format.md.

This module is the code twin of ``docs/format.md``: the names of files and directories,
the format versions, the commit marker's manifest and its part entries as dataclasses
with ``to_json``/``from_json``, the records of ``_TREE.json``/``_CHUNKS.p<i>.json`` as
``TypedDict``s, and the one JSON encoding rule every file follows. It imports nothing
else from flax_ckpt but the errors, so every layer can use it.

Example:
  >>> m = Manifest(parts={'state': PartEntry('pytree')}, created_at=1.0)
  >>> Manifest.from_json(m.to_json(), where='ckpt').parts['state'].kind
  'pytree'
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, TypedDict

import numpy as np

from flax_ckpt._src import errors

FORMAT_NAME = "flax_ckpt"
FORMAT_VERSION = 3  # the newest commit marker "version" this flax_ckpt reads and writes
# Version 1: the parts live in the checkpoint directory. Version 2 adds "generation": the
# parts live in that subdirectory (object stores, where nothing can be renamed). Version 3
# adds chunks stored in reused data files (a chunk record's "f", see "Reused bytes"): an
# older reader would read them from the wrong file. A marker is written with the lowest
# version its content needs, so older readers keep reading what they can.
READABLE_VERSIONS = (1, 2, 3)
TREE_VERSION = 1  # _TREE.json's "version"

# checkpoint directory
COMMIT_MARKER = "_CHECKPOINT"  # written last; a directory without it is not a checkpoint
TMP_TAG = ".flax_ckpt-tmp-"  # <name>.flax_ckpt-tmp-<host>-<pid>-<hex>: a save in progress
OLD_TAG = ".flax_ckpt-old-"  # an overwritten or deleted checkpoint on its way out
LOCK_NAME = ".flax_ckpt_owner"  # a CheckpointManager's owner lock in its root directory
# Object stores: a save writes its parts under <checkpoint>/flax_ckpt-gen-<time>-<host>-
# <pid>-<hex>/ and the commit marker names that generation; see "Commit protocol".
GEN_TAG = "flax_ckpt-gen-"
GEN_RE = re.compile(r"flax_ckpt-gen-(\d+)-([A-Za-z0-9._-]+)-(\d+)-([0-9a-f]+)")

# parts
DEFAULT_CHECKPOINTABLE = "state"  # the part flax_ckpt.save writes
ROOT_DIR = "."  # a Checkpointer's single part lives in the checkpoint directory itself
PART_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
KIND_PYTREE, KIND_STATEFUL, KIND_HANDLER = "pytree", "stateful", "handler"

# a PyTree part
TREE_FILE = "_TREE.json"
CHUNKS_PREFIX = "_CHUNKS.p"  # _CHUNKS.p<i>.json: where process i wrote each chunk
LEAVES_DIR = "leaves"  # leaves/<leaf-dir>/: files of handlers that write their own
# a data file (or its segment): data.p<i>.bin, or data.p<i>.r<k>.bin, a data file of an
# earlier checkpoint that this one reuses (a hard link; docs/format.md, "Reused bytes")
DATA_FILE_RE = re.compile(r"data\.p\d+(\.r\d+)?\.bin(\.\d+)?")
REUSED_FILE_RE = re.compile(r"data\.p\d+\.r\d+\.bin")

# checksums (docs/format.md, "Checksums"): XXH3 64-bit, as 16 lowercase hex digits
CHECKSUM_ALGORITHM = "xxh3_64"
CHECKSUM_RE = re.compile(r"[0-9a-f]{16}")
# A chunk's bytes are checksummed in blocks of whole rows (index 0 of the chunk's first
# dimension), so a read of some rows verifies without reading the whole chunk. Writers
# aim at a 16th of the chunk, within these bounds (one row if a row is bigger); readers
# take the block size from the record.
CHECKSUM_BLOCK_BYTES = 1 << 20
CHECKSUM_MIN_BLOCK_BYTES = 64 << 10


DATA_FILE_PREFIX = "data.p"  # every data file's name starts so (reused ones too)


@functools.lru_cache(maxsize=4096)  # asked for every chunk of a load: 10,000 f-strings
def data_file(process_index: int) -> str:
  """``data.p<i>.bin``: the packed array bytes process ``i`` wrote."""
  return f"data.p{process_index}.bin"


def reused_file(process_index: int, k: int) -> str:
  """``data.p<i>.r<k>.bin``: the ``k``-th earlier data file process ``i`` reuses."""
  return f"data.p{process_index}.r{k}.bin"


def chunk_file(chunk: Any) -> str:
  """The data file (name in its part directory) holding a chunk record's bytes: its
  ``f`` (a reused file, format version 3) or else ``data.p<p>.bin``."""
  return chunk.get("f") or data_file(chunk["p"])


def chunks_file(process_index: int) -> str:
  """``_CHUNKS.p<i>.json``: the chunk index of process ``i``."""
  return f"{CHUNKS_PREFIX}{process_index}.json"


# a stateful part: process_<i>-of-<n>.<ext>, one file per process
STATE_FILE_RE = re.compile(r"process_(\d+)-of-(\d+)\.(typed\.json|json|bin)")


def state_file(index: int, count: int, ext: str) -> str:
  """``process_<i>-of-<n>.<ext>``: process ``i``'s ``get_state()`` (ext json|typed.json|bin)."""
  return f"process_{index}-of-{count}.{ext}"


# ---------------------------------------------------------------------------------------
# The JSON rule


def dump_json_bytes(obj: Any, *, compact: bool = True) -> bytes:
  """``obj`` as the UTF-8 JSON every flax_ckpt file holds.

  Raw UTF-8 with surrogatepass: a str holding lone surrogates (e.g. "\\ud800\\udc00" as two
  code points) keeps them as 3-byte sequences. JSON escapes could not tell such a pair
  from the single code point U+10000. NaN and infinities are refused (``ValueError``).
  """
  seps = (",", ":") if compact else None
  return json.dumps(obj, separators=seps, allow_nan=False, ensure_ascii=False).encode(
      "utf-8", "surrogatepass")


MAX_JSON_DEPTH = 5000  # deeper JSON is refused before it is parsed


def _too_deep(raw: bytes) -> bool:
  """Whether ``raw`` nests arrays/objects deeper than MAX_JSON_DEPTH (brackets inside
  strings count too: an upper bound, exact for every file flax_ckpt writes)."""
  if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
    return False  # the common case: too few brackets to nest that deep
  # the brackets alone first (bytes.translate, in C): the running sum then covers a few
  # percent of the file (a 1 MB _TREE.json of 5,000 leaves: 14 -> 4 ms)
  brackets = raw.translate(None, _NOT_BRACKETS)
  step = _BRACKET_STEP[np.frombuffer(brackets, np.uint8)]  # +1 [ {, -1 ] }
  return int(np.cumsum(step, dtype=np.int32).max()) > MAX_JSON_DEPTH


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def load_json_bytes(raw: bytes) -> Any:
  """The inverse of :func:`dump_json_bytes` (raises ``ValueError`` on bad bytes).

  Why the depth check: the C JSON parser recurses per level, and with a raised recursion
  limit a crafted file of 100k nested brackets crashes the interpreter (SIGSEGV)."""
  if _too_deep(raw):
    raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
  return json.loads(raw.decode("utf-8", "surrogatepass"))


def parse_json_object(raw: bytes, where: str) -> dict[str, Any]:
  """A metadata file read from a checkpoint (hostile input) as a JSON object.

  Raises:
    FormatError: naming ``where``, for bytes that are not UTF-8 JSON, JSON nested too deep
      for the parser, or a document that is not an object.
  """
  try:
    doc = load_json_bytes(raw)
  except (ValueError, RecursionError) as e:  # incl. UnicodeDecodeError, JSONDecodeError
    detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
    raise errors.FormatError(f"{where} is not valid JSON ({detail}); the checkpoint is "
                             "damaged, load an earlier one.") from None
  if not isinstance(doc, dict):
    raise errors.FormatError(f"{where}: expected a JSON object, found {type(doc).__name__}; "
                             "the checkpoint is damaged, load an earlier one.")
  return doc


# ---------------------------------------------------------------------------------------
# The commit marker


@dataclasses.dataclass(frozen=True)
class PartEntry:
  """One part in the manifest: its kind and, for some kinds, what wrote it.

  Attributes:
    kind: ``pytree``, ``stateful`` or ``handler`` (or a kind a newer flax_ckpt knows).
    dir: the part's directory relative to the checkpoint, when it is not the part's name
      (``"."`` for a Checkpointer's single part).
    fields: the kind's own fields (``handler`` for a custom handler; ``process_count`` and
      ``type`` for a stateful part), as written.
  """

  kind: str
  dir: str | None = None
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    out = {"kind": self.kind, **self.fields}
    if self.dir is not None:
      out["dir"] = self.dir
    return out

  @classmethod
  def from_json(cls, name: str, d: Any, *, where: str) -> PartEntry:
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
      raise errors.FormatError(f"{where}: part {name!r} has no valid entry in the commit "
                               "marker; the checkpoint is damaged.")
    fields = {k: v for k, v in d.items() if k not in ("kind", "dir")}
    return cls(d["kind"], d.get("dir"), fields)

  def directory(self, name: str, *, where: str) -> str:
    """The part's directory relative to the checkpoint (``"."`` = the checkpoint itself)."""
    d = self.dir if self.dir is not None else name
    if d == ROOT_DIR:
      return d
    if not isinstance(d, str) or not PART_NAME_RE.fullmatch(d):
      raise errors.FormatError(f"{where}: part {name!r} has an invalid directory {d!r}")
    return d


@dataclasses.dataclass(frozen=True)
class Manifest:
  """The commit marker ``_CHECKPOINT``: what a committed checkpoint holds.

  Attributes:
    parts: ``{name: PartEntry}`` in the order the parts were saved.
    custom_metadata: the caller's JSON dict, or None.
    created_at: UNIX time of the commit.
    process_count: how many processes wrote the checkpoint.
    manager: a CheckpointManager's ``{"step", "time", "metrics"}`` record, or None.
    generation: the subdirectory holding the parts (object stores), or None: the
      checkpoint directory itself.
    version: the format version: 3 when a part reuses data files of an earlier
      checkpoint (``reuses``), else 2 with a generation, else 1.
    reuses: a part's chunks refer to reused data files (written as version 3; not
      stored: a reader knows it from the version).
  """

  parts: dict[str, PartEntry]
  custom_metadata: dict[str, Any] | None = None
  created_at: float | None = None
  process_count: int = 1
  manager: dict[str, Any] | None = None
  generation: str | None = None
  version: int = 0  # 0: the version this content needs (2 with a generation, else 1)
  checksums: dict[str, str] | None = None  # {path in the checkpoint: digest}; None: none
  reuses: bool = False

  def __post_init__(self) -> None:
    if not self.version:
      object.__setattr__(self, "version",
                         3 if self.reuses else 2 if self.generation is not None else 1)

  def to_json(self) -> dict[str, Any]:
    out: dict[str, Any] = {
        "format": FORMAT_NAME, "version": self.version,
        "checkpointables": {n: e.to_json() for n, e in self.parts.items()},
        "custom_metadata": self.custom_metadata, "created_at": self.created_at,
        "process_count": self.process_count,
    }
    if self.manager is not None:
      out["manager"] = self.manager
    if self.generation is not None:
      out["generation"] = self.generation
    if self.checksums is not None:
      out["checksums"] = {"algorithm": CHECKSUM_ALGORITHM, "files": self.checksums}
    return out

  def checkpointables(self) -> dict[str, dict[str, Any]]:
    """The parts as recorded (``{name: {"kind": ..., ...}}``)."""
    return {n: e.to_json() for n, e in self.parts.items()}

  @classmethod
  def from_json(cls, d: Any, *, where: str) -> Manifest:
    """Validates a parsed commit marker; ``where`` names the checkpoint in errors."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
      raise errors.FormatError(f"{where}/{COMMIT_MARKER} is not a flax_ckpt commit marker.")
    if d.get("version") not in READABLE_VERSIONS:
      raise errors.FormatError(
          f"{where}: format version {d.get('version')} is not supported (this flax_ckpt "
          f"reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade flax_ckpt.")
    generation = d.get("generation")
    if generation is not None and (d["version"] < 2 or not isinstance(generation, str)
                                   or not GEN_RE.fullmatch(generation)):
      # a hostile marker must not point a read outside the checkpoint
      raise errors.FormatError(f"{where}/{COMMIT_MARKER}: invalid generation "
                               f"{generation!r}; the checkpoint is damaged.")
    parts = d.get("checkpointables")
    if not isinstance(parts, dict):
      raise errors.FormatError(f"{where}: the commit marker lists no checkpointables.")
    custom = d.get("custom_metadata")
    manager = d.get("manager")
    created = d.get("created_at")
    nproc = d.get("process_count", 1)
    return cls(
        checksums=_file_checksums(d.get("checksums"), where),
        parts={n: PartEntry.from_json(n, e, where=where) for n, e in parts.items()},
        custom_metadata=custom if isinstance(custom, dict) else None,
        created_at=float(created) if isinstance(created, (int, float)) else None,
        process_count=nproc if isinstance(nproc, int) else 1,
        manager=manager if isinstance(manager, dict) else None,
        generation=generation, version=d["version"], reuses=d["version"] >= 3)

  @classmethod
  def from_bytes(cls, raw: bytes, *, where: str) -> Manifest:
    return cls.from_json(parse_json_object(raw, f"{where}/{COMMIT_MARKER}"), where=where)


def _file_checksums(d: Any, where: str) -> dict[str, str] | None:
  """The manifest's ``checksums`` (hostile input): None, or ``{relative path: digest}``."""
  if d is None:
    return None
  if not isinstance(d, dict) or not isinstance(d.get("files"), dict):
    raise errors.FormatError(f"{where}/{COMMIT_MARKER}: malformed checksums; the checkpoint "
                             "is damaged.")
  if d.get("algorithm") != CHECKSUM_ALGORITHM:
    raise errors.FormatError(
        f"{where}/{COMMIT_MARKER}: checksum algorithm {d.get('algorithm')!r} is not known to "
        f"this flax_ckpt (knows {CHECKSUM_ALGORITHM}); upgrade flax_ckpt.")
  files = d["files"]
  for k, v in files.items():
    parts = k.split("/")
    if (not isinstance(v, str) or not CHECKSUM_RE.fullmatch(v) or not k
        or any(p in ("", ".", "..") for p in parts)):
      raise errors.FormatError(f"{where}/{COMMIT_MARKER}: malformed checksum entry {k!r}; "
                               "the checkpoint is damaged.")
  return files


# ---------------------------------------------------------------------------------------
# Records of a PyTree part (the one-letter keys are the format; these name them)


class _ChunkRecordOptional(TypedDict, total=False):
  x: list[str]  # checksums of the chunk's blocks (CHECKSUM_RE each), in order
  xb: int  # block size in bytes when there is more than one block (a multiple of a row)
  f: str  # version 3: a reused data file data.p<p>.r<k>.bin holds the bytes (REUSED_FILE_RE)


class ChunkRecord(_ChunkRecordOptional):
  """One chunk of a leaf in ``_CHUNKS.p<i>.json``: a box of the leaf's global array."""

  s: list[int]  # start index of the box
  h: list[int]  # the box's shape
  o: int  # byte offset in data.p<p>.bin (or in ``f``), 64-byte aligned
  n: int  # byte count
  p: int  # the process that wrote it (which data.p<p>.bin, unless ``f`` says another)


class _ChunksFileOptional(TypedDict, total=False):
  segment_bytes: int  # object stores: data.p<i>.bin is stored as segments of this size
  checksum: str  # CHECKSUM_ALGORITHM when the chunks carry checksums ("x")


class ChunksFile(_ChunksFileOptional):
  """``_CHUNKS.p<i>.json``: where process i wrote each chunk, by leaf id (a str).

  With ``segment_bytes`` (object stores) the data file's bytes are the objects
  ``data.p<i>.bin.<k>``, k = 0, 1, ..., each ``segment_bytes`` long but the last.
  """

  process_index: int
  data_file: str
  chunks: dict[str, list[ChunkRecord]]


def segment_file(name: str, k: int) -> str:
  """``<data file>.<k>``: segment ``k`` of a data file stored in segments."""
  return f"{name}.{k}"


class LeafRecord(TypedDict):
  """One leaf in ``_TREE.json``: its key path, its TypeHandler, the handler's record."""

  path: list[list[Any]]  # [[kind, key], ...], kind d|a|i|f
  typestr: str
  record: dict[str, Any]


class TreeFile(TypedDict):
  """``_TREE.json``: the structure (nodes, see docs/format.md) and the leaf records."""

  version: int
  root: dict[str, Any]
  leaves: list[LeafRecord]
