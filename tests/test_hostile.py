"""Hostile checkpoints: every byte read from a checkpoint is untrusted input.

Each test crafts one checkpoint (re-sealing its file checksums with ``_crafting.reseal``
so the crafted metadata reaches the structural checks, not the checksum check) and asserts
that loading it fails with a clear ``FormatError`` (or another ``CheckpointError``) that
names the file or leaf, within 2 s and 64 MiB of peak RSS over the baseline, without
reading or changing any file outside the checkpoint. ``flax_ckpt.verify`` must report such
a checkpoint, not crash on it. Cases already in test_errors.py are not repeated here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import xxhash
from _crafting import reseal

import flax_ckpt

LIMIT_S = 2.0
LIMIT_KIB = 64 * 1024  # ru_maxrss is in KiB on Linux
OLD_ATIME = 1_000_000_000  # a file read since gets a newer atime (relatime: atime < mtime)
TREE = "_TREE.json"
CHUNKS = "_CHUNKS.p0.json"


def _maxrss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _values() -> dict:
  return {"a": np.arange(12, dtype=np.float64).reshape(3, 4),
          "b": np.arange(5, dtype=np.int32)}


class Crafted:
  """A saved checkpoint ``root/c`` (leaves ``['a']`` id 0, ``['b']`` id 1) to craft, next
  to ``root/outside/secret.bin``, a file that must never be read or changed."""

  def __init__(self, root):
    self.root = root
    self.path = root / "c"
    self.state = self.path / "state"
    flax_ckpt.save(self.path, _values())
    self.outside = root / "outside"
    self.outside.mkdir()
    self.secret = self.outside / "secret.bin"
    self.secret.write_bytes((self.state / "data.p0.bin").read_bytes())
    self.secret_bytes = self.secret.read_bytes()
    os.utime(self.secret, (OLD_ATIME, time.time()))

  def edit_json(self, rel: str, edit) -> None:
    """Applies ``edit`` (in place) to the JSON document at ``rel``, then reseals."""
    f = self.path / rel
    doc = json.loads(f.read_text())
    edit(doc)
    f.write_text(json.dumps(doc))
    reseal(self.path)

  def write(self, rel: str, raw: bytes) -> None:
    (self.path / rel).write_bytes(raw)
    reseal(self.path)

  def assert_outside_untouched(self) -> None:
    st = os.stat(self.secret)
    assert st.st_atime == OLD_ATIME, "a file outside the checkpoint was read"
    assert self.secret.read_bytes() == self.secret_bytes
    os.utime(self.secret, (OLD_ATIME, st.st_mtime))  # our own read above


@pytest.fixture
def ck(tmp_path):
  return Crafted(tmp_path)


def _refused(call, *names, exc=flax_ckpt.FormatError):
  """Runs ``call``; it must raise ``exc`` naming one of ``names``, within the time and
  memory limits. Returns the exception."""
  before = _maxrss()
  t = time.monotonic()
  with pytest.raises(exc) as e:
    call()
  elapsed = time.monotonic() - t
  grown = _maxrss() - before
  assert elapsed < LIMIT_S, f"took {elapsed:.2f} s"
  assert grown < LIMIT_KIB, f"peak RSS grew by {grown} KiB"
  msg = str(e.value)
  assert any(n in msg for n in names), f"{names} not named in: {msg}"
  return e.value


def _verify_reports(ck: Crafted) -> None:
  """``flax_ckpt.verify`` reports the crafted checkpoint (a falsy report), never raises."""
  t = time.monotonic()
  report = flax_ckpt.verify(ck.path)
  assert time.monotonic() - t < LIMIT_S
  assert not report, f"verify found nothing wrong in a crafted checkpoint: {report}"
  ck.assert_outside_untouched()


def _load_refused(ck: Crafted, *names, exc=flax_ckpt.FormatError, verify: bool = True):
  """A load of the crafted checkpoint is refused; verify reports it; nothing outside read."""
  err = _refused(lambda: flax_ckpt.load(ck.path), *names, exc=exc)
  ck.assert_outside_untouched()
  if verify:
    _verify_reports(ck)
  return err


def _params(edits: dict) -> list:
  """``edits`` as pytest params, one id each."""
  return [pytest.param(e, id=k) for k, e in edits.items()]


def test_baseline_checkpoint_loads_and_verifies(ck):
  """The uncrafted checkpoint (resealed by the test's own code) loads and verifies."""
  reseal(ck.path)
  out = flax_ckpt.load(ck.path)
  for k, v in _values().items():
    np.testing.assert_array_equal(out[k], v)
  assert flax_ckpt.verify(ck.path)
  ck.assert_outside_untouched()


# ------------------------------------------------------------------ chunk index (_CHUNKS)


def _chunk(doc, leaf="0"):
  return doc["chunks"][leaf][0]


CHUNK_EDITS = {
    "negative_h": lambda d: _chunk(d).update(h=[-3, -4]),
    "negative_h_one_dim": lambda d: _chunk(d).update(h=[3, -4]),
    "negative_s": lambda d: _chunk(d).update(s=[-1, 0]),
    "negative_o_resealed": lambda d: _chunk(d).update(o=-64),
    "negative_n": lambda d: _chunk(d).update(n=-96),
    "leaf_id_7_of_2": lambda d: d["chunks"].update({"7": d["chunks"]["1"]}),
    "leaf_id_minus_1": lambda d: d["chunks"].update({"-1": d["chunks"].pop("1")}),
    "leaf_id_abc": lambda d: d["chunks"].update({"abc": d["chunks"].pop("1")}),
    "leaf_id_2_of_2": lambda d: d["chunks"].update({"2": d["chunks"].pop("1")}),
    "missing_o": lambda d: _chunk(d).pop("o"),
    "missing_p": lambda d: _chunk(d).pop("p"),
    "missing_s": lambda d: _chunk(d).pop("s"),
    "o_string": lambda d: _chunk(d).update(o="12"),
    "o_float": lambda d: _chunk(d).update(o=0.0),
    "o_bool": lambda d: _chunk(d).update(o=False),
    "n_huge": lambda d: _chunk(d).update(n=2 ** 70),
    "o_huge": lambda d: _chunk(d).update(o=2 ** 64),
    "o_int64_max": lambda d: _chunk(d).update(o=2 ** 63 - 64),
    "s_huge": lambda d: _chunk(d).update(s=[2 ** 63, 0]),
    "h_huge_matching_n": lambda d: _chunk(d).update(h=[2 ** 62, 4], n=2 ** 67),
    "s_null": lambda d: _chunk(d).update(s=None),
    "h_float": lambda d: _chunk(d).update(h=[1.5, 4]),
    "h_huge": lambda d: _chunk(d).update(h=[2 ** 64, 4]),
    "chunk_not_object": lambda d: d["chunks"].update({"0": [7]}),
    "chunks_of_leaf_not_list": lambda d: d["chunks"].update({"0": {"s": [0]}}),
    "process_index_negative": lambda d: d.update(process_index=-1),
    "process_index_string": lambda d: d.update(process_index="0"),
    "chunks_missing": lambda d: d.pop("chunks"),
    "segment_bytes_tiny": lambda d: d.update(segment_bytes=1),
    "xb_zero": lambda d: _chunk(d).update(xb=0),
    "xb_negative": lambda d: _chunk(d).update(xb=-32),
    "xb_string": lambda d: _chunk(d).update(xb="32"),
    "x_too_long": lambda d: _chunk(d).update(x=_chunk(d)["x"] * 2),
    "x_empty": lambda d: _chunk(d).update(x=[]),
    "x_not_hex": lambda d: _chunk(d).update(x=["zz" * 8]),
    "x_uppercase_hex": lambda d: _chunk(d).update(x=[_chunk(d)["x"][0].upper()]),
    "x_short_digest": lambda d: _chunk(d).update(x=[_chunk(d)["x"][0][:8]]),
    "x_not_list": lambda d: _chunk(d).update(x=_chunk(d)["x"][0]),
    "x_int_digest": lambda d: _chunk(d).update(x=[12345]),
    "checksum_md5": lambda d: d.update(checksum="md5"),
    "checksum_not_string": lambda d: d.update(checksum=["xxh3_64"]),
}


@pytest.mark.parametrize("edit", _params(CHUNK_EDITS))
def test_crafted_chunk_index_is_a_format_error(ck, edit):
  ck.edit_json(f"state/{CHUNKS}", edit)
  _load_refused(ck, CHUNKS, "['a']", "['b']", verify=False)


@pytest.mark.parametrize("edit", _params(CHUNK_EDITS))
def test_crafted_chunk_index_is_reported_by_verify(ck, edit):
  ck.edit_json(f"state/{CHUNKS}", edit)
  _verify_reports(ck)


def test_chunk_index_not_utf8_is_a_format_error_naming_it(ck):
  raw = (ck.state / CHUNKS).read_bytes().replace(b'"data.p0.bin"', b'"data.p0.\xff\xfe"')
  ck.write(f"state/{CHUNKS}", raw)
  _load_refused(ck, CHUNKS)


def test_chunk_index_deeply_nested_is_a_format_error_naming_it(ck):
  ck.write(f"state/{CHUNKS}", b'{"chunks": ' + b"[" * 100_000)
  _load_refused(ck, CHUNKS)


def test_a_second_chunk_index_claiming_a_leaf_again_is_refused(ck):
  """A crafted ``_CHUNKS.p1.json`` (over a real copy of the data as data.p1.bin) adds
  chunks to leaves already covered: overlapping boxes, refused; never the wrong bytes."""
  doc = json.loads((ck.state / CHUNKS).read_text())
  doc["process_index"] = 1
  doc["data_file"] = "data.p1.bin"
  for chunks in doc["chunks"].values():
    for c in chunks:
      c["p"] = 1
  (ck.state / "_CHUNKS.p1.json").write_text(json.dumps(doc))
  shutil.copyfile(ck.state / "data.p0.bin", ck.state / "data.p1.bin")
  reseal(ck.path)
  _load_refused(ck, "['a']", "['b']", "_CHUNKS")


def test_chunk_in_the_data_file_of_a_process_that_wrote_none_is_a_clean_error(ck):
  """``"p": 3`` names data.p3.bin, which does not exist: an error naming it (the
  library's deliberate FileNotFoundError for a missing data file, or a FormatError)."""
  ck.edit_json(f"state/{CHUNKS}", lambda d: _chunk(d).update(p=3))
  _refused(lambda: flax_ckpt.load(ck.path), "data.p3.bin",
           exc=(flax_ckpt.FormatError, FileNotFoundError))
  _verify_reports(ck)


def _digests(data: bytes, xb: int) -> list[str]:
  return [xxhash.xxh3_64_hexdigest(data[i:i + xb]) for i in range(0, len(data), xb)]


def test_checksum_blocks_of_whole_rows_load(ck):
  """Control: ``xb`` of one 32-byte row, with its digests, is a valid layout."""
  data = (ck.state / "data.p0.bin").read_bytes()[:96]
  ck.edit_json(f"state/{CHUNKS}", lambda d: _chunk(d).update(xb=32, x=_digests(data, 32)))
  np.testing.assert_array_equal(flax_ckpt.load(ck.path)["a"], _values()["a"])
  assert flax_ckpt.verify(ck.path)


def test_checksum_block_not_whole_rows_is_a_format_error(ck):
  data = (ck.state / "data.p0.bin").read_bytes()[:96]
  # 40 bytes is not a multiple of a 32-byte row; the digests match the 40-byte blocks
  ck.edit_json(f"state/{CHUNKS}", lambda d: _chunk(d).update(xb=40, x=_digests(data, 40)))
  _load_refused(ck, CHUNKS, "['a']")


def test_checksum_block_not_whole_rows_partial_read_is_a_format_error(ck):
  """The same crafted ``xb`` through a read of part of the chunk (a template that asks
  for a sharded array makes the load read row boxes) is a FormatError naming the leaf."""
  import jax
  data = (ck.state / "data.p0.bin").read_bytes()[:96]
  ck.edit_json(f"state/{CHUNKS}", lambda d: _chunk(d).update(xb=40, x=_digests(data, 40)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:3]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  template = {"a": jax.ShapeDtypeStruct((3, 4), np.float64, sharding=sharding),
              "b": np.zeros(5, np.int32)}
  _refused(lambda: flax_ckpt.load(ck.path, template), "['a']", CHUNKS)
  ck.assert_outside_untouched()


# ------------------------------------------------------------------- leaf records (_TREE)


def _record(doc, i=0):
  return doc["leaves"][i]["record"]


RECORD_EDITS = {
    # negative dimensions whose product still matches nbytes and the chunk's box volume
    "shape_two_negative_dims": lambda d: _record(d).update(shape=[-3, -4]),
    "shape_negative_dim": lambda d: _record(d).update(shape=[-3, 4], nbytes=-96),
    "shape_string": lambda d: _record(d).update(shape="12"),
    "shape_string_dims": lambda d: _record(d).update(shape=["3", "4"]),
    "shape_float_dims": lambda d: _record(d).update(shape=[3.0, 4.0]),
    "shape_null": lambda d: _record(d).update(shape=None),
    "shape_missing": lambda d: _record(d).pop("shape"),
    "shape_huge_dims": lambda d: _record(d).update(shape=[2 ** 64, 2 ** 64]),
    "shape_wrong_rank": lambda d: _record(d).update(shape=[12]),
    "dtype_unknown": lambda d: _record(d).update(dtype="float128x"),
    "dtype_object": lambda d: _record(d).update(dtype="object"),
    "dtype_numpy_char": lambda d: _record(d).update(dtype="O"),
    "dtype_int": lambda d: _record(d).update(dtype=8),
    "dtype_list": lambda d: _record(d).update(dtype=["float64"]),
    "dtype_null": lambda d: _record(d).update(dtype=None),
    "dtype_missing": lambda d: _record(d).pop("dtype"),
    "dtype_mismatch_itemsize": lambda d: _record(d).update(dtype="int8"),
    "nbytes_wrong": lambda d: _record(d).update(nbytes=8),
}

@pytest.mark.parametrize("edit", _params(RECORD_EDITS))
def test_crafted_leaf_record_is_a_format_error_naming_the_leaf(ck, edit):
  ck.edit_json(f"state/{TREE}", edit)
  _load_refused(ck, "['a']", TREE, verify=False)


@pytest.mark.parametrize("edit", _params(RECORD_EDITS))
def test_crafted_leaf_record_is_reported_by_verify(ck, edit):
  ck.edit_json(f"state/{TREE}", edit)
  _verify_reports(ck)


@pytest.mark.parametrize("edit", _params(RECORD_EDITS))
def test_crafted_leaf_record_metadata_is_clean(ck, edit):
  """``flax_ckpt.metadata`` reads the same records: it may describe the leaf, or refuse it
  with a FormatError naming it, but never raises a raw TypeError/ValueError."""
  ck.edit_json(f"state/{TREE}", edit)
  t = time.monotonic()
  try:
    flax_ckpt.metadata(ck.path)
  except flax_ckpt.FormatError as e:
    assert "['a']" in str(e) or TREE in str(e), str(e)
  assert time.monotonic() - t < LIMIT_S
  ck.assert_outside_untouched()


SCALAR_EDITS = {
    "int_v_hex_garbage": lambda r: r.update(v="0xzz"),
    "int_v_missing": lambda r: r.pop("v"),
    "float_v_garbage": lambda r: r.update(v="nan:zz"),
    "float_v_list": lambda r: r.update(v=[1]),
}

@pytest.mark.parametrize("edit", _params(SCALAR_EDITS))
def test_crafted_scalar_record_is_a_format_error_naming_the_leaf(tmp_path, edit):
  path = tmp_path / "c"
  flax_ckpt.save(path, {"i": 7, "f": 1.5})
  tree_f = path / "state" / TREE
  doc = json.loads(tree_f.read_text())
  for leaf in doc["leaves"]:
    edit(leaf["record"])
  tree_f.write_text(json.dumps(doc))
  reseal(path)
  _refused(lambda: flax_ckpt.load(path), "['i']", "['f']", TREE)


# --------------------------------------------------------------- structure (_TREE root)


def _root(node):
  def edit(doc):
    doc["root"] = node
  return edit


_KIDS = [{"t": "leaf", "id": 0}, {"t": "leaf", "id": 1}]
ROOT_EDITS = {
    "unknown_t": _root({"t": "pickle", "c": [{"t": "leaf", "id": 0}]}),
    "t_missing": _root({"c": [{"t": "leaf", "id": 0}]}),
    "t_not_string": _root({"t": ["leaf"], "id": 0}),
    "leaf_id_out_of_range": _root({"t": "list", "c": [{"t": "leaf", "id": 7}]}),
    "leaf_id_negative": _root({"t": "list", "c": [{"t": "leaf", "id": -1}]}),
    "leaf_id_string": _root({"t": "list", "c": [{"t": "leaf", "id": "0"}]}),
    "leaf_id_missing": _root({"t": "list", "c": [{"t": "leaf"}]}),
    "leaf_id_twice": _root({"t": "list", "c": [{"t": "leaf", "id": 0},
                                               {"t": "leaf", "id": 0}]}),
    "dict_more_keys_than_children": _root({"t": "dict", "k": ["a", "b", "z"],
                                           "kt": ["s", "s", "s"], "c": _KIDS}),
    "dict_more_children_than_keys": _root({"t": "dict", "k": ["a"], "kt": ["s"],
                                           "c": _KIDS}),
    "dict_unhashable_key": _root({"t": "dict", "k": [["a"], "b"], "kt": ["s", "s"],
                                  "c": _KIDS}),
    "children_not_list": _root({"t": "list", "c": 5}),
    "child_not_object": _root({"t": "list", "c": [0, 1]}),
    "namedtuple_fields_missing": _root({"t": "namedtuple", "cls": "x.Y", "reg": False,
                                        "c": _KIDS}),
    "node_keys_not_pairs": _root({"t": "node", "cls": "x.Y", "reg": False, "keys": [1, 2],
                                  "c": _KIDS}),
}

@pytest.mark.parametrize("edit", _params(ROOT_EDITS))
def test_crafted_tree_structure_is_a_format_error_naming_the_file(ck, edit):
  ck.edit_json(f"state/{TREE}", edit)
  _load_refused(ck, TREE, verify=False)


@pytest.mark.parametrize("edit", _params(ROOT_EDITS))
def test_crafted_tree_structure_is_reported_by_verify(ck, edit):
  ck.edit_json(f"state/{TREE}", edit)
  _verify_reports(ck)


@pytest.mark.parametrize("edit", _params(ROOT_EDITS))
def test_crafted_tree_structure_through_a_template(ck, edit):
  """A load with a template walks the structure differently (by path): a clean
  CheckpointError naming the file or a leaf, or the template's leaves loaded correctly,
  never a raw error."""
  ck.edit_json(f"state/{TREE}", edit)
  t = time.monotonic()
  try:
    out = flax_ckpt.load(ck.path, {"a": np.zeros((3, 4)), "b": np.zeros(5, np.int32)})
  except flax_ckpt.CheckpointError as e:
    assert TREE in str(e) or "['a']" in str(e) or "['b']" in str(e), str(e)
  else:
    for k, v in _values().items():
      np.testing.assert_array_equal(out[k], v)
  assert time.monotonic() - t < LIMIT_S
  ck.assert_outside_untouched()


def _deep_root(depth: int) -> str:
  return '{"t":"list","c":[' * depth + '{"t":"leaf","id":0}' + "]}" * depth


@pytest.mark.parametrize("depth", [300, 450, 490, 10_000])
def test_deeply_nested_tree_root_is_a_format_error_not_recursion_error(ck, depth):
  """Nesting the JSON parser accepts but the structure walk might not, and nesting the
  parser refuses: a FormatError naming the file (or a correct load), never RecursionError."""
  doc = json.loads((ck.state / TREE).read_text())
  raw = ('{"version":1,"root":' + _deep_root(depth) + ',"leaves":'
         + json.dumps(doc["leaves"]) + "}")
  ck.write(f"state/{TREE}", raw.encode())
  for fn in (flax_ckpt.load, flax_ckpt.metadata):
    t = time.monotonic()
    try:
      fn(ck.path)
    except flax_ckpt.FormatError as e:
      assert TREE in str(e), str(e)
    assert time.monotonic() - t < LIMIT_S
  ck.assert_outside_untouched()


_CHILD = """
import sys
sys.setrecursionlimit(1_000_000)  # as deep-learning code often does
import flax_ckpt
try:
  flax_ckpt.load_checkpointables(sys.argv[1])
except flax_ckpt.FormatError as e:
  print("FormatError", e)
"""


@pytest.mark.parametrize("rel", [f"state/{TREE}", "_CHECKPOINT", "dataset/process_0-of-1.json"])
def test_absurd_nesting_with_a_raised_recursion_limit_is_a_format_error(tmp_path, rel):
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"state": _values(), "dataset": It()})
  depth = 100_000
  (path / rel).write_bytes(b'{"format": "flax_ckpt", "version": 1, "x": ' + b"[" * depth
                           + b"]" * depth + b"}")
  if rel != "_CHECKPOINT":
    reseal(path)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _CHILD, os.fspath(path)], env=env,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
  assert "FormatError" in r.stdout and os.path.basename(rel) in r.stdout, r.stdout


