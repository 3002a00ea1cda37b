"""Round trips of every built-in leaf type and dtype, with and without a template."""

import dataclasses
import math
import os
import struct
import typing
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.io import storage

# ----------------------------------------------------------------------------- helpers


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def _roundtrip(ckpt_dir, tree, template=None, **kwargs):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  return flax_ckpt.load(path, template, **kwargs)


def _bits(x):
  """The raw bytes of an array (any dtype, any rank) as a flat uint8 array."""
  return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _assert_bitwise_equal(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype
  assert actual.shape == expected.shape
  np.testing.assert_array_equal(_bits(actual), _bits(expected))


def _float_bits(x):
  return struct.pack("<d", x)


_INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
_FLOAT8_DTYPES = [
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e3m4", "float8_e4m3", "float8_e8m0fnu",
]
_ALL_DTYPES = (
    ["bool"] + _INT_DTYPES + ["float16", "float32", "float64", "complex64", "complex128",
                              "bfloat16"] + _FLOAT8_DTYPES + ["int4", "uint4"]
)
_X64_DTYPES = {"int64", "uint64", "float64", "complex128"}


def _dtype(name):
  return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _random(name, shape, seed=0):
  """Random host data of dtype ``name`` (all bit patterns for the 8/16-bit ml_dtypes floats)."""
  rng = np.random.default_rng(seed)
  dt = _dtype(name)
  if name == "bool":
    return rng.integers(0, 2, shape).astype(bool)
  if name in _INT_DTYPES:
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
  if name in ("int4", "uint4"):
    info = ml_dtypes.iinfo(dt)
    return rng.integers(int(info.min), int(info.max) + 1, shape).astype(dt)
  if name in ("float16", "float32", "float64"):
    return (rng.standard_normal(shape) * 100).astype(dt)
  if name.startswith("complex"):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
  # bfloat16 and float8 variants: every bit pattern (NaNs included) must survive.
  return rng.integers(0, 256, shape + (dt.itemsize,), dtype=np.uint8).view(dt).reshape(shape)


def _assert_same_structure(actual, expected):
  """Exact types of every container and leaf, and equal leaf values."""
  assert type(actual) is type(expected), (type(actual), type(expected))
  if isinstance(expected, dict):
    assert list(actual.keys()) == list(expected.keys())
    for ka, ke in zip(actual.keys(), expected.keys(), strict=True):
      assert type(ka) is type(ke)
    for k in expected:
      _assert_same_structure(actual[k], expected[k])
  elif isinstance(expected, (list, tuple)):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
      _assert_same_structure(a, e)
  elif dataclasses.is_dataclass(expected):
    for f in dataclasses.fields(expected):
      _assert_same_structure(getattr(actual, f.name), getattr(expected, f.name))
  elif isinstance(expected, (np.ndarray, jax.Array)):
    _assert_bitwise_equal(actual, expected)
  elif isinstance(expected, float) and math.isnan(expected):
    assert math.isnan(actual)
  else:
    assert actual == expected


# -------------------------------------------------------------------------- jax.Array


def test_jax_array_single_device(ckpt_dir):
  x = jnp.asarray(_random("float32", (3, 5)))
  out = _roundtrip(ckpt_dir, {"x": x})["x"]
  assert isinstance(out, jax.Array)
  _assert_bitwise_equal(out, x)
  assert out.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_jax_array_zero_dim_and_empty(ckpt_dir):
  tree = {"scalar": jnp.asarray(np.float32(-2.5)), "empty": jnp.zeros((0, 3), jnp.int32),
          "np_scalar_arr": np.asarray(7, np.int16), "np_empty": np.zeros((2, 0), np.float32)}
  out = _roundtrip(ckpt_dir, tree)
  assert isinstance(out["scalar"], jax.Array) and out["scalar"].shape == ()
  assert isinstance(out["empty"], jax.Array) and out["empty"].shape == (0, 3)
  assert type(out["np_scalar_arr"]) is np.ndarray and out["np_scalar_arr"].shape == ()
  assert type(out["np_empty"]) is np.ndarray and out["np_empty"].shape == (2, 0)
  for k in tree:
    _assert_bitwise_equal(out[k], tree[k])


_SPECS = [
    pytest.param(P("x", None), id="x_none"),
    pytest.param(P(None, "y"), id="none_y"),
    pytest.param(P(), id="replicated"),
    pytest.param(P("x"), id="partial_x"),
    pytest.param(P(None, "x"), id="partial_none_x"),
    pytest.param(P("y", "x"), id="y_x"),
    pytest.param(P(("x", "y")), id="xy_fused"),
]


@pytest.mark.parametrize("spec", _SPECS)
def test_sharded_jax_array(ckpt_dir, spec):
  sharding = NamedSharding(_mesh(), spec)
  host = _random("float32", (8, 16), seed=1)
  x = jax.device_put(host, sharding)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": x})

  plain = flax_ckpt.load(path)["x"]
  assert isinstance(plain, jax.Array)
  _assert_bitwise_equal(plain, host)

  template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)}
  out = flax_ckpt.load(path, template)["x"]
  assert out.sharding == sharding
  _assert_bitwise_equal(out, host)
  for shard in out.addressable_shards:
    _assert_bitwise_equal(shard.data, host[shard.index])


