"""Property-based tests (hypothesis) of ``save``/``load`` on random trees of every leaf type."""

import math
import os
import struct
import tempfile

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import flax_ckpt

# When a @given test fails, hypothesis' pytest plugin imports libcst to suggest a patch, and
# libcst's import warns (DeprecationWarning from mypy_extensions); with filterwarnings=error
# that becomes an INTERNALERROR that hides the real failure.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

# ----------------------------------------------------------------------------- helpers

_SETTINGS = dict(
    deadline=None,
    database=None,  # no example database under .hypothesis/ in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)

_INT_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
_NP_DTYPES = (["bool"] + _INT_DTYPES
              + ["float16", "float32", "float64", "complex64", "bfloat16", "float8_e4m3fn",
                 "int4", "uint4"])
# jax x64 is off: no 64-bit dtypes in jax arrays.
_JAX_DTYPES = ["float32", "int32", "bfloat16", "bool", "int8", "uint8", "float16", "complex64",
               "float8_e4m3fn", "int4"]


def _dtype(name):
  return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _bits(x):
  """The raw bytes of an array (any dtype, any rank, any strides) as a flat uint8 array."""
  return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _from_bytes(name, shape, raw):
  """An array of dtype ``name`` and ``shape`` from ``raw`` bytes (every valid bit pattern)."""
  dt = _dtype(name)
  u8 = np.frombuffer(raw, np.uint8).copy()
  if name == "bool":
    u8 &= 1
  elif name in ("int4", "uint4"):
    u8 &= 0x0F  # ml_dtypes keeps a sub-byte value in the low bits, high bits zero
  return u8.view(dt).reshape(shape)


def _path_str(path):
  """A leaf path as flax_ckpt prints it in errors, e.g. ``['params'][3]``."""
  return "".join(f"[{k!r}]" for k in path)


def _assert_identical(actual, expected, *, ordered=True, where="<root>"):
  """Same container types, dict key types (and order), leaf types, dtypes, shapes and bits."""
  if isinstance(expected, jax.Array):
    assert isinstance(actual, jax.Array), (where, type(actual))
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
    np.testing.assert_array_equal(_bits(actual), _bits(expected), err_msg=where)
    return
  assert type(actual) is type(expected), (where, type(actual), type(expected))
  if type(expected) is dict:
    akeys = [(type(k), k) for k in actual]
    ekeys = [(type(k), k) for k in expected]
    if ordered:
      assert akeys == ekeys, where
    else:
      assert len(akeys) == len(ekeys) and set(akeys) == set(ekeys), where
    for k in expected:
      _assert_identical(actual[k], expected[k], ordered=ordered, where=f"{where}[{k!r}]")
  elif type(expected) in (list, tuple):
    assert len(actual) == len(expected), where
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
      _assert_identical(a, e, ordered=ordered, where=f"{where}[{i}]")
  elif isinstance(expected, (np.ndarray, np.generic)):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
    np.testing.assert_array_equal(_bits(actual), _bits(expected), err_msg=where)
  elif type(expected) is float:
    assert struct.pack("<d", actual) == struct.pack("<d", expected), (where, actual, expected)
  elif type(expected) is complex:
    assert struct.pack("<dd", actual.real, actual.imag) == struct.pack(
        "<dd", expected.real, expected.imag), (where, actual, expected)
  else:  # None, bool, int, str, bytes
    assert actual == expected, (where, actual, expected)


def _template(x):
  """The template for ``x``: ShapeDtypeStruct for jax arrays, the array for numpy, else None."""
  if type(x) is dict:
    return {k: _template(v) for k, v in x.items()}
  if type(x) in (list, tuple):
    return type(x)(_template(v) for v in x)
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  if isinstance(x, np.ndarray):
    return x
  return None


def _roundtrip(tree, template=None, **kwargs):
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "ckpt")
    flax_ckpt.save(path, tree)
    return flax_ckpt.load(path, template, **kwargs)


# -------------------------------------------------------------------------- strategies


def _float_from_bits(bits):
  return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


_NANS = st.builds(lambda sign, payload: _float_from_bits(sign << 63 | 0x7FF << 52 | payload),
                  st.integers(0, 1), st.integers(1, 2**52 - 1))  # quiet and signaling
_FLOATS = st.one_of(st.floats(), _NANS,
                    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324]))
_INTS = st.one_of(
    st.integers(),
    st.integers(-(2**200), 2**200),
    st.sampled_from([2**53 - 1, 2**53, -(2**53) + 1, -(2**53), 2**63, 2**64, -(2**64) - 1,
                     -(10**40)]),
)
_ANY_CHAR = st.characters(codec=None, exclude_categories=())  # lone surrogates too


_SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
_TEXT = st.one_of(st.text(), st.text(_ANY_CHAR), _SURROGATES)
_BIG_BYTES = st.builds(lambda n, pat: (pat * n)[:n],  # around the 64 KiB inline limit
                       st.integers(64 * 1024 - 1, 64 * 1024 + 1),
                       st.binary(min_size=1, max_size=4))
_BYTES = st.one_of(st.binary(max_size=40), _BIG_BYTES)