def test_tree_file_with_non_utf8_inside_a_string_is_a_format_error_naming_it(ck):
  raw = (ck.state / TREE).read_bytes().replace(b'"np.ndarray"', b'"np.nd\xc3\x28array"', 1)
  ck.write(f"state/{TREE}", raw)
  _load_refused(ck, TREE)


@pytest.mark.parametrize("raw", [b"\xef\xbb\xbf{}", b'{"version": 1, "root": {}, "leaves": []}'
                                 b"\x00", b"null", b'"string"', b"1e999999"],
                         ids=["bom", "trailing_nul", "null", "string", "huge_float"])
def test_tree_file_odd_documents_are_a_format_error_naming_it(ck, raw):
  ck.write(f"state/{TREE}", raw)
  _load_refused(ck, TREE)


def test_tree_leaf_path_malformed_is_a_format_error(ck):
  ck.edit_json(f"state/{TREE}", lambda d: d["leaves"][0].update(path=[5, [None]]))
  _load_refused(ck, TREE, "leaf", verify=False)


# ---------------------------------------------------------------- commit marker (_CHECKPOINT)


def _edit_marker(ck: Crafted, edit) -> None:
  """Edits ``_CHECKPOINT`` without resealing (reseal rewrites the checksums entry)."""
  f = ck.path / "_CHECKPOINT"
  doc = json.loads(f.read_text())
  edit(doc)
  f.write_text(json.dumps(doc))


