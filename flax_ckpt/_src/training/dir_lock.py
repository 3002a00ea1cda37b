"""One writing CheckpointManager per directory: an owner file with host, pid and heartbeat.

``<root>/.flax_ckpt_owner`` is created exclusively (``O_EXCL``) and holds the owner's host,
pid and start time; its modification time is the owner's heartbeat, refreshed while the
manager is open. A lock is stale, and taken over, when its heartbeat is older than
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

from flax_ckpt._src import errors
from flax_ckpt._src.format import LOCK_NAME
from flax_ckpt._src.io import paths

_held: set[str] = set()  # lock files this process holds
_held_lock = threading.Lock()


class DirectoryLock:
  """Exclusive ownership of a checkpoint directory by this process."""

  def __init__(self, root: str, *, stale_after_s: float = 600.0):
    self.path = os.path.join(root, LOCK_NAME)
    self.stale_after_s = stale_after_s
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

  def _owner(self) -> dict | None:
    try:
      with open(self.path, encoding="utf-8") as f:
        owner = json.load(f)
      owner["_mtime"] = os.stat(self.path).st_mtime
      return owner
    except (FileNotFoundError, ValueError):
      return None

  def _is_stale(self, owner: dict) -> bool:
    if time.time() - owner.get("_mtime", 0.0) > self.stale_after_s:
      return True  # the owner stopped refreshing it (its pid may belong to another process)
    if owner.get("host") == self._me["host"] and isinstance(owner.get("pid"), int):
      if owner["pid"] == self._me["pid"]:
        return not self._held_here()  # our pid, but not our lock: a previous life's
      return not paths.pid_alive(owner["pid"])
    return False

  def _held_here(self) -> bool:
    with _held_lock:
      return os.path.realpath(self.path) in _held

  def acquire(self) -> None:
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        fd = None
      if fd is None:
        owner = self._owner()
        if owner is None:  # vanished or being written: look again
          time.sleep(0.05)
          continue
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
        try:  # stale: take it over (only one taker wins the unlink + O_EXCL race)
          os.unlink(self.path)
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(self._me, f)
      with _held_lock:
        _held.add(os.path.realpath(self.path))
      self._start_heartbeat()
      return
    raise errors.CheckpointError(f"could not take the lock {self.path}; try again")

  def _start_heartbeat(self) -> None:
    interval = max(self.stale_after_s / 4, 0.05)

    def beat():
      while not self._stop.wait(interval):
        self.touch()

    self._thread = threading.Thread(target=beat, name="flax_ckpt_lock", daemon=True)
    self._thread.start()

  def touch(self) -> None:
    try:
      os.utime(self.path)
    except FileNotFoundError:
      pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    with _held_lock:
      _held.discard(os.path.realpath(self.path))
    owner = self._owner()
    if owner and owner.get("host") == self._me["host"] and owner.get("pid") == self._me["pid"]:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
