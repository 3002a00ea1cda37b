"""Unchanged bytes are never written twice: chunks equal to the previous checkpoint's.

Why: fine-tuning with frozen base weights, EMA copies and embedding tables repeat most of
their bytes at every save. When an array chunk of a save has exactly the bytes of the
same chunk (same leaf path, dtype, start and shape) of the previous checkpoint of the
same manager directory, the new checkpoint hard-links that checkpoint's data file into
its own part directory (``data.p<i>.r<k>.bin``) and its chunk record points there
(``"f"``, format version 3; docs/format.md, "Reused bytes") instead of writing the bytes
again. A hard link keeps every checkpoint self-contained: readers, copies and deletion
see an ordinary file, and deleting the old checkpoint (retention) leaves the new one
whole. Local files only; object stores write every byte (no hard links there).

Identity is decided by the chunk's checksums, which the previous checkpoint already
records per block (XXH3-64, at more than 10 GB/s): the first block is hashed first, so a
changed chunk costs one block's hash (at most 1 MiB); an unchanged one is hashed whole,
on the hash pool. Cheaper still, a ``jax.Array`` is immutable: when a save is given the
very array object (still alive) whose chunk checksums an earlier save of this process
computed, those checksums are its bytes' and nothing is hashed (frozen weights kept
outside the train step's outputs). A reused file of which less than half would be
referenced is not kept (its chunks are written anew), so reuse never more than doubles
the disk space a checkpoint keeps alive.

Example:
  >>> key_of((("d", "w"),), "float32", (0,), (4,))
  ((('d', 'w'),), 'float32', (0,), (4,))
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from flax_ckpt._src.format import ChunkRecord, chunk_file, reused_file
from flax_ckpt._src.io import observe, storage
from flax_ckpt._src.io.storage import checksums

_log = observe.child("save")

ChunkKey = tuple[tuple, str, tuple[int, ...], tuple[int, ...]]

# id(jax.Array) -> (weak reference, {(dtype, start, shape): (block bytes, checksums)}):
# the checksums saves of this process computed for live arrays (entries leave with them)
_KNOWN: dict[int, tuple[weakref.ref, dict[tuple, tuple[int, list[str]]]]] = {}
_KNOWN_LOCK = threading.Lock()


def _forget(ref: weakref.ref, key: int) -> None:
  with _KNOWN_LOCK:
    entry = _KNOWN.get(key)
    if entry is not None and entry[0] is ref:
      del _KNOWN[key]


def _known_sums(value: Any, key: tuple) -> tuple[int, list[str]] | None:
  entry = _KNOWN.get(id(value))
  if entry is None or entry[0]() is not value:
    return None
  return entry[1].get(key)


def _remember(value: Any, key: tuple, xb: int, digests: list[str]) -> None:
  """Records the checksums of a chunk of the (immutable) jax array ``value``."""
  with _KNOWN_LOCK:
    key_id = id(value)
    entry = _KNOWN.get(key_id)
    if entry is None or entry[0]() is not value:
      try:
        ref = weakref.ref(value, lambda r: _forget(r, key_id))
      except TypeError:
        return
      entry = _KNOWN[key_id] = (ref, {})
    entry[1][key] = (xb, digests)


def key_of(keypath: Sequence[Sequence[Any]], dtype: str, start: Sequence[int],
           shape: Sequence[int]) -> ChunkKey:
  """The identity of a chunk across saves: leaf path, stored dtype, start and shape."""
  return (tuple(tuple(e) for e in keypath), dtype, tuple(start), tuple(shape))


@dataclasses.dataclass
class PreviousChunks:
  """The checksummed array chunks of one PyTree part of a committed checkpoint.

  Attributes:
    part_dir: the part's directory in that checkpoint.
    chunks: ``{chunk key: its record}``.
    files: ``{data file name: (st_dev, st_ino)}`` when the index was read, so a file
      replaced since (a checkpoint deleted and saved again) is never linked.
  """

  part_dir: str = ""
  chunks: dict[ChunkKey, Any] = dataclasses.field(default_factory=dict)  # ChunkRecords
  files: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def previous_chunks(part_dir: str, leaves: Sequence[Any],
                    chunks: dict[int, list[ChunkRecord]]) -> PreviousChunks | None:
  """The reusable chunks of a part already read and validated (``_TREE.json``'s leaves
  and the merged chunk index): checksummed chunks of built-in array leaves in regular
  data files. None when there are none."""
  out: dict[ChunkKey, Any] = {}
  files: dict[str, tuple[int, int]] = {}
  for i, leaf in enumerate(leaves):
    dtype = leaf["record"].get("dtype")
    if leaf["typestr"] not in ("jax.Array", "np.ndarray") or not isinstance(dtype, str):
      continue
    for c in chunks.get(i, ()):
      if not c.get("x") or not c["n"]:
        continue
      name = chunk_file(c)
      if name not in files:
        try:
          st = os.lstat(os.path.join(part_dir, name))
        except OSError:
          continue
        if not stat.S_ISREG(st.st_mode):
          continue
        files[name] = (st.st_dev, st.st_ino)
      out[key_of(leaf["path"], dtype, c["s"], c["h"])] = c
  return PreviousChunks(part_dir, out, files) if out else None


@dataclasses.dataclass
class _Link:
  """An earlier data file linked into the new part directory, and who refers to it."""

  name: str
  size: int
  used: int = 0
  chunks: list = dataclasses.field(default_factory=list)  # (record, host buffer)


def _first_block_same(view: memoryview, old: Any) -> bool:
  """Whether ``view``'s first block has the checksum ``old`` records for it (for a chunk
  of one block: whether the whole chunk is the same)."""
  return checksums.digest(view[:old.get("xb", old["n"])]) == old["x"][0]


class ChunkReuse:
  """One process's reuse of a :class:`PreviousChunks` in one save of a part.

  Args:
    previous: the earlier checkpoint's chunks of this part (empty: the first save, which
      only notes the checksums of the jax arrays it writes, for the next one).
    part_dir: the new checkpoint's part directory (its temporary one).
    process_index: this process (its reused files are ``data.p<i>.r<k>.bin``).
    backend: the storage backend (its ``link_file`` makes the links).
    background: an async save: the checks run at the background threads' priority.
  """

  def __init__(self, previous: PreviousChunks, part_dir: str, process_index: int,
               backend: Any, background: bool = False):
    self._background = background
    self._prev = previous
    self._dir = part_dir
    self._pid = process_index
    self._backend = backend
    self._links: dict[str, _Link | None] = {}  # earlier file name -> its link (None: none)
    self._arrays: list[tuple[Any, tuple, ChunkRecord]] = []  # jax arrays' chunks to note
    self._pending: list[tuple[ChunkRecord, np.ndarray, Any, Any]] = []  # see reuse()
    self.reused_bytes = 0

  def reuse(self, value: Any, keypath: Any, dtype: str, start: Sequence[int],
            host: np.ndarray) -> ChunkRecord | None:
    """The record of ``host`` (the chunk of leaf ``value`` at ``keypath`` that starts at
    ``start``) when it may be the earlier chunk's bytes; None: write it now.

    A returned record is completed by :meth:`settle`: it refers to the earlier bytes if
    they are the same (the rest of its blocks are checked on the hash pool meanwhile),
    or the bytes go to the writer then."""
    key = (dtype, tuple(start), tuple(host.shape))
    old = self._prev.chunks.get((tuple(tuple(e) for e in keypath), *key))
    if old is None or old["n"] != host.nbytes:
      return None
    known = _known_sums(value, key)
    check = None
    if known is None or known != (old.get("xb", old["n"]), old["x"]):
      view = storage.as_bytes_view(host)
      if not _first_block_same(view, old):
        return None  # changed (most chunks of a training run): written at once
      if len(old["x"]) > 1:  # the other blocks: on the pool while the next leaves go on
        check = checksums.check_later(view, old["xb"], old["x"], self._background)
    # else: the same immutable array whose checksums these are: nothing to hash
    rec: ChunkRecord = {"s": list(start), "h": list(host.shape), "o": 0, "n": old["n"],
                        "p": self._pid}
    self._pending.append((rec, host, old, check))
    self.note(value, key, rec)
    return rec

  def _resolve(self, writer: Any) -> None:
    """Completes the records :meth:`reuse` returned: linked, or written."""
    for rec, host, old, check in self._pending:
      link = None
      if check is None or check():
        link = self._link(chunk_file(old))
      if link is None or old["o"] + old["n"] > link.size:  # changed, unlinkable, truncated
        rec["o"], _ = writer.add(host)
        continue
      rec.update({"o": old["o"], "f": link.name, "x": old["x"]})  # pyright: ignore[reportCallIssue,reportArgumentType]  # ChunkRecord keys
      if "xb" in old:
        rec["xb"] = old["xb"]
      link.used += old["n"]
      link.chunks.append((rec, host))
      self.reused_bytes += old["n"]
    self._pending = []

  def note(self, value: Any, key: tuple, record: ChunkRecord) -> None:
    """Remembers, once the save's checksums are known, those of a jax array's chunk."""
    if not isinstance(value, np.ndarray):  # numpy arrays are mutable: never by identity
      self._arrays.append((value, key, record))

  def _link(self, name: str) -> _Link | None:
    """The earlier file ``name`` linked into the new part directory (once)."""
    if name in self._links:
      return self._links[name]
    link = None
    dst = os.path.join(self._dir, reused_file(self._pid, len(self._links)))
    try:
      if self._backend.link_file(os.path.join(self._prev.part_dir, name), dst):
        st = os.lstat(dst)
        if (st.st_dev, st.st_ino) == self._prev.files.get(name):
          link = _Link(os.path.basename(dst), st.st_size)
        else:  # replaced since its index was read: not the bytes the index describes
          os.unlink(dst)
    except OSError as e:  # deleted meanwhile, another filesystem, too many links: write
      _log.debug("cannot reuse %s (%s); writing its chunks", name, e)
    self._links[name] = link
    return link

  def settle(self, writer: Any) -> None:
    """Before the chunk index is written: completes every record :meth:`reuse` returned
    (linked, or its bytes added to ``writer``); then a reused file of which less than
    half is referred to is dropped and its chunks go to ``writer`` too (the space bound).
    The caller's buffers are released."""
    self._resolve(writer)
    for link in self._links.values():
      if link is None:
        continue
      if link.used * 2 < link.size:
        for rec, host in link.chunks:
          rec["o"], _ = writer.add(host)
          for field in ("f", "x", "xb"):  # the writer checksums what it writes
            rec.pop(field, None)  # pyright: ignore[reportGeneralTypeIssues]  # optional keys
        self.reused_bytes -= link.used
        os.unlink(os.path.join(self._dir, link.name))
      link.chunks = []

  def remember(self) -> None:
    """After the chunk records have their checksums: notes them for the jax arrays they
    came from, so the next save of the same arrays hashes nothing."""
    for value, key, rec in self._arrays:
      digests = rec.get("x")
      if digests:
        _remember(value, key, rec.get("xb", rec["n"]), digests)
    self._arrays = []