MARKER_EDITS = {
    "algorithm_md5": lambda d: d["checksums"].update(algorithm="md5"),
    "algorithm_missing": lambda d: d["checksums"].pop("algorithm"),
    "files_not_object": lambda d: d["checksums"].update(files=["state/_TREE.json"]),
    "entry_dotdot": lambda d: d["checksums"]["files"].update(
        {"state/../../outside/secret.bin": "0" * 16}),
    "entry_leading_dotdot": lambda d: d["checksums"]["files"].update(
        {"../outside/secret.bin": "0" * 16}),
    "entry_absolute": lambda d: d["checksums"]["files"].update(
        {"/etc/passwd": "0" * 16}),
    "entry_dot": lambda d: d["checksums"]["files"].update({"state/./_TREE.json": "0" * 16}),
    "entry_bad_digest": lambda d: d["checksums"]["files"].update(
        {"state/_TREE.json": "not-a-digest"}),
    "checksums_not_object": lambda d: d.update(checksums="xxh3_64"),
    "part_dir_dotdot": lambda d: d["checkpointables"]["state"].update(dir="../outside"),
    "part_dir_absolute": lambda d: d["checkpointables"]["state"].update(dir="/etc"),
    "part_entry_not_object": lambda d: d["checkpointables"].update(state="pytree"),
    "generation_dotdot": lambda d: d.update(version=2, generation="../outside"),
    "checkpointables_list": lambda d: d.update(checkpointables=["state"]),
}


