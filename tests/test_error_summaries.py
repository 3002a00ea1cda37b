"""Errors stay readable on huge trees, and lossy dtype casts warn (issue 16).

- A structure mismatch over thousands of leaves: the first line counts each kind of
  difference, each kind lists its first paths then "... and N more", the message stays short.
- A template dtype the saved values do not fit (float32 -> int8, float32 -> bfloat16) is cast
  as asked, with one LossyCastWarning naming the leaves; lossless casts and None template
  leaves do not warn.
"""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import serialization

import flax_ckpt
from flax_ckpt._src.errors import LossyCastWarning, lossy_casts, mismatch_summary

N = 3000  # leaves in the "huge" trees


def _huge(n: int = N) -> dict:
  return {"layers": {f"l{i:04d}": np.zeros(2, np.float32) for i in range(n)}}


def _sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_mismatch_summary_counts_and_caps():
  msg = mismatch_summary(
      "the template does not match X",
      [("missing", "in the template only: {}", [f"['m{i}']" for i in range(25)]),
       ("extra", "in X only: {} (pass partial=True)", ["['e']"]),
       ("that do not fit", "", [f"['s{i}']: shape (1,), template (2,)" for i in range(12)]),
       ("unused", "never shown: {}", [])],
      "Fix it.", cap=10)
  lines = msg.splitlines()
  assert lines[0] == ("the template does not match X: 25 leaves missing, 1 leaf extra, "
                      "12 leaves that do not fit")
  assert lines[1].startswith("  in the template only: ['m0'], ") and lines[1].endswith(
      "['m9'] ... and 15 more")
  assert lines[2] == "  in X only: ['e'] (pass partial=True)"
  assert lines[3:13] == [f"  ['s{i}']: shape (1,), template (2,)" for i in range(10)]
  assert lines[13] == "  ... and 2 more"
  assert lines[-1] == "Fix it." and "never shown" not in msg


def test_thousands_of_mismatched_leaves_give_a_short_summary(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, _huge())
  layers = {f"l{i:04d}": _sds((2,)) for i in range(1000)}  # l1000.. are not in the template
  layers.update({f"new{i:04d}": _sds((2,)) for i in range(500)})  # not in the checkpoint
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, {"layers": layers})
  msg = str(e.value)
  first = msg.splitlines()[0]
  assert str(path) in first
  assert "500 leaves missing from the checkpoint" in first
  assert "2000 leaves not in the template" in first
  assert "['layers']['new0000']" in msg and "... and 490 more" in msg
  assert "['layers']['l1000']" in msg and "... and 1990 more" in msg
  assert "partial=True" in msg and len(msg) < 3000


def test_thousands_of_shape_differences_are_capped(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, _huge())
  template = {"layers": {f"l{i:04d}": _sds((3,)) for i in range(N)}}
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, template)
  msg = str(e.value)
  assert msg.splitlines()[0].endswith(f"{N} leaves of another shape")
  assert "['layers']['l0000']: checkpoint shape (2,), template shape (3,)" in msg
  assert f"... and {N - 10} more" in msg and len(msg) < 3000


def test_msgpack_mismatch_summary(tmp_path):
  path = tmp_path / "f.msgpack"
  path.write_bytes(serialization.to_bytes(_huge()))
  template = {"layers": {f"x{i:04d}": np.zeros(2, np.float32) for i in range(N)}}
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path, template)
  msg = str(e.value)
  assert f"{N} leaves missing from the file, {N} leaves not in the template" in msg
  assert f"... and {N - 10} more" in msg and len(msg) < 3000


@pytest.mark.parametrize("saved,target,lossy", [
    ("float32", "int8", True), ("float32", "bfloat16", True), ("float64", "float32", True),
    ("int64", "float32", True), ("int32", "uint32", True), ("complex64", "float32", True),
    ("int64", "int16", True), ("float32", "float64", False), ("int8", "int32", False),
    ("bfloat16", "float32", False), ("float32", "float32", False), ("bool", "int8", False),
])
def test_lossy_cast_rule(saved, target, lossy):
  s, t = (np.dtype(getattr(ml_dtypes, n, n)) for n in (saved, target))
  assert lossy_casts([("p", s, t, False)]) == ([f"p {s.name}->{t.name}"] if lossy else [])


def test_the_cast_jax_makes_with_x64_off_is_not_lossy_on_device():
  x64 = jax.config.jax_enable_x64
  pairs = [("a", np.dtype("float64"), np.dtype("float32"), True),
           ("b", np.dtype("int64"), np.dtype("int32"), True),
           ("c", np.dtype("float64"), np.dtype(ml_dtypes.bfloat16), True)]
  assert lossy_casts(pairs) == (["a float64->float32", "b int64->int32"] if x64 else []) + [
      "c float64->bfloat16"]