@pytest.mark.parametrize("spec_in, spec_out", [
    (P("x", None), P(None, "y")),
    (P(None, "y"), P(("x", "y"))),
    (P(), P("y", "x")),
    (P("x"), P()),
])
def test_resharding_on_load(ckpt_dir, spec_in, spec_out):
  mesh = _mesh()
  host = _random("bfloat16", (8, 16), seed=2)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, jax.device_put(host, NamedSharding(mesh, spec_in)))
  target = NamedSharding(mesh, spec_out)
  out = flax_ckpt.load(path, jax.ShapeDtypeStruct(host.shape, host.dtype, sharding=target))
  assert out.sharding == target
  _assert_bitwise_equal(out, host)
  for shard in out.addressable_shards:
    _assert_bitwise_equal(shard.data, host[shard.index])


# ---------------------------------------------------------------------- numpy arrays


def test_numpy_arrays(ckpt_dir):
  base = _random("float64", (6, 8), seed=3)
  tree = {
      "c": base,
      "strided": base[:, ::3],
      "fortran": np.asfortranarray(base),
      "transposed": base.T,
      "big": _random("int32", (256, 300), seed=4),
  }
  out = _roundtrip(ckpt_dir, tree)
  for k, v in tree.items():
    assert type(out[k]) is np.ndarray
    _assert_bitwise_equal(out[k], v)


# --------------------------------------------------------------------- Python scalars


@pytest.mark.parametrize("value", [
    0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64, 2**64 + 1, -(2**64) - 7, 2**200 + 12345,
    -(3**300), 10**1000,
])
def test_python_int(ckpt_dir, value):
  out = _roundtrip(ckpt_dir, {"v": value})["v"]
  assert type(out) is int
  assert out == value


def test_python_int_beyond_str_digit_limit(ckpt_dir):
  value = 10**5000 + 1
  out = _roundtrip(ckpt_dir, {"v": value})["v"]
  assert type(out) is int and out == value


_FLOATS = [
    0.0, -0.0, 1.5, -2.25, 0.1, 1e308, -1e-308, 5e-324, -5e-324, 1.7976931348623157e308,
    math.pi, float("inf"), float("-inf"),
]


@pytest.mark.parametrize("value", _FLOATS, ids=repr)
def test_python_float_bitwise(ckpt_dir, value):
  out = _roundtrip(ckpt_dir, {"v": value})["v"]
  assert type(out) is float
  assert _float_bits(out) == _float_bits(value)


def test_python_float_nan(ckpt_dir):
  out = _roundtrip(ckpt_dir, [float("nan")])[0]
  assert type(out) is float
  assert math.isnan(out)
  assert _float_bits(out) == _float_bits(float("nan"))


def test_python_float_nan_sign_and_payload(ckpt_dir):
  neg_nan = -float("nan")
  payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_0000_1234))[0]
  out = _roundtrip(ckpt_dir, [neg_nan, payload_nan])
  assert _float_bits(out[0]) == _float_bits(neg_nan)
  assert _float_bits(out[1]) == _float_bits(payload_nan)


def test_python_bool(ckpt_dir):
  out = _roundtrip(ckpt_dir, {"t": True, "f": False, "i": 1, "z": 0})
  assert out["t"] is True and out["f"] is False
  assert type(out["i"]) is int and type(out["z"]) is int


@pytest.mark.parametrize("value", [
    1 + 2j, complex(-0.0, 0.0), complex(float("inf"), float("-inf")), complex(5e-324, -1e308),
], ids=repr)
def test_python_complex(ckpt_dir, value):
  out = _roundtrip(ckpt_dir, (value,))[0]
  assert type(out) is complex
  assert _float_bits(out.real) == _float_bits(value.real)
  assert _float_bits(out.imag) == _float_bits(value.imag)