@pytest.mark.parametrize("edit", list(MARKER_EDITS.values()), ids=list(MARKER_EDITS))
def test_crafted_commit_marker_is_a_format_error_naming_it(ck, edit):
  _edit_marker(ck, edit)
  _load_refused(ck, "_CHECKPOINT", str(ck.path))
  _refused(lambda: flax_ckpt.metadata(ck.path), "_CHECKPOINT", str(ck.path))


def test_commit_marker_deeply_nested_is_a_format_error(ck):
  (ck.path / "_CHECKPOINT").write_bytes(b'{"format": "flax_ckpt", "x": ' + b"[" * 100_000)
  _load_refused(ck, "_CHECKPOINT")


def test_commit_marker_not_utf8_is_a_format_error(ck):
  raw = (ck.path / "_CHECKPOINT").read_bytes().replace(b'"flax_ckpt"', b'"flax_\xff"', 1)
  (ck.path / "_CHECKPOINT").write_bytes(raw)
  _load_refused(ck, "_CHECKPOINT")


# ---------------------------------------------------------------------- iterator state


class It:
  """A data iterator: its position (and a tuple, so the state is saved as typed JSON)."""

  def __init__(self, state=None):
    self.state = state if state is not None else {"pos": 3}

  def get_state(self):
    return self.state

  def set_state(self, s):
    self.state = s


