"""Pausing Python's cyclic garbage collector while a save or load does its bookkeeping.

Why: the metadata of a tree with many leaves is many small dicts and lists (records, chunk
entries, parsed JSON) that live until the save or load ends. Each one counts towards the
collector's thresholds, so a 10,000-leaf load triggers several *full* collections, and a
full collection walks every object of the process: the user's model, optimizer and data
pipeline too. Measured (10,000 leaves, this repo's CI machine): ``metadata`` 52 -> 19
µs/leaf once it was paused too (saves and loads already were). None of what we allocate
there needs the cycle collector (reference counting frees it); the collector runs as usual
once the section ends.

Only short, CPU-bound sections are paused: planning and recording a save's leaves and
reading a checkpoint (in the caller's thread), and dumping a tree's records to JSON (tens of
milliseconds, also in an async save's commit thread). Never the wait for a background save's
I/O: a training loop running meanwhile keeps its collector. A caller that turned the
collector off itself finds it still off afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # sections currently paused, in any thread
_we_disabled = False  # whether the first of them turned the collector off (it was on)


@contextlib.contextmanager
def paused() -> Iterator[None]:
  """Turns the cyclic collector off for the ``with`` block (nested and concurrent sections
  counted: it comes back on when the last one ends, and only if it was on before).

  Example:
    >>> import gc
    >>> with paused():
    ...   gc.isenabled()
    False
    >>> gc.isenabled()
    True
  """
  global _depth, _we_disabled
  with _lock:
    if _depth == 0:
      _we_disabled = gc.isenabled()
      gc.disable()
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0 and _we_disabled:
        _we_disabled = False
        gc.enable()
