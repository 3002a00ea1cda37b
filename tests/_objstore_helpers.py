"""Helpers for tests/test_objstore_api.py: look at what a save left on S3 / GCS, independently
of flax_ckpt (straight through tensorstore's kvstores), and an S3 server that checks
credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import objstore_servers
import tensorstore as ts

GEN_TAG = "flax_ckpt-gen-"
MARKER = "_CHECKPOINT"

_STORES: dict[str, ts.KvStore] = {}


def _bucket_store(scheme: str, bucket: str) -> ts.KvStore:
  """The whole bucket as a kvstore, configured from the environment the fixtures set."""
  key = json.dumps([scheme, bucket, os.environ.get("AWS_ENDPOINT_URL_S3"),
                    os.environ.get("AWS_SECRET_ACCESS_KEY")])
  kv = _STORES.get(key)
  if kv is None:
    retries = {"max_retries": 2, "initial_delay": "10ms", "max_delay": "100ms"}
    if scheme == "s3":
      spec = {"driver": "s3", "bucket": bucket, "path": "",
              "endpoint": os.environ["AWS_ENDPOINT_URL_S3"],
              "aws_region": os.environ["AWS_REGION"],
              "aws_credentials": {"type": "environment"}, "s3_request_retries": retries}
    else:
      spec = {"driver": "gcs", "bucket": bucket, "path": "", "gcs_request_retries": retries}
    kv = _STORES[key] = ts.KvStore.open(spec).result()
  return kv


def _split(url: str) -> tuple[ts.KvStore, str]:
  scheme, rest = str(url).split("://", 1)
  bucket, _, key = rest.partition("/")
  return _bucket_store(scheme, bucket), key.strip("/")


def keys(url: str) -> list[str]:
  """Every object key under the "directory" `url`, relative to it, sorted."""
  kv, key = _split(url)
  prefix = f"{key}/" if key else ""
  end = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""
  got = kv.list(ts.KvStore.KeyRange(prefix, end),
                strip_prefix_length=len(prefix.encode())).result()  # bytes, not characters
  return sorted(k.decode() for k in got)


def read(url: str) -> bytes | None:
  kv, key = _split(url)
  r = kv.read(key).result()
  return bytes(r.value) if r.state == "value" else None


def put(url: str, data: bytes) -> None:
  kv, key = _split(url)
  kv.write(key, data).result()


def delete(url: str) -> None:
  kv, key = _split(url)
  kv.write(key, None).result()


def marker(ckpt: str) -> dict:
  data = read(f"{ckpt}/{MARKER}")
  assert data is not None, f"no {MARKER} at {ckpt}"
  return json.loads(data)


def generations(ckpt: str) -> list[str]:
  """The generation prefixes directly under the checkpoint `ckpt`."""
  return sorted({k.split("/", 1)[0] for k in keys(ckpt) if k.startswith(GEN_TAG)})


# ---------------------------------------------------------------- S3 with credentials checked

# What start_s3_with_auth does before moto starts checking credentials (one request each).
_SETUP_ACTIONS = 7


class AuthS3:
  """A moto S3 server that checks credentials, with a bucket, a user allowed everything
  (`admin_keys`) and one with no policy at all (`noperm_keys`)."""

  def __init__(self, server: objstore_servers.Server, bucket: str,
               admin_keys: tuple[str, str], noperm_keys: tuple[str, str]):
    self.server = server
    self.endpoint = server.endpoint
    self.bucket = bucket
    self.admin_keys = admin_keys
    self.noperm_keys = noperm_keys

  def stop(self) -> None:
    self.server.stop()


# moto 5 rebuilds the request it checks a SigV4 signature against from the raw URL; for the
# ListObjectsV2 requests tensorstore sends (prefix=a/b/ in the query) its canonical query
# then differs from what the client signed, and every such request fails with
# SignatureDoesNotMatch, whatever the keys. This launcher retries the check with the query's
# "/" percent-encoded (and decoded) before giving up: unknown keys and wrong secrets are
# still refused, and policies still apply.
_MOTO_LAUNCHER = """
import sys
from moto.iam import access_control as ac
_orig = ac.IAMRequestBase.check_signature
def _check(self):
  path = self._path
  base, sep, query = path.partition("?")
  tries = [path]
  if sep:
    tries += [base + sep + query.replace("/", "%2F"), base + sep + query.replace("%2F", "/")]
  try:
    for p in tries[1:]:
      self._path = p
      try:
        return _orig(self)
      except Exception:
        pass
    self._path = path
    return _orig(self)
  finally:
    self._path = path
ac.IAMRequestBase.check_signature = _check
from moto.server import main
main(sys.argv[1:])
"""


def start_s3_with_auth() -> AuthS3:
  """moto's server with INITIAL_NO_AUTH_ACTION_COUNT set so that only the setup below runs
  unauthenticated; every later request needs a known access key with a policy allowing it."""
  import boto3

  tmp = tempfile.TemporaryDirectory(prefix="flax_ckpt_moto_auth_")
  port = objstore_servers.free_port()
  log = Path(tmp.name) / "moto.log"
  env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(_SETUP_ACTIONS))
  with open(log, "wb") as f:
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_LAUNCHER, "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
  server = objstore_servers.Server("moto S3 server (auth)", f"http://127.0.0.1:{port}", proc,
                                   log, tmp.cleanup)
  server.wait_ready(f"{server.endpoint}/moto-api/")  # not counted: moto's own API
  try:
    kw = {"endpoint_url": server.endpoint, "region_name": "us-east-1",
          "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **kw)
    s3 = boto3.client("s3", **kw)
    bucket = objstore_servers.new_bucket_name()
    s3.create_bucket(Bucket=bucket)  # 1
    iam.create_user(UserName="admin")  # 2
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps({  # 3
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    a = iam.create_access_key(UserName="admin")["AccessKey"]  # 4
    iam.create_user(UserName="noperm")  # 5
    n = iam.create_access_key(UserName="noperm")["AccessKey"]  # 6
    # 7: the last free action; from here on credentials are checked
    s3.list_objects_v2(Bucket=bucket)
  except BaseException:
    server.stop()
    raise
  return AuthS3(server, bucket, (a["AccessKeyId"], a["SecretAccessKey"]),
                (n["AccessKeyId"], n["SecretAccessKey"]))