STATE_FILES = {
    "json": ({"pos": 3}, "process_0-of-1.json"),
    "typed": ({"pos": (3, 4)}, "process_0-of-1.typed.json"),
}

STATE_CONTENT = {
    "not_utf8": b'{"pos": "\xff\xfe"}',
    "deep": b"[" * 100_000,
    "deep_closed": b"[" * 5000 + b"]" * 5000,
    "empty": b"",
    "not_object": b"[1, 2]",
    "typed_v_missing": b'{"flax_ckpt_typed_state": 1}',
    "typed_unknown_tag": b'{"flax_ckpt_typed_state": 1, "v": {"zz": 1}}',
    "typed_two_tags": b'{"flax_ckpt_typed_state": 1, "v": {"l": [], "t": []}}',
    "typed_bad_int": b'{"flax_ckpt_typed_state": 1, "v": {"i": "0xzz"}}',
    "typed_bad_array": b'{"flax_ckpt_typed_state": 1, "v": {"a": ["float64", [1000], "AAAA"]}}',
    "typed_object_array": b'{"flax_ckpt_typed_state": 1, "v": {"a": ["object", [1], "AAAA"]}}',
    "typed_unknown_np_dtype": b'{"flax_ckpt_typed_state": 1, "v": {"np": ["float128x", 1]}}',
    "typed_dict_unhashable": b'{"flax_ckpt_typed_state": 1, "v": {"d": [[{"l": []}, 1]]}}',
    "typed_deep": b'{"flax_ckpt_typed_state": 1, "v": ' + b'{"l": [' * 2000 + b"1"
                  + b"]}" * 2000 + b"}",
}


