"""Every error flax_ckpt raises: what it says, and that failed saves leave nothing behind."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from _crafting import reseal

import flax_ckpt


class Plain:
  """A class that is neither a PyTree node nor has a TypeHandler."""


def _snapshot(directory):
  """{relative path: bytes} of every file under ``directory`` (dirs as None)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), directory)] = None
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = fh.read()
  return out


def _assert_nothing_written(parent, name="ckpt"):
  assert not os.path.lexists(parent / name)
  leftovers = [e for e in os.listdir(parent) if e.startswith(f".{name}")]
  assert leftovers == [], leftovers


def _temp_siblings(parent):
  return [e for e in os.listdir(parent) if "flax_ckpt-" in e]


# ---------------------------------------------------------------------- unsupported leaves


@pytest.mark.parametrize("tree, leaf_path", [
    ({"a": object()}, "['a']"),
    ({"params": {"w": jnp.ones(2), "bad": Plain()}}, "['params']['bad']"),
    ([1, (2, Plain())], "[1][1]"),
    (Plain(), "<root>"),
    ({"ok": np.ones(3), 3: [bytearray(b"x")]}, "[3][0]"),
])
def test_unsupported_leaf(ckpt_dir, tree, leaf_path):
  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    flax_ckpt.save(ckpt_dir / "ckpt", tree)
  assert leaf_path in str(e.value)
  assert isinstance(e.value, TypeError)
  _assert_nothing_written(ckpt_dir)


def test_unsupported_leaves_all_listed(ckpt_dir):
  tree = {"a": object(), "b": [1, Plain()], "c": {"d": {1.5: 2}}}
  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    flax_ckpt.save(ckpt_dir / "ckpt", tree)
  msg = str(e.value)
  assert "['a']" in msg and "['b'][1]" in msg and "Plain" in msg and "1.5" in msg
  _assert_nothing_written(ckpt_dir)


def test_unsupported_leaf_save_async_raises_immediately(ckpt_dir):
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match=r"\['x'\]"):
    flax_ckpt.save_async(ckpt_dir / "ckpt", {"x": object()})
  _assert_nothing_written(ckpt_dir)


def test_unsupported_leaf_overwrite_keeps_old_checkpoint(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"v": np.arange(4)})
  before = _snapshot(path)
  with pytest.raises(flax_ckpt.UnsupportedLeafError):
    flax_ckpt.save(path, {"v": object()}, overwrite=True)
  assert _snapshot(path) == before
  assert _temp_siblings(ckpt_dir) == []
  np.testing.assert_array_equal(flax_ckpt.load(path)["v"], np.arange(4))


def test_unsupported_leaf_creates_no_parent_dirs(ckpt_dir):
  with pytest.raises(flax_ckpt.UnsupportedLeafError):
    flax_ckpt.save(ckpt_dir / "new" / "sub" / "ckpt", {"x": object()})
  assert os.listdir(ckpt_dir) == []


@pytest.mark.parametrize("value", [
    np.array(["a", "bc"]), np.array([object()]), np.datetime64("2020-01-01"),
], ids=["unicode", "object", "datetime64"])
def test_unsupported_dtype_is_unsupported_leaf(ckpt_dir, value):
  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    flax_ckpt.save(ckpt_dir / "ckpt", {"good": np.ones(2), "bad": [value]})
  assert "['bad'][0]" in str(e.value)


@pytest.mark.parametrize("value", [
    np.array(["a", "bc"]), np.array([object()]), np.datetime64("2020-01-01"),
], ids=["unicode", "object", "datetime64"])
def test_unsupported_dtype_writes_nothing(ckpt_dir, value):
  with pytest.raises(TypeError):
    flax_ckpt.save(ckpt_dir / "ckpt", {"good": np.ones(2), "bad": [value]})
  _assert_nothing_written(ckpt_dir)


# --------------------------------------------------------------------------- bad keys


