"""Launching a local multi-process job (``jax.distributed`` on 127.0.0.1) from a test.

Each worker prints a last line ``RESULT <json>``; :func:`run_job` returns every process's
``(returncode, parsed RESULT or None, output tail)`` and never leaves a child behind. The
workers get the environment without ``XLA_FLAGS``/``JAX_PLATFORMS`` (each sets its own
device count) plus ``extra_env``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from typing import Any


def free_port() -> int:
  """A free TCP port on 127.0.0.1 for the coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _result(out: str) -> Any:
  lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
  if not lines:
    return None
  try:
    return json.loads(lines[-1][7:])
  except ValueError:
    return lines[-1][7:]  # a plain word (e.g. "ok")


def run_job(argv: Callable[[int, int], list[str]], nproc: int, *, timeout: float,
            extra_env: Mapping[str, str] | None = None, cwd: str | None = None
            ) -> list[tuple[int, Any, str]]:
  """Runs ``argv(process index, port)`` for each of ``nproc`` processes and waits."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(extra_env or {})
  procs = [subprocess.Popen(argv(i, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
           for i in range(nproc)]
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      outs.append(out)
  finally:
    for p in procs:  # never leave a child behind
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, _result(out), out[-3000:]) for p, out in zip(procs, outs)]
