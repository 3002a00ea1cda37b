"""Writing the array leaves of a save whose structure was saved before.

A save that finds its structure in ``parts/save_cache.py`` already knows every leaf's
record (``_TREE.json`` is reused as it is), so per leaf only the bytes go to the writer:
no record, no ParamInfo, no handler call. The chunks land where :func:`arrays.save_array`
would have put them (same leaves, same order, same writer), so the files are byte for
byte those of a full save.

Example:
  >>> import numpy as np
  >>> class Writer:  # what a data file writer gives: (offset, nbytes)
  ...   def add(self, host):
  ...     return 4096, host.nbytes
  >>> leaf = np.arange(4, dtype=np.int32)
  >>> write_known_leaves([(0, (("d", "w"),), leaf)], Writer(), False, str)
  [(0, (0,), (4,), 4096, 16)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flax_ckpt._src.encoding import dtypes
from flax_ckpt._src.format import ChunkRecord
from flax_ckpt._src.leaves import reuse as reuse_lib
from flax_ckpt._src.leaves.arrays import check_alive, cpu_only, host_chunks, start_host_copies


def _host_views(leaves: Sequence[tuple[int, Any, Any]], is_async: bool,
                path_str: Callable[[Any], str]):
  """(leaf index, key path, value, start, host buffer) of every chunk to write, in the
  order :func:`arrays.save_array` writes them (device->host copies all started first)."""
  if not cpu_only():
    start_host_copies([v for _, _, v in leaves])
  for i, keypath, v in leaves:
    numpy = isinstance(v, np.ndarray)
    if not numpy:
      check_alive(v, lambda keypath=keypath: path_str(keypath))
    for start, host in host_chunks(v, copy=is_async and numpy):
      yield i, keypath, v, start, dtypes.little_endian(host)


def write_known_leaves(leaves: Sequence[tuple[int, Any, Any]], writer: Any, is_async: bool,
                       path_str: Callable[[Any], str]) -> list[tuple]:
  """Adds the chunks of array leaves whose records are already known to ``writer``.

  ``leaves``: (leaf index, key path, value) of ``jax.Array`` / ``np.ndarray`` leaves of a
  single-process save, in the order the handlers would have written them. Returns
  ``(leaf index, start, shape, offset, nbytes)`` per chunk, in that order: the offsets
  and bytes :func:`arrays.save_array` would have given them.
  """
  out = []
  for i, _, _, start, host in _host_views(leaves, is_async, path_str):
    off, n = writer.add(host)
    out.append((i, start, host.shape, off, n))
  return out


def write_known_leaves_reusing(leaves: Sequence[tuple[int, Any, Any]], writer: Any,
                               reuse: reuse_lib.ChunkReuse, process_index: int,
                               is_async: bool, path_str: Callable[[Any], str]
                               ) -> dict[str, list[ChunkRecord]]:
  """:func:`write_known_leaves` for a save that refers to the previous checkpoint's bytes
  where they are unchanged (``leaves/reuse.py``): each chunk goes through ``reuse`` as in
  :func:`arrays.save_array`. Returns the chunk records by leaf id (as the index lists
  them: by leaf), completed by ``reuse.settle`` and the checksums later.
  """
  by_leaf: dict[int, list[ChunkRecord]] = {}
  names: dict[Any, str] = {}  # dtype -> its stored name (as in the leaf's record)
  for i, keypath, v, start, host in _host_views(leaves, is_async, path_str):
    name = names.get(v.dtype)
    if name is None:
      name = names[v.dtype] = dtypes.dtype_name(np.dtype(v.dtype))
    records = by_leaf.setdefault(i, [])
    same = reuse.reuse(v, keypath, name, start, host)
    if same is not None:
      records.append(same)
      continue
    off, n = writer.add(host)
    records.append({"s": list(start), "h": list(host.shape), "o": off, "n": n,
                    "p": process_index})
    reuse.note(v, (name, tuple(start), tuple(host.shape)), records[-1])
  return {str(i): by_leaf[i] for i in sorted(by_leaf)}
