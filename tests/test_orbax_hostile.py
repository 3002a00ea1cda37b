"""An Orbax checkpoint is hostile input too: crafted ``_METADATA``, zarr headers, names and
links get a flax_ckpt error naming the file or leaf, before anything is allocated or any
file outside the checkpoint is read (issue 15, with the rules of issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

import flax_ckpt


@pytest.fixture(scope="module")
def ocp():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return pytest.importorskip("orbax.checkpoint")


def _tree():
  return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int32)}


@pytest.fixture(scope="module")
def pristine(ocp, tmp_path_factory):
  """Two Orbax checkpoints of _tree(): zarr v2 files without OCDBT (easy to edit), and the
  default OCDBT layout."""
  root = tmp_path_factory.mktemp("orbax")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ck:
      ck.save(root / "files", _tree())
    with ocp.StandardCheckpointer() as ck:
      ck.save(root / "ocdbt", _tree())
      ck.wait_until_finished()
  return root


@pytest.fixture
def files_ckpt(pristine, tmp_path):
  dst = tmp_path / "files"
  shutil.copytree(pristine / "files", dst)
  return dst


@pytest.fixture
def ocdbt_ckpt(pristine, tmp_path):
  dst = tmp_path / "ocdbt"
  shutil.copytree(pristine / "ocdbt", dst)
  return dst


def _load(path, template=None):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", flax_ckpt.UnregisteredClassWarning)
    return flax_ckpt.load(path, template)


def _edit_metadata(path, edit):
  meta = json.loads((path / "_METADATA").read_text())
  edit(meta)
  (path / "_METADATA").write_text(json.dumps(meta))


def test_the_pristine_copies_load(files_ckpt, ocdbt_ckpt):
  for p in (files_ckpt, ocdbt_ckpt):
    got = _load(p)
    np.testing.assert_array_equal(got["w"], _tree()["w"])
    np.testing.assert_array_equal(got["b"], _tree()["b"])


def _first_entry(meta):
  return next(iter(meta["tree_metadata"].values()))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(tree_metadata=[1, 2]), "tree_metadata"),
    (lambda m: m.pop("tree_metadata"), "tree_metadata"),
    (lambda m: _first_entry(m).update(key_metadata="w"), "key_metadata"),
    (lambda m: _first_entry(m)["key_metadata"][0].update(key_type=7), "key_type"),
    (lambda m: _first_entry(m)["key_metadata"][0].update(key=["x"]), "key_metadata"),
    (lambda m: _first_entry(m)["key_metadata"][0].update(key_type=1), "sequence index"),
    (lambda m: _first_entry(m).update(value_metadata=5), "value_metadata"),
    (lambda m: _first_entry(m)["value_metadata"].update(value_type="my.Custom"), "my.Custom"),
    (lambda m: m.update(use_zarr3="yes"), "use_zarr3"),
    (lambda m: m["tree_metadata"].update(
        dup=_first_entry(m)), "two entries"),
    (lambda m: m["tree_metadata"].update(deep={
        "key_metadata": [{"key": "k", "key_type": 2}] * 5000,
        "value_metadata": {"value_type": "None", "skip_deserialize": True}}), "levels deep"),
    (lambda m: m["tree_metadata"].update(under={
        "key_metadata": [*_first_entry(m)["key_metadata"], {"key": "x", "key_type": 2}],
        "value_metadata": {"value_type": "None", "skip_deserialize": True}}),
     "both a leaf and a container|conflicts"),
])
def test_crafted_metadata_is_a_format_error_naming_the_file(files_ckpt, edit, match):
  _edit_metadata(files_ckpt, edit)
  with pytest.raises(flax_ckpt.FormatError, match=match) as e:
    _load(files_ckpt)
  assert "_METADATA" in str(e.value) or str(files_ckpt) in str(e.value)


def test_list_positions_with_a_gap_are_refused(files_ckpt):
  def edit(m):
    for i, e in enumerate(m["tree_metadata"].values()):
      e["key_metadata"] = [{"key": "l", "key_type": 2}, {"key": str(2 * i), "key_type": 1}]
  _edit_metadata(files_ckpt, edit)
  with pytest.raises(flax_ckpt.FormatError, match="list positions"):
    _load(files_ckpt)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[" * 100_000, b'{"tree_metadata": {}'])
def test_unparseable_metadata_is_a_format_error(files_ckpt, raw):
  (files_ckpt / "_METADATA").write_bytes(raw)
  with pytest.raises(flax_ckpt.FormatError, match="_METADATA"):
    _load(files_ckpt)


def test_a_leaf_name_cannot_reach_outside_the_checkpoint(files_ckpt, tmp_path):
  # a zarr array next to the checkpoint, that a name with '..' would open
  outside = tmp_path / "secret"
  shutil.copytree(files_ckpt / "w", outside)

  def edit(m):
    # Orbax joins keys with '.', and a '/' in a key makes sub-directories
    _first_entry(m)["key_metadata"] = [{"key": "../secret", "key_type": 2}]
  _edit_metadata(files_ckpt, edit)
  with pytest.raises(flax_ckpt.FormatError, match="not a plain relative key"):
    _load(files_ckpt)


def test_a_symlink_out_of_the_checkpoint_is_refused(files_ckpt, tmp_path):
  outside = tmp_path / "elsewhere"
  shutil.move(files_ckpt / "w", outside)
  os.symlink(outside, files_ckpt / "w")
  with pytest.raises(flax_ckpt.FormatError, match="symlink"):
    _load(files_ckpt)


def _edit_zarray(path, leaf, edit):
  za = path / leaf / ".zarray"
  meta = json.loads(za.read_text())
  edit(meta)
  za.write_text(json.dumps(meta))


def test_a_huge_claimed_shape_is_refused_before_allocating(files_ckpt):
  _edit_zarray(files_ckpt, "w", lambda z: z.update(shape=[2**40, 2**20], chunks=[2, 3]))
  with pytest.raises(flax_ckpt.FormatError, match="more bytes than this machine"):
    _load(files_ckpt)


def test_a_template_decides_the_shape_before_any_read(files_ckpt):
  import jax

  _edit_zarray(files_ckpt, "w", lambda z: z.update(shape=[2**40, 2**20], chunks=[2, 3]))
  template = {"w": jax.ShapeDtypeStruct((2, 3), np.float32),
              "b": jax.ShapeDtypeStruct((3,), np.int32)}
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['w'\].*shape"):
    _load(files_ckpt, template)


@pytest.mark.parametrize("dtype", ["|O", "<U8", "|S4"])
def test_non_numeric_dtypes_are_refused(files_ckpt, dtype):
  _edit_zarray(files_ckpt, "b", lambda z: z.update(dtype=dtype))
  with pytest.raises(flax_ckpt.FormatError, match=r"\['b'\]"):
    _load(files_ckpt)


def test_a_damaged_chunk_names_the_leaf(files_ckpt):
  chunk = next(p for p in (files_ckpt / "w").iterdir() if not p.name.startswith("."))
  chunk.write_bytes(b"\x00garbage" * 3)
  with pytest.raises(flax_ckpt.FormatError, match=r"\['w'\]"):
    _load(files_ckpt)


def test_a_damaged_ocdbt_manifest_is_a_format_error(ocdbt_ckpt):
  (ocdbt_ckpt / "manifest.ocdbt").write_bytes(b"\x0c\xdb\x3a\x2a" + b"\xff" * 40)
  with pytest.raises(flax_ckpt.FormatError) as e:
    _load(ocdbt_ckpt)
  assert str(ocdbt_ckpt) in str(e.value)


def test_ocdbt_without_any_database_is_a_format_error(ocdbt_ckpt):
  os.remove(ocdbt_ckpt / "manifest.ocdbt")
  for p in ocdbt_ckpt.iterdir():
    if p.name.startswith("ocdbt.process_"):
      shutil.rmtree(p)
  with pytest.raises(flax_ckpt.FormatError, match="incomplete or damaged"):
    _load(ocdbt_ckpt)


def test_unmerged_per_process_databases_still_load(ocdbt_ckpt):
  # a save whose merge step did not run: only the ocdbt.process_<i> databases are there
  os.remove(ocdbt_ckpt / "manifest.ocdbt")
  shutil.rmtree(ocdbt_ckpt / "d", ignore_errors=True)
  got = _load(ocdbt_ckpt)
  np.testing.assert_array_equal(got["w"], _tree()["w"])


def test_a_string_leaf_missing_from_strings_json(files_ckpt):
  def edit(m):
    m["tree_metadata"]["s"] = {"key_metadata": [{"key": "s", "key_type": 2}],
                               "value_metadata": {"value_type": "string",
                                                  "skip_deserialize": False}}
  _edit_metadata(files_ckpt, edit)
  with pytest.raises(flax_ckpt.FormatError, match="_strings.json"):
    _load(files_ckpt)


def _upload(local, url):
  import _objstore_helpers as oh

  for dirpath, _, names in os.walk(local):
    for n in names:
      rel = os.path.relpath(os.path.join(dirpath, n), local)
      with open(os.path.join(dirpath, n), "rb") as f:
        oh.put(f"{url}/{rel}", f.read())


@pytest.mark.parametrize("layout", ["files", "ocdbt"])
def test_an_orbax_checkpoint_in_an_object_store_loads(pristine, objstore_root, layout):
  import jax

  url = f"{objstore_root}/orbax_{layout}"
  _upload(pristine / layout, url)
  assert flax_ckpt.is_orbax_checkpoint(url)
  got = _load(url)
  np.testing.assert_array_equal(got["w"], _tree()["w"])
  template = {"w": jax.ShapeDtypeStruct((2, 3), np.float32),
              "b": jax.ShapeDtypeStruct((3,), np.int32)}
  got = _load(url, template)
  assert isinstance(got["b"], jax.Array)
  np.testing.assert_array_equal(got["b"], _tree()["b"])


def test_an_unfinished_orbax_save_says_so(ocdbt_ckpt, tmp_path):
  tmp = tmp_path / "7.orbax-checkpoint-tmp"
  shutil.copytree(ocdbt_ckpt, tmp)
  meta = tmp / "_CHECKPOINT_METADATA"
  meta.write_text(json.dumps({"item_handlers": None, "commit_timestamp_nsecs": None}))
  os.remove(tmp / "_METADATA")
  for p in (tmp, ocdbt_ckpt):
    if p is ocdbt_ckpt:
      shutil.copy(meta, p / "_CHECKPOINT_METADATA")
      os.remove(p / "_METADATA")
    assert not flax_ckpt.is_orbax_checkpoint(p)
    with pytest.raises(flax_ckpt.IncompleteCheckpointError, match="unfinished Orbax save") as e:
      _load(p)
    assert "did not finish" not in str(e.value)


def test_a_pre_0_5_orbax_checkpoint_says_it_is_not_read(tmp_path):
  old = tmp_path / "old"
  old.mkdir()
  (old / "checkpoint").write_bytes(b"\x81\xa1w\xc0")  # the msgpack of {"w": None}
  with pytest.raises(flax_ckpt.FormatError, match="before 0.5") as e:
    _load(old)
  assert "did not finish" not in str(e.value)