def test_python_complex_nan(ckpt_dir):
  out = _roundtrip(ckpt_dir, (complex(float("nan"), 2.0),))[0]
  assert type(out) is complex
  assert math.isnan(out.real) and out.imag == 2.0


_NP_SCALARS = [
    np.float32(1.5), np.float32(-0.0), np.int64(-(2**62) - 3), np.int8(-128), np.uint64(2**64 - 1),
    np.uint8(255), np.float16(0.333), np.complex64(1 - 2j), np.bool_(True),
    ml_dtypes.bfloat16(1.5), ml_dtypes.float8_e4m3fn(-3.0), ml_dtypes.int4(-7),
    np.float64(2.75),
    np.complex128(1 + 3j),
]


@pytest.mark.parametrize("value", _NP_SCALARS, ids=lambda v: f"{type(v).__name__}_{v}")
def test_numpy_scalars(ckpt_dir, value):
  out = _roundtrip(ckpt_dir, {"v": value})["v"]
  assert type(out) is type(value)
  assert out.dtype == value.dtype
  _assert_bitwise_equal(out, value)


# ------------------------------------------------------------------------ str, bytes, None


@pytest.mark.parametrize("value", [
    "", "hello", "ünïcødé – 日本語 – עברית – 🎉🧪", "nul\x00byte\nnewline\t\"quote\"\\",
    "x" * 100_000,
], ids=lambda v: f"len{len(v)}")
def test_str(ckpt_dir, value):
  out = _roundtrip(ckpt_dir, {"s": value})["s"]
  assert type(out) is str and out == value


@pytest.mark.parametrize("n", [0, 1, 1000, 64 << 10, (64 << 10) + 1, 300_000])
def test_bytes(ckpt_dir, n):
  value = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
  out = _roundtrip(ckpt_dir, {"b": value})["b"]
  assert type(out) is bytes and out == value


def test_many_big_bytes_mixed_with_arrays(ckpt_dir):
  rng = np.random.default_rng(5)
  tree = {
      f"k{i}": (rng.integers(0, 256, 70_000 + 13 * i, dtype=np.uint8).tobytes(),
                _random("float32", (7, 3 + i), seed=i), b"small" * i)
      for i in range(5)
  }
  out = _roundtrip(ckpt_dir, tree)
  _assert_same_structure(out, tree)


def test_none(ckpt_dir):
  tree = {"a": None, "b": [None, 1, None], "c": (None,)}
  out = _roundtrip(ckpt_dir, tree)
  assert out == tree
  assert type(out["c"]) is tuple


def test_none_root(ckpt_dir):
  assert _roundtrip(ckpt_dir, None) is None


# -------------------------------------------------------------------------- PRNG keys


def _assert_same_keys(actual, expected):
  assert isinstance(actual, jax.Array)
  assert jax.dtypes.issubdtype(actual.dtype, jax.dtypes.prng_key)
  assert actual.shape == expected.shape
  assert str(jax.random.key_impl(actual)) == str(jax.random.key_impl(expected))
  _assert_bitwise_equal(jax.random.key_data(actual), jax.random.key_data(expected))


@pytest.mark.parametrize("make_key", [
    pytest.param(lambda: jax.random.key(0), id="threefry"),
    pytest.param(lambda: jax.random.key(42, impl="rbg"), id="rbg"),
    pytest.param(lambda: jax.random.key(3, impl="unsafe_rbg"), id="unsafe_rbg"),
    pytest.param(lambda: jax.random.split(jax.random.key(1), 5), id="split"),
    pytest.param(lambda: jax.random.split(jax.random.key(7, impl="rbg"), 6).reshape(2, 3),
                 id="split_rbg_2d"),
])
def test_prng_keys(ckpt_dir, make_key):
  key = make_key()
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"key": key})
  _assert_same_keys(flax_ckpt.load(path)["key"], key)
  template = jax.eval_shape(lambda: {"key": key})
  _assert_same_keys(flax_ckpt.load(path, template)["key"], key)
  # The loaded key draws the same numbers as the original.
  first = lambda k: k.reshape(-1)[0]
  assert jax.random.uniform(first(flax_ckpt.load(path)["key"])) == jax.random.uniform(first(key))