def _state_cases() -> list:
  """(kind, content) pairs; tagged JSON and non-objects only mean something in .typed.json
  (a plain .json state may be any JSON value)."""
  return [pytest.param(kind, content, id=f"{kind}-{name}") for kind in STATE_FILES
          for name, content in STATE_CONTENT.items()
          if kind == "typed" or not (name.startswith("typed") or name == "not_object")]


@pytest.mark.parametrize("kind, content", _state_cases())
def test_malformed_iterator_state_is_a_format_error_naming_the_file(tmp_path, kind, content):
  state, name = STATE_FILES[kind]
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"dataset": It(state), "p": {"w": np.ones(2)}})
  f = path / "dataset" / name
  assert f.exists()
  f.write_bytes(content)
  reseal(path)
  it = It({"untouched": True})
  _refused(lambda: flax_ckpt.load_checkpointables(path, {"dataset": it}), name)
  assert it.state == {"untouched": True}
  _refused(lambda: flax_ckpt.load_checkpointables(path, {"dataset": None}), name)


def test_iterator_state_bin_is_returned_as_bytes_never_unpickled(tmp_path, monkeypatch):
  """A ``.bin`` state holding a pickle is returned as the raw bytes."""
  calls = []
  monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
  monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"dataset": It(b"raw state")})
  f = path / "dataset" / "process_0-of-1.bin"
  assert f.exists()
  payload = b"cos\nsystem\n(S'touch " + os.fsencode(tmp_path / "pwned") + b"'\ntR."
  f.write_bytes(payload)
  reseal(path)
  out = flax_ckpt.load_checkpointables(path, {"dataset": None})["dataset"]
  assert out == payload
  assert calls == [] and not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------- non-regular files


def _plant_socket(ck: Crafted, rel: str):
  """Replaces ``rel`` with a bound AF_UNIX socket (bound in a short dir, then moved)."""
  short = tempfile.mkdtemp(prefix="fc", dir="/tmp")  # AF_UNIX paths are short
  s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  s.bind(os.path.join(short, "s"))
  (ck.path / rel).unlink()
  os.rename(os.path.join(short, "s"), ck.path / rel)
  os.rmdir(short)
  return s


def test_a_socket_in_a_checkpoint_is_an_error_at_once(ck):
  s = _plant_socket(ck, f"state/{TREE}")
  try:
    _refused(lambda: flax_ckpt.load(ck.path), TREE, exc=(flax_ckpt.CheckpointError, OSError))
  finally:
    s.close()
  ck.assert_outside_untouched()


@pytest.mark.parametrize("rel", [f"state/{TREE}", "_CHECKPOINT"])
def test_a_socket_in_a_checkpoint_is_a_format_error(ck, rel):
  s = _plant_socket(ck, rel)
  try:
    _load_refused(ck, os.path.basename(rel))
  finally:
    s.close()


def test_a_device_node_in_a_checkpoint_is_refused_at_once(ck):
  try:
    os.mknod(ck.state / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
  except (PermissionError, OSError) as e:
    pytest.skip(f"cannot create a device node here: {e}")
  os.unlink(ck.state / TREE)
  os.rename(ck.state / "dev", ck.state / TREE)
  _load_refused(ck, TREE)


def test_a_fifo_state_file_is_refused_at_once(tmp_path):
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"dataset": It()})
  f = path / "dataset" / "process_0-of-1.json"
  f.unlink()
  os.mkfifo(f)
  _refused(lambda: flax_ckpt.load_checkpointables(path, {"dataset": None}),
           "process_0-of-1.json", exc=flax_ckpt.CheckpointError)


def test_a_fifo_chunk_index_is_refused_at_once(ck):
  (ck.state / CHUNKS).unlink()
  os.mkfifo(ck.state / CHUNKS)
  _load_refused(ck, CHUNKS)


# ---------------------------------------------------------------------------- symlinks


def _fifo_outside(ck: Crafted):
  fifo = ck.outside / "fifo"
  os.mkfifo(fifo)
  return fifo


def _watchdog(seconds: float):
  """Unblocks a reader of a FIFO outside after ``seconds`` (so a bug fails, not hangs)."""
  stop = threading.Event()

  def run(fifo):
    if not stop.wait(seconds):
      try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
      except OSError:
        pass
  return stop, run


def test_data_file_symlinked_outside_is_refused_naming_the_link(ck):
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink(ck.secret, link)
  err = _load_refused(ck, str(link))
  assert "FLAX_CKPT_ALLOW_SYMLINKS" in str(err)
  _refused(lambda: flax_ckpt.metadata(ck.path), str(link))
  ck.assert_outside_untouched()


def test_data_file_symlinked_to_an_outside_fifo_never_opens_it(ck):
  """The target is a FIFO outside: opening it for reading (without O_NONBLOCK) would hang,
  and the refusal comes before any open. A watchdog opens the FIFO's write end after 5 s
  so that a regression fails instead of hanging the suite."""
  fifo = _fifo_outside(ck)
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink(fifo, link)
  stop, run = _watchdog(5)
  th = threading.Thread(target=run, args=(fifo,), daemon=True)
  th.start()
  try:
    _load_refused(ck, str(link))
  finally:
    stop.set()
    th.join()


