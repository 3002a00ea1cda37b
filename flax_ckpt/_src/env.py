"""Every ``FLAX_CKPT_*`` environment variable, read and documented in one place.

Each knob is read at call time, not at import, so a process (or a test, with
``monkeypatch.setenv``) may change it between saves.

* ``FLAX_CKPT_STORAGE``: the storage backend for local paths, ``posix`` (the default) or
  ``tensorstore`` (a tensorstore kvstore; costs one extra copy of the data on save).
* ``FLAX_CKPT_DIRECT_IO``: ``0`` turns off direct I/O (``O_DIRECT``) for background saves.
* ``FLAX_CKPT_BARRIER_TIMEOUT_S``: seconds a multi-host save waits for the other processes
  (300 by default).
* ``FLAX_CKPT_BACKGROUND_NICE``: how much background checkpoint threads lower their CPU
  priority (10 by default; 0 or less leaves it).
* ``FLAX_CKPT_STAGING_BYTES``: host memory a load may use beyond its results, for tiny strided
  reads when resharding (64 MiB by default).
* ``FLAX_CKPT_OBJECT_BYTES``: object stores: the largest object a save writes; bigger data
  files are split into segments of this size (16 MiB by default, at most 1 GiB; 8 upload
  at a time, so a save holds at most ~9 segments of extra host memory).
* ``FLAX_CKPT_OBJECT_RETRIES``: object stores: how often one request is retried before the
  error is raised (10 by default: about 40 s of exponential backoff, never a hang).
* ``FLAX_CKPT_ALLOW_SYMLINKS``: ``1`` lets loads follow symlinks inside a checkpoint that
  resolve outside it (trusted layouts, e.g. a cache of symlinked blobs); by default such a
  checkpoint is refused with a FormatError naming the link.

The object stores' own configuration is the clouds' usual environment (docs/design.md,
"Object storage"): ``AWS_*`` for S3 and ``STORAGE_EMULATOR_HOST`` / application default
credentials for GCS.
"""

from __future__ import annotations

import os

STORAGE = "FLAX_CKPT_STORAGE"
DIRECT_IO = "FLAX_CKPT_DIRECT_IO"
BARRIER_TIMEOUT_S = "FLAX_CKPT_BARRIER_TIMEOUT_S"
BACKGROUND_NICE = "FLAX_CKPT_BACKGROUND_NICE"
STAGING_BYTES = "FLAX_CKPT_STAGING_BYTES"
OBJECT_BYTES = "FLAX_CKPT_OBJECT_BYTES"
OBJECT_RETRIES = "FLAX_CKPT_OBJECT_RETRIES"
ALLOW_SYMLINKS = "FLAX_CKPT_ALLOW_SYMLINKS"

DEFAULT_STORAGE = "posix"
DEFAULT_BACKGROUND_NICE = 10
DEFAULT_STAGING_BYTES = 64 << 20
DEFAULT_OBJECT_BYTES = 16 << 20
MAX_OBJECT_BYTES = 1 << 30
DEFAULT_OBJECT_RETRIES = 10


def storage() -> str:
  """The backend name asked for (``$FLAX_CKPT_STORAGE``, unset or empty: ``posix``).

  Not validated here: the storage layer checks it against the backends it has.
  """
  return os.environ.get(STORAGE, "") or DEFAULT_STORAGE


def direct_io() -> bool:
  """Whether direct I/O may be used (``$FLAX_CKPT_DIRECT_IO`` is not ``0``)."""
  return os.environ.get(DIRECT_IO, "1") != "0"


def barrier_timeout_s(default: float) -> float:
  """``$FLAX_CKPT_BARRIER_TIMEOUT_S`` as a float, else ``default``."""
  return float(os.environ.get(BARRIER_TIMEOUT_S, default))


def background_nice() -> int:
  """``$FLAX_CKPT_BACKGROUND_NICE`` as an int, else 10; raises ValueError if it is no int."""
  return int(os.environ.get(BACKGROUND_NICE, str(DEFAULT_BACKGROUND_NICE)))


def allow_symlinks() -> bool:
  """``$FLAX_CKPT_ALLOW_SYMLINKS`` is ``1``: follow links that leave a checkpoint."""
  return os.environ.get(ALLOW_SYMLINKS, "0") == "1"


def staging_bytes() -> int:
  """``$FLAX_CKPT_STAGING_BYTES`` as an int, else 64 MiB."""
  return int(os.environ.get(STAGING_BYTES, DEFAULT_STAGING_BYTES))


def object_bytes() -> int:
  """``$FLAX_CKPT_OBJECT_BYTES`` (4 KiB to 1 GiB), else 16 MiB; ValueError outside."""
  raw = os.environ.get(OBJECT_BYTES, str(DEFAULT_OBJECT_BYTES))
  try:
    n = int(raw)
  except ValueError:
    raise ValueError(f"{OBJECT_BYTES}={raw!r} is not a number of bytes; use an int from 4096 "
                     f"to {MAX_OBJECT_BYTES}") from None
  if not 4096 <= n <= MAX_OBJECT_BYTES:
    raise ValueError(f"{OBJECT_BYTES}={n}: use a size from 4096 to {MAX_OBJECT_BYTES} bytes")
  return n


def object_retries() -> int:
  """``$FLAX_CKPT_OBJECT_RETRIES`` (0 or more), else 10."""
  raw = os.environ.get(OBJECT_RETRIES, str(DEFAULT_OBJECT_RETRIES))
  try:
    return max(0, int(raw))
  except ValueError:
    raise ValueError(f"{OBJECT_RETRIES}={raw!r} is not an int (retries of one request)"
                     ) from None
