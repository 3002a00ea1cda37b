"""Resharding loads on 8 simulated devices: any saved sharding into any target sharding,
reading each needed byte straight into place, within a bounded staging budget."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.io import storage

pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

# 3- and 6-device meshes put box boundaries in the middle of saved chunks
_MESHES = {"2x4": (2, 4), "4x2": (4, 2), "8x1": (8, 1), "1x8": (1, 8), "3x1": (3, 1),
           "2x3": (2, 3), "1x1": (1, 1)}


def _mesh(name):
  shape = _MESHES[name]
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return jax.sharding.Mesh(devices, ("x", "y"))


def _specs(ndim):
  """Partition specs using each mesh axis at most once (in any dim, or not at all)."""
  def build(dims):
    parts = [[] for _ in range(ndim)]
    for axis, d in zip(("x", "y"), dims):
      if d >= 0:
        parts[d].append(axis)
    return P(*[None if not p else p[0] if len(p) == 1 else tuple(p) for p in parts])
  return st.tuples(st.integers(-1, ndim - 1), st.integers(-1, ndim - 1)).map(build)


def _fits(shape, spec, mesh):
  for n, a in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if a is None:
      continue
    names = (a,) if isinstance(a, str) else a
    if n % int(np.prod([mesh.shape[x] for x in names])):
      return False
  return True


@st.composite
def _cases(draw):
  ndim = draw(st.integers(1, 3))
  # sizes that are multiples of 8 often enough to be shardable, with small and large rows
  shape = tuple(draw(st.sampled_from([8, 24, 48, 96, 240])) for _ in range(ndim))
  mesh_in, mesh_out = draw(st.sampled_from(sorted(_MESHES))), draw(st.sampled_from(
      sorted(_MESHES)))
  spec_in, spec_out = draw(_specs(ndim)), draw(_specs(ndim))
  dtype = draw(st.sampled_from(["float32", "bfloat16", "int8"]))
  return shape, mesh_in, spec_in, mesh_out, spec_out, dtype


def _check_shards(out, host):
  for shard in out.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data).view(np.uint8),
                                  np.ascontiguousarray(host[shard.index]).view(np.uint8))


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases(), staging=st.sampled_from([None, 1, 4096]))
def test_any_sharding_into_any_sharding(tmp_path_factory, monkeypatch, case, staging):
  shape, mesh_in, spec_in, mesh_out, spec_out, dtype = case
  m_in, m_out = _mesh(mesh_in), _mesh(mesh_out)
  assume(_fits(shape, spec_in, m_in) and _fits(shape, spec_out, m_out))
  if staging is None:
    monkeypatch.delenv("FLAX_CKPT_STAGING_BYTES", raising=False)
  else:  # tiny budgets: many slabs, or one row at a time
    monkeypatch.setenv("FLAX_CKPT_STAGING_BYTES", str(staging))
  rng = np.random.default_rng(abs(hash(case)) % (1 << 32))
  host = np.asarray(jnp.asarray(rng.standard_normal(shape) * 50, dtype))
  path = tmp_path_factory.mktemp("ckpt") / "c"
  flax_ckpt.save(path, {"w": jax.device_put(host, NamedSharding(m_in, spec_in))})
  target = NamedSharding(m_out, spec_out)
  out = flax_ckpt.load(path, {"w": jax.ShapeDtypeStruct(shape, host.dtype, sharding=target)})
  assert out["w"].sharding == target
  _check_shards(out["w"], host)


@pytest.mark.parametrize("shape", [(256, 512), (1024, 64)])  # 512-byte runs; tiny runs
@pytest.mark.parametrize("spec_out", [P(None, "y"), P("y", "x"), P(), P(("x", "y"), None),
                                      P(None, ("x", "y"))])
def test_resharding_reads_each_needed_byte_once(ckpt_dir, spec_out, shape):
  mesh = _mesh("2x4")
  host = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  path = ckpt_dir / "c"
  flax_ckpt.save(path, jax.device_put(host, NamedSharding(mesh, P("x", None))))
  before = storage.READ_STATS.bytes
  out = flax_ckpt.load(path, jax.ShapeDtypeStruct(host.shape, host.dtype,
                                                  sharding=NamedSharding(mesh, spec_out)))
  # every byte is needed by some device of this process; replicas are read once
  assert storage.READ_STATS.bytes - before == host.nbytes
  _check_shards(out, host)


_RSS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, flax_ckpt
    from jax.sharding import NamedSharding, PartitionSpec as P
    path, spec_in, spec_out = sys.argv[1], sys.argv[3], sys.argv[4]
    shape = tuple(int(n) for n in sys.argv[2].split(","))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))
    def spec(s):
      return P(*[None if a == "-" else a for a in s])
    if not os.path.exists(path):
      host = np.random.default_rng(0).random(shape, np.float32)
      flax_ckpt.save(path, jax.device_put(host, NamedSharding(mesh, spec(spec_in))))
      sys.exit(0)
    def hwm():  # this process's peak RSS (ru_maxrss would include the parent's, see exec)
      for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
    base = hwm()
    out = flax_ckpt.load(path, jax.ShapeDtypeStruct(shape, np.float32,
                                                    sharding=NamedSharding(mesh, spec(spec_out))))
    jax.block_until_ready(out)
    peak = hwm()
    print(peak - base)
""")


@pytest.mark.parametrize("shape, spec_in, spec_out", [
    ((2048, 16384), "x-", "-y"),   # long contiguous runs: read in place
    ((2048, 64, 256), "x--", "--y"),  # 256-byte runs: staged slab by slab
])
def test_resharding_load_needs_no_second_copy(tmp_path, shape, spec_in, spec_out):
  """Peak RSS of a resharding load stays near the result size (128 MiB here)."""
  path = str(tmp_path / "c")
  env = {**os.environ, "FLAX_CKPT_STAGING_BYTES": str(8 << 20)}
  for _ in range(2):  # save, then load in a fresh process
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, ",".join(map(str, shape)), spec_in,
                        spec_out], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
  grown = int(r.stdout.split()[-1])
  size = int(np.prod(shape)) * 4
  assert 0.9 * size < grown < 1.4 * size, (
      f"load grew RSS by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB result")


_ONE_DEVICE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np, flax_ckpt
    assert jax.device_count() == 1
    path, want = sys.argv[1], np.load(sys.argv[2])
    plain = flax_ckpt.load(path)["w"]  # the saved 8-device sharding is metadata only
    np.testing.assert_array_equal(np.asarray(plain), want)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = flax_ckpt.load(path, {"w": jax.ShapeDtypeStruct(want.shape, want.dtype,
                                                          sharding=single)})["w"]
    np.testing.assert_array_equal(np.asarray(out), want)
    assert flax_ckpt.metadata(path)["w"].sharding["mesh_shape"] == [2, 4]
    print("OK")
""")


def test_saved_on_eight_devices_loads_on_one(tmp_path):
  host = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
  flax_ckpt.save(tmp_path / "c", {"w": jax.device_put(host, NamedSharding(_mesh("2x4"),
                                                                          P("x", "y")))})
  np.save(tmp_path / "want.npy", host)
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  r = subprocess.run([sys.executable, "-c", _ONE_DEVICE, str(tmp_path / "c"),
                      str(tmp_path / "want.npy")], capture_output=True, text=True,
                     timeout=120, env=env)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
