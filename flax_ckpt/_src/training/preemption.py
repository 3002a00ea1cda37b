"""Noticing preemption: a chained SIGTERM handler, and JAX's multi-host sync point.

What SIGTERM does while a (writable) manager is open depends on the loop and on the handler
that was installed before:

- A Python handler of the program's own: flag, then that handler is called (as before).
- ``SIG_IGN``: the program chose to ignore SIGTERM; flag only, the process never ends
  because of it.
- The default action (or a handler installed outside Python), once any manager of the
  process was asked :meth:`reached_preemption`: flag only. The loop saves and exits by
  itself (exit status 0).
- The default action, in a loop that never asked (a port from a library without that
  call): the process still ends by SIGTERM. The next ``save`` is forced, waited for, and
  then the default action ends the process (status -15). Without a save within the grace
  period (``sigterm_grace_s``) it ends then, after any save in flight has committed.

Multi-process (``jax.distributed``): JAX owns SIGTERM and feeds its preemption sync point;
the manager leaves the handler alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from flax_ckpt._src.io import multihost

# Set by the first reached_preemption() call of the process: the loop checks for preemption
# and ends itself, so SIGTERM only sets the flag.
_loop_checks = threading.Event()


class SigtermWatcher:
  """Sets a flag on SIGTERM and then calls the handler that was installed before.

  A previous Python handler is chained; with the default action before, the process is made
  to end after its next save (see the module docstring). ``uninstall`` puts the previous
  handler back. Installing needs the main thread; elsewhere the watcher stays passive.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous: Callable[[int, FrameType | None], Any] | int | None = None
    self._installed = False
    self._graces: list[float] = []
    self._ending = threading.Event()  # SIGTERM must end the process after the next save
    self._ending_save_started = False
    self._cv = threading.Condition()
    self._saves = 0  # saves in flight in this process (snapshot to commit)

  def install(self) -> bool:
    if threading.current_thread() is not threading.main_thread():
      return False
    self._previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True
    return True

  def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
    self._event.set()
    prev = self._previous
    if prev == signal.SIG_IGN:
      return
    if callable(prev) and prev != signal.SIG_DFL:
      prev(signum, frame)
      return
    if not _loop_checks.is_set() and not self._ending.is_set():
      self._ending.set()
      grace = min(self._graces, default=30.0)
      threading.Thread(target=self._end_after_grace, args=(grace,), daemon=True,
                       name="flax_ckpt-sigterm-grace").start()

  def _end_after_grace(self, grace_s: float) -> None:
    """The grace timer: ends the process ``grace_s`` after SIGTERM, once no save is in
    flight (a save that started is let commit, so the step it holds is kept)."""
    time.sleep(grace_s)
    if not self._ending.is_set():
      return  # the loop asked reached_preemption() in time: it ends itself
    self.wait_for_saves()
    end_process()

  def wait_for_saves(self) -> None:
    """Blocks until no save of this process is in flight (each commits or fails)."""
    with self._cv:
      self._cv.wait_for(lambda: self._saves == 0)

  def add_grace(self, grace_s: float) -> None:
    self._graces.append(grace_s)

  def remove_grace(self, grace_s: float) -> None:
    if grace_s in self._graces:
      self._graces.remove(grace_s)

  @property
  def installed(self) -> bool:
    return self._installed

  @property
  def triggered(self) -> bool:
    return self._event.is_set()

  @property
  def ending(self) -> bool:
    """Whether SIGTERM was received in a loop that never asked ``reached_preemption``: the
    next save is forced and the process then ends."""
    return self._ending.is_set()

  def loop_checks(self) -> None:
    """Records that the loop asks ``reached_preemption``: SIGTERM only sets the flag from
    now on, and one received before, whose save has not started, no longer ends the
    process (the loop that asks ends itself)."""
    _loop_checks.set()
    with self._cv:
      if not self._ending_save_started:
        self._ending.clear()

  def save_started(self, ending: bool) -> None:
    """A save (``ending``: the one after SIGTERM) begins; the grace timer waits for it."""
    with self._cv:
      self._saves += 1
      self._ending_save_started |= ending

  def save_finished(self) -> None:
    with self._cv:
      self._saves -= 1
      self._cv.notify_all()

  def uninstall(self) -> None:
    if not self._installed:
      return
    self._installed = False
    if threading.current_thread() is threading.main_thread():
      if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
        signal.signal(signal.SIGTERM,
                      self._previous if self._previous is not None else signal.SIG_DFL)


def end_process() -> None:
  """Ends this process by SIGTERM's default action (exit status -15), from any thread."""
  sys.stdout.flush()
  sys.stderr.flush()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  else:
    # signal.signal only works in the main thread, which may be busy for long; libc's
    # signal() sets the default action from any thread.
    try:
      libc = ctypes.CDLL(None)
      libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
      libc.signal(int(signal.SIGTERM), None)  # SIG_DFL is 0
    except (OSError, AttributeError):
      os._exit(128 + signal.SIGTERM)
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(10)  # the signal is delivered at once; this only runs if it was blocked
  os._exit(128 + signal.SIGTERM)


_shared: SigtermWatcher | None = None
_users = 0
_shared_lock = threading.Lock()


def acquire_watcher(grace_s: float = 30.0) -> SigtermWatcher:
  """The process-wide watcher; installed by the first user, uninstalled by the last.

  One handler for all managers, so closing them in any order puts back exactly the
  handler that was there before the first one opened. ``grace_s`` is the user's
  ``sigterm_grace_s``; the shortest of the open managers' applies.
  """
  global _shared, _users
  with _shared_lock:
    if _shared is None or _users == 0:
      _shared = SigtermWatcher()
    # jax.distributed installs its own (C-level, invisible to Python) SIGTERM handler that
    # feeds the preemption sync point; flax_ckpt must then leave SIGTERM alone and ask the
    # sync point (see ``reached``).
    if not _shared.installed and not multihost.distributed_initialized():
      _shared.install()  # (no-op off the main thread: a later main-thread user installs it)
    _shared.add_grace(grace_s)
    _users += 1
    return _shared


def release_watcher(w: SigtermWatcher, grace_s: float = 30.0) -> None:
  global _users
  with _shared_lock:
    if w is not _shared or _users == 0:
      return
    _users -= 1
    w.remove_grace(grace_s)
    if _users == 0:
      w.uninstall()


def reached(step: int, watcher: SigtermWatcher) -> bool:
  """Whether the job is being preempted: after SIGTERM (single process), or at JAX's
  multi-host preemption sync point (all processes agree on the step)."""
  watcher.loop_checks()
  if multihost.distributed_initialized():  # then JAX owns SIGTERM (see acquire_watcher)
    return jax_sync_point_reached(step)
  return watcher.triggered


def jax_sync_point_reached(step: int) -> bool:
  """JAX's multi-host preemption sync point (False when the service is not running)."""
  try:
    from jax.experimental import multihost_utils

    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # noqa: BLE001 - no distributed runtime / no preemption service
    return False
