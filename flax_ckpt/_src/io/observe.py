"""Logging, progress reports and ``jax.monitoring`` metrics, for layer 2 and above.

The library logs through Python ``logging`` under the ``flax_ckpt`` logger (children
``flax_ckpt.save``, ``flax_ckpt.load``, ``flax_ckpt.manager``, ``flax_ckpt.multihost``).
It only adds a ``NullHandler`` and never configures the root logger: records propagate to
whatever the program set up (``absl.logging``'s handler sits on the root logger, so absl
programs show the INFO lines). Durations and bytes also go to ``jax.monitoring``, under the
event names of docs/design.md ("Logging, progress and metrics").

Hot paths only add to counters (:class:`Counter`: one locked add per leaf placed and per
batch written); a :class:`Progress` timer thread reads them when an operation runs long.

Example:
  >>> from flax_ckpt._src.io import observe
  >>> c = observe.Counter()
  >>> c.plan(2 << 20); c.add_done(1 << 20)
  >>> observe.progress_text(c.done, c.planned, 2.0)
  '1.0 MiB of 2.0 MiB (50%), 0.5 MiB/s'
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import jax.monitoring

logger = logging.getLogger("flax_ckpt")
# a library adds no handler of its own but this one: without any configured handler,
# Python's last-resort handler would print WARNINGs to stderr in programs that chose silence
logger.addHandler(logging.NullHandler())

PROGRESS_ENV = "FLAX_CKPT_PROGRESS_S"
_FIRST_S, _EVERY_S = 5.0, 10.0

# the jax.monitoring event names (documented in docs/design.md)
SAVE_DURATION = "/flax_ckpt/save/duration_secs"
SAVE_BYTES = "/flax_ckpt/save/bytes"
SAVE_BLOCKING = "/flax_ckpt/save/blocking_secs"
LOAD_DURATION = "/flax_ckpt/load/duration_secs"
LOAD_BYTES = "/flax_ckpt/load/bytes"
BARRIER_DURATION = "/flax_ckpt/barrier/duration_secs"


def child(name: str) -> logging.Logger:
  """The ``flax_ckpt.<name>`` logger (propagates to ``flax_ckpt``)."""
  return logger.getChild(name)


class Counter:
  """Bytes one operation plans to move and has moved, added to from any thread."""

  def __init__(self) -> None:
    self.planned = 0
    self.done = 0
    self._lock = threading.Lock()

  def plan(self, nbytes: int) -> None:
    with self._lock:
      self.planned += nbytes

  def add_done(self, nbytes: int) -> None:
    with self._lock:
      self.done += nbytes


_current: contextvars.ContextVar[Counter | None] = contextvars.ContextVar(
    "flax_ckpt_counter", default=None)


@contextlib.contextmanager
def counting(counter: Counter) -> Iterator[Counter]:
  """Makes ``counter`` the one data writers created in this context add to."""
  token = _current.set(counter)
  try:
    yield counter
  finally:
    _current.reset(token)


def current_counter() -> Counter | None:
  """The counter of the operation running in this context, if any (captured by writers
  when they are created, since they write from their own threads)."""
  return _current.get()


def mib(nbytes: float) -> str:
  return f"{nbytes / (1 << 20):.1f} MiB"


def rate(nbytes: float, secs: float) -> str:
  """Throughput as text (MiB/s)."""
  return f"{nbytes / (1 << 20) / max(secs, 1e-9):.1f} MiB/s"


def progress_text(done: int, total: int | None, secs: float) -> str:
  """``done of total (pct), rate``: what a progress line says."""
  if total:
    return f"{mib(done)} of {mib(total)} ({100 * done // max(total, 1)}%), {rate(done, secs)}"
  return f"{mib(done)}, {rate(done, secs)}"


def progress_intervals() -> tuple[float, float]:
  """(first delay, interval) of progress lines, from ``$FLAX_CKPT_PROGRESS_S``
  (``first[,every]``; default 5 s then every 10 s; ``0`` turns them off)."""
  raw = os.environ.get(PROGRESS_ENV, "").strip()
  if not raw:
    return _FIRST_S, _EVERY_S
  try:
    vals = [float(x) for x in raw.split(",")]
  except ValueError:
    return _FIRST_S, _EVERY_S
  return vals[0], vals[1] if len(vals) > 1 else vals[0]


class Progress:
  """A timer thread that logs ``message()`` at INFO while an operation runs long.

  Nothing happens for operations shorter than the first delay (the thread only waits on an
  event), so a hang is visible in the logs without noise from quick saves.
  """

  def __init__(self, log: logging.Logger, message: Callable[[float], str]):
    self._log, self._message = log, message
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.start_time = time.monotonic()

  def __enter__(self) -> Progress:
    return self.start()

  def __exit__(self, *exc: object) -> None:
    self.stop()

  def start(self) -> Progress:
    """Starts the timer (once the operation began; :meth:`stop` ends it)."""
    first, every = progress_intervals()
    if first > 0 and self._log.isEnabledFor(logging.INFO):
      self._thread = threading.Thread(target=self._run, args=(first, max(every, 0.01)),
                                      name="flax_ckpt_progress", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the timer and waits for its thread (no line is logged after this)."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    self._thread = None

  def _run(self, first: float, every: float) -> None:
    wait = first
    while not self._stop.wait(wait):
      try:
        self._log.info("%s", self._message(time.monotonic() - self.start_time))
      except Exception:  # noqa: BLE001 - a progress line must never break the operation
        return
      wait = every


@contextlib.contextmanager
def phase(log: logging.Logger, what: str, name: str) -> Iterator[None]:
  """Logs at DEBUG how long phase ``name`` of ``what`` took."""
  if not log.isEnabledFor(logging.DEBUG):
    yield
    return
  t0 = time.monotonic()
  yield
  log.debug("%s: phase %s took %.3f s", what, name, time.monotonic() - t0)


def record_duration(event: str, secs: float, **tags: str | int) -> None:
  """``jax.monitoring.record_event_duration_secs``; a failing listener does not fail
  the checkpoint operation (it is logged)."""
  try:
    jax.monitoring.record_event_duration_secs(event, secs, **tags)
  except Exception:  # noqa: BLE001 - metrics are best effort
    logger.warning("a jax.monitoring listener failed on %s", event, exc_info=True)


def record_scalar(event: str, value: float | int, **tags: str | int) -> None:
  """``jax.monitoring.record_scalar``, best effort like :func:`record_duration`."""
  try:
    jax.monitoring.record_scalar(event, value, **tags)
  except Exception:  # noqa: BLE001 - metrics are best effort
    logger.warning("a jax.monitoring listener failed on %s", event, exc_info=True)
