"""The object-storage fixtures work: tensorstore's s3 and gcs kvstores against the local servers.

These use tensorstore directly (not flax_ckpt), so a failure here is in the test setup.
"""

import os
import subprocess
import sys

import objstore_servers
import pytest
import tensorstore as ts

MISSING = b"\x02"  # the generation tensorstore reports for a key that does not exist


def kvstore(root: str) -> ts.KvStore:
  """A kvstore on `root` (`s3://bucket/prefix` or `gs://bucket/prefix`), configured from the
  environment the fixtures set, the way a user's environment would configure it."""
  scheme, rest = root.split("://", 1)
  bucket, _, path = rest.partition("/")
  spec = {"bucket": bucket, "path": path.rstrip("/") + "/"}
  if scheme == "s3":
    spec.update(driver="s3", endpoint=os.environ["AWS_ENDPOINT_URL_S3"],
                aws_region=os.environ["AWS_REGION"], aws_credentials={"type": "environment"},
                s3_request_retries={"max_retries": 2, "initial_delay": "10ms",
                                    "max_delay": "100ms"})
  else:
    assert scheme == "gs"
    spec.update(driver="gcs", gcs_request_retries={"max_retries": 2, "initial_delay": "10ms",
                                                    "max_delay": "100ms"})
  return ts.KvStore.open(spec).result()


def test_fixture_roots_and_env(s3_root, gcs_root, s3_server, gcs_server):
  assert s3_root.startswith("s3://") and s3_root.endswith("/some/prefix")
  assert gcs_root.startswith("gs://") and gcs_root.endswith("/some/prefix")
  for url in (s3_server, gcs_server):
    assert url.startswith("http://127.0.0.1:")
  assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server
  assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_server
  assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
  assert os.environ["AWS_REGION"] == "us-east-1"
  # Google auth's GCE metadata probe (once per process) goes to a closed local port
  assert os.environ["GCE_METADATA_ROOT"].startswith("127.0.0.1:")
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == gcs_server
  # a subprocess sees the same environment
  out = subprocess.run(
      [sys.executable, "-c",
       "import os; print(os.environ['AWS_ENDPOINT_URL_S3'], os.environ['STORAGE_EMULATOR_HOST'])"],
      capture_output=True, text=True, check=True, timeout=60).stdout.split()
  assert out == [s3_server, gcs_server]


def test_each_root_is_a_fresh_bucket(s3_server, gcs_server):
  assert objstore_servers.make_s3_bucket(s3_server) != objstore_servers.make_s3_bucket(s3_server)
  assert (objstore_servers.make_gcs_bucket(gcs_server)
          != objstore_servers.make_gcs_bucket(gcs_server))


def test_write_read_list(objstore_root):
  kv = kvstore(objstore_root)
  assert kv.list().result() == []
  assert kv.read("missing").result().state == "missing"
  for key in ("a/x", "a/y", "b/z", "c"):
    kv.write(key, key.encode() * 3).result()
  assert kv.read("a/y").result().value == b"a/ya/ya/y"
  assert sorted(kv.list().result()) == [b"a/x", b"a/y", b"b/z", b"c"]
  prefix = ts.KvStore.KeyRange(inclusive_min="a/", exclusive_max="a0")
  assert sorted(kv.list(prefix).result()) == [b"a/x", b"a/y"]
  assert sorted(kv.list(prefix, strip_prefix_length=2).result()) == [b"x", b"y"]
  # the kvstore's path scopes it: a sibling prefix sees nothing
  assert kvstore(objstore_root + "-sibling").list().result() == []


def test_byte_range_read(objstore_root):
  kv = kvstore(objstore_root)
  data = bytes(range(256)) * 64
  kv.write("blob", data).result()
  assert kv.read("blob", byte_range=slice(100, 1000)).result().value == data[100:1000]
  assert kv.read("blob", byte_range=slice(16000, None)).result().value == data[16000:]
  assert kv.read("blob", byte_range=slice(0, 1)).result().value == data[:1]


def test_delete_and_delete_range(objstore_root):
  kv = kvstore(objstore_root)
  for key in ("d/1", "d/2", "d/sub/3", "e"):
    kv.write(key, b"v").result()
  kv.write("e", None).result()  # delete one key
  assert kv.read("e").result().state == "missing"
  kv.delete_range(ts.KvStore.KeyRange(inclusive_min="d/", exclusive_max="d0")).result()
  assert kv.list().result() == []


# fake-gcs-server v1.54.0 (the bundled binary) ignores `ifGenerationMatch` on simple
# (uploadType=media) uploads, which is how tensorstore writes: every conditional write succeeds.
# Fixed upstream by fsouza/fake-gcs-server#2308; strict, so a fixed server shows up here.
GCS_IGNORES_PRECONDITIONS = pytest.mark.xfail(
    strict=True, reason="fake-gcs-server <=1.54 ignores ifGenerationMatch on media uploads")


@pytest.mark.parametrize(
    "objstore_root", ["s3", pytest.param("gs", marks=GCS_IGNORES_PRECONDITIONS)], indirect=True)
def test_conditional_writes(objstore_root):
  kv = kvstore(objstore_root)
  missing = kv.read("k").result()
  assert missing.state == "missing" and missing.stamp.generation == MISSING
  # create-only: succeeds once, then fails without raising (generation b"")
  first = kv.write("k", b"one", if_equal=MISSING).result()
  assert first.generation not in (b"", MISSING)
  assert kv.write("k", b"two", if_equal=MISSING).result().generation == b""
  assert kv.read("k").result().value == b"one"
  # compare-and-swap on the generation read
  gen = kv.read("k").result().stamp.generation
  assert gen == first.generation
  second = kv.write("k", b"three", if_equal=gen).result()
  assert second.generation not in (b"", gen)
  assert kv.write("k", b"stale", if_equal=gen).result().generation == b""
  assert kv.read("k").result().value == b"three"
