"""Object-store URLs (``s3://``, ``gs://``) as tensorstore kvstore specs, and their errors.

Configuration is each cloud's own environment, read at every open, so nothing new is
learned:

* S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` for S3-compatible stores (tensorstore's driver ignores the latter
  two, so they go into the spec here).
* GCS: application default credentials, and ``STORAGE_EMULATOR_HOST`` for an emulator
  (passed to tensorstore as ``TENSORSTORE_GCS_HTTP_URL``).

Every request is retried a bounded number of times (``FLAX_CKPT_OBJECT_RETRIES``), so an
unreachable endpoint ends in a :class:`~flax_ckpt.StorageError`, never a hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from typing import Any

from flax_ckpt._src import env, errors

SCHEMES = ("s3", "gs")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_KEY_PART = re.compile(r"[^\x00-\x1f\x7f]+")


@dataclasses.dataclass(frozen=True)
class ObjectUrl:
  """A parsed ``s3://bucket/key`` or ``gs://bucket/key`` (key without outer slashes).

  Example:
    >>> u = parse('s3://my-bucket/runs/ckpt/')
    >>> u.bucket, u.key, str(u / 'state')
    ('my-bucket', 'runs/ckpt', 's3://my-bucket/runs/ckpt/state')
  """

  scheme: str
  bucket: str
  key: str

  def __str__(self) -> str:
    return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else (
        f"{self.scheme}://{self.bucket}")

  def __truediv__(self, name: str) -> ObjectUrl:
    return ObjectUrl(self.scheme, self.bucket, f"{self.key}/{name}" if self.key else name)

  @property
  def prefix(self) -> str:
    """The key as a "directory" prefix: ``key/`` (empty for the bucket itself)."""
    return f"{self.key}/" if self.key else ""


def parse(url: str) -> ObjectUrl:
  """Parses and validates an object-store URL (raises CheckpointError naming the fix)."""
  scheme, sep, rest = url.partition("://")
  if not sep or scheme not in SCHEMES:
    raise errors.CheckpointError(f"{url!r} is not an s3:// or gs:// URL")
  bucket, _, key = rest.partition("/")
  pattern = _S3_BUCKET if scheme == "s3" else _GCS_BUCKET
  if not pattern.fullmatch(bucket):
    raise errors.CheckpointError(
        f"{url!r}: {bucket!r} is not a valid bucket name; write {scheme}://<bucket>/<prefix> "
        "with a bucket of 3-63 lowercase letters, digits, '-' and '.'.")
  parts = [p for p in key.split("/") if p]
  bad = [p for p in parts if p in (".", "..") or not _KEY_PART.fullmatch(p)]
  if bad:
    raise errors.CheckpointError(
        f"{url!r}: the path component {bad[0]!r} is not allowed in a checkpoint path "
        "(no '.', '..' or control characters).")
  return ObjectUrl(scheme, bucket, "/".join(parts))


def _retries() -> dict[str, Any]:
  return {"max_retries": env.object_retries(), "initial_delay": "100ms", "max_delay": "8s"}


def _s3_spec(url: ObjectUrl) -> dict[str, Any]:
  spec: dict[str, Any] = {"driver": "s3", "bucket": url.bucket, "path": url.prefix,
                          "s3_request_retries": _retries()}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    spec["endpoint"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    spec["aws_region"] = region
  if os.environ.get("AWS_ACCESS_KEY_ID"):
    # straight from the environment: the default chain would first look for (and log
    # about) ~/.aws files and the instance metadata service
    spec["aws_credentials"] = {"type": "environment"}
  elif os.environ.get("AWS_PROFILE"):
    spec["aws_credentials"] = {"type": "profile", "profile": os.environ["AWS_PROFILE"]}
  return spec


_GCS_ENV_LOCK = threading.Lock()


def _gcs_spec(url: ObjectUrl) -> dict[str, Any]:
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    if "://" not in emulator:
      emulator = f"http://{emulator}"
    with _GCS_ENV_LOCK:  # tensorstore reads its own variable when a gcs kvstore opens
      os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator.rstrip("/")
  return {"driver": "gcs", "bucket": url.bucket, "path": url.prefix,
          "gcs_request_retries": _retries()}


def kvstore_spec(url: ObjectUrl) -> dict[str, Any]:
  """The tensorstore kvstore spec of the "directory" ``url`` (path ends in ``/``).

  Example:
    >>> kvstore_spec(parse('gs://bkt/ckpt'))['path']
    'ckpt/'
  """
  return _s3_spec(url) if url.scheme == "s3" else _gcs_spec(url)


def spec_key(spec: dict[str, Any]) -> str:
  """A cache key for an opened kvstore: the spec plus the environment it depends on."""
  env = [os.environ.get(k) for k in (
      "TENSORSTORE_GCS_HTTP_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
      "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS")]
  return json.dumps([spec, env], sort_keys=True)


_HINTS = (  # the first whose needle is in tensorstore's message; checked in this order
    (("NoSuchBucket", "bucket does not exist", "NOT_FOUND"),
     "the bucket does not exist: create it, or fix the bucket name in the path"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
      "CREDENTIALS_PROVIDER", "UNAUTHENTICATED", "http_response_code='401'"),
     "no valid credentials: for S3 set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
     "AWS_PROFILE); for GCS run `gcloud auth application-default login` or set "
     "GOOGLE_APPLICATION_CREDENTIALS"),
    (("AccessDenied", "PERMISSION_DENIED", "http_response_code='403'", "Forbidden"),
     "permission denied: give these credentials read and write access to the bucket"),
    (("CURL error", "Could not connect", "Couldn't connect", "Connection refused",
      "Failed to connect", "Could not resolve", "UNAVAILABLE", "DEADLINE_EXCEEDED",
      "timed out"),
     "the endpoint cannot be reached (after FLAX_CKPT_OBJECT_RETRIES retries): check the "
     "network, and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (S3) or STORAGE_EMULATOR_HOST "
     "(GCS) if you use one"),
)


def storage_error(e: BaseException, where: str, doing: str) -> errors.StorageError:
  """``e`` (a tensorstore error) as a StorageError naming ``where`` and the likely fix."""
  msg = str(e)
  hint = next((h for needles, h in _HINTS if any(n in msg for n in needles)),
              "see the store's message at the end")
  short = msg if len(msg) <= 400 else msg[:400] + "..."
  return errors.StorageError(f"{where}: could not {doing}: {hint}. ({short})")