def test_sharded_prng_key_array(ckpt_dir):
  sharding = NamedSharding(_mesh(), P("x"))
  keys = jax.device_put(jax.random.split(jax.random.key(9), 8), sharding)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, keys)
  _assert_same_keys(flax_ckpt.load(path), keys)
  out = flax_ckpt.load(path, jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding))
  _assert_same_keys(out, keys)
  assert out.sharding == sharding


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", _ALL_DTYPES)
def test_dtype_numpy(ckpt_dir, name):
  x = _random(name, (3, 5), seed=len(name))
  assert x.dtype == _dtype(name)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": x})
  out = flax_ckpt.load(path)["x"]
  assert type(out) is np.ndarray
  _assert_bitwise_equal(out, x)
  if name not in _FLOAT8_DTYPES + ["bfloat16"]:  # NaN-free data: compare values as well
    np.testing.assert_array_equal(out, x)
  # with a numpy template of the same dtype
  t = flax_ckpt.load(path, {"x": np.zeros_like(x)})["x"]
  assert type(t) is np.ndarray
  _assert_bitwise_equal(t, x)


@pytest.mark.parametrize("name", [
    n for n in _ALL_DTYPES
])
def test_dtype_numpy_scalar(ckpt_dir, name):
  s = _random(name, (7,), seed=len(name) + 2)[3]
  assert isinstance(s, np.generic) and s.dtype == _dtype(name)
  out = _roundtrip(ckpt_dir, [s])[0]
  assert type(out) is type(s)
  _assert_bitwise_equal(out, s)


def _check_jax_dtype(ckpt_dir, name):
  x = jnp.asarray(_random(name, (4, 8), seed=len(name) + 1))
  assert x.dtype == _dtype(name)
  expected = np.asarray(x)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": x})
  out = flax_ckpt.load(path)["x"]
  assert isinstance(out, jax.Array)
  _assert_bitwise_equal(out, expected)
  if name in ("bool", "int4", "uint4", "int8", "float32", "bfloat16", "float16"):
    np.testing.assert_array_equal(np.asarray(out).astype(np.float32),
                                  expected.astype(np.float32))
  sharding = NamedSharding(_mesh(), P("x", "y"))
  t = flax_ckpt.load(path, {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)})
  assert t["x"].sharding == sharding
  _assert_bitwise_equal(t["x"], expected)
  n = flax_ckpt.load(path, {"x": np.zeros(x.shape, x.dtype)})["x"]
  assert type(n) is np.ndarray
  _assert_bitwise_equal(n, expected)


@pytest.mark.parametrize("name", [n for n in _ALL_DTYPES if n not in _X64_DTYPES])
def test_dtype_jax(ckpt_dir, name):
  _check_jax_dtype(ckpt_dir, name)


@pytest.fixture
def x64_global():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


@pytest.mark.parametrize("name", sorted(_X64_DTYPES))
def test_dtype_jax_x64(ckpt_dir, name, x64_global):
  _check_jax_dtype(ckpt_dir, name)


@pytest.mark.parametrize("name", sorted(_X64_DTYPES))
def test_dtype_jax_x64_context_manager(ckpt_dir, name):
  with jax.enable_x64(True):
    _check_jax_dtype(ckpt_dir, name)


@pytest.mark.parametrize("name", ["int4", "bfloat16", "float8_e4m3fn", "bool", "complex64"])
def test_dtype_sharded_save(ckpt_dir, name):
  sharding = NamedSharding(_mesh(), P("y", "x"))
  x = jax.device_put(_random(name, (8, 4), seed=11), sharding)
  expected = np.asarray(x)
  out = _roundtrip(ckpt_dir, x, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))
  assert out.sharding == sharding
  _assert_bitwise_equal(out, expected)
  out_np = flax_ckpt.load(ckpt_dir / "ckpt", np.zeros(x.shape, x.dtype))
  assert type(out_np) is np.ndarray
  _assert_bitwise_equal(out_np, expected)


# ----------------------------------------------------------------- structure fidelity


class RegisteredPoint(typing.NamedTuple):
  x: typing.Any
  y: typing.Any


flax_ckpt.register_class(RegisteredPoint, override=True)


class UnregisteredPair(typing.NamedTuple):
  first: typing.Any
  second: typing.Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RegisteredState:
  params: typing.Any
  step: typing.Any


