"""A deterministic toy training loop that checkpoints with a ``CheckpointManager``.

Usage: ``python tests/_train_loop.py WORKDIR TOTAL_STEPS [--sleep S] [--interval N] [--chain]
[--hold]``

The state after step ``k`` is a pure function of ``k`` (:func:`state_at`), so a test can
check any checkpoint, and the final state, bit for bit. On start the loop restores the
latest committed step (``RESUMED <step>``; ``FRESH`` when there is none) and continues with
the step after it. Each step updates the state, hands it to ``mngr.save`` (which saves every
``--interval`` steps, asynchronously), prints ``STEP <step>`` and then does the preemption
check of a real training loop: after SIGTERM it saves the current step, waits for the save
and stops (``PREEMPTED <step>``). At the end it prints ``FINAL <step> <digest>`` and
``DONE`` and exits 0.

``--chain`` installs a SIGTERM handler of its own before the manager is opened; the manager
must call it after setting its flag (``CHAINED <n>`` reports how often it ran) and must put
it back on ``close()`` (``HANDLER_RESTORED <bool>``).

``--hold`` prints ``HOLD <pid>`` and waits for a line on stdin before it opens the manager
(so a test can prepare the directory for exactly this process).

The test module imports this file for :func:`state_at`, :func:`loss` and :func:`digest`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time

import numpy as np

W_SIZE = 1 << 20  # 4 MiB of float32: an async save takes a little while
B_SIZE = 16
_DECAY = np.float32(0.999)
_LR = np.float32(0.001)


def initial_state() -> dict:
  """The state before step 1 (step 0; never saved)."""
  w = (np.arange(W_SIZE, dtype=np.float32) % np.float32(1000)) / np.float32(1000)
  b = np.linspace(-1.0, 1.0, B_SIZE, dtype=np.float32)
  return {"w": w, "b": b, "step": 0}


def update(state: dict, step: int) -> dict:
  """One training step: ``param * 0.999 + f(step)``, in float32 numpy (deterministic)."""
  assert state["step"] == step - 1, (state["step"], step)
  f_w = np.float32(step % 7) * _LR
  f_b = np.float32(step % 3 - 1) * _LR
  w = np.asarray(state["w"], dtype=np.float32) * _DECAY + f_w
  b = np.asarray(state["b"], dtype=np.float32) * _DECAY + f_b
  return {"w": w, "b": b, "step": step}


def state_at(step: int, cache: dict | None = None) -> dict:
  """The state after ``step`` steps (numpy leaves); ``cache`` maps steps to states."""
  start, state = 0, initial_state()
  if cache:
    below = [s for s in cache if s <= step]
    if below:
      start = max(below)
      state = cache[start]
  for s in range(start + 1, step + 1):
    state = update(state, s)
  if cache is not None:
    cache[step] = state
  return state


def loss(state: dict) -> float:
  return float(np.float32(np.abs(np.asarray(state["b"])).sum()))


def digest(state: dict) -> str:
  h = hashlib.sha256()
  for k in ("w", "b"):
    a = np.asarray(state[k])
    h.update(f"{k}:{a.dtype}:{a.shape};".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(f"step:{int(state['step'])}".encode())
  return h.hexdigest()


def to_saved(state: dict) -> dict:
  """What the loop hands to the manager: ``w`` as a jax array, the rest as is."""
  import jax.numpy as jnp

  return {"w": jnp.asarray(state["w"]), "b": state["b"], "step": state["step"]}


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("total_steps", type=int)
  p.add_argument("--sleep", type=float, default=0.0)
  p.add_argument("--interval", type=int, default=5)
  p.add_argument("--chain", action="store_true")
  p.add_argument("--hold", action="store_true")
  a = p.parse_args(argv)

  import flax_ckpt

  chained = []

  def own_handler(signum, frame):
    chained.append(signum)

  if a.chain:
    signal.signal(signal.SIGTERM, own_handler)
  if a.hold:
    print(f"HOLD {os.getpid()}", flush=True)
    sys.stdin.readline()

  mngr = flax_ckpt.CheckpointManager(a.workdir, save_interval_steps=a.interval, max_to_keep=3,
                                     enable_async=True)
  latest = mngr.latest_step()
  if latest is None:
    state = initial_state()
    print("FRESH", flush=True)
  else:
    restored = mngr.restore()
    state = {"w": np.asarray(restored["w"]), "b": np.asarray(restored["b"]),
             "step": restored["step"]}
    assert state["step"] == latest, (state["step"], latest)
    print(f"RESUMED {state['step']}", flush=True)

  for step in range(state["step"] + 1, a.total_steps + 1):
    state = update(state, step)
    mngr.save(step, to_saved(state), metrics={"loss": loss(state)})
    print(f"STEP {step}", flush=True)
    if a.sleep:
      time.sleep(a.sleep)
    if mngr.reached_preemption(step):
      mngr.save(step, to_saved(state), force=True)
      mngr.wait_until_finished()
      print(f"PREEMPTED {step}", flush=True)
      break
  mngr.close()
  if a.chain:
    print(f"CHAINED {len(chained)}", flush=True)
    print(f"HANDLER_RESTORED {signal.getsignal(signal.SIGTERM) == own_handler}", flush=True)
  print(f"FINAL {state['step']} {digest(state)}", flush=True)
  print("DONE", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
