"""Background execution: a private event loop for handler coroutines, commit threads, and
the exit hook that finishes (or loudly reports) pending saves."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from flax_ckpt._src import env

NICE_ENV = env.BACKGROUND_NICE


def lower_thread_priority() -> None:
  """Lowers the calling thread's CPU priority by ``$FLAX_CKPT_BACKGROUND_NICE`` (default 10).

  Background checkpoint work (copying bytes into the page cache, fsync, bookkeeping) then
  yields the CPU to the training step it overlaps with, instead of taking cores from it.
  Linux only (threads have their own nice value there); elsewhere a no-op.
  """
  try:
    delta = env.background_nice()
  except ValueError:
    delta = 10
  if delta <= 0 or not hasattr(os, "setpriority") or sys.platform != "linux":
    return
  try:
    tid = threading.get_native_id()
    now = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, min(19, now + delta))
  except OSError:
    pass


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
  global _loop
  with _loop_lock:
    if _loop is None:
      loop = asyncio.new_event_loop()
      t = threading.Thread(target=loop.run_forever, name="flax_ckpt_loop", daemon=True)
      t.start()
      _loop = loop
    return _loop


class _LoopHolder:
  """A thread's own event loop, closed when the thread ends (its thread-local dies)."""

  def __init__(self):
    self.loop = asyncio.new_event_loop()

  def __del__(self):
    loop = getattr(self, "loop", None)
    if loop is not None and not loop.is_closed() and not loop.is_running():
      loop.close()


_local = threading.local()


def run_coro(coro: Coroutine) -> Any:
  """Runs ``coro`` to completion and returns its result.

  In the calling thread when it has no running event loop (so thread-local JAX settings
  such as ``jax.enable_x64`` or ``jax.default_device`` context managers apply); otherwise
  (e.g. inside Jupyter) on flax_ckpt's own loop thread.
  """
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    holder = getattr(_local, "holder", None)
    if holder is None or holder.loop.is_closed():
      holder = _local.holder = _LoopHolder()
    return holder.loop.run_until_complete(coro)
  return asyncio.run_coroutine_threadsafe(coro, _get_loop()).result()


def run_on_background_loop(coro: Coroutine) -> Any:
  """Runs ``coro`` on flax_ckpt's long-lived loop thread and returns its result.

  Tasks and futures the coroutine leaves running stay attached to a loop that keeps
  running, so they can finish (and be awaited from any thread) after it returns.
  """
  return asyncio.run_coroutine_threadsafe(coro, _get_loop()).result()


def wait_futures(futures: list[Any], *, quiet: bool = False) -> None:
  """Waits for concurrent/asyncio futures or awaitables returned by handlers.

  With ``quiet``, waits for every one of them and swallows their errors (used to make sure
  nothing is still writing before a failed save's directory is removed).
  """
  for f in futures:
    if f is None:
      continue
    try:
      _wait_one(f)
    except BaseException:
      if not quiet:
        raise


def _wait_one(f: Any) -> None:
  if isinstance(f, concurrent.futures.Future):
    f.result()
    return
  if asyncio.isfuture(f):
    loop = f.get_loop()
    if loop.is_running() and loop is not _running_loop():
      async def _aw_on_own_loop(x=f):
        return await x

      asyncio.run_coroutine_threadsafe(_aw_on_own_loop(), loop).result()
      return
  if asyncio.isfuture(f) or asyncio.iscoroutine(f) or hasattr(f, "__await__"):
    async def _aw(x=f):
      return await x

    run_coro(_aw())
  elif hasattr(f, "result"):
    f.result()


def _running_loop() -> asyncio.AbstractEventLoop | None:
  try:
    return asyncio.get_running_loop()
  except RuntimeError:
    return None


class AsyncResponse:
  """Handle on a save running in the background.

  Example:
    >>> import numpy as np, flax_ckpt, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> r = flax_ckpt.save_async(os.path.join(d, 'ckpt'), {'w': np.ones(3)})
    >>> r.result()  # blocks until committed; re-raises a failure
  """

  def __init__(self, future: concurrent.futures.Future, description: str):
    self._future = future
    self._description = description
    self._observed = False

  def result(self, timeout: float | None = None) -> None:
    """Blocks until the checkpoint is committed; re-raises any failure of the save.

    Args:
      timeout: seconds to wait; ``TimeoutError`` if the save is still running then.
    """
    try:
      out = self._future.result(timeout)
    except concurrent.futures.TimeoutError:
      raise  # still pending: a later failure must still be reported
    except BaseException:
      self._observed = True
      raise
    self._observed = True
    return out

  def done(self) -> bool:
    """Whether the save has finished (committed or failed)."""
    return self._future.done()

  def __repr__(self) -> str:
    state = "done" if self.done() else "pending"
    return f"AsyncResponse({self._description}, {state})"


_pending: list[AsyncResponse] = []
_pending_lock = threading.Lock()


def start_background(fn: Callable[[], Any], description: str) -> AsyncResponse:
  """Runs ``fn`` in a non-daemon thread, so interpreter exit waits for it."""
  fut: concurrent.futures.Future = concurrent.futures.Future()
  resp = AsyncResponse(fut, description)

  def target():
    lower_thread_priority()
    try:
      fut.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the caller via result()
      fut.set_exception(e)

  with _pending_lock:
    _pending[:] = [r for r in _pending if not (r.done() and r._observed)]
    _pending.append(resp)
  threading.Thread(target=target, name=f"flax_ckpt_save:{description}", daemon=False).start()
  return resp


@atexit.register
def _report_at_exit() -> None:
  with _pending_lock:
    pending = list(_pending)
  for r in pending:
    try:
      r._future.result()
    except BaseException as e:  # noqa: BLE001 - report loudly, never drop silently
      if not r._observed:
        sys.stderr.write(
            f"\nflax_ckpt ERROR: background save {r._description} FAILED and was not "
            f"committed:\n{''.join(traceback.format_exception(e))}\n"
        )
        sys.stderr.flush()
