"""Planning done once per tree structure: the next save of the same structure reuses it.

Why: a training loop saves a tree of the same structure, leaf types, shapes, dtypes and
shardings again and again. For a tree of many small arrays, recording every leaf and
dumping ``_TREE.json`` and the chunk index as JSON cost as much as writing the bytes
(about 15 µs a leaf, measured on 5,000 arrays of 4-64 KiB: docs/design.md, "Scale"). A
save whose structure equals an earlier save's (in this process) takes that save's
``_TREE.json`` bytes as they are, and its chunk index as a template in which only the
checksums of the new bytes are filled in; per leaf it only checks the signature and hands
the bytes to the writer. The files it writes are byte for byte the files a full save
would have written (the tests compare them). The two most recent structures are kept, if
they fit in 128 MiB (a tree of 100,000 leaves keeps ~83 MiB; a larger one is not cached).

What "the same" means (everything a leaf record and the chunk layout depend on): the
encoded tree structure (``root``: containers, keys, node types and their order), the key
paths, the handler of every leaf (the built-in ``jax.Array`` / ``np.ndarray`` handler
only: anything else always takes the full path), and per leaf its shape, dtype, sharding
and weak type. Any difference is a miss: the save is planned in full and becomes the
entry. A hit also checks that every chunk landed at its recorded offset; if not, the
index is dumped in full. Single-process saves only. A save that refers to an earlier
checkpoint's unchanged bytes (the manager's ``reuse_unchanged``) reuses ``_TREE.json``
too, but makes its chunk records per chunk (they refer to earlier files) and dumps its
index in full.

Example:
  >>> fill([b'[', b',', b']'], [(0, 8), (64, 8)], {0: (8, ['a']), 64: (8, ['b'])})
  b'[["a"],["b"]]'
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any

import jax
import numpy as np

from flax_ckpt._src.leaves.arrays import ArrayHandler

_MAX_ENTRIES = 2  # a training loop saves one or two structures (train state, EMA, ...)
_MAX_BYTES = 128 << 20  # memory kept over all entries, at most
# what an entry keeps per leaf besides the file bytes (key paths, signatures, encoded
# structure), measured with tracemalloc: a 100,000-leaf tree keeps ~83 MiB in all
_BYTES_PER_LEAF = 700
_MARK = "@flax_ckpt_x{}@"  # stands for a chunk's checksums in the template; no other
_MARK_RE = re.compile(rb'\["@flax_ckpt_x\d+@"\]')  # string of the chunk index looks like it


@dataclasses.dataclass
class Key:
  """What a save's leaf records and chunk layout depend on."""

  root: dict
  keypaths: list
  handlers: list
  sigs: list

  def same(self, other: Key) -> bool:
    # handlers compare by identity (no __eq__); the rest as values, in C
    return (len(self.sigs) == len(other.sigs) and self.handlers == other.handlers
            and self.sigs == other.sigs and self.keypaths == other.keypaths
            and self.root == other.root)


@dataclasses.dataclass
class Entry:
  """The planned files of a saved structure."""

  key: Key
  tree_bytes: bytes  # _TREE.json
  # (offset, nbytes) of every chunk, in index order, and the chunk index around each
  # non-empty chunk's checksums; None from a save that reused unchanged bytes (its chunk
  # records refer to earlier files: no template for the next save)
  chunks: list[tuple[int, int]] | None
  pieces: list[bytes] | None
  segment_bytes: Any

  def size(self) -> int:
    """About the memory this entry keeps."""
    return (len(self.tree_bytes) + sum(len(p) for p in self.pieces or ())
            + _BYTES_PER_LEAF * len(self.key.sigs))


_lock = threading.Lock()
_entries: list[Entry] = []


@dataclasses.dataclass
class Stats:
  """Test instrumentation: saves that found their structure here (``hits``), and those
  of them whose chunks were not where planned, so their index was dumped in full."""

  hits: int = 0
  full_index: int = 0


STATS = Stats()


def _sig(value: Any) -> tuple:
  if isinstance(value, jax.Array):
    return (value.shape, value.dtype, value.sharding, value.weak_type)
  return (value.shape, value.dtype)


def key_for(root: dict, leaves: list, handlers: list) -> Key | None:
  """The key of a planned tree, or None when it cannot take the cached path."""
  if not all(type(h) is ArrayHandler for h in handlers):
    return None  # PRNG keys, scalars, strings, custom handlers: always planned in full
  if not all(isinstance(v, (jax.Array, np.ndarray)) for _, v in leaves):
    return None
  return Key(root, [p for p, _ in leaves], list(handlers), [_sig(v) for _, v in leaves])


def lookup(key: Key) -> Entry | None:
  with _lock:
    for i, e in enumerate(_entries):
      if e.key.same(key):
        _entries.insert(0, _entries.pop(i))  # most recently used first
        STATS.hits += 1
        return e
  return None


def remember(entry: Entry) -> None:
  """Keeps ``entry`` (replacing one of the same key), dropping the least recently used
  beyond :data:`_MAX_ENTRIES` or :data:`_MAX_BYTES`."""
  with _lock:
    kept: list[Entry] = []
    total = 0
    for e in [entry] + [e for e in _entries if not e.key.same(entry.key)]:
      if len(kept) == _MAX_ENTRIES or total + e.size() > _MAX_BYTES:
        break
      kept.append(e)
      total += e.size()
    _entries[:] = kept


def clear() -> None:
  """Forgets every cached structure (tests)."""
  with _lock:
    _entries.clear()


def mark(k: int) -> list[str]:
  """The placeholder of the ``k``-th non-empty chunk's checksums in a template."""
  return [_MARK.format(k)]


def split(index_bytes: bytes) -> list[bytes]:
  """A chunk index dumped with :func:`mark` placeholders, as the pieces around them."""
  return _MARK_RE.split(index_bytes)


def fill(pieces: list[bytes], chunks: list[tuple[int, int]],
         sums: dict[int, tuple[int, list[str]]]) -> bytes:
  """The chunk index: ``pieces`` with each non-empty chunk's checksums (``"x"``, and
  ``"xb"`` for several blocks, as ``pytree_io`` writes them) between them."""
  out = [pieces[0]]
  k = 1
  for off, n in chunks:
    if not n:
      continue
    xb, digests = sums[off]
    out.append(('["' + '","'.join(digests) + '"]').encode())
    if len(digests) > 1:
      out.append(b',"xb":%d' % xb)
    out.append(pieces[k])
    k += 1
  return b"".join(out)