_STR_KEYS = st.one_of(st.text(max_size=6), st.text(_ANY_CHAR, max_size=3), _SURROGATES)
_INT_KEYS = st.one_of(st.integers(-3, 3), st.integers())


@st.composite
def _numpy_arrays(draw, dtypes=tuple(_NP_DTYPES), layouts=("c", "reversed", "transposed")):
  name = draw(st.sampled_from(dtypes))
  shape = tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
  n = math.prod(shape) * _dtype(name).itemsize
  arr = _from_bytes(name, shape, draw(st.binary(min_size=n, max_size=n)))
  layout = draw(st.sampled_from(layouts))
  if layout == "reversed" and arr.ndim:
    arr = arr[..., ::-1]  # negative strides
  elif layout == "transposed":
    arr = arr.T
  return arr


@st.composite
def _numpy_scalars(draw):
  name = draw(st.sampled_from(_NP_DTYPES))
  raw = draw(st.binary(min_size=_dtype(name).itemsize, max_size=_dtype(name).itemsize))
  return _from_bytes(name, (), raw)[()]


_NP_SCALARS = _numpy_scalars()
_JAX_ARRAYS = _numpy_arrays(dtypes=tuple(_JAX_DTYPES), layouts=("c",)).map(jnp.asarray)

_ARRAYS = [_NP_SCALARS, _numpy_arrays(), _JAX_ARRAYS]
_LEAVES = st.one_of(
    st.none(), st.booleans(), _INTS, _FLOATS, st.builds(complex, _FLOATS, _FLOATS), _TEXT,
    _BYTES, *_ARRAYS, *_ARRAYS,  # arrays twice: about half the leaves
)


def _trees(mixed_keys):
  if mixed_keys:
    dicts = lambda c: st.dictionaries(st.one_of(_STR_KEYS, _INT_KEYS), c, max_size=4)
  else:  # jax.tree_util cannot flatten a template dict whose keys cannot be sorted together
    dicts = lambda c: st.one_of(st.dictionaries(_STR_KEYS, c, max_size=4),
                                st.dictionaries(_INT_KEYS, c, max_size=4))
  return st.recursive(
      _LEAVES,
      lambda c: st.one_of(dicts(c), st.lists(c, max_size=4), st.lists(c, max_size=4).map(tuple)),
      max_leaves=12,
  )


# ------------------------------------------------------------------------------- tests


@settings(max_examples=40, **_SETTINGS)
@given(tree=_trees(mixed_keys=True))
def test_roundtrip_without_template_is_identical(tree):
  _assert_identical(_roundtrip(tree), tree)


@settings(max_examples=40, **_SETTINGS)
@given(tree=_trees(mixed_keys=False))
def test_roundtrip_with_template_is_identical(tree):
  out = _roundtrip(tree, _template(tree))
  # jax orders a template's dict keys when flattening it: key order is not compared here.
  _assert_identical(out, tree, ordered=False)


@st.composite
def _flat_trees_and_subsets(draw):
  """A dict of leaves and of dicts of leaves, and a subset of its leaf paths."""
  keys = draw(st.one_of(st.lists(_STR_KEYS, min_size=1, max_size=5, unique=True),
                        st.lists(_INT_KEYS, min_size=1, max_size=5, unique=True)))
  tree, paths = {}, []
  for k in keys:
    if draw(st.booleans()):
      tree[k] = draw(st.dictionaries(_STR_KEYS, _LEAVES, min_size=1, max_size=3))
      paths.extend((k, k2) for k2 in tree[k])
    else:
      tree[k] = draw(_LEAVES)
      paths.append((k,))
  chosen = draw(st.lists(st.sampled_from(paths), unique=True))
  return tree, paths, chosen


@settings(max_examples=40, **_SETTINGS)
@given(case=_flat_trees_and_subsets())
def test_partial_load_returns_exactly_the_subset(case):
  tree, paths, chosen = case
  subset = {}
  for p in chosen:
    if len(p) == 1:
      subset[p[0]] = tree[p[0]]
    else:
      subset.setdefault(p[0], {})[p[1]] = tree[p[0]][p[1]]
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "ckpt")
    flax_ckpt.save(path, tree)
    out = flax_ckpt.load(path, _template(subset), partial=True)
    _assert_identical(out, subset, ordered=False)

    left_out = [p for p in paths if p not in chosen]
    if not left_out:
      _assert_identical(flax_ckpt.load(path, _template(subset)), tree, ordered=False)
      return
    with pytest.raises(flax_ckpt.StructureMismatchError) as e:
      flax_ckpt.load(path, _template(subset))
  msg = str(e.value)
  assert "partial=True" in msg
  assert "in the template but not in the checkpoint" not in msg
  for p in left_out:
    assert _path_str(p) in msg, (p, msg)


def test_str_with_surrogate_pair_code_points():
  s = "\ud800\udc00"  # two lone surrogate code points, not the one code point U+10000
  assert len(s) == 2
  tree = {"s": s, s: 1, "\U00010000": 2}  # both keys survive, distinct
  out = _roundtrip(tree)
  assert out == tree and [len(k) for k in out] == [1, 2, 1], ascii(out)