flax_ckpt.register_class(RegisteredState, override=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class UnregisteredState:
  a: typing.Any
  b: typing.Any



@dataclasses.dataclass
class WithMeta:
  w: typing.Any
  name: str


jax.tree_util.register_dataclass(WithMeta, data_fields=["w"], meta_fields=["name"])


def test_int_dict_keys_stay_int(ckpt_dir):
  tree = {0: np.arange(3), 1: "one", 10: {2: 2.5, -3: [4]}}
  out = _roundtrip(ckpt_dir, tree)
  _assert_same_structure(out, tree)


def test_mixed_int_and_str_keys(ckpt_dir):
  tree = {1: "int one", "1": "str one", "k": 3, -5: None, 0: {"a": 1, 2: (b"x",)}}
  out = _roundtrip(ckpt_dir, tree)
  _assert_same_structure(out, tree)
  assert out[1] == "int one" and out["1"] == "str one"


def test_list_vs_tuple(ckpt_dir):
  tree = {"l": [1, 2], "t": (1, 2), "nested": [(1,), [()], ([],)], "root_tuple_in_list": [()]}
  out = _roundtrip(ckpt_dir, tree)
  _assert_same_structure(out, tree)
  assert _roundtrip(ckpt_dir / "t", (1, [2])) == (1, [2])
  assert type(_roundtrip(ckpt_dir / "l", [1, (2,)])) is list


def test_registered_namedtuple(ckpt_dir):
  tree = {"p": RegisteredPoint(x=np.float32(1), y=jnp.arange(3)),
          "ps": [RegisteredPoint(1, 2), RegisteredPoint("a", None)]}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = _roundtrip(ckpt_dir, tree)
  assert type(out["p"]) is RegisteredPoint
  _assert_same_structure(out, tree)


def test_unregistered_namedtuple_warns_once(ckpt_dir):
  tree = {"a": UnregisteredPair(1, "x"), "b": [UnregisteredPair(2.5, None)]}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  with pytest.warns(flax_ckpt.UnregisteredClassWarning) as record:
    out = flax_ckpt.load(path)
  ours = [w for w in record if issubclass(w.category, flax_ckpt.UnregisteredClassWarning)]
  assert len(ours) == 1
  assert "UnregisteredPair" in str(ours[0].message)
  assert out == {"a": {"first": 1, "second": "x"}, "b": [{"first": 2.5, "second": None}]}
  assert type(out["a"]) is dict


def test_empty_containers(ckpt_dir):
  tree = {"d": {}, "l": [], "t": (), "nested": [{}, ([], {"e": ()})]}
  _assert_same_structure(_roundtrip(ckpt_dir, tree), tree)
  for i, root in enumerate([{}, [], ()]):
    _assert_same_structure(_roundtrip(ckpt_dir / str(i), root), root)


def test_deeply_nested(ckpt_dir):
  tree = leaf = {"leaf": np.arange(4, dtype=np.int16)}
  for i in range(40):
    tree = {"d": tree, i: [(i, "s")]} if i % 2 else [{"k": i}, tree]
  out = _roundtrip(ckpt_dir, tree)
  _assert_same_structure(out, tree)
  assert leaf["leaf"].sum() == 6


def test_registered_dataclass(ckpt_dir):
  tree = {"state": RegisteredState(params={"w": jnp.ones((2, 2))}, step=3)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = _roundtrip(ckpt_dir, tree)
  assert type(out["state"]) is RegisteredState
  _assert_same_structure(out, tree)


def test_unregistered_dataclass_comes_back_as_dict(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, UnregisteredState(a=1, b=[2]))
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match="UnregisteredState"):
    out = flax_ckpt.load(path)
  assert out == {"a": 1, "b": [2]}


def test_dataclass_with_meta_fields_via_template(ckpt_dir):
  obj = WithMeta(w=np.arange(3.0), name="static")
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, obj)
  out = flax_ckpt.load(path, WithMeta(w=np.zeros(3), name="static"))
  assert type(out) is WithMeta and out.name == "static"
  _assert_bitwise_equal(out.w, obj.w)


# ------------------------------------------------------------------------- templates


def test_template_from_eval_shape(ckpt_dir):
  state = {"params": {"w": jnp.asarray(_random("float32", (4, 3))), "b": jnp.zeros(3)},
           "step": jnp.asarray(5, jnp.int32), "opt": (jnp.ones(2), [jnp.full((1,), 2.0)])}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, state)
  template = jax.eval_shape(lambda: state)
  out = flax_ckpt.load(path, template)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(state)
  # jax orders dict keys when flattening the template: compare with the same ordering.
  _assert_same_structure(out, jax.tree_util.tree_map(lambda x: x, state))
  for leaf in jax.tree_util.tree_leaves(out):
    assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_template_sharding_applied_to_numpy_saved_leaves(ckpt_dir):
  mesh = _mesh()
  tree = {"a": _random("float32", (8, 4)), "b": _random("int32", (4, 8)), "c": np.float32(2)}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  sh_a, sh_b = NamedSharding(mesh, P("x", "y")), NamedSharding(mesh, P())
  template = {"a": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=sh_a),
              "b": jax.ShapeDtypeStruct((4, 8), np.int32, sharding=sh_b),
              "c": jax.ShapeDtypeStruct((), np.float32)}
  out = flax_ckpt.load(path, template)
  assert out["a"].sharding == sh_a and out["b"].sharding == sh_b
  assert isinstance(out["c"], jax.Array) and out["c"].shape == ()
  _assert_bitwise_equal(out["a"], tree["a"])
  _assert_bitwise_equal(out["b"], tree["b"])
  _assert_bitwise_equal(out["c"], np.asarray(tree["c"]))