@pytest.mark.parametrize("key", [1.5, (1, 2), None, True, b"k", frozenset()],
                         ids=["float", "tuple", "None", "bool", "bytes", "frozenset"])
def test_bad_dict_key(ckpt_dir, key):
  tree = {"outer": {"fine": 1, key: np.zeros(2)}}
  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    flax_ckpt.save(ckpt_dir / "ckpt", tree)
  msg = str(e.value)
  assert "['outer']" in msg
  assert repr(key) in msg
  assert type(key).__name__ in msg
  _assert_nothing_written(ckpt_dir)


# --------------------------------------------------------------------- destinations


def test_existing_checkpoint_without_overwrite(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"v": np.arange(5), "s": "old"}, custom_metadata={"gen": 1})
  before = _snapshot(path)
  with pytest.raises(flax_ckpt.CheckpointExistsError) as e:
    flax_ckpt.save(path, {"v": np.zeros(5), "s": "new"})
  assert isinstance(e.value, FileExistsError)
  assert "overwrite=True" in str(e.value)
  assert _snapshot(path) == before
  assert _temp_siblings(ckpt_dir) == []
  out = flax_ckpt.load(path)
  assert out["s"] == "old"
  np.testing.assert_array_equal(out["v"], np.arange(5))
  assert flax_ckpt.metadata(path).custom_metadata == {"gen": 1}
  with pytest.raises(flax_ckpt.CheckpointExistsError):
    flax_ckpt.save_async(path, {"v": 1})
  assert _snapshot(path) == before


def test_existing_non_checkpoint_directory_without_overwrite(ckpt_dir):
  path = ckpt_dir / "ckpt"
  path.mkdir()
  (path / "keep.txt").write_text("mine")
  with pytest.raises(flax_ckpt.CheckpointExistsError):
    flax_ckpt.save(path, {"v": 1})
  assert _snapshot(path) == {"keep.txt": b"mine"}


@pytest.mark.parametrize("overwrite", [False, True])
def test_path_is_existing_file(ckpt_dir, overwrite):
  path = ckpt_dir / "ckpt"
  path.write_bytes(b"not a checkpoint")
  with pytest.raises(flax_ckpt.CheckpointError, match="not a directory"):
    flax_ckpt.save(path, {"v": 1}, overwrite=overwrite)
  assert path.read_bytes() == b"not a checkpoint"
  assert _temp_siblings(ckpt_dir) == []


def test_ancestor_is_a_file(ckpt_dir):
  (ckpt_dir / "file").write_text("x")
  with pytest.raises(flax_ckpt.CheckpointError, match="is a file"):
    flax_ckpt.save(ckpt_dir / "file" / "sub" / "ckpt", {"v": 1})
  assert (ckpt_dir / "file").read_text() == "x"


def test_bad_path_types(ckpt_dir):
  with pytest.raises(TypeError, match="bytes"):
    flax_ckpt.save(os.fsencode(ckpt_dir / "ckpt"), {"v": 1})
  with pytest.raises(flax_ckpt.CheckpointError, match="gs"):
    flax_ckpt.save("gs://bucket/ckpt", {"v": 1})
  _assert_nothing_written(ckpt_dir)


def test_str_and_file_url_paths_work(ckpt_dir):
  flax_ckpt.save(str(ckpt_dir / "a"), {"v": 1})
  assert flax_ckpt.load("file://" + str(ckpt_dir / "a")) == {"v": 1}


# -------------------------------------------------------------------- custom metadata


@pytest.mark.parametrize("custom", [
    {"arr": np.zeros(2)},
    {"obj": object()},
    {"nan": float("nan")},
    {"nested": {"inf": [1, float("inf")]}},
    {"np_scalar": np.float32(1.0)},
    {"set": {1, 2}},
    [1, 2],
    "a string",
], ids=["ndarray", "object", "nan", "inf", "np_scalar", "set", "list", "str"])
def test_non_json_custom_metadata(ckpt_dir, custom):
  with pytest.raises(TypeError):
    flax_ckpt.save(ckpt_dir / "ckpt", {"v": 1}, custom_metadata=custom)
  _assert_nothing_written(ckpt_dir)
  with pytest.raises(TypeError):
    flax_ckpt.save_async(ckpt_dir / "ckpt", {"v": 1}, custom_metadata=custom)
  _assert_nothing_written(ckpt_dir)