def test_tree_file_symlinked_outside_is_refused(ck):
  link = ck.state / TREE
  target = ck.outside / "tree.json"
  target.write_bytes(link.read_bytes())
  os.utime(target, (OLD_ATIME, time.time()))
  link.unlink()
  os.symlink(target, link)
  reseal(ck.path)  # reseal reads through the link: restore the atime after it
  os.utime(target, (OLD_ATIME, os.stat(target).st_mtime))
  _load_refused(ck, str(link))
  assert os.stat(target).st_atime == OLD_ATIME


def test_relative_symlink_escaping_with_dotdot_is_refused(ck):
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink(os.path.join("..", "..", "outside", "secret.bin"), link)
  _load_refused(ck, str(link))


def test_part_directory_symlinked_outside_is_refused(ck):
  copy = ck.outside / "state_copy"
  shutil.copytree(ck.state, copy)
  for f in copy.iterdir():
    os.utime(f, (OLD_ATIME, time.time()))
  shutil.rmtree(ck.state)
  os.symlink(copy, ck.state)
  _load_refused(ck, str(ck.state))
  for f in copy.iterdir():
    assert os.stat(f).st_atime == OLD_ATIME, f"{f} was read"


def test_symlink_inside_pointing_inside_is_allowed(ck):
  blobs = ck.path / "blobs"
  blobs.mkdir()
  os.rename(ck.state / "data.p0.bin", blobs / "data.p0.bin")
  os.symlink(os.path.join("..", "blobs", "data.p0.bin"), ck.state / "data.p0.bin")
  os.rename(ck.state / TREE, blobs / "tree.json")
  os.symlink(blobs / "tree.json", ck.state / TREE)  # absolute, still inside
  reseal(ck.path)
  out = flax_ckpt.load(ck.path)
  np.testing.assert_array_equal(out["a"], _values()["a"])
  assert flax_ckpt.verify(ck.path)
  ck.assert_outside_untouched()


def test_checkpoint_path_itself_a_symlink_is_allowed(ck):
  link = ck.root / "alias"
  os.symlink(ck.path, link)
  out = flax_ckpt.load(link)
  np.testing.assert_array_equal(out["b"], _values()["b"])
  assert flax_ckpt.verify(link)
  assert flax_ckpt.metadata(link)["a"].shape == (3, 4)
  # a symlink to a symlink to the checkpoint, and a relative one
  link2 = ck.root / "alias2"
  os.symlink("alias", link2)
  np.testing.assert_array_equal(flax_ckpt.load(link2)["a"], _values()["a"])
  ck.assert_outside_untouched()


def test_opt_in_follows_an_outside_data_file_link(ck, monkeypatch):
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink(ck.secret, link)
  monkeypatch.setenv("FLAX_CKPT_ALLOW_SYMLINKS", "1")
  out = flax_ckpt.load(ck.path)
  np.testing.assert_array_equal(out["a"], _values()["a"])
  np.testing.assert_array_equal(out["b"], _values()["b"])
  assert flax_ckpt.verify(ck.path)


def test_opt_in_follows_an_outside_part_directory(ck, monkeypatch):
  copy = ck.outside / "state_copy"
  shutil.copytree(ck.state, copy)
  shutil.rmtree(ck.state)
  os.symlink(copy, ck.state)
  monkeypatch.setenv("FLAX_CKPT_ALLOW_SYMLINKS", "1")
  np.testing.assert_array_equal(flax_ckpt.load(ck.path)["a"], _values()["a"])


@pytest.mark.parametrize("allow", ["0", "", "true", "yes"])
def test_only_the_exact_opt_in_value_follows_outside_links(ck, monkeypatch, allow):
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink(ck.secret, link)
  monkeypatch.setenv("FLAX_CKPT_ALLOW_SYMLINKS", allow)
  _load_refused(ck, str(link))


@pytest.mark.parametrize("victim", ["state/data.p0.bin", f"state/{TREE}", f"state/{CHUNKS}"])
@pytest.mark.parametrize("allow", [False, True])
def test_symlink_to_dev_zero_is_refused_even_with_opt_in(ck, monkeypatch, victim, allow):
  """/dev/zero is outside (refused by default) and not a regular file (refused with the
  opt-in too): at once, without reading an endless stream into memory."""
  if allow:
    monkeypatch.setenv("FLAX_CKPT_ALLOW_SYMLINKS", "1")
  f = ck.path / victim
  f.unlink()
  os.symlink("/dev/zero", f)
  err = _load_refused(ck, os.path.basename(victim))
  if allow:
    assert "not a regular file" in str(err)


def test_symlink_to_an_outside_fifo_with_opt_in_is_refused_and_does_not_hang(ck, monkeypatch):
  monkeypatch.setenv("FLAX_CKPT_ALLOW_SYMLINKS", "1")
  fifo = _fifo_outside(ck)
  link = ck.state / TREE
  link.unlink()
  os.symlink(fifo, link)
  stop, run = _watchdog(5)
  th = threading.Thread(target=run, args=(fifo,), daemon=True)
  th.start()
  try:
    err = _load_refused(ck, TREE)
  finally:
    stop.set()
    th.join()
  assert "not a regular file" in str(err)


def test_dangling_symlink_in_a_checkpoint_is_a_clean_error(ck):
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink(ck.root / "does-not-exist", link)
  _refused(lambda: flax_ckpt.load(ck.path), str(link), "data.p0.bin",
           exc=(flax_ckpt.CheckpointError, FileNotFoundError))
  assert not flax_ckpt.verify(ck.path)


