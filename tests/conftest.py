"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def ckpt_dir(tmp_path):
  """A fresh directory to put checkpoints in."""
  return tmp_path


# ---- object storage: local S3 (moto) and GCS (fake-gcs-server) servers ----
# tests/objstore_servers.py starts them (or reuses those .ci/run started). A server that cannot
# start fails the tests that need it; nothing is skipped.

import objstore_servers  # noqa: E402


def _set_env(env):
  """Set `env` in os.environ (so subprocesses see it too); returns a function that undoes it."""
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)

  def restore():
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v

  return restore


@pytest.fixture(scope="session")
def s3_server():
  """Endpoint URL of a local S3 server; sets the AWS_* environment a user would, for the
  session: credentials `testing`/`testing`, region us-east-1, AWS_ENDPOINT_URL_S3."""
  server = objstore_servers.s3_server()
  restore = _set_env(objstore_servers.client_env(server.endpoint, None))
  try:
    yield server.endpoint
  finally:
    restore()
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
  """Endpoint URL of a local GCS server; sets STORAGE_EMULATOR_HOST (and
  TENSORSTORE_GCS_HTTP_URL) for the session, and points Google auth's GCE metadata probe at a
  closed 127.0.0.1 port so nothing leaves this machine."""
  server = objstore_servers.gcs_server()
  restore = _set_env(objstore_servers.client_env(None, server.endpoint))
  try:
    yield server.endpoint
  finally:
    restore()
    server.stop()


@pytest.fixture
def s3_root(s3_server):
  """A fresh bucket's prefix: `s3://<new bucket>/some/prefix`."""
  return f"s3://{objstore_servers.make_s3_bucket(s3_server)}/some/prefix"


@pytest.fixture
def gcs_root(gcs_server):
  """A fresh bucket's prefix: `gs://<new bucket>/some/prefix`."""
  return f"gs://{objstore_servers.make_gcs_bucket(gcs_server)}/some/prefix"


@pytest.fixture(params=["s3", "gs"])
def objstore_root(request):
  """`s3_root` or `gcs_root`: each test that uses it runs once per store."""
  return request.getfixturevalue("s3_root" if request.param == "s3" else "gcs_root")