# ------------------------------------------------------------------ missing checkpoints


def test_load_nonexistent(ckpt_dir):
  for fn in (flax_ckpt.load, flax_ckpt.metadata):
    with pytest.raises(flax_ckpt.CheckpointNotFoundError) as e:
      fn(ckpt_dir / "nope")
    assert isinstance(e.value, FileNotFoundError)
    assert "nope" in str(e.value)


def test_load_a_file(ckpt_dir):
  (ckpt_dir / "f").write_text("x")
  with pytest.raises(flax_ckpt.CheckpointNotFoundError, match="is a file"):
    flax_ckpt.load(ckpt_dir / "f")


def test_load_without_commit_marker(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"v": np.arange(3)})
  os.remove(path / "_CHECKPOINT")
  for fn in (flax_ckpt.load, flax_ckpt.metadata):
    with pytest.raises(flax_ckpt.IncompleteCheckpointError, match="_CHECKPOINT"):
      fn(path)
  empty = ckpt_dir / "empty"
  empty.mkdir()
  with pytest.raises(flax_ckpt.IncompleteCheckpointError):
    flax_ckpt.load(empty)


def test_damaged_commit_marker(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"v": 1})
  marker = path / "_CHECKPOINT"
  manifest = json.loads(marker.read_text())
  manifest["version"] = 999
  marker.write_text(json.dumps(manifest))
  with pytest.raises(flax_ckpt.FormatError, match="999"):
    flax_ckpt.load(path)
  marker.write_text("{not json")
  with pytest.raises(flax_ckpt.FormatError):
    flax_ckpt.load(path)
  marker.write_text(json.dumps({"format": "other"}))
  with pytest.raises(flax_ckpt.FormatError):
    flax_ckpt.metadata(path)


def test_missing_tree_file(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"v": 1})
  os.remove(path / "state" / "_TREE.json")
  with pytest.raises(flax_ckpt.FormatError, match="_TREE.json"):
    flax_ckpt.load(path)


# -------------------------------------------------------------------------- overwrite


def test_overwrite_replaces_content(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"old": np.arange(100), "nested": {"x": "old"}},
                 custom_metadata={"gen": 1})
  flax_ckpt.save(path, {"new": jnp.ones((2, 2)), "s": 7}, overwrite=True,
                 custom_metadata={"gen": 2})
  out = flax_ckpt.load(path)
  assert set(out) == {"new", "s"} and out["s"] == 7
  np.testing.assert_array_equal(np.asarray(out["new"]), np.ones((2, 2)))
  assert flax_ckpt.metadata(path).custom_metadata == {"gen": 2}
  assert os.listdir(ckpt_dir) == ["ckpt"]
  # and again, with the async API
  flax_ckpt.save_async(path, [1, 2], overwrite=True).result()
  assert flax_ckpt.load(path) == [1, 2]
  assert os.listdir(ckpt_dir) == ["ckpt"]


def test_overwrite_on_new_path(ckpt_dir):
  flax_ckpt.save(ckpt_dir / "ckpt", {"v": 1}, overwrite=True)
  assert flax_ckpt.load(ckpt_dir / "ckpt") == {"v": 1}
  assert os.listdir(ckpt_dir) == ["ckpt"]


def test_overwrite_an_incomplete_directory(ckpt_dir):
  path = ckpt_dir / "ckpt"
  path.mkdir()
  (path / "junk").write_text("x")
  flax_ckpt.save(path, {"v": 2}, overwrite=True)
  assert flax_ckpt.load(path) == {"v": 2}
  assert not (path / "junk").exists()
  assert os.listdir(ckpt_dir) == ["ckpt"]