def test_symlink_loop_in_a_checkpoint_is_a_clean_error(ck):
  link = ck.state / "data.p0.bin"
  link.unlink()
  os.symlink("data.p0.bin", link)
  _refused(lambda: flax_ckpt.load(ck.path), "data.p0.bin")
  assert not flax_ckpt.verify(ck.path)


def test_stateful_part_directory_symlinked_outside_is_refused(tmp_path):
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"dataset": It()})
  outside = tmp_path / "outside"
  shutil.copytree(path / "dataset", outside)
  shutil.rmtree(path / "dataset")
  os.symlink(outside, path / "dataset")
  it = It({"untouched": True})
  _refused(lambda: flax_ckpt.load_checkpointables(path, {"dataset": it}),
           str(path / "dataset"))
  assert it.state == {"untouched": True}
  assert not flax_ckpt.verify(path)


# ---------------------------------------------------------------- nothing is executed

PLANTED = "flax_ckpt_hostile_planted_mod"


@pytest.fixture
def planted(tmp_path, monkeypatch):
  """A module on sys.path whose import (or any use) leaves a mark; and os.system,
  subprocess.Popen, pickle.loads and pickle.load patched to record calls. On teardown:
  nothing was called, the module was never imported."""
  mods = tmp_path / "mods"
  mods.mkdir()
  mark = tmp_path / "imported"
  (mods / f"{PLANTED}.py").write_text(
      f"open({os.fspath(mark)!r}, 'w').close()\n"
      "class Evil:\n"
      "  def __init__(self, *a, **k):\n"
      f"    open({os.fspath(mark)!r} + '.called', 'w').close()\n"
      "Handler = H = It = Evil\n")
  monkeypatch.syspath_prepend(os.fspath(mods))
  assert importlib.util.find_spec(PLANTED) is not None  # importable, so a lapse would show
  calls = []
  monkeypatch.setattr(os, "system", lambda *a: calls.append(("os.system", a)))
  monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(("Popen", a)))
  monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(("pickle.loads", a)))
  monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(("pickle.load", a)))
  yield calls
  assert calls == []
  assert PLANTED not in sys.modules
  assert not mark.exists() and not (tmp_path / "imported.called").exists()


@pytest.mark.parametrize("typestr", [f"{PLANTED}.Handler", "os.system", "subprocess.Popen",
                                     "builtins.eval", "pickle.loads"])
def test_a_typestr_is_never_imported_or_called(ck, planted, typestr):
  ck.edit_json(f"state/{TREE}", lambda d: d["leaves"][0].update(typestr=typestr))
  _refused(lambda: flax_ckpt.load(ck.path), "['a']", typestr, exc=flax_ckpt.CheckpointError)
  md = flax_ckpt.metadata(ck.path)
  assert type(md["a"]) is flax_ckpt.Metadata
  flax_ckpt.verify(ck.path)  # reads the records, runs no handler


@pytest.mark.parametrize("cls", [f"{PLANTED}.Evil", "os.system", "subprocess.Popen",
                                 "builtins.eval"])
@pytest.mark.parametrize("t", ["node", "namedtuple"])
def test_a_class_name_in_the_tree_is_never_imported_or_called(ck, planted, cls, t):
  def edit(doc):
    kids = [{"t": "leaf", "id": 0}, {"t": "leaf", "id": 1}]
    if t == "node":
      doc["root"] = {"t": "node", "cls": cls, "reg": True, "keys": [["a", "a"], ["a", "b"]],
                     "c": kids, "aux": {"l": ["rm -rf /"]}}
    else:
      doc["root"] = {"t": "namedtuple", "cls": cls, "reg": True, "f": ["a", "b"], "c": kids}
  ck.edit_json(f"state/{TREE}", edit)
  with pytest.warns(flax_ckpt.UnregisteredClassWarning, match="not registered"):
    out = flax_ckpt.load(ck.path)
  assert type(out) is dict
  np.testing.assert_array_equal(out["a"], _values()["a"])
  assert flax_ckpt.verify(ck.path)


def test_handler_and_stateful_type_names_are_never_imported(tmp_path, planted):
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"dataset": It(), "p": {"w": np.ones(2)}})
  marker = path / "_CHECKPOINT"
  doc = json.loads(marker.read_text())
  doc["checkpointables"]["dataset"]["type"] = f"{PLANTED}.It"
  doc["checkpointables"]["extra"] = {"kind": "handler", "handler": f"{PLANTED}.H"}
  marker.write_text(json.dumps(doc))
  (path / "extra").mkdir()
  (path / "extra" / "payload.pkl").write_bytes(pickle.dumps({"x": 1}))
  reseal(path)
  _refused(lambda: flax_ckpt.load_checkpointables(path), "extra", f"{PLANTED}.H",
           exc=flax_ckpt.CheckpointError)
  out = flax_ckpt.load_checkpointables(path, {"dataset": None, "p": None})
  assert out["dataset"] == {"pos": 3}
  md = flax_ckpt.metadata(path)
  assert md.checkpointables["extra"]["handler"] == f"{PLANTED}.H"
  flax_ckpt.verify(path)


def test_unknown_part_kind_is_a_format_error_not_an_import(tmp_path, planted):
  path = tmp_path / "c"
  flax_ckpt.save_checkpointables(path, {"p": {"w": np.ones(2)}})
  marker = path / "_CHECKPOINT"
  doc = json.loads(marker.read_text())
  doc["checkpointables"]["p"]["kind"] = f"{PLANTED}.Kind"
  marker.write_text(json.dumps(doc))
  _refused(lambda: flax_ckpt.load_checkpointables(path), f"{PLANTED}.Kind", "p")