def test_lossy_cast_warns_once_naming_the_leaves(ckpt_dir):
  path = ckpt_dir / "ckpt"
  x = np.linspace(-3, 3, 6, dtype=np.float32)
  flax_ckpt.save(path, {"w": x, "b": x, "k": x, "same": x})
  with pytest.warns(LossyCastWarning) as rec:
    out = flax_ckpt.load(path, {"w": _sds((6,), jnp.int8), "b": np.zeros(6, ml_dtypes.bfloat16),
                                "k": _sds((6,), jnp.float32), "same": None})
  assert len(rec) == 1
  msg = str(rec[0].message)
  assert "2 leaves" in msg and "['w'] float32->int8" in msg and "['b'] float32->bfloat16" in msg
  assert "['k']" not in msg and "['same']" not in msg
  assert rec[0].filename == __file__  # the warning points at the user's call
  np.testing.assert_array_equal(np.asarray(out["w"]), x.astype(np.int8))
  assert out["b"].dtype == ml_dtypes.bfloat16 and out["same"].dtype == np.float32


def test_many_lossy_casts_are_capped(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, _huge(50))
  template = {"layers": {f"l{i:04d}": _sds((2,), jnp.float16) for i in range(50)}}
  with pytest.warns(LossyCastWarning, match=r"casting 50 leaves.*and 40 more"):
    flax_ckpt.load(path, template)


def test_lossless_casts_and_none_leaves_do_not_warn(ckpt_dir):
  path = ckpt_dir / "ckpt"
  f = np.arange(4, dtype=np.float32)
  i = np.arange(4, dtype=np.int8)
  flax_ckpt.save(path, {"f": f, "i": i, "n": f})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(path, {"f": _sds((4,), jnp.float64) if jax.config.jax_enable_x64
                                else np.zeros(4, np.float64),
                                "i": np.zeros(4, np.int32), "n": None})
  assert out["f"].dtype == np.float64 and out["i"].dtype == np.int32
  assert out["n"].dtype == np.float32  # None: as saved, no cast
  np.testing.assert_array_equal(out["n"], f)


def test_msgpack_lossy_cast_warns(tmp_path):
  path = tmp_path / "f.msgpack"
  path.write_bytes(serialization.to_bytes({"w": np.ones(3, np.float32), "v": np.ones(3)}))
  with pytest.warns(LossyCastWarning, match=r"\['w'\] float32->int8") as rec:
    out = flax_ckpt.load(path, {"w": np.zeros(3, np.int8), "v": None})
  assert len(rec) == 1 and "['v']" not in str(rec[0].message)
  assert out["w"].dtype == np.int8


@pytest.fixture(scope="module")
def orbax_ckpt(tmp_path_factory):
  """An Orbax checkpoint (StandardCheckpointer) of 200 float32 leaves."""
  with warnings.catch_warnings():  # Orbax's own warnings while it imports and writes
    warnings.simplefilter("ignore")
    ocp = pytest.importorskip("orbax.checkpoint")
    path = str(tmp_path_factory.mktemp("orbax") / "ckpt")
    with ocp.StandardCheckpointer() as ck:
      ck.save(path, _huge(200))
      ck.wait_until_finished()
  return path


def test_orbax_mismatch_summary(orbax_ckpt):
  layers = {f"l{i:04d}": _sds((2,)) for i in range(100)}
  layers.update({f"new{i:04d}": _sds((2,)) for i in range(30)})
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(orbax_ckpt, {"layers": layers})
  msg = str(e.value)
  assert ("30 leaves missing from the checkpoint, 100 leaves not in the template"
          in msg.splitlines()[0])
  assert "['layers']['new0000']" in msg and "... and 20 more" in msg
  assert "... and 90 more" in msg and "partial=True" in msg and len(msg) < 3000


def test_orbax_lossy_cast_warns_once(orbax_ckpt):
  template = {"layers": {f"l{i:04d}": _sds((2,), jnp.int8 if i < 3 else jnp.float32)
                         for i in range(200)}}
  with pytest.warns(LossyCastWarning) as rec:
    out = flax_ckpt.load(orbax_ckpt, template)
  assert len(rec) == 1 and rec[0].filename == __file__
  msg = str(rec[0].message)
  assert "casting 3 leaves" in msg and "['layers']['l0002'] float32->int8" in msg
  assert out["layers"]["l0000"].dtype == jnp.int8