# ----------------------------------------------------------------- unknown typestrs


def _rewrite_typestr(path, leaf_path, typestr):
  tree_file = path / "state" / "_TREE.json"
  tree = json.loads(tree_file.read_text())
  hits = [leaf for leaf in tree["leaves"] if leaf["path"] == leaf_path]
  assert len(hits) == 1
  hits[0]["typestr"] = typestr
  tree_file.write_text(json.dumps(tree))
  reseal(path)


def test_unregistered_typestr_names_leaf(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"a": 1, "b": {"c": np.zeros(3)}})
  _rewrite_typestr(path, [["d", "b"], ["d", "c"]], "some.plugin.Unknown")
  with pytest.raises(flax_ckpt.CheckpointError) as e:
    flax_ckpt.load(path)
  msg = str(e.value)
  assert "['b']['c']" in msg and "some.plugin.Unknown" in msg
  assert "register_type_handler" in msg
  # also when only that leaf is requested through a template
  with pytest.raises(flax_ckpt.CheckpointError, match=r"\['b'\]\['c'\]"):
    flax_ckpt.load(path, {"b": {"c": np.zeros(3)}}, partial=True)
  # other leaves still load, and metadata() describes the unknown leaf generically
  assert flax_ckpt.load(path, {"a": 0}, partial=True) == {"a": 1}
  md = flax_ckpt.metadata(path)
  assert type(md["b"]["c"]) is flax_ckpt.Metadata
  assert md["b"]["c"].name == "['b']['c']"
  assert md["a"].type == "int"


# ------------------------------------------------------------ handler registration


def test_register_type_handler_twice(ckpt_dir):
  class Kelvin(float):
    pass

  class KelvinHandler(flax_ckpt.ScalarHandler):
    def __init__(self, tag):
      super().__init__(Kelvin)
      self.tag = tag

    def typestr(self):
      return f"test_errors.Kelvin.{self.tag}"

  # before registration, the float handler (a base class) would be used
  assert flax_ckpt.get_type_handler(Kelvin) is flax_ckpt.get_type_handler(float)
  first, second = KelvinHandler("a"), KelvinHandler("b")
  flax_ckpt.register_type_handler(Kelvin, first)
  assert flax_ckpt.get_type_handler(Kelvin) is first
  with pytest.raises(ValueError, match="override=True"):
    flax_ckpt.register_type_handler(Kelvin, second)
  assert flax_ckpt.get_type_handler(Kelvin) is first
  flax_ckpt.register_type_handler(Kelvin, second, override=True)
  assert flax_ckpt.get_type_handler(Kelvin) is second

  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"t": Kelvin(300.5)})
  assert json.loads((path / "state" / "_TREE.json").read_text())["leaves"][0]["typestr"] == (
      "test_errors.Kelvin.b")
  assert flax_ckpt.load(path) == {"t": 300.5}


def test_override_builtin_handler_and_restore(ckpt_dir):
  original = flax_ckpt.get_type_handler(int)
  calls = []

  class CountingIntHandler(flax_ckpt.ScalarHandler):
    async def serialize(self, values, infos, args=None):
      calls.append(len(values))
      return await super().serialize(values, infos, args)

  with pytest.raises(ValueError, match="already registered"):
    flax_ckpt.register_type_handler(int, CountingIntHandler(int))
  assert flax_ckpt.get_type_handler(int) is original
  try:
    flax_ckpt.register_type_handler(int, CountingIntHandler(int), override=True)
    assert isinstance(flax_ckpt.get_type_handler(int), CountingIntHandler)
    flax_ckpt.save(ckpt_dir / "ckpt", {"a": 1, "b": [2, 3], "c": True})
    assert calls == [3]  # batched: one call for the three ints, not the bool
    assert flax_ckpt.load(ckpt_dir / "ckpt") == {"a": 1, "b": [2, 3], "c": True}
  finally:
    flax_ckpt.register_type_handler(int, original, override=True)
  assert flax_ckpt.get_type_handler(int) is original
  flax_ckpt.save(ckpt_dir / "again", {"a": 1})
  assert calls == [3]
  assert type(flax_ckpt.load(ckpt_dir / "again")["a"]) is int