def test_template_jax_array_leaves_give_their_sharding(ckpt_dir):
  sharding = NamedSharding(_mesh(), P(None, "y"))
  x = jax.device_put(_random("float32", (2, 8)), sharding)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": x})
  out = flax_ckpt.load(path, {"x": jax.device_put(jnp.zeros((2, 8)), sharding)})
  assert out["x"].sharding == sharding
  _assert_bitwise_equal(out["x"], x)


def test_template_numpy_gives_numpy(ckpt_dir):
  x = jnp.asarray(_random("float32", (3, 4)))
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": x, "k": jax.random.key(0)})
  out = flax_ckpt.load(path, {"x": np.zeros((3, 4), np.float32), "k": None})
  assert type(out["x"]) is np.ndarray
  _assert_bitwise_equal(out["x"], x)
  _assert_same_keys(out["k"], jax.random.key(0))


def test_template_none_leaf_loads_as_saved(ckpt_dir):
  tree = {"a": jnp.arange(3), "b": np.arange(2), "c": "text", "d": 1.5, "e": b"xy", "f": None,
          "g": np.float32(3)}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  out = flax_ckpt.load(path, dict.fromkeys(tree))
  _assert_same_structure(out, tree)


def test_template_structure_and_types_win(ckpt_dir):
  """A tuple template for a saved list and a NamedTuple template give the template's types."""
  tree = {"seq": [np.arange(2), np.arange(3)], "pair": {"first": 1.0, "second": np.ones(2)}}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(path, {"seq": (None, None), "pair": {"first": 0.0, "second": None}})
  assert type(out["seq"]) is tuple
  _assert_bitwise_equal(out["seq"][1], tree["seq"][1])
  assert out["pair"]["first"] == 1.0


def test_template_unregistered_namedtuple_is_rebuilt_without_warning(ckpt_dir):
  tree = UnregisteredPair(first=np.arange(3), second=[np.float32(1)])
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(path, UnregisteredPair(first=np.zeros(3, np.int64),
                                                second=[np.float32(0)]))
  assert type(out) is UnregisteredPair
  _assert_same_structure(out, tree)


def test_template_dtype_cast_float32_to_bfloat16(ckpt_dir):
  x = _random("float32", (5, 6), seed=21)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"j": jnp.asarray(x), "n": x})
  sharding = NamedSharding(_mesh(), P(None, None))
  with pytest.warns(UserWarning, match=r"\['j'\] float32->bfloat16, \['n'\] float32->bfloat16"):
    out = flax_ckpt.load(path, {  # a narrowing cast warns, naming the leaves
        "j": jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
        "n": np.zeros(x.shape, ml_dtypes.bfloat16),
    })
  assert out["j"].dtype == jnp.bfloat16 and isinstance(out["j"], jax.Array)
  assert out["n"].dtype == ml_dtypes.bfloat16 and type(out["n"]) is np.ndarray
  _assert_bitwise_equal(out["j"], x.astype(ml_dtypes.bfloat16))
  _assert_bitwise_equal(out["n"], x.astype(ml_dtypes.bfloat16))
  with pytest.warns(UserWarning, match=r"\['j'\] float32->bfloat16"):
    sh = flax_ckpt.load(path, {"j": jax.ShapeDtypeStruct(x.shape, jnp.bfloat16,
                                                         sharding=sharding), "n": None})
  assert sh["j"].sharding == sharding
  _assert_bitwise_equal(sh["j"], x.astype(ml_dtypes.bfloat16))


