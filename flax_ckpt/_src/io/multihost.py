"""Coordination of the processes of a ``jax.distributed`` job during a save.

Everything goes through the distributed runtime client that ``jax.distributed.initialize``
set up: its key-value store shares the temporary directory's name, and its barriers (always
with a timeout) make the primary commit only after every process has written its part.
A single process needs none of this and never touches the client.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from typing import Any

import jax

from flax_ckpt._src import env, errors
from flax_ckpt._src.io import observe

DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = env.BARRIER_TIMEOUT_S

_log = observe.child("multihost")
_counter = itertools.count()
_counter_lock = threading.Lock()


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def timeout_s(timeout: float | None = None) -> float:
  """The barrier timeout: ``timeout``, else ``$FLAX_CKPT_BARRIER_TIMEOUT_S``, else 300 s."""
  if timeout is not None:
    return float(timeout)
  return env.barrier_timeout_s(DEFAULT_TIMEOUT_S)


def path_digest(path: str, length: int = 16) -> str:
  """A short id of ``path`` (hex SHA-1 of its bytes), the same in every process.

  Operation ids (key-value keys, barrier names) are named after the path, so processes
  that disagree about which checkpoint they work on time out instead of pairing up.
  """
  return hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def next_operation_id(path: str) -> str:
  """An id for the next save to ``path``; processes that save in the same order agree."""
  digest = path_digest(path)
  with _counter_lock:
    return f"flax_ckpt/save/{next(_counter)}/{digest}"


def _runtime_client() -> Any:
  """The client ``jax.distributed.initialize`` set up in this process, or None."""
  try:
    from jax._src import distributed

    return distributed.global_state.client
  except Exception:  # noqa: BLE001 - a JAX without this (private) module: no runtime
    return None


def distributed_initialized() -> bool:
  """Whether ``jax.distributed`` is initialized in this process."""
  return _runtime_client() is not None


def _client() -> Any:
  client = _runtime_client()
  if client is None:
    raise errors.CheckpointError(
        f"this job has {process_count()} processes but jax.distributed is not initialized in "
        "this process; call jax.distributed.initialize() before saving.")
  return client


def barrier(name: str, timeout: float, what: str, *, committed: bool = False) -> None:
  """Waits until every process reached ``name``; a clear error after ``timeout`` seconds.

  Keep the timeout below ``jax.distributed``'s heartbeat timeout: when a process dies, the
  runtime aborts the survivors once the heartbeat times out.
  """
  if process_count() == 1:
    return
  client, t0 = _client(), time.monotonic()
  arrived = f"{name}/arrived/"
  _best_effort(lambda: client.key_value_set(f"{arrived}{process_index()}", "1"))
  try:
    with observe.Progress(_log, lambda secs: _waiting_line(client, name, secs)):
      client.wait_at_barrier(name, int(timeout * 1000))
    _best_effort(lambda: client.key_value_delete(f"{arrived}{process_index()}"))
    observe.record_duration(observe.BARRIER_DURATION, time.monotonic() - t0)
  except Exception as e:  # noqa: BLE001 - the runtime raises its own error types
    state = ("every process had written its part, so the checkpoint may be committed: "
             "process 0's error (if any) says whether it is; load it to check"
             if committed else "another process failed or died; nothing was committed")
    raise errors.CheckpointError(
        f"process {process_index()} of {process_count()}: not every process {what} within "
        f"{timeout:.0f} s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
        f"{state}. Raise the timeout with barrier_timeout_s= or {TIMEOUT_ENV} if saves are "
        "just slow.") from e


def _best_effort(fn: Any) -> Any:
  """Runs ``fn`` (a key-value call for the logs only); its failure changes nothing."""
  try:
    return fn()
  except Exception:  # noqa: BLE001 - the barrier itself reports real failures
    return None


def _waiting_line(client: Any, name: str, secs: float) -> str:
  """What a barrier that has waited long logs: the processes that have not arrived.

  Each process sets ``<barrier>/arrived/<index>`` before waiting (the runtime's barrier
  does not say who arrived), so the ones missing from that directory are the late ones.
  """
  got = _best_effort(lambda: client.key_value_dir_get(f"{name}/arrived/"))
  n = process_count()
  if got is None:
    late = "unknown (the key-value store did not answer)"
  else:
    here = {k.rsplit("/", 1)[-1] for k, _ in got}
    missing = [str(i) for i in range(n) if str(i) not in here]
    late = ", ".join(missing[:16]) + (f" and {len(missing) - 16} more" if len(missing) > 16
                                      else "") if missing else "none (finishing)"
  return (f"barrier {name}: process {process_index()} of {n} has waited {secs:.0f} s; "
          f"waiting for process(es) {late}")


def share(key: str, value: str | None, timeout: float) -> str:
  """The primary publishes ``value`` under ``key``; every other process waits for it."""
  if process_count() == 1:
    assert value is not None
    return value
  client = _client()
  if process_index() == 0:
    assert value is not None
    client.key_value_set(key, value)
    return value
  try:
    return client.blocking_key_value_get(key, int(timeout * 1000))
  except Exception as e:  # noqa: BLE001
    raise errors.CheckpointError(
        f"process {process_index()}: the primary process did not start the save within "
        f"{timeout:.0f} s ({type(e).__name__}); it failed or died. Nothing was committed.") from e