def test_register_type_handler_rejects_bad_arguments():
  with pytest.raises(TypeError):
    flax_ckpt.register_type_handler("not a type", flax_ckpt.ScalarHandler(int))
  with pytest.raises(TypeError, match="not a TypeHandler"):
    flax_ckpt.register_type_handler(Plain, object())
  assert not flax_ckpt.has_type_handler(Plain)
  with pytest.raises(ValueError, match="Plain"):
    flax_ckpt.get_type_handler(Plain)


def test_register_class_conflicts():
  class A:
    pass

  class B:
    pass

  flax_ckpt.register_class(A, name="test_errors.conflict")
  with pytest.raises(ValueError, match="override=True"):
    flax_ckpt.register_class(B, name="test_errors.conflict")
  flax_ckpt.register_class(B, name="test_errors.conflict", override=True)
  with pytest.raises(TypeError):
    flax_ckpt.register_class(A(), name="x")


def test_cyclic_tree_is_refused_naming_the_path(tmp_path):
  a = {"x": np.ones(2), "inner": {"y": [1, 2]}}
  a["inner"]["back"] = a
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match=r"\['inner'\]\['back'\].*cycle"):
    flax_ckpt.save(tmp_path / "c", a)
  assert not os.path.exists(tmp_path / "c")


def test_absurdly_deep_tree_is_refused_not_a_recursion_error(tmp_path):
  deep = np.ones(1)
  for _ in range(5000):
    deep = [deep]
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match="nested deeper than"):
    flax_ckpt.save(tmp_path / "d", {"t": deep})
  shared = np.arange(3)  # the same object twice is a tree, not a cycle
  flax_ckpt.save(tmp_path / "ok", {"a": shared, "b": [shared, (shared,)]})
  np.testing.assert_array_equal(flax_ckpt.load(tmp_path / "ok")["b"][1][0], shared)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b"[" * 100000,
                                     b'{"version": 1, "root": [], "leaves": 3}'])
def test_malformed_tree_file_is_a_format_error_naming_it(tmp_path, content):
  flax_ckpt.save(tmp_path / "c", {"w": np.ones(3)})
  (tmp_path / "c" / "state" / "_TREE.json").write_bytes(content)
  with pytest.raises(flax_ckpt.FormatError, match="_TREE.json"):
    flax_ckpt.load(tmp_path / "c")


@pytest.mark.parametrize("edit", [
    lambda d: d["chunks"].update({"7": d["chunks"]["0"]}),  # leaf id out of range
    lambda d: d["chunks"]["0"][0].update(o=-64),  # negative offset
    lambda d: d["chunks"]["0"][0].update(h="3"),  # wrong type
    lambda d: d.update(chunks=[1]),
])
def test_malformed_chunk_index_is_a_format_error_naming_it(tmp_path, edit):
  flax_ckpt.save(tmp_path / "c", {"w": np.ones(3)})
  f = tmp_path / "c" / "state" / "_CHUNKS.p0.json"
  doc = json.loads(f.read_text())
  edit(doc)
  f.write_text(json.dumps(doc))
  with pytest.raises(flax_ckpt.FormatError, match="_CHUNKS.p0.json"):
    flax_ckpt.load(tmp_path / "c")