def test_template_dtype_cast_astype_semantics(ckpt_dir):
  rng = np.random.default_rng(22)
  f = np.concatenate([np.array([-1.7, 2.9, -0.2, 100.5, 0.0], np.float32),
                      (rng.standard_normal(27) * 1000).astype(np.float32)]).reshape(4, 8)
  i = np.concatenate([np.array([300, -200, 127, -129, 255], np.int32),
                      rng.integers(-(2**20), 2**20, 27, dtype=np.int32)]).reshape(4, 8)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"f": jnp.asarray(f), "i": i})
  sharding = NamedSharding(_mesh(), P("x", "y"))
  with pytest.warns(UserWarning, match=r"\['f'\] float32->int32, \['i'\] int32->int8"):
    out = flax_ckpt.load(path, {"f": jax.ShapeDtypeStruct(f.shape, jnp.int32, sharding=sharding),
                                "i": np.zeros(i.shape, np.int8)})
  assert out["f"].sharding == sharding
  _assert_bitwise_equal(out["f"], f.astype(np.int32))
  np.testing.assert_array_equal(np.asarray(out["f"])[0, :5], [-1, 2, 0, 100, 0])
  _assert_bitwise_equal(out["i"], i.astype(np.int8))
  np.testing.assert_array_equal(out["i"][0, :5], [44, 56, 127, 127, -1])


def test_template_scalar_types(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"f": 2.5, "i": 7, "n": np.float32(1.25)})
  with pytest.warns(UserWarning, match=r"\['n'\] float32->float16"):
    out = flax_ckpt.load(path, {"f": jax.ShapeDtypeStruct((), jnp.float32),
                                "i": np.zeros((), np.int16), "n": np.float16(0)})
  assert isinstance(out["f"], jax.Array) and out["f"].dtype == jnp.float32
  assert float(out["f"]) == 2.5
  assert type(out["i"]) is np.ndarray and out["i"].dtype == np.int16 and out["i"] == 7
  assert type(out["n"]) is np.float16 and out["n"] == np.float16(1.25)


def test_partial_loads_only_subset(ckpt_dir):
  big = {f"w{i}": _random("float32", (512, 512), seed=30 + i) for i in range(4)}
  tree = {"params": big, "extra": {"note": "hi", "v": np.arange(5)}, "step": 3}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  template = {"params": {"w2": jax.ShapeDtypeStruct((512, 512), jnp.float32)}, "step": 0}
  before = storage.READ_STATS.bytes
  out = flax_ckpt.load(path, template, partial=True)
  read = storage.READ_STATS.bytes - before
  assert set(out) == {"params", "step"} and set(out["params"]) == {"w2"}
  assert out["step"] == 3 and type(out["step"]) is int
  _assert_bitwise_equal(out["params"]["w2"], big["w2"])
  nbytes = big["w2"].nbytes
  assert nbytes <= read < 2 * nbytes

  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, template)
  msg = str(e.value)
  assert "['params']['w0']" in msg and "['extra']['note']" in msg and "partial=True" in msg


def test_shape_mismatch_names_path_and_shapes(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"layer": {"w": np.zeros((3, 4), np.float32)}, "b": np.zeros(2)})
  template = {"layer": {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)},
              "b": np.zeros(2)}
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, template)
  msg = str(e.value)
  assert "['layer']['w']" in msg and "(3, 4)" in msg and "(4, 3)" in msg
  assert "['b']" not in msg


def test_shape_mismatch_scalar_vs_array(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"s": 1.0, "k": jax.random.split(jax.random.key(0), 3)})
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['s'\].*\(\).*\(2,\)"):
    flax_ckpt.load(path, {"s": np.zeros(2), "k": None})
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['k'\].*\(3,\).*\(4,\)"):
    key_template = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 4))
    flax_ckpt.load(path, {"s": None, "k": key_template})


def test_missing_and_extra_leaves_one_error(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"a": 1, "b": {"c": np.zeros(2), "d": 2}, 3: "int key"})
  template = {"a": 0, "b": {"c": np.zeros(2), "x": None}, "y": [None], "3": None}
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, template)
  msg = str(e.value)
  for p in ("['b']['x']", "['y'][0]", "['3']", "['b']['d']", "[3]"):
    assert p in msg, p
  assert "['a']" not in msg
  # partial=True still rejects leaves missing from the checkpoint
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['b'\]\['x'\]"):
    flax_ckpt.load(path, template, partial=True)


# -------------------------------------------------------------------------- metadata


