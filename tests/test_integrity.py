"""Integrity and hostile input (issue 14): checksums catch damage after a save.

Every test damages a committed checkpoint the way storage does (a flipped byte, an edited
offset, a truncated or deleted file, a changed digit of a JSON state file) and checks that
loads raise :class:`flax_ckpt.CorruptCheckpointError` (or a FormatError) naming the
checkpoint, part, leaf and file; that ``flax_ckpt.verify`` lists every problem; that
``verify=False`` reads anyway; and that neither a failing load nor ``verify`` changes a byte
of what is saved. Checksums are recomputed here with ``xxhash`` directly, independently of
flax_ckpt's own code.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
import xxhash
from _crafting import reseal
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt

_MIB = 1 << 20

# ----------------------------------------------------------------------------- helpers


class Dataset:
  """A data iterator with get_state/set_state, like grain's."""

  def __init__(self, pos=12345):
    self.pos = pos
    self.set_calls = 0

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.set_calls += 1
    self.pos = state["pos"]



def _params():
  return {"w": np.arange(1000, dtype=np.float32), "b": np.full((1000,), 7, np.float32)}


def _opt_state():
  return {"m": np.linspace(0, 1, 500).astype(np.float64), "count": np.int32(3)}


def _save(kind, path):
  """Saves the test tree with ``kind``; returns (part holding ``_params()``, its dir)."""
  if kind == "save":
    flax_ckpt.save(path, _params())
    part = "state"
  elif kind == "save_async":
    flax_ckpt.save_async(path, _params()).result()
    part = "state"
  else:
    flax_ckpt.save_checkpointables(
        path, {"params": _params(), "opt_state": _opt_state(), "dataset": Dataset()})
    part = "params"
  return part, os.path.join(path, part)


def _load(kind, path, **kw):
  """Loads the part holding ``_params()`` (the only one the test damaged)."""
  if kind in ("save", "save_async"):
    return flax_ckpt.load(path, **kw)
  return flax_ckpt.load_checkpointables(path, {"params": None}, **kw)["params"]


def _leaf_chunks(part_dir):
  """{leaf path string: [chunk records]} read straight from _TREE.json and _CHUNKS."""
  with open(os.path.join(part_dir, "_TREE.json")) as f:
    tree = json.load(f)
  with open(os.path.join(part_dir, "_CHUNKS.p0.json")) as f:
    chunks = json.load(f)
  out = {}
  for i, leaf in enumerate(tree["leaves"]):
    name = "".join(f"[{k!r}]" for _, k in leaf["path"])
    out[name] = chunks["chunks"].get(str(i), [])
  return out


def _flip(path, offset):
  """Flips every bit of the byte at ``offset`` of the file ``path``."""
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)
    assert len(b) == 1
    f.seek(offset)
    f.write(bytes([b[0] ^ 0xFF]))