def test_malformed_iterator_state_is_a_format_error_naming_it(tmp_path):
  class It:
    def __init__(self):
      self.state = {"pos": 3}

    def get_state(self):
      return self.state

    def set_state(self, s):
      self.state = s

  flax_ckpt.save_checkpointables(tmp_path / "c", {"dataset": It(), "p": {"w": np.ones(2)}})
  (f,) = (tmp_path / "c" / "dataset").iterdir()
  f.write_bytes(b'{"pos": 3')
  with pytest.raises(flax_ckpt.FormatError, match=f.name):
    flax_ckpt.load_checkpointables(tmp_path / "c", {"dataset": It()})


@pytest.mark.parametrize("victim", ["_CHECKPOINT", "state/_TREE.json", "state/data.p0.bin"])
def test_a_fifo_in_a_checkpoint_is_refused_at_once(tmp_path, victim):
  import time
  flax_ckpt.save(tmp_path / "c", {"w": np.ones(3)})
  f = tmp_path / "c" / victim
  f.unlink()
  os.mkfifo(f)
  t = time.monotonic()
  with pytest.raises(flax_ckpt.FormatError, match="not a regular file"):
    flax_ckpt.load(tmp_path / "c")
  assert time.monotonic() - t < 5


def test_a_hundred_thousand_chunks_load_in_bounded_time_and_memory(tmp_path):
  """The tiling check is n log n: 100k one-element chunks (a crafted index over a valid
  data file) load in well under the time the old pairwise check needed for 20k."""
  import resource
  import time
  n = 100_000
  values = np.arange(n, dtype=np.int64)
  flax_ckpt.save(tmp_path / "c", {"w": values})
  f = tmp_path / "c" / "state" / "_CHUNKS.p0.json"
  doc = json.loads(f.read_text())
  (chunk,) = doc["chunks"]["0"]
  doc["chunks"]["0"] = [{"s": [i], "h": [1], "o": chunk["o"] + 8 * i, "n": 8, "p": 0}
                        for i in range(n)]
  f.write_text(json.dumps(doc))
  reseal(tmp_path / "c")  # crafted: the author recomputed the checksums
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.monotonic()
  np.testing.assert_array_equal(flax_ckpt.load(tmp_path / "c")["w"], values)
  assert time.monotonic() - t < 20
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB
  doc["chunks"]["0"][7]["s"] = [6]  # two chunks on one element, one element uncovered
  f.write_text(json.dumps(doc))
  reseal(tmp_path / "c")
  with pytest.raises(flax_ckpt.FormatError, match="do not tile"):
    flax_ckpt.load(tmp_path / "c")


@pytest.mark.parametrize("craft", ["huge_shape", "offset_past_end", "lying_count"])
def test_crafted_sizes_are_a_format_error_before_any_allocation(tmp_path, craft):
  """A crafted shape of 2**40 elements or an offset past the file's end is refused before
  anything is allocated: no MemoryError, no huge RSS, within a second or two."""
  import resource
  import time
  flax_ckpt.save(tmp_path / "c", {"w": np.arange(1000, dtype=np.float64)})
  tree_f = tmp_path / "c" / "state" / "_TREE.json"
  chunks_f = tmp_path / "c" / "state" / "_CHUNKS.p0.json"
  tree, index = json.loads(tree_f.read_text()), json.loads(chunks_f.read_text())
  (chunk,) = index["chunks"]["0"]
  record = tree["leaves"][0]["record"]
  if craft == "huge_shape":
    record["shape"], record["nbytes"] = [2 ** 40], 8 * 2 ** 40
    chunk.update(h=[2 ** 40], n=8 * 2 ** 40)
  elif craft == "offset_past_end":
    chunk["o"] += 1 << 30
  else:
    chunk["n"] = 8  # a byte count that does not match the box
  tree_f.write_text(json.dumps(tree))
  chunks_f.write_text(json.dumps(index))
  reseal(tmp_path / "c")  # crafted: the author recomputed the checksums
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.monotonic()
  with pytest.raises(flax_ckpt.FormatError, match="leaf"):
    flax_ckpt.load(tmp_path / "c")
  assert time.monotonic() - t < 2
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