def test_metadata_per_leaf(ckpt_dir):
  tree = {
      "w": jnp.zeros((3, 4), jnp.float32),
      "n": np.zeros((5,), np.int16),
      "bf": np.zeros((2, 2), ml_dtypes.bfloat16),
      "i4": np.zeros((6,), ml_dtypes.int4),
      "s": np.float32(1),
      "key": jax.random.split(jax.random.key(0), 3),
      "i": 5, "f": 1.5, "b": True, "c": 1j, "str": "héllo", "bytes": b"\x00" * 100_000,
      "none": None,
  }
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  md = flax_ckpt.metadata(path)
  assert isinstance(md, flax_ckpt.CheckpointMetadata)
  assert md.format_version == 1 and isinstance(md.created_at, float)
  assert md.custom_metadata is None
  assert set(md.tree) == set(tree)

  w = md["w"]
  assert isinstance(w, flax_ckpt.ArrayMetadata)
  assert (w.shape, w.dtype, w.type, w.nbytes, w.name) == (
      (3, 4), np.dtype(np.float32), "jax.Array", 48, "['w']")
  assert w.sharding == {"type": "SingleDeviceSharding"}
  assert (md["n"].shape, md["n"].dtype, md["n"].type, md["n"].nbytes) == (
      (5,), np.dtype(np.int16), "np.ndarray", 10)
  assert md["n"].sharding is None
  assert (md["bf"].dtype, md["bf"].nbytes) == (np.dtype(ml_dtypes.bfloat16), 8)
  assert (md["i4"].dtype, md["i4"].nbytes) == (np.dtype(ml_dtypes.int4), 6)
  assert (md["s"].shape, md["s"].dtype, md["s"].type, md["s"].nbytes) == (
      (), np.dtype(np.float32), "np.generic", 4)
  k = md["key"]
  assert (k.shape, k.type, k.nbytes) == ((3,), "jax.PRNGKey", 24)
  assert "fry" in str(k.dtype)
  for name, typ in [("i", "int"), ("f", "float"), ("b", "bool"), ("c", "complex"),
                    ("str", "str"), ("bytes", "bytes"), ("none", "None")]:
    assert isinstance(md[name], flax_ckpt.ValueMetadata), name
    assert md[name].type == typ
  assert md["str"].nbytes == len("héllo".encode())
  assert md["bytes"].nbytes == 100_000
  assert md["none"].nbytes == 0


@pytest.mark.parametrize("spec, desc", [
    (P("x", None), ["x", None]),
    (P(None, "y"), [None, "y"]),
    (P(), []),
    (P(("x", "y")), [["x", "y"]]),
])
def test_metadata_sharding_description(ckpt_dir, spec, desc):
  x = jax.device_put(jnp.zeros((8, 8)), NamedSharding(_mesh(), spec))
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": x})
  sh = flax_ckpt.metadata(path)["x"].sharding
  assert sh["type"] == "NamedSharding"
  assert sh["mesh_shape"] == [2, 4]
  assert sh["axis_names"] == ["x", "y"]
  assert sh["spec"] == desc


def test_metadata_structure_mirrors_tree(ckpt_dir):
  tree = {"p": RegisteredPoint(np.zeros(2), [np.ones(3), (4,)]), 7: {"z": None}}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree)
  md = flax_ckpt.metadata(path).tree
  assert type(md["p"]) is RegisteredPoint
  assert md["p"].x.shape == (2,)
  assert md["p"].y[0].shape == (3,) and type(md["p"].y[1]) is tuple
  assert md["p"].y[1][0].type == "int"
  assert list(md) == ["p", 7] and md[7]["z"].type == "None"


def test_custom_metadata_roundtrip(ckpt_dir):
  custom = {"lr": 0.1, "step": 10**20, "names": ["a", "é"], "nested": {"k": None, "b": True},
            "empty": {}}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"x": 1}, custom_metadata=custom)
  assert flax_ckpt.metadata(path).custom_metadata == custom


def test_metadata_reads_no_array_bytes(ckpt_dir):
  tree = {"w": jnp.ones((64, 64)), "n": np.arange(1000), "bytes": b"y" * 100_000,
          "key": jax.random.key(1)}
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, tree, custom_metadata={"a": 1})
  data_file = path / "state" / "data.p0.bin"
  assert os.path.exists(data_file)
  os.remove(data_file)
  md = flax_ckpt.metadata(path)
  assert md["w"].shape == (64, 64) and md["w"].nbytes == 64 * 64 * 4
  assert md["n"].shape == (1000,)
  assert md["bytes"].nbytes == 100_000
  assert md["key"].shape == ()
  assert md.custom_metadata == {"a": 1}
  with pytest.raises(OSError):  # the data really is gone
    flax_ckpt.load(path)
