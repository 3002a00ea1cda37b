"""The storage layer's two backends (posix and tensorstore kvstore) write the same format."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.io import storage

BACKENDS = ["posix", "tensorstore"]


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def _tree():
  rng = np.random.default_rng(0)
  mesh = _mesh()
  w = rng.standard_normal((16, 24)).astype(np.float32)
  return {
      "sharded": jax.device_put(w, NamedSharding(mesh, P("x", "y"))),
      "replicated": jax.device_put(w[:4], NamedSharding(mesh, P())),
      "bf16": jnp.asarray(rng.standard_normal((7, 5)), jnp.bfloat16),
      "int4": rng.integers(-8, 8, (9,)).astype(ml_dtypes.int4),
      "np": rng.integers(0, 1000, (33,), dtype=np.int64),
      "empty": np.zeros((0, 3), np.float32),
      "big_bytes": rng.bytes(100_000),
      "key": jax.random.key(3),
      "step": 12,
      "name": "run",
  }


def _bits(x):
  return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _check(out, tree):
  for k in ("sharded", "replicated", "bf16", "int4", "np", "empty"):
    assert np.asarray(out[k]).dtype == np.asarray(tree[k]).dtype, k
    np.testing.assert_array_equal(_bits(out[k]), _bits(tree[k]))
  assert out["big_bytes"] == tree["big_bytes"]
  np.testing.assert_array_equal(jax.random.key_data(out["key"]),
                                jax.random.key_data(tree["key"]))
  assert out["step"] == 12 and out["name"] == "run"


@pytest.mark.parametrize("save_backend", BACKENDS)
@pytest.mark.parametrize("load_backend", BACKENDS)
def test_backends_write_and_read_the_same_format(ckpt_dir, monkeypatch, save_backend,
                                                 load_backend):
  tree = _tree()
  path = ckpt_dir / "ckpt"
  monkeypatch.setenv(storage.BACKEND_ENV, save_backend)
  flax_ckpt.save(path, tree)
  monkeypatch.setenv(storage.BACKEND_ENV, load_backend)
  _check(flax_ckpt.load(path), tree)
  # into a different sharding from a template
  mesh = _mesh()
  template = {k: (jax.ShapeDtypeStruct(v.shape, v.dtype) if isinstance(v, jax.Array) else None)
              for k, v in tree.items()}
  template["sharded"] = jax.ShapeDtypeStruct((16, 24), jnp.float32,
                                             sharding=NamedSharding(mesh, P("y", None)))
  out = flax_ckpt.load(path, template)
  _check(out, tree)
  assert out["sharded"].sharding == template["sharded"].sharding


def test_tensorstore_backend_async_and_partial(ckpt_dir, monkeypatch):
  monkeypatch.setenv(storage.BACKEND_ENV, "tensorstore")
  big = {f"w{i}": np.random.default_rng(i).random((256, 256), np.float32) for i in range(4)}
  path = ckpt_dir / "ckpt"
  src = {k: v.copy() for k, v in big.items()}
  resp = flax_ckpt.save_async(path, src)
  for v in src.values():
    v[...] = -1  # the checkpoint holds the values at call time
  resp.result()
  before = storage.READ_STATS.bytes
  out = flax_ckpt.load(path, {"w1": jax.ShapeDtypeStruct((256, 256), jnp.float32)},
                       partial=True)
  assert storage.READ_STATS.bytes - before == big["w1"].nbytes  # byte-range reads only
  np.testing.assert_array_equal(np.asarray(out["w1"]), big["w1"])


def test_tensorstore_backend_truncated_data_file(ckpt_dir, monkeypatch):
  monkeypatch.setenv(storage.BACKEND_ENV, "tensorstore")
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"w": np.arange(4096, dtype=np.float32)})
  data = path / "state" / "data.p0.bin"
  os.truncate(data, 1000)
  with pytest.raises(OSError, match="truncated"):
    flax_ckpt.load(path)


def test_unknown_backend_is_a_clear_error(ckpt_dir, monkeypatch):
  monkeypatch.setenv(storage.BACKEND_ENV, "floppy")
  with pytest.raises(ValueError, match="FLAX_CKPT_STORAGE='floppy'.*posix"):
    flax_ckpt.save(ckpt_dir / "ckpt", {"w": np.ones(3)})
  assert not (ckpt_dir / "ckpt").exists()


def test_kvstore_spec_of_a_directory():
  assert storage.kvstore_spec("/a/b") == {"driver": "file", "path": "/a/b/"}
  assert storage.kvstore_spec("/a/b/") == {"driver": "file", "path": "/a/b/"}


class Grid:
  """A user type whose handler stores it as a zarr3 array with tensorstore."""

  def __init__(self, values):
    self.values = np.asarray(values)


class GridHandler(flax_ckpt.TypeHandler):
  def typestr(self):
    return "test.Grid"

  async def serialize(self, values, infos, args=None):
    import tensorstore as ts

    futures = []
    for v, info in zip(values, infos):
      info.path.mkdir(exist_ok=True)
      t = await ts.open({"driver": "zarr3", "kvstore": info.kvstore_spec},
                        context=info.ts_context, create=True,
                        dtype=v.values.dtype.name, shape=v.values.shape)
      futures.append(t.write(v.values.copy()))
    return futures

  async def deserialize(self, infos, args=None):
    import tensorstore as ts

    out = []
    for info in infos:
      t = await ts.open({"driver": "zarr3", "kvstore": info.kvstore_spec},
                        context=info.ts_context)
      out.append(Grid(await t.read()))
    return out

  async def metadata(self, infos):
    return [flax_ckpt.Metadata(name=i.name, directory=i.path) for i in infos]


def test_custom_handler_stores_with_tensorstore(ckpt_dir):
  flax_ckpt.register_type_handler(Grid, GridHandler(), override=True)
  vals = np.arange(24, dtype=np.int32).reshape(4, 6)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"grid": Grid(vals), "w": np.ones(3)})
  assert (path / "state" / "leaves" / "grid" / "zarr.json").exists()
  out = flax_ckpt.load(path)
  assert type(out["grid"]) is Grid
  np.testing.assert_array_equal(out["grid"].values, vals)
