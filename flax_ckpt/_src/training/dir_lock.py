"""One writing CheckpointManager per directory: an owner file with host, pid and heartbeat.

``<root>/.flax_ckpt_owner`` is created exclusively (``O_EXCL`` locally; a create-only
conditional write on an object store) and holds the owner's host, pid and start time. The
heartbeat, refreshed while the manager is open, is the file's modification time locally
and its ``beat`` field (rewritten with a compare-and-swap) on an object store, where the
clocks of the hosts involved must roughly agree (well within ``stale_after_s``). A lock is
stale, and taken over, when its heartbeat is older than
``stale_after_s`` (an owner that died, on any host), or at once when its owner is a dead
process on this host, or names this very process without this process holding it (a
restarted container that got the same pid).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from flax_ckpt._src import errors
from flax_ckpt._src.format import LOCK_NAME
from flax_ckpt._src.io import observe, paths, storage

_held: set[str] = set()  # lock files this process holds
_held_lock = threading.Lock()


class DirectoryLock:
  """Exclusive ownership of a checkpoint directory by this process."""

  def __init__(self, root: str, *, stale_after_s: float = 600.0):
    self.path = os.path.join(root, LOCK_NAME)
    self.stale_after_s = stale_after_s
    self._backend = storage.backend_for(root)
    self._key = paths.canonical(self.path)
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    self._version: Any = None
    self._acquired = False

  def _content(self) -> bytes:
    return json.dumps({**self._me, "beat": time.time()}).encode()

  def _owner(self) -> tuple[dict, Any] | None:
    """The owner record (with ``_beat``, its last heartbeat) and the lock's version."""
    got = self._backend.read_versioned(self.path)
    if got is None:
      return None
    try:
      owner = json.loads(got[0])
    except ValueError:
      return None
    if not isinstance(owner, dict):
      return None
    # locally the file's mtime is the heartbeat; on an object store, its "beat" field
    beat = self._backend.modified_at(got[1])
    owner["_beat"] = beat if beat is not None else float(owner.get("beat") or 0.0)
    return owner, got[1]

  def _is_stale(self, owner: dict) -> bool:
    if time.time() - owner.get("_beat", 0.0) > self.stale_after_s:
      return True  # the owner stopped refreshing it (its pid may belong to another process)
    if owner.get("host") == self._me["host"] and isinstance(owner.get("pid"), int):
      if owner["pid"] == self._me["pid"]:
        return not self._held_here()  # our pid, but not our lock: a previous life's
      return not paths.pid_alive(owner["pid"])
    return False

  def _held_here(self) -> bool:
    with _held_lock:
      return self._key in _held

  def acquire(self) -> None:
    for _ in range(3):
      if self._backend.create_exclusive(self.path, self._content()):
        self._took()
        return
      found = self._owner()
      if found is None:  # vanished or being written: look again
        time.sleep(0.05)
        continue
      owner, version = found
      self._refuse_live(owner)
      # stale: take it over; of several takers only one wins the conditional replace
      if self._backend.replace_if(self.path, self._content(), version):
        observe.child("manager").info(
            "took over the stale lock %s (owner host %s, pid %s, last heartbeat %.0f s ago)",
            self.path, owner.get("host"), owner.get("pid"),
            time.time() - owner.get("_beat", 0.0))
        self._took()
        return
    raise errors.CheckpointError(f"could not take the lock {self.path}; try again")

  def _refuse_live(self, owner: dict) -> None:
    """Raises the clear error when ``owner`` is alive."""
    if (owner.get("host") == self._me["host"] and owner.get("pid") == self._me["pid"]
        and self._held_here()):
      raise errors.CheckpointError(
          f"{os.path.dirname(self.path)} is already managed by another open "
          f"CheckpointManager in this process (host {owner.get('host')}, pid "
          f"{owner.get('pid')}); close it first (or use read_only=True).")
    if not self._is_stale(owner):
      since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
      raise errors.CheckpointError(
          f"{os.path.dirname(self.path)} is in use by another CheckpointManager (host "
          f"{owner.get('host')}, pid {owner.get('pid')}, since {since}). Only one job may "
          "write a checkpoint directory: stop that job, open this one with "
          f"read_only=True, or, if that owner is gone, delete {self.path}.")

  def _took(self) -> None:
    self._acquired = True
    found = self._owner()
    self._version = found[1] if found is not None else None
    with _held_lock:
      _held.add(self._key)
    self._start_heartbeat()

  def _start_heartbeat(self) -> None:
    interval = max(self.stale_after_s / 4, 0.05)

    def beat():
      while not self._stop.wait(interval):
        self.touch()

    self._thread = threading.Thread(target=beat, name="flax_ckpt_lock", daemon=True)
    self._thread.start()

  def touch(self) -> None:
    """Refreshes the heartbeat (a no-op once another process took the lock over)."""
    if self._version is None:
      return
    try:
      self._version = self._backend.heartbeat(self.path, self._content(), self._version)
    except OSError:
      pass  # a transient storage error: the next beat tries again

  def ensure_held(self) -> None:
    """Raises CheckpointError unless this process still owns the lock (checked now, in
    the storage), and refreshes the heartbeat. A manager that was paused for longer than
    ``stale_after_s`` may have been replaced by another job: it must not write or delete
    anything there any more."""
    found = self._owner() if self._version is not None else None
    mine = found is not None and all(found[0].get(k) == v for k, v in self._me.items())
    if not mine:
      self._version = None
      who = ("nobody holds it now" if found is None else
             f"host {found[0].get('host')}, pid {found[0].get('pid')} holds it now")
      raise errors.CheckpointError(
          f"{os.path.dirname(self.path)}: this CheckpointManager lost its owner lock "
          f"({who}; its heartbeat was older than lock_stale_after_s={self.stale_after_s} "
          "s, e.g. the process was paused, so another job took the directory over). "
          "Nothing was saved or deleted; close this manager.")
    self.touch()

  def release(self) -> None:
    """Lets go of the lock, if this object took it (a refused open releases nothing)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if not self._acquired:
      return
    self._acquired = False
    with _held_lock:
      _held.discard(self._key)
    found = self._owner()
    if found and all(found[0].get(k) == v for k, v in self._me.items()):
      self._backend.remove_file(self.path)