def _snapshot(root):
  """{relative path: bytes} of every file under ``root``."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def _strip_checksums(path):
  """Turns ``path`` into a checkpoint of the format before checksums existed."""
  marker = os.path.join(path, "_CHECKPOINT")
  with open(marker) as f:
    m = json.load(f)
  del m["checksums"]
  with open(marker, "w") as f:
    json.dump(m, f)
  for d, _, names in os.walk(path):
    for n in names:
      if re.fullmatch(r"_CHUNKS\.p\d+\.json", n):
        p = os.path.join(d, n)
        with open(p) as f:
          c = json.load(f)
        c.pop("checksum", None)
        for chunks in c["chunks"].values():
          for ch in chunks:
            ch.pop("x", None)
            ch.pop("xb", None)
        with open(p, "w") as f:
          json.dump(c, f)


def _geometry(c, row_bytes):
  """Checks a chunk record's block geometry against its bytes' layout; returns (xb, n
  blocks). The block size is the library's choice (whole rows, at most 1 MiB); the tests
  only rely on what the record says."""
  xb = c.get("xb", c["n"])
  nb = len(c["x"])
  assert xb % row_bytes == 0 or xb == c["n"], (xb, row_bytes)
  assert 0 < xb <= max(_MIB, row_bytes) and (nb - 1) * xb < c["n"] <= nb * xb, c
  return xb, nb


def _block_digests(raw, xb):
  return [xxhash.xxh3_64_hexdigest(raw[i:i + xb]) for i in range(0, len(raw), xb)]


def _problems(report):
  return [(os.path.basename(p.file), p.part, p.leaf) for p in report.problems]


# ----------------------------------------------------------------------------- format


def test_checksums_are_recorded_for_every_chunk_and_file(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save_checkpointables(
      path, {"params": _params(), "opt_state": _opt_state(), "dataset": Dataset()})
  with open(os.path.join(path, "_CHECKPOINT")) as f:
    sums = json.load(f)["checksums"]
  assert sums["algorithm"] == "xxh3_64"
  files = set(_snapshot(path)) - {"_CHECKPOINT"}
  listed = {f for f in files if not re.fullmatch(r".*data\.p\d+\.bin", f)}
  assert set(sums["files"]) == listed
  for rel, want in sums["files"].items():
    with open(os.path.join(path, rel), "rb") as f:
      assert xxhash.xxh3_64_hexdigest(f.read()) == want, rel
  n_chunks = n_bytes = 0
  for part in ("params", "opt_state"):
    d = os.path.join(path, part)
    with open(os.path.join(d, "_CHUNKS.p0.json")) as f:
      assert json.load(f)["checksum"] == "xxh3_64"
    with open(os.path.join(d, "data.p0.bin"), "rb") as f:
      data = f.read()
    for name, chunks in _leaf_chunks(d).items():
      for c in chunks:
        assert c["x"] == [xxhash.xxh3_64_hexdigest(data[c["o"]:c["o"] + c["n"]])], name
        n_chunks, n_bytes = n_chunks + 1, n_bytes + c["n"]
  report = flax_ckpt.verify(path)
  assert report and report.ok and report.problems == [] and report.has_checksums
  assert report.files_checked == len(sums["files"])
  assert n_chunks >= 3  # w, b, m (a scalar may be stored in _TREE.json)
  assert report.chunks_checked == n_chunks and report.bytes_checked == n_bytes
  assert "OK" in str(report)


# ----------------------------------------------------------------------------- 1a data


@pytest.mark.parametrize("kind", ["save", "save_async", "checkpointables"])
def test_flipped_data_byte_is_caught_and_named(ckpt_dir, kind):
  path = os.fspath(ckpt_dir / "c")
  part, part_dir = _save(kind, path)
  w = _leaf_chunks(part_dir)["['w']"][0]
  data = os.path.join(part_dir, "data.p0.bin")
  _flip(data, w["o"] + 4 * 500 + 1)  # element 500 of w
  before = _snapshot(path)

  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    _load(kind, path)
  e = info.value
  assert isinstance(e, flax_ckpt.FormatError) and isinstance(e, flax_ckpt.CheckpointError)
  assert e.leaf == "['w']"
  assert e.part == part
  assert e.file.endswith(os.path.join(part, "data.p0.bin"))
  assert os.fspath(e.checkpoint) == path
  msg = str(e)
  assert "['w']" in msg and repr(part) in msg and "data.p0.bin" in msg and path in msg
  assert "verify=False" in msg

  report = flax_ckpt.verify(path)
  assert not report and not report.ok
  assert _problems(report) == [("data.p0.bin", part, "['w']")]
  assert "['w']" in str(report) and "1 problem" in str(report)

  got = _load(kind, path, verify=False)  # read anyway: the damaged value comes back
  want = _params()
  diff = np.flatnonzero(np.asarray(got["w"]) != want["w"])
  assert diff.tolist() == [500]
  np.testing.assert_array_equal(got["b"], want["b"])

  if kind == "checkpointables":  # the other parts do not read a byte of params
    out = flax_ckpt.load_checkpointables(path, {"opt_state": None})
    np.testing.assert_array_equal(out["opt_state"]["m"], _opt_state()["m"])
    ds = Dataset(pos=0)
    out = flax_ckpt.load_checkpointables(path, {"opt_state": None, "dataset": ds})
    assert ds.pos == 12345
    with pytest.raises(flax_ckpt.CorruptCheckpointError):  # and a full load fails
      flax_ckpt.load_checkpointables(path)
  assert _snapshot(path) == before  # neither the failing loads nor verify wrote a byte


def test_failed_load_does_not_set_state_of_the_dataset(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  _, part_dir = _save("checkpointables", path)
  _flip(os.path.join(part_dir, "data.p0.bin"), 3)
  ds = Dataset(pos=0)
  with pytest.raises(flax_ckpt.CorruptCheckpointError):
    flax_ckpt.load_checkpointables(path, {"params": None, "dataset": ds})
  assert ds.pos == 0 and ds.set_calls == 0


def test_damage_in_the_padding_between_chunks_is_not_read(ckpt_dir):
  """Bytes no chunk covers (alignment padding) are not data: nothing to report."""
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"a": np.arange(3, dtype=np.float64), "z": np.ones(3)})
  chunks = _leaf_chunks(os.path.join(path, "state"))
  ends = sorted((c["o"], c["o"] + c["n"]) for cs in chunks.values() for c in cs)
  gap = ends[0][1]
  if gap >= ends[1][0]:
    pytest.skip("no padding between chunks in this layout")
  _flip(os.path.join(path, "state", "data.p0.bin"), gap)
  assert flax_ckpt.verify(path)
  np.testing.assert_array_equal(flax_ckpt.load(path)["z"], np.ones(3))


# ----------------------------------------------------------------------------- 1b offsets


@pytest.mark.parametrize("resealed", [False, True], ids=["plain", "resealed"])
def test_edited_chunk_offset_is_caught(ckpt_dir, resealed):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  part_dir = os.path.join(path, "state")
  index = os.path.join(part_dir, "_CHUNKS.p0.json")
  with open(index) as f:
    c = json.load(f)
  by_name = _leaf_chunks(part_dir)
  w, b = by_name["['w']"][0], by_name["['b']"][0]
  for chunk in c["chunks"].values():  # w now points at b's bytes: valid JSON, valid extents
    if chunk[0]["o"] == w["o"]:
      chunk[0]["o"] = b["o"]
  with open(index, "w") as f:
    json.dump(c, f)
  if resealed:
    reseal(path)  # the crafter recomputed the file checksums: only the data checks remain
  before = _snapshot(path)

  with pytest.raises(flax_ckpt.FormatError) as info:
    flax_ckpt.load(path)
  report = flax_ckpt.verify(path)
  assert not report
  if resealed:
    assert isinstance(info.value, flax_ckpt.CorruptCheckpointError)
    assert info.value.leaf == "['w']" and info.value.file.endswith("data.p0.bin")
    assert _problems(report) == [("data.p0.bin", "state", "['w']")]
  else:
    e = info.value
    assert isinstance(e, flax_ckpt.CorruptCheckpointError)
    assert e.file.endswith("_CHUNKS.p0.json") and e.part == "state" and e.leaf == ""
    assert ("_CHUNKS.p0.json", "state", "") in _problems(report)
  assert _snapshot(path) == before


def test_edited_chunk_offset_outside_the_file_is_a_format_error(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  index = os.path.join(path, "state", "_CHUNKS.p0.json")
  with open(index) as f:
    c = json.load(f)
  for chunk in c["chunks"].values():
    chunk[0]["o"] += 1 << 30
  with open(index, "w") as f:
    json.dump(c, f)
  reseal(path)
  with pytest.raises(flax_ckpt.FormatError):
    flax_ckpt.load(path)
  report = flax_ckpt.verify(path)
  assert not report
  assert {p.leaf for p in report.problems} <= {"['w']", "['b']"}
  assert report.problems


# ----------------------------------------------------------------------------- 1c dataset


def test_changed_digit_of_the_dataset_state_is_caught(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  _save("checkpointables", path)
  state_file = os.path.join(path, "dataset", "process_0-of-1.json")
  with open(state_file) as f:
    text = f.read()
  assert "12345" in text
  with open(state_file, "w") as f:
    f.write(text.replace("12345", "12346"))  # still valid JSON, still a plausible state
  before = _snapshot(path)

  ds = Dataset(pos=0)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load_checkpointables(path, {"dataset": ds})
  e = info.value
  assert e.part == "dataset" and e.leaf == ""
  assert e.file.endswith(os.path.join("dataset", "process_0-of-1.json"))
  assert "process_0-of-1.json" in str(e) and "'dataset'" in str(e)
  assert ds.pos == 0 and ds.set_calls == 0  # the iterator was not touched
  with pytest.raises(flax_ckpt.CorruptCheckpointError):
    flax_ckpt.load_checkpointables(path, {"dataset": None})

  # the other parts still load; verify=False reads the damaged state
  out = flax_ckpt.load_checkpointables(path, {"params": None, "opt_state": None})
  np.testing.assert_array_equal(out["params"]["w"], _params()["w"])
  flax_ckpt.load_checkpointables(path, {"dataset": ds}, verify=False)
  assert ds.pos == 12346

  report = flax_ckpt.verify(path)
  assert not report
  assert _problems(report) == [("process_0-of-1.json", "dataset", "")]
  assert _snapshot(path) == before


@pytest.mark.parametrize("name", ["_TREE.json", "_CHUNKS.p0.json"])
def test_changed_byte_of_pytree_metadata_is_caught(ckpt_dir, name):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  f = os.path.join(path, "state", name)
  with open(f) as fh:
    text = fh.read()
  with open(f, "w") as fh:
    fh.write(text.replace("1000", "1001", 1) if "1000" in text else text + " ")
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert info.value.file.endswith(name) and info.value.part == "state"
  assert (name, "state", "") in _problems(flax_ckpt.verify(path))


# ----------------------------------------------------------------------------- 1d truncated


@pytest.mark.parametrize("kind", ["save", "checkpointables"])
def test_truncated_data_file(ckpt_dir, kind):
  path = os.fspath(ckpt_dir / "c")
  part, part_dir = _save(kind, path)
  data = os.path.join(part_dir, "data.p0.bin")
  size = os.path.getsize(data)
  with open(data, "r+b") as f:
    f.truncate(size // 2)
  before = _snapshot(path)
  with pytest.raises(flax_ckpt.FormatError) as info:
    _load(kind, path)
  assert "data.p0.bin" in str(info.value)
  report = flax_ckpt.verify(path)
  assert not report
  assert report.problems and all(p.part == part for p in report.problems)
  assert any("data.p0.bin" in str(p) for p in report.problems)
  if kind == "checkpointables":
    out = flax_ckpt.load_checkpointables(path, {"opt_state": None})
    np.testing.assert_array_equal(out["opt_state"]["m"], _opt_state()["m"])
  assert _snapshot(path) == before


@pytest.mark.parametrize("kind", ["save", "checkpointables"])
def test_deleted_data_file_is_reported_once(ckpt_dir, kind):
  path = os.fspath(ckpt_dir / "c")
  part, part_dir = _save(kind, path)
  os.remove(os.path.join(part_dir, "data.p0.bin"))
  before = _snapshot(path)
  with pytest.raises(OSError, match="data.p0.bin"):  # whatever the class: it names the file
    _load(kind, path)
  report = flax_ckpt.verify(path)
  assert not report
  # two leaves live in that file: it is reported once, not once per leaf
  assert len(report.problems) == 1, str(report)
  p = report.problems[0]
  assert p.part == part and p.file.endswith("data.p0.bin") and "missing" in p.message
  if kind == "checkpointables":
    out = flax_ckpt.load_checkpointables(path, {"opt_state": None})
    np.testing.assert_array_equal(out["opt_state"]["m"], _opt_state()["m"])
  assert _snapshot(path) == before


def test_deleted_data_file_load_is_a_format_error(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  os.remove(os.path.join(path, "state", "data.p0.bin"))
  with pytest.raises(flax_ckpt.FormatError, match="data.p0.bin"):
    flax_ckpt.load(path)


@pytest.mark.parametrize("name", ["_TREE.json", "_CHUNKS.p0.json"])
def test_deleted_metadata_file_is_corrupt(ckpt_dir, name):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  os.remove(os.path.join(path, "state", name))
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match="missing") as info:
    flax_ckpt.load(path)
  assert info.value.file.endswith(name) and info.value.part == "state"
  report = flax_ckpt.verify(path)
  assert not report
  assert (name, "state", "") in _problems(report)
  assert any("missing" in p.message for p in report.problems)


# ----------------------------------------------------------------------------- 1e every problem


def test_verify_lists_every_damaged_leaf(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  part_dir = os.path.join(path, "state")
  chunks = _leaf_chunks(part_dir)
  data = os.path.join(part_dir, "data.p0.bin")
  _flip(data, chunks["['w']"][0]["o"] + 10)
  _flip(data, chunks["['b']"][0]["o"] + 3990)
  report = flax_ckpt.verify(path)
  assert not report
  assert len(report.problems) == 2, str(report)
  assert {p.leaf for p in report.problems} == {"['w']", "['b']"}
  assert "2 problem(s)" in str(report)
  assert report.chunks_checked == 2


def test_verify_lists_problems_in_every_part(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  _save("checkpointables", path)
  p_chunks = _leaf_chunks(os.path.join(path, "params"))
  o_chunks = _leaf_chunks(os.path.join(path, "opt_state"))
  _flip(os.path.join(path, "params", "data.p0.bin"), p_chunks["['b']"][0]["o"])
  _flip(os.path.join(path, "opt_state", "data.p0.bin"), o_chunks["['m']"][0]["o"] + 7)
  state_file = os.path.join(path, "dataset", "process_0-of-1.json")
  with open(state_file) as f:
    text = f.read()
  with open(state_file, "w") as f:
    f.write(text.replace("3", "4"))
  report = flax_ckpt.verify(path)
  assert sorted(_problems(report)) == sorted([
      ("data.p0.bin", "params", "['b']"),
      ("data.p0.bin", "opt_state", "['m']"),
      ("process_0-of-1.json", "dataset", ""),
  ]), str(report)
  for name in ("params", "opt_state", "dataset"):
    with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
      flax_ckpt.load_checkpointables(path, {name: None})
    assert info.value.part == name


# ----------------------------------------------------------------------------- 2 large arrays


def _big():
  return np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)  # 4 MiB, 4 blocks


def test_large_chunk_damage_in_block_two_names_its_bytes(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big(), "small": np.ones(4)})
  part_dir = os.path.join(path, "state")
  (c,) = _leaf_chunks(part_dir)["['big']"]
  xb, nb = _geometry(c, 4096)
  assert c["n"] == 4 * _MIB and nb >= 4
  with open(os.path.join(part_dir, "data.p0.bin"), "rb") as f:
    f.seek(c["o"])
    raw = f.read(c["n"])
  assert c["x"] == _block_digests(raw, xb)

  a = c["o"] + 2 * xb
  _flip(os.path.join(part_dir, "data.p0.bin"), a + 12345 % xb)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  e = info.value
  assert e.leaf == "['big']"
  assert f"{a}..{a + xb}" in str(e) and "block 2" in str(e)
  report = flax_ckpt.verify(path)
  assert _problems(report) == [("data.p0.bin", "state", "['big']")]
  assert f"1 of {nb}" in report.problems[0].message
  assert str(a) in report.problems[0].message and str(a + xb) in report.problems[0].message
  got = flax_ckpt.load(path, verify=False)["big"]
  assert (got != _big()).sum() == 1


def test_large_chunk_damage_in_several_blocks_counted(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big()})
  part_dir = os.path.join(path, "state")
  (c,) = _leaf_chunks(part_dir)["['big']"]
  xb, nb = _geometry(c, 4096)
  for k in (1, 3):
    _flip(os.path.join(part_dir, "data.p0.bin"), c["o"] + k * xb + 5)
  report = flax_ckpt.verify(path)
  assert len(report.problems) == 1  # one chunk: one problem naming its bad blocks
  msg = report.problems[0].message
  assert f"2 of {nb}" in msg and str(c["o"] + xb) in msg
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match="block 1"):
    flax_ckpt.load(path)


def _mesh8():
  devs = jax.devices()
  if len(devs) < 8:
    pytest.skip("needs 8 devices")
  return jax.sharding.Mesh(np.array(devs[:8]), ("x",))


@pytest.mark.parametrize("spec", [P("x", None), P(None, "x")], ids=["rows", "cols"])
def test_resharded_load_reads_parts_of_chunks_and_verifies_them(ckpt_dir, spec):
  """A single 4-block chunk loaded into 8 shards: each shard reads part of the chunk."""
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big()})
  mesh = _mesh8()
  template = {"big": jax.ShapeDtypeStruct((1024, 1024), np.float32,
                                          sharding=NamedSharding(mesh, spec))}
  got = flax_ckpt.load(path, template)["big"]  # undamaged: loads, and correctly
  assert got.sharding == template["big"].sharding
  np.testing.assert_array_equal(np.asarray(got), _big())

  part_dir = os.path.join(path, "state")
  (c,) = _leaf_chunks(part_dir)["['big']"]
  xb, _ = _geometry(c, 4096)
  a = c["o"] + 2 * xb
  row = 2 * xb // 4096 + 3
  _flip(os.path.join(part_dir, "data.p0.bin"), a + 4096 * 3 + 8)  # block 2, row `row`, col 2
  before = _snapshot(path)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path, template)
  assert info.value.leaf == "['big']" and f"{a}..{a + xb}" in str(info.value)
  got = np.asarray(flax_ckpt.load(path, template, verify=False)["big"])
  assert (got != _big()).sum() == 1 and got[row, 2] != _big()[row, 2]
  assert _snapshot(path) == before


def test_resharding_from_sharded_multi_block_chunks(ckpt_dir):
  """Saved row-sharded (8 chunks of 2 MiB, several blocks each), loaded column-sharded."""
  mesh = _mesh8()
  x = np.arange(8192 * 512, dtype=np.float32).reshape(8192, 512)
  arr = jax.device_put(x, NamedSharding(mesh, P("x", None)))
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"x": arr})
  part_dir = os.path.join(path, "state")
  chunks = _leaf_chunks(part_dir)["['x']"]
  assert len(chunks) == 8 and all(_geometry(c, 2048)[1] >= 2 for c in chunks)
  template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=NamedSharding(mesh, P(None, "x")))}
  np.testing.assert_array_equal(np.asarray(flax_ckpt.load(path, template)["x"]), x)
  c = sorted(chunks, key=lambda c: c["s"][0])[5]
  _flip(os.path.join(part_dir, "data.p0.bin"), c["o"] + c["xb"] + 100)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path, template)
  assert info.value.leaf == "['x']" and str(c["s"]) in str(info.value)
  report = flax_ckpt.verify(path)
  assert _problems(report) == [("data.p0.bin", "state", "['x']")]
  assert f"1 of {len(c['x'])}" in report.problems[0].message


def test_partial_load_skips_damaged_leaf_it_does_not_need(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big(), "small": np.arange(4.0)})
  part_dir = os.path.join(path, "state")
  (c,) = _leaf_chunks(part_dir)["['big']"]
  _flip(os.path.join(part_dir, "data.p0.bin"), c["o"] + 3 * _MIB + 1)
  got = flax_ckpt.load(path, {"small": jax.ShapeDtypeStruct((4,), np.float64)}, partial=True)
  np.testing.assert_array_equal(got["small"], np.arange(4.0))
  with pytest.raises(flax_ckpt.CorruptCheckpointError):
    flax_ckpt.load(path, {"big": jax.ShapeDtypeStruct((1024, 1024), np.float32)},
                   partial=True)


# ----------------------------------------------------------------------------- 3 manager


def _data_files(root):
  return sorted(os.path.join(d, n) for d, _, ns in os.walk(root) for n in ns
                if re.fullmatch(r"data\.p\d+\.bin", n))


def test_manager_verify_and_restore_of_a_damaged_step(ckpt_dir):
  root = ckpt_dir / "run"
  with flax_ckpt.CheckpointManager(root, enable_async=False, fsync=False) as m:
    for step in (1, 2):
      assert m.save(step, {"w": np.full((1000,), step, np.float32), "n": step})
    assert m.verify() and m.verify(step=1)
    step_dir = os.path.join(root, "2")
    assert os.path.isdir(step_dir), os.listdir(root)
    (data,) = _data_files(step_dir)
    _flip(data, 0)
    before = _snapshot(root)

    report = m.verify()
    assert not report and report.problems[0].file.endswith("data.p0.bin")
    assert m.verify(step=2).problems == report.problems
    assert m.verify(step=1)
    with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
      m.restore()
    assert "2" in os.fspath(info.value.checkpoint)
    with pytest.raises(flax_ckpt.CorruptCheckpointError):
      m.restore(step=2)
    old = m.restore(step=1)
    np.testing.assert_array_equal(old["w"], np.full((1000,), 1, np.float32))
    got = m.restore(verify=False)
    assert got["n"] == 2
    assert _snapshot(root) == before  # the manager neither deleted nor repaired anything
    assert m.all_steps() == [1, 2]


def test_manager_restore_only_an_undamaged_part(ckpt_dir):
  root = ckpt_dir / "run"
  state = {"params": {"w": np.ones(100, np.float32)}, "opt_state": {"mu": np.zeros(100)},
           "step": 5}
  with flax_ckpt.CheckpointManager(root, enable_async=False, fsync=False) as m:
    m.save(5, state, dataset=Dataset())
    step_dir = os.path.join(root, "5")
    params_data = [f for f in _data_files(step_dir) if f"{os.sep}params{os.sep}" in f]
    if not params_data:
      pytest.skip(f"no params part in this layout: {os.listdir(step_dir)}")
    _flip(params_data[0], 1)
    with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
      m.restore()
    assert info.value.part == "params"
    np.testing.assert_array_equal(m.restore(only="opt_state")["mu"], np.zeros(100))
    assert {p.part for p in m.verify().problems} == {"params"}


# ----------------------------------------------------------------------------- 4 handlers


class Calls:
  restored = 0


class JsonStateHandler(flax_ckpt.CheckpointHandler):
  """Writes its state as JSON files of its own."""

  def save(self, directory, args):
    with open(os.path.join(directory, "state.json"), "w") as f:
      json.dump({"a": args.a}, f)
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    with open(os.path.join(directory, "sub", "more.txt"), "w") as f:
      f.write("12345")

  def restore(self, directory, args):
    Calls.restored += 1
    with open(os.path.join(directory, "state.json")) as f:
      a = json.load(f)["a"]
    with open(os.path.join(directory, "sub", "more.txt")) as f:
      return {"a": a, "more": f.read()}


@flax_ckpt.args.register_with_handler(JsonStateHandler, for_save=True)
class JsonSave(flax_ckpt.args.CheckpointArgs):

  def __init__(self, a=0):
    self.a = a


@flax_ckpt.args.register_with_handler(JsonStateHandler, for_restore=True)
class JsonRestore(flax_ckpt.args.CheckpointArgs):
  pass


@pytest.mark.parametrize("file", ["state.json", "sub/more.txt"])
@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_custom_handler_files_are_verified_before_the_handler_reads(ckpt_dir, file, async_):
  path = ckpt_dir / "c"
  cls = flax_ckpt.AsyncCheckpointer if async_ else flax_ckpt.Checkpointer
  ckptr = cls(JsonStateHandler())
  try:
    ckptr.save(path, args=JsonSave(a=12345))
    assert ckptr.restore(path, args=JsonRestore()) == {"a": 12345, "more": "12345"}
    target = os.path.join(path, *file.split("/"))
    with open(target) as f:
      text = f.read()
    with open(target, "w") as f:
      f.write(text.replace("12345", "12346"))
    before = _snapshot(path)
    calls = Calls.restored
    with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
      ckptr.restore(path, args=JsonRestore())
    assert Calls.restored == calls  # refused before the handler read a byte
    assert info.value.file.endswith(os.path.join(*file.split("/")))
    assert os.fspath(info.value.checkpoint) == os.fspath(path)
    got = ckptr.restore(path, args=JsonRestore(), verify=False)
    assert "12346" in (str(got["a"]) + got["more"])
    report = flax_ckpt.verify(path)
    assert not report and len(report.problems) == 1
    assert report.problems[0].file.endswith(os.path.join(*file.split("/")))
    assert _snapshot(path) == before
  finally:
    ckptr.close()


def test_pytree_checkpointer_restore_verifies(ckpt_dir):
  path = ckpt_dir / "c"
  ckptr = flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
  ckptr.save(path, args=flax_ckpt.args.PyTreeSave(_params()))
  (data,) = _data_files(path)
  _flip(data, 9)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    ckptr.restore(path)
  assert info.value.leaf in ("['w']", "['b']")
  ckptr.restore(path, verify=False)


# ----------------------------------------------------------------------------- 5 old format


@pytest.mark.parametrize("kind", ["save", "checkpointables"])
def test_checkpoint_without_checksums_still_loads(ckpt_dir, kind):
  path = os.fspath(ckpt_dir / "c")
  _, part_dir = _save(kind, path)
  big = os.fspath(ckpt_dir / "big")
  flax_ckpt.save(big, {"big": _big()})
  for p in (path, big):
    _strip_checksums(p)
  got = _load(kind, path)
  for k, v in _params().items():
    np.testing.assert_array_equal(got[k], v)
  np.testing.assert_array_equal(flax_ckpt.load(big)["big"], _big())
  if kind == "checkpointables":
    out = flax_ckpt.load_checkpointables(path)
    assert out["dataset"] == {"pos": 12345}
  for p in (path, big):
    report = flax_ckpt.verify(p)
    assert report and not report.has_checksums and report.problems == []
    assert "no checksums" in str(report)

  # without checksums, only structure and lengths are checked: a truncated file still shows
  with open(os.path.join(part_dir, "data.p0.bin"), "r+b") as f:
    f.truncate(10)
  report = flax_ckpt.verify(path)
  assert not report and not report.has_checksums
  with pytest.raises(flax_ckpt.FormatError):
    _load(kind, path)


# ----------------------------------------------------------------------------- 6 object stores


def _objstore_segments(ckpt):
  from _objstore_helpers import keys

  return [k for k in keys(ckpt) if re.fullmatch(r"data\.p\d+\.bin\.\d+", k.rsplit("/", 1)[-1])]


def test_object_store_flipped_byte_in_a_data_segment(objstore_root):
  from _objstore_helpers import keys, put, read

  path = f"{objstore_root}/ckpt"
  tree = {"w": np.arange(5000, dtype=np.float32), "b": np.ones(7)}
  flax_ckpt.save(path, tree)
  np.testing.assert_array_equal(flax_ckpt.load(path)["w"], tree["w"])
  assert flax_ckpt.verify(path)
  segs = [k for k in _objstore_segments(path) if "/state/" in f"/{k}"]
  assert segs, keys(path)
  seg = f"{path}/{segs[0]}"
  data = bytearray(read(seg))
  data[100] ^= 0xFF  # inside w (the first leaf's chunk starts at offset 0)
  put(seg, bytes(data))
  before = {k: read(f"{path}/{k}") for k in keys(path)}

  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  e = info.value
  assert e.part == "state" and e.leaf in ("['w']", "['b']") and "data.p0.bin" in e.file
  assert os.fspath(e.checkpoint).rstrip("/") == path
  report = flax_ckpt.verify(path)
  assert not report and report.has_checksums
  assert [(p.part, p.leaf) for p in report.problems] == [("state", e.leaf)]
  got = flax_ckpt.load(path, verify=False)
  assert not np.array_equal(got["w"], tree["w"]) or not np.array_equal(got["b"], tree["b"])
  assert {k: read(f"{path}/{k}") for k in keys(path)} == before


def test_object_store_changed_metadata_object(objstore_root):
  from _objstore_helpers import keys, put, read

  path = f"{objstore_root}/ckpt"
  flax_ckpt.save(path, {"w": np.arange(100, dtype=np.float32)})
  (tree_key,) = [k for k in keys(path) if k.endswith("state/_TREE.json")]
  put(f"{path}/{tree_key}", read(f"{path}/{tree_key}") + b" ")
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert info.value.file.endswith("_TREE.json") and info.value.part == "state"
  report = flax_ckpt.verify(path)
  assert [os.path.basename(p.file) for p in report.problems] == ["_TREE.json"]


# ----------------------------------------------------------------------------- read paths


@pytest.mark.parametrize("storage_kind", ["posix", "tensorstore"])
@pytest.mark.parametrize("direct_io", ["1", "0"], ids=["direct", "buffered"])
def test_every_read_path_verifies(ckpt_dir, monkeypatch, storage_kind, direct_io):
  monkeypatch.setenv("FLAX_CKPT_STORAGE", storage_kind)
  monkeypatch.setenv("FLAX_CKPT_DIRECT_IO", direct_io)
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big(), "w": np.arange(1000, dtype=np.float32)})
  part_dir = os.path.join(path, "state")
  chunks = _leaf_chunks(part_dir)
  np.testing.assert_array_equal(flax_ckpt.load(path)["big"], _big())
  _flip(os.path.join(part_dir, "data.p0.bin"), chunks["['w']"][0]["o"] + 40)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert info.value.leaf == "['w']"
  assert _problems(flax_ckpt.verify(path)) == [("data.p0.bin", "state", "['w']")]
  c = chunks["['big']"][0]
  _, nb = _geometry(c, 4096)
  _flip(os.path.join(part_dir, "data.p0.bin"), c["o"] + c["n"] - 1)  # last byte, last block
  report = flax_ckpt.verify(path)
  assert {p.leaf for p in report.problems} == {"['w']", "['big']"}
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match=rf"block {nb - 1}\)"):
    flax_ckpt.load(path, {"big": jax.ShapeDtypeStruct((1024, 1024), np.float32)},
                   partial=True)


def test_small_staging_budget_still_verifies_whole_blocks(ckpt_dir, monkeypatch):
  """Blocks larger than the staging buffer: a partial read of a chunk still checks them."""
  monkeypatch.setenv("FLAX_CKPT_STAGING_BYTES", str(64 << 10))
  mesh = _mesh8()
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big()})
  template = {"big": jax.ShapeDtypeStruct((1024, 1024), np.float32,
                                          sharding=NamedSharding(mesh, P(None, "x")))}
  np.testing.assert_array_equal(np.asarray(flax_ckpt.load(path, template)["big"]), _big())
  assert flax_ckpt.verify(path)
  (c,) = _leaf_chunks(os.path.join(path, "state"))["['big']"]
  xb, _ = _geometry(c, 4096)
  _flip(os.path.join(path, "state", "data.p0.bin"), c["o"] + xb + 77)
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match="block 1"):
    flax_ckpt.load(path, template)
  assert not flax_ckpt.verify(path)


def test_uneven_blocks_last_block_shorter(ckpt_dir):
  """Rows of 4000 bytes: blocks of whole rows (not a power of two), the last one shorter."""
  x = np.arange(1000 * 1000, dtype=np.float32).reshape(1000, 1000)
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"x": x})
  part_dir = os.path.join(path, "state")
  (c,) = _leaf_chunks(part_dir)["['x']"]
  xb, nb = _geometry(c, 4000)
  assert nb >= 4 and c["n"] % xb  # the last block is shorter
  with open(os.path.join(part_dir, "data.p0.bin"), "rb") as f:
    f.seek(c["o"])
    raw = f.read(c["n"])
  assert c["x"] == _block_digests(raw, xb)
  assert c["x"][-1] == xxhash.xxh3_64_hexdigest(raw[(nb - 1) * xb:])
  _flip(os.path.join(part_dir, "data.p0.bin"), c["o"] + c["n"] - 2)
  end = c["o"] + c["n"]
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert f"{c['o'] + (nb - 1) * xb}..{end}" in str(info.value)
  mesh = _mesh8()
  template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=NamedSharding(mesh, P("x", None)))}
  with pytest.raises(flax_ckpt.CorruptCheckpointError):
    flax_ckpt.load(path, template)
  report = flax_ckpt.verify(path)
  assert f"1 of {nb}" in report.problems[0].message and str(end) in report.problems[0].message


def test_rows_larger_than_a_block(ckpt_dir):
  """A row of 2.4 MB: each block is one row; a column-resharded load checks whole rows."""
  x = np.arange(3 * 300_000, dtype=np.float64).reshape(3, 300_000)
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"x": x})
  part_dir = os.path.join(path, "state")
  (c,) = _leaf_chunks(part_dir)["['x']"]
  assert _geometry(c, 2_400_000) == (2_400_000, 3)
  mesh = _mesh8()
  template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=NamedSharding(mesh, P(None, "x")))}
  np.testing.assert_array_equal(np.asarray(flax_ckpt.load(path, template)["x"]), x)
  _flip(os.path.join(part_dir, "data.p0.bin"), c["o"] + c["xb"] + 5)
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match="block 1"):
    flax_ckpt.load(path, template)
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match="block 1"):
    flax_ckpt.load(path)


def test_empty_and_scalar_leaves_verify(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  tree = {"e": np.zeros((0, 5), np.float32), "s": np.float64(2.5), "z": np.array(3)}
  flax_ckpt.save(path, tree)
  report = flax_ckpt.verify(path)
  assert report and report.has_checksums, str(report)
  got = flax_ckpt.load(path)
  assert got["e"].shape == (0, 5) and got["s"] == 2.5 and got["z"] == 3


def test_verify_of_a_damaged_marker_is_a_problem_not_an_exception(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  marker = os.path.join(path, "_CHECKPOINT")
  with open(marker, "rb") as f:
    raw = f.read()
  with open(marker, "wb") as f:
    f.write(raw[:len(raw) // 2])  # no longer JSON
  report = flax_ckpt.verify(path)
  assert not report and len(report.problems) == 1
  assert "_CHECKPOINT" in str(report)
  with pytest.raises(flax_ckpt.FormatError):
    flax_ckpt.load(path)


@pytest.mark.parametrize("staging", [None, 2 << 20], ids=["default", "2MiB"])
def test_verify_counts_every_bad_block_of_a_large_chunk(ckpt_dir, monkeypatch, staging):
  """A 40 MiB chunk of many blocks (hashed on the pool; in several slabs with a small
  staging budget)."""
  if staging:
    monkeypatch.setenv("FLAX_CKPT_STAGING_BYTES", str(staging))
  x = np.arange(40 * 256 * 1024, dtype=np.float32).reshape(40 * 256, 1024)  # 40 MiB
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"x": x})
  data = os.path.join(path, "state", "data.p0.bin")
  (c,) = _leaf_chunks(os.path.join(path, "state"))["['x']"]
  xb, nb = _geometry(c, 4096)
  assert nb >= 40
  assert flax_ckpt.verify(path).bytes_checked == 40 * _MIB
  for k in (nb - 1, 17, 18, 2):
    _flip(data, c["o"] + k * xb + 1000)
  report = flax_ckpt.verify(path)
  assert len(report.problems) == 1, str(report)
  msg = report.problems[0].message
  assert f"4 of {nb}" in msg and f"bytes {c['o'] + 2 * xb}" in msg, msg
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert "block 2)" in str(info.value)  # the first damaged block is named
  got = np.asarray(flax_ckpt.load(path, verify=False)["x"])
  assert (got != x).sum() == 4


def test_object_store_chunk_split_over_segments(s3_root, monkeypatch):
  """A 2 MiB chunk stored as 64 KiB segment objects: damage in a later segment is caught
  by a whole load, a resharded load and verify."""
  from _objstore_helpers import keys, put, read

  monkeypatch.setenv("FLAX_CKPT_OBJECT_BYTES", str(65536))
  x = np.arange(512 * 1024, dtype=np.float32).reshape(512, 1024)
  path = f"{s3_root}/ckpt"
  flax_ckpt.save(path, {"x": x})
  segs = sorted(_objstore_segments(path), key=lambda k: int(k.rsplit(".", 1)[-1]))
  assert len(segs) >= 32, keys(path)
  (index,) = [k for k in keys(path) if k.endswith("state/_CHUNKS.p0.json")]
  (c,) = json.loads(read(f"{path}/{index}"))["chunks"]["0"]
  xb, nb = _geometry(c, 4096)
  seg = f"{path}/{segs[20]}"  # bytes 1.25 MiB.. of the data file
  block = (20 * 65536 + 10 - c["o"]) // xb
  data = bytearray(read(seg))
  data[10] ^= 0x01
  put(seg, bytes(data))
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match=rf"block {block}\)"):
    flax_ckpt.load(path)
  mesh = _mesh8()
  template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                        sharding=NamedSharding(mesh, P(None, "x")))}
  with pytest.raises(flax_ckpt.CorruptCheckpointError, match=rf"block {block}\)"):
    flax_ckpt.load(path, template)
  report = flax_ckpt.verify(path)
  assert [(p.part, p.leaf) for p in report.problems] == [("state", "['x']")]
  assert f"1 of {nb}" in report.problems[0].message


def test_manager_damaged_dataset_leaves_the_iterator_alone(ckpt_dir):
  root = ckpt_dir / "run"
  with flax_ckpt.CheckpointManager(root, enable_async=True, fsync=False) as m:
    m.save(1, {"w": np.ones(10, np.float32)}, dataset=Dataset(pos=111))
    m.save(2, {"w": np.full(10, 2, np.float32)}, dataset=Dataset(pos=222))
    m.wait_until_finished()
    state_file = os.path.join(root, "2", "dataset", "process_0-of-1.json")
    assert os.path.exists(state_file), os.listdir(os.path.join(root, "2"))
    with open(state_file) as f:
      text = f.read()
    with open(state_file, "w") as f:
      f.write(text.replace("222", "223"))
    ds = Dataset(pos=0)
    with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
      m.restore(dataset=ds)
    assert info.value.part == "dataset" and ds.set_calls == 0 and ds.pos == 0
    got = m.restore(step=1, dataset=ds)
    assert ds.pos == 111 and float(got["w"][0]) == 1.0
    m.restore(dataset=ds, verify=False)
    assert ds.pos == 223
    assert [p.part for p in m.verify().problems] == ["dataset"]


def test_verify_flag_is_per_thread(ckpt_dir):
  """A load with verify=False in one thread does not switch checks off in another."""
  import threading

  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"big": _big(), "w": np.arange(1000, dtype=np.float32)})
  (c,) = _leaf_chunks(os.path.join(path, "state"))["['big']"]
  _flip(os.path.join(path, "state", "data.p0.bin"), c["o"] + 5)
  results = {}
  start = threading.Barrier(8)

  def work(i):
    start.wait()
    try:
      for _ in range(3):
        flax_ckpt.load(path, verify=bool(i % 2))
      results[i] = "ok"
    except flax_ckpt.CorruptCheckpointError:
      results[i] = "corrupt"

  threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == {i: "corrupt" if i % 2 else "ok" for i in range(8)}


def test_load_inside_a_running_event_loop_verifies(ckpt_dir):
  import asyncio

  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  _flip(os.path.join(path, "state", "data.p0.bin"), 0)

  async def main():
    with pytest.raises(flax_ckpt.CorruptCheckpointError):
      flax_ckpt.load(path)
    return flax_ckpt.load(path, verify=False)

  got = asyncio.run(main())
  assert got["w"][0] != 0 or got["b"][0] != 7


# ----------------------------------------------------------------------------- report details


def test_truncated_data_file_problem_names_the_file(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  data = os.path.join(path, "state", "data.p0.bin")
  os.truncate(data, 100)
  report = flax_ckpt.verify(path)
  assert report.problems
  assert all(p.file == data for p in report.problems), [p.file for p in report.problems]


def test_damaged_marker_report_does_not_claim_an_old_format(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  with open(os.path.join(path, "_CHECKPOINT"), "w") as f:
    f.write("{")
  report = flax_ckpt.verify(path)
  assert not report
  assert "saved by a flax_ckpt without them" not in str(report), str(report)


# ----------------------------------------------------------------------------- leaf kinds


@pytest.mark.parametrize("kind", ["bytes", "key", "keys", "bfloat16", "bool", "int8_sharded"])
def test_every_leaf_kind_in_the_data_file_is_checked(ckpt_dir, kind):
  import jax.numpy as jnp

  if kind == "bytes":
    value = bytes(range(256)) * 400  # > 64 KiB: goes to the data file
  elif kind == "key":
    value = jax.random.key(0)
  elif kind == "keys":
    value = jax.random.split(jax.random.key(1), 50)
  elif kind == "bfloat16":
    value = jnp.arange(100, dtype=jnp.bfloat16)
  elif kind == "bool":
    value = np.ones(100, bool)
  else:
    value = jax.device_put(np.arange(64, dtype=np.int8).reshape(8, 8),
                           NamedSharding(_mesh8(), P("x")))
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"v": value})
  (c, *_) = _leaf_chunks(os.path.join(path, "state"))["['v']"]
  assert c["x"]
  with open(os.path.join(path, "state", "data.p0.bin"), "rb") as f:
    f.seek(c["o"])
    assert _block_digests(f.read(c["n"]), c.get("xb", c["n"])) == c["x"]
  _flip(os.path.join(path, "state", "data.p0.bin"), c["o"] + c["n"] - 1)
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert info.value.leaf == "['v']"
  assert _problems(flax_ckpt.verify(path)) == [("data.p0.bin", "state", "['v']")]


def test_inline_value_in_the_tree_file_is_checked(ckpt_dir):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"name": "run-12345", "lr": 0.125, "n": 12345})
  tree_file = os.path.join(path, "state", "_TREE.json")
  with open(tree_file) as f:
    text = f.read()
  assert text.count("12345") >= 2
  with open(tree_file, "w") as f:
    f.write(text.replace("run-12345", "run-12346"))
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert info.value.file.endswith("_TREE.json") and info.value.leaf == ""
  assert flax_ckpt.load(path, verify=False)["name"] == "run-12346"


class Note:
  """A leaf type with a TypeHandler that writes its own file."""

  def __init__(self, text):
    self.text = text


class NoteHandler(flax_ckpt.type_handlers.TypeHandler):

  def typestr(self):
    return "test_integrity.Note"

  async def serialize(self, values, infos, args=None):
    del args
    for value, info in zip(values, infos, strict=True):
      info.path.mkdir(exist_ok=True)
      (info.path / "note.txt").write_text(value.text)
    return []

  async def deserialize(self, infos, args=None):
    del args
    return [Note((info.path / "note.txt").read_text()) for info in infos]

  async def metadata(self, infos):
    return [flax_ckpt.metadata.Metadata(name=info.name, directory=info.path) for info in infos]


def test_files_of_a_custom_type_handler_are_checked(ckpt_dir):
  flax_ckpt.type_handlers.register_type_handler(Note, NoteHandler(), override=True)
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, {"note": Note("step 12345"), "w": np.ones(3)})
  assert flax_ckpt.load(path)["note"].text == "step 12345"
  (note,) = [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns if n == "note.txt"]
  with open(note, "w") as f:
    f.write("step 12346")
  with pytest.raises(flax_ckpt.CorruptCheckpointError) as info:
    flax_ckpt.load(path)
  assert info.value.file == note and info.value.part == "state"
  report = flax_ckpt.verify(path)
  assert [p.file for p in report.problems] == [note]
  assert flax_ckpt.load(path, verify=False)["note"].text == "step 12346"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_overwriting_a_damaged_checkpoint_gives_a_sound_one(ckpt_dir, use_async):
  path = os.fspath(ckpt_dir / "c")
  flax_ckpt.save(path, _params())
  _flip(os.path.join(path, "state", "data.p0.bin"), 0)
  assert not flax_ckpt.verify(path)
  new = {"w": np.full(5, 3.0, np.float32)}
  if use_async:
    flax_ckpt.save_async(path, new, overwrite=True).result()
  else:
    flax_ckpt.save(path, new, overwrite=True)
  assert flax_ckpt.verify(path)
  np.testing.assert_array_equal(flax_ckpt.load(path)["w"], new["w"])
