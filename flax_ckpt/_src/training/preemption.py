"""Noticing preemption: a chained SIGTERM handler, and JAX's multi-host sync point."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from flax_ckpt._src.io import multihost


class SigtermWatcher:
  """Sets a flag on SIGTERM and then calls the handler that was installed before.

  Only a Python-level previous handler is chained: the default action (terminate) is
  replaced, so the training loop can save and exit cleanly. ``uninstall`` puts the previous
  handler back. Installing needs the main thread; elsewhere the watcher stays passive.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous: Callable[[int, FrameType | None], Any] | int | None = None
    self._installed = False

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
    if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
      prev(signum, frame)

  @property
  def installed(self) -> bool:
    return self._installed

  @property
  def triggered(self) -> bool:
    return self._event.is_set()

  def uninstall(self) -> None:
    if not self._installed:
      return
    self._installed = False
    if threading.current_thread() is threading.main_thread():
      if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
        signal.signal(signal.SIGTERM,
                      self._previous if self._previous is not None else signal.SIG_DFL)


_shared: SigtermWatcher | None = None
_users = 0
_shared_lock = threading.Lock()


def acquire_watcher() -> SigtermWatcher:
  """The process-wide watcher; installed by the first user, uninstalled by the last.

  One handler for all managers, so closing them in any order puts back exactly the
  handler that was there before the first one opened.
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
    _users += 1
    return _shared


def release_watcher(w: SigtermWatcher) -> None:
  global _users
  with _shared_lock:
    if w is not _shared or _users == 0:
      return
    _users -= 1
    if _users == 0:
      w.uninstall()


def reached(step: int, watcher: SigtermWatcher) -> bool:
  """Whether the job is being preempted: after SIGTERM (single process), or at JAX's
  multi-host preemption sync point (all processes agree on the step)."""
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
