"""Stateful checkpointables: objects with ``get_state()`` / ``set_state()`` (data iterators).

grain's iterators (``DatasetIterator`` with JSON state, ``DataLoaderIterator`` with bytes
state) and our own iterators are saved with ``save_checkpointables`` and restored into fresh
iterators that continue exactly where the saved one was.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from _crafting import reseal

import flax_ckpt

# ----------------------------------------------------------------------------- helpers


def _state_file(path, name="dataset", ext="json", index=0, count=1):
  return path / name / f"process_{index}-of-{count}.{ext}"


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_elements(actual, expected):
  """Equal element lists, where elements are PyTrees of numpy arrays / numbers."""
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(e)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(e)):
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(x, y)


def _assert_identical(actual, expected):
  """Same value with the same Python types, dict key order and float bits."""
  assert type(actual) is type(expected), (actual, expected)
  if isinstance(expected, dict):
    assert list(actual) == list(expected)
    assert [type(k) for k in actual] == [type(k) for k in expected]
    for k in expected:
      _assert_identical(actual[k], expected[k])
  elif isinstance(expected, (list, tuple)):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
      _assert_identical(a, e)
  elif isinstance(expected, (float, np.floating)):
    if math.isnan(expected):
      assert math.isnan(actual)
    else:
      assert actual == expected
      assert math.copysign(1.0, actual) == math.copysign(1.0, expected)
  elif isinstance(expected, np.ndarray):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()
  else:
    assert actual == expected


def _params():
  return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def _assert_params(loaded):
  expected = _params()
  assert sorted(loaded) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(loaded[k], v)
    assert np.asarray(loaded[k]).dtype == v.dtype


class StreamIterator:
  """A deterministic, endless, epoch-structured iterator of our own."""

  def __init__(self, seed=0, epoch_len=7):
    self.seed, self.epoch_len = seed, epoch_len
    self.pos = 0
    self.get_state_calls = 0
    self.set_state_calls = []

  def __iter__(self):
    return self

  def __next__(self):
    epoch, k = divmod(self.pos, self.epoch_len)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.epoch_len)
    self.pos += 1
    return {"epoch": epoch, "value": int(order[k]) * 10 + self.seed}

  def get_state(self):
    self.get_state_calls += 1
    return {"pos": self.pos, "seed": self.seed, "epoch_len": self.epoch_len}

  def set_state(self, state):
    self.set_state_calls.append(state)
    self.pos, self.seed, self.epoch_len = state["pos"], state["seed"], state["epoch_len"]


class Holder:
  """Returns whatever state it holds; records what ``set_state`` received."""

  def __init__(self, state=None):
    self.state = state
    self.received = []

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.received.append(state)
    self.state = state


def _fake_two_processes(path, other_state, ext="json"):
  """Turns the single-process state files of ``path/dataset`` into a 2-process layout."""
  d = path / "dataset"
  os.rename(d / "process_0-of-1.json", d / "process_0-of-2.json")
  data = other_state if ext == "bin" else json.dumps(other_state).encode()
  (d / f"process_1-of-2.{ext}").write_bytes(data)
  reseal(path)  # a real 2-process save records both files' checksums


@pytest.fixture
def gp():
  return pytest.importorskip("grain.python")


# ------------------------------------------------------------------------ grain iterators


def _grain_map_pipeline(gp):
  return (gp.MapDataset.range(100).shuffle(seed=1).map(lambda x: {"x": x, "sq": x * x})
          .batch(4).to_iter_dataset())


def _grain_filter_pipeline(gp):
  return (gp.MapDataset.range(200).shuffle(seed=2).to_iter_dataset()
          .filter(lambda x: x % 3 != 0).map(lambda x: (x, np.float32(x) / 2)).batch(5))


def _grain_repeat_pipeline(gp):
  # 10 elements per epoch, reshuffled each epoch, batches of 3 straddle epoch boundaries
  return gp.MapDataset.range(10).shuffle(seed=7).repeat(3).batch(3).to_iter_dataset()


@pytest.mark.parametrize("make, consumed, n", [
    (_grain_map_pipeline, 3, 6),
    (_grain_filter_pipeline, 4, 8),
    (_grain_repeat_pipeline, 2, 6),  # saved in epoch 0, continues into epochs 1 and 2
    (_grain_repeat_pipeline, 4, 4),  # saved after a batch straddling the epoch boundary
], ids=["map-shuffle-batch", "iter-filter", "repeat-epoch0", "repeat-epoch1"])
def test_grain_dataset_iterator_resumes_where_saved(ckpt_dir, gp, make, consumed, n):
  ds = make(gp)
  it = iter(ds)
  _take(it, consumed)
  saved_state = it.get_state()
  assert isinstance(saved_state, dict)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"params": _params(), "dataset": it})

  expected = _take(it, n)  # what followed the save point
  _take(it, 2)  # the live iterator moves on

  assert json.loads(_state_file(path).read_text()) == saved_state
  fresh = iter(ds)
  out = flax_ckpt.load_checkpointables(path, {"params": None, "dataset": fresh})
  assert list(out) == ["params", "dataset"]
  assert out["dataset"] is fresh
  _assert_params(out["params"])
  _assert_same_elements(_take(fresh, n), expected)

  # the advanced live iterator itself can be rewound too
  assert flax_ckpt.load_checkpointables(path, {"dataset": it})["dataset"] is it
  _assert_same_elements(_take(it, n), expected)

  # the raw state, with None or without any template
  assert flax_ckpt.load_checkpointables(path, {"dataset": None}) == {"dataset": saved_state}
  everything = flax_ckpt.load_checkpointables(path)
  assert everything["dataset"] == saved_state
  _assert_params(everything["params"])

  md = flax_ckpt.metadata(path)
  assert md.parts["dataset"] == flax_ckpt.StatefulMetadata(1, ("json",))
  assert isinstance(md.parts["dataset"], flax_ckpt.StatefulMetadata)
  assert md.checkpointables["dataset"]["kind"] == "stateful"


def test_grain_iterator_to_the_end_of_the_data(ckpt_dir, gp):
  ds = gp.MapDataset.range(10).map(lambda x: x + 100).batch(3).to_iter_dataset()
  it = iter(ds)
  _take(it, 2)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": it})
  expected = list(it)
  assert len(expected) == 2  # [106, 107, 108], [109]
  fresh = flax_ckpt.load_checkpointables(path, {"dataset": iter(ds)})["dataset"]
  _assert_same_elements(list(fresh), expected)


def _data_loader(gp, num_epochs=2):
  return gp.DataLoader(
      data_source=np.arange(30) * 10,
      sampler=gp.IndexSampler(30, shard_options=gp.NoSharding(), shuffle=True,
                              num_epochs=num_epochs, seed=0),
      worker_count=0, operations=[gp.Batch(4)])


def test_grain_data_loader_bytes_state_resumes(ckpt_dir, gp):
  loader = _data_loader(gp)
  it = iter(loader)
  _take(it, 5)  # 20 of 30 records of the first epoch
  saved_state = it.get_state()
  assert isinstance(saved_state, bytes)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"params": _params(), "dataset": it})
  expected = _take(it, 6)  # crosses into the second epoch
  _take(it, 1)

  assert _state_file(path, ext="bin").read_bytes() == saved_state
  assert not _state_file(path, ext="json").exists()
  fresh = iter(loader)
  out = flax_ckpt.load_checkpointables(path, {"dataset": fresh})
  assert list(out) == ["dataset"]
  assert out["dataset"] is fresh
  _assert_same_elements(_take(fresh, 6), expected)

  raw = flax_ckpt.load_checkpointables(path, {"dataset": None})["dataset"]
  assert type(raw) is bytes and raw == saved_state
  md = flax_ckpt.metadata(path)
  assert md.parts["dataset"] == flax_ckpt.StatefulMetadata(1, ("bin",))


def test_grain_iterators_async_state_is_taken_at_call_time(ckpt_dir, gp):
  ds = _grain_map_pipeline(gp)
  it = iter(ds)
  _take(it, 2)
  loader_it = iter(_data_loader(gp))
  _take(loader_it, 3)
  path = ckpt_dir / "ckpt"
  r = flax_ckpt.save_checkpointables_async(
      path, {"params": _params(), "dataset": it, "loader": loader_it})
  expected, expected_loader = _take(it, 4), _take(loader_it, 4)  # while the save runs
  _take(it, 3)
  r.result()

  out = flax_ckpt.load_checkpointables(path, {"dataset": iter(ds),
                                              "loader": iter(_data_loader(gp))})
  _assert_same_elements(_take(out["dataset"], 4), expected)
  _assert_same_elements(_take(out["loader"], 4), expected_loader)


def test_grain_dataset_is_not_an_iterator_to_restore_into(ckpt_dir, gp):
  ds = _grain_map_pipeline(gp)
  it = iter(ds)
  next(it)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": it})
  with pytest.raises(TypeError, match="set_state"):
    flax_ckpt.load_checkpointables(path, {"dataset": ds})  # the dataset, not an iterator


def test_grain_iterator_via_checkpointer(ckpt_dir, gp):
  ds = _grain_filter_pipeline(gp)
  it = iter(ds)
  _take(it, 3)
  path = ckpt_dir / "ckpt"
  with flax_ckpt.Checkpointer(flax_ckpt.StatefulCheckpointHandler()) as ckptr:
    ckptr.save(path, args=flax_ckpt.args.StatefulSave(it))
    expected = _take(it, 4)
    fresh = iter(ds)
    assert ckptr.restore(path, args=flax_ckpt.args.StatefulRestore(fresh)) is fresh
  _assert_same_elements(_take(fresh, 4), expected)


# ------------------------------------------------------------------ our own iterator


def test_own_iterator_resumes_where_saved(ckpt_dir):
  it = StreamIterator(seed=3, epoch_len=7)
  _take(it, 5)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"params": _params(), "dataset": it})
  assert it.get_state_calls == 1  # once, when the save starts
  expected = _take(it, 12)  # crosses two epoch boundaries
  _take(it, 3)

  assert json.loads(_state_file(path).read_text()) == {"pos": 5, "seed": 3, "epoch_len": 7}
  fresh = StreamIterator()
  out = flax_ckpt.load_checkpointables(path, {"dataset": fresh, "params": None})
  assert list(out) == ["params", "dataset"]  # saved order
  assert out["dataset"] is fresh
  assert fresh.set_state_calls == [{"pos": 5, "seed": 3, "epoch_len": 7}]
  assert _take(fresh, 12) == expected
  _assert_params(out["params"])

  md = flax_ckpt.metadata(path)
  assert md.checkpointables["dataset"]["kind"] == "stateful"
  assert md.parts["dataset"] == flax_ckpt.StatefulMetadata(1, ("json",))

  # loading only the params does not read the state file
  os.remove(_state_file(path))
  _assert_params(flax_ckpt.load_checkpointables(path, {"params": None})["params"])


def test_own_iterator_restored_with_stateful_restore_args(ckpt_dir):
  it = StreamIterator(seed=1)
  _take(it, 4)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": it})
  expected = _take(it, 5)
  fresh = StreamIterator()
  out = flax_ckpt.load_checkpointables(path, {"dataset": flax_ckpt.StatefulRestore(fresh)})
  assert out["dataset"] is fresh
  assert _take(fresh, 5) == expected
  raw = flax_ckpt.load_checkpointables(path, {"dataset": flax_ckpt.StatefulRestore()})
  assert raw == {"dataset": {"pos": 4, "seed": 1, "epoch_len": 7}}


def test_overwrite_saves_the_new_position(ckpt_dir):
  it = StreamIterator(seed=2)
  path = ckpt_dir / "ckpt"
  _take(it, 2)
  flax_ckpt.save_checkpointables(path, {"dataset": it})
  _take(it, 3)
  flax_ckpt.save_checkpointables(path, {"dataset": it}, overwrite=True)
  expected = _take(it, 4)
  fresh = flax_ckpt.load_checkpointables(path, {"dataset": StreamIterator()})["dataset"]
  assert fresh.pos == 5
  assert _take(fresh, 4) == expected


def test_async_takes_get_state_at_call_time(ckpt_dir):
  live = {"pos": 3, "history": [1, 2, 3]}

  class Live(Holder):
    def get_state(self):
      self.calls = getattr(self, "calls", 0) + 1
      return self.state  # the live object, changed after the call

  it = Live(live)
  big = {"w": np.ones((256, 256), np.float32)}
  path = ckpt_dir / "ckpt"
  r = flax_ckpt.save_checkpointables_async(path, {"params": big, "dataset": it})
  assert it.calls == 1
  live["pos"] = 99
  live["history"].append(4)
  live["new"] = True
  r.result()
  assert it.calls == 1
  out = flax_ckpt.load_checkpointables(path, {"dataset": Holder()})
  assert out["dataset"].received == [{"pos": 3, "history": [1, 2, 3]}]


def test_async_takes_bytearray_state_at_call_time(ckpt_dir):
  buf = bytearray(b"position=0001")
  path = ckpt_dir / "ckpt"
  r = flax_ckpt.save_checkpointables_async(path, {"dataset": Holder(buf)})
  buf[-4:] = b"9999"
  r.result()
  raw = flax_ckpt.load_checkpointables(path, {"dataset": None})["dataset"]
  assert bytes(raw) == b"position=0001"


# ------------------------------------------------------------------- JSON fidelity


@pytest.mark.parametrize("state", [
    {},
    [],
    None,
    0,
    -(2**100),
    "",
    True,
    {"b": 1, "a": 2, "c": {"z": [], "y": {}}},  # key order kept
    {"f": [0.1, -0.0, 1e-310, 1.7976931348623157e308, -2.5, 3.0]},
    {"s": ["é☃😀", "\x00\n\t\"\\", "\ud800", "\u2028"], "é": "key"},
    [1, "1", 1.0, True, None, [[]], {"": None}],
], ids=lambda s: type(s).__name__ + str(len(json.dumps(s))))
def test_json_states_round_trip_exactly(ckpt_dir, state):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": Holder(state)})
  assert _state_file(path).is_file()
  restored = flax_ckpt.load_checkpointables(path, {"dataset": Holder("x")})["dataset"]
  assert len(restored.received) == 1
  _assert_identical(restored.received[0], state)
  _assert_identical(flax_ckpt.load_checkpointables(path)["dataset"], state)


@pytest.mark.parametrize("state", [
    {"a": (1, 2)},
    (1, 2),
    {1: "x"},
    {"d": {"ok": 1, 2: "x"}},
    {True: 1, None: 2, (1, "a"): 3},
    {"n": np.int64(3)},
    {"f": [1.0, np.float32(2.0)]},
    {"x": float("nan")},
    {"x": [0, {"y": float("-inf")}]},
    {"b": b"raw", "ba": bytearray(b"xy")},
    {"arr": np.arange(3), "m": np.ones((2, 2), np.float16)},
    {"big": (2**80, -(2**70))},
    {"deep": [{"ok": [1, 2]}, {"bad": (3,)}]},
], ids=["tuple", "top-tuple", "int-key", "nested-int-key", "odd-keys", "np.int64",
        "np.float32", "nan", "inf", "nested-bytes", "ndarray", "big-int", "deep"])
def test_non_json_states_round_trip_with_their_types(ckpt_dir, state):
  """grain's packing iterators keep tuples, interleave keeps int keys: they must come back."""
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"params": _params(), "dataset": Holder(state)})
  assert [p.name for p in (path / "dataset").iterdir()] == ["process_0-of-1.typed.json"]
  restored = flax_ckpt.load_checkpointables(path, {"dataset": Holder("x")})["dataset"]
  expected = {"b": b"raw", "ba": b"xy"} if "ba" in state else state  # bytearray -> bytes
  _assert_identical(restored.received[0], expected)
  _assert_identical(flax_ckpt.load_checkpointables(path)["dataset"], expected)


@pytest.mark.parametrize("state, needles", [
    ({"s": {1, 2}}, ["state['s']", "set"]),
    ({"o": object()}, ["state['o']", "object"]),
    ({"deep": [{"ok": [1, 2]}, {"bad": {3}}]}, ["state['deep'][1]['bad']", "set"]),
], ids=["set", "object", "deep"])
def test_unencodable_state_is_rejected_and_nothing_written(ckpt_dir, state, needles):
  path = ckpt_dir / "ckpt"
  for save in (flax_ckpt.save_checkpointables, flax_ckpt.save_checkpointables_async):
    with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
      save(path, {"params": _params(), "dataset": Holder(state)})
    msg = str(e.value)
    assert "'dataset'" in msg
    for needle in needles:
      assert needle in msg
    assert not path.exists()
    assert os.listdir(ckpt_dir) == []  # no temporary directory left either
  # the same path takes a valid save afterwards
  flax_ckpt.save_checkpointables(path, {"dataset": Holder({"ok": 1})})
  assert flax_ckpt.load_checkpointables(path)["dataset"] == {"ok": 1}


def test_non_json_state_via_checkpointer_writes_nothing(ckpt_dir):
  path = ckpt_dir / "ckpt"
  with flax_ckpt.Checkpointer(flax_ckpt.StatefulCheckpointHandler()) as ckptr:
    with pytest.raises(flax_ckpt.UnsupportedLeafError, match="set"):
      ckptr.save(path, args=flax_ckpt.args.StatefulSave(Holder({"a": {1}})))
  assert os.listdir(ckpt_dir) == []


# ------------------------------------------------------------------------ bytes states


@pytest.mark.parametrize("state", [
    bytes(range(256)) * 3,
    b"",
    b'{"pos": 3}',  # bytes that look like JSON stay bytes
    bytearray(b"\x00\xffbytearray\x80"),
], ids=["bytes", "empty", "json-looking", "bytearray"])
def test_bytes_states_round_trip_exactly(ckpt_dir, state):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": Holder(state)})
  assert _state_file(path, ext="bin").read_bytes() == bytes(state)
  assert not _state_file(path, ext="json").exists()
  restored = flax_ckpt.load_checkpointables(path, {"dataset": Holder()})["dataset"]
  assert len(restored.received) == 1
  got = restored.received[0]
  assert isinstance(got, (bytes, bytearray)) and bytes(got) == bytes(state)
  raw = flax_ckpt.load_checkpointables(path, {"dataset": None})["dataset"]
  assert isinstance(raw, (bytes, bytearray)) and bytes(raw) == bytes(state)
  assert flax_ckpt.metadata(path).parts["dataset"] == flax_ckpt.StatefulMetadata(1, ("bin",))


def test_json_string_state_stays_a_string(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": Holder("abc")})
  raw = flax_ckpt.load_checkpointables(path)["dataset"]
  assert type(raw) is str and raw == "abc"


# -------------------------------------------------------------- process count changes


@pytest.fixture
def two_process_ckpt(ckpt_dir):
  """A checkpoint whose 'dataset' part looks saved by 2 processes (states pos 5 and 8)."""
  it = StreamIterator(seed=4)
  _take(it, 5)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"params": _params(), "dataset": it})
  _fake_two_processes(path, {"pos": 8, "seed": 4, "epoch_len": 7})
  return path


_P0 = {"pos": 5, "seed": 4, "epoch_len": 7}
_P1 = {"pos": 8, "seed": 4, "epoch_len": 7}


def test_process_count_mismatch_without_mapping_is_an_error(two_process_ckpt):
  path = two_process_ckpt
  fresh = StreamIterator()
  for spec in (fresh, None, flax_ckpt.StatefulRestore(fresh)):
    with pytest.raises(flax_ckpt.StructureMismatchError, match="process_mapping"):
      flax_ckpt.load_checkpointables(path, {"dataset": spec})
  with pytest.raises(flax_ckpt.StructureMismatchError):
    flax_ckpt.load_checkpointables(path)
  assert fresh.set_state_calls == []
  # other parts still load
  _assert_params(flax_ckpt.load_checkpointables(path, {"params": None})["params"])
  md = flax_ckpt.metadata(path)
  assert md.parts["dataset"] == flax_ckpt.StatefulMetadata(2, ("json", "json"))


@pytest.mark.parametrize("mapping, expected", [
    ({0: 1}, _P1),
    ({0: 0}, _P0),
    ({0: 1, 1: 0, 7: 1}, _P1),
    (lambda i: i + 1, _P1),
    (lambda i: 0, _P0),
], ids=["dict-to-1", "dict-to-0", "dict-extra-entries", "fn-to-1", "fn-to-0"])
def test_process_mapping_picks_the_saved_process(two_process_ckpt, mapping, expected):
  path = two_process_ckpt
  fresh = StreamIterator()
  out = flax_ckpt.load_checkpointables(
      path, {"dataset": flax_ckpt.StatefulRestore(fresh, process_mapping=mapping)})
  assert out["dataset"] is fresh
  assert fresh.set_state_calls == [expected]
  ref = StreamIterator(seed=4)
  _take(ref, expected["pos"])
  assert _take(fresh, 6) == _take(ref, 6)
  raw = flax_ckpt.load_checkpointables(
      path, {"dataset": flax_ckpt.StatefulRestore(None, process_mapping=mapping)})
  assert raw == {"dataset": expected}


@pytest.mark.parametrize("mapping", [
    {0: 2},
    {0: -1},
    {1: 0},  # no entry for this process (0)
    lambda i: 5,
    lambda i: None,
], ids=["dict-out-of-range", "dict-negative", "dict-no-entry", "fn-out-of-range", "fn-none"])
def test_process_mapping_to_a_missing_process_is_an_error(two_process_ckpt, mapping):
  fresh = StreamIterator()
  with pytest.raises(flax_ckpt.StructureMismatchError):
    flax_ckpt.load_checkpointables(
        two_process_ckpt,
        {"dataset": flax_ckpt.StatefulRestore(fresh, process_mapping=mapping)})
  assert fresh.set_state_calls == []


def test_process_mapping_to_a_process_whose_file_is_missing(two_process_ckpt):
  # saved by 2 processes, but process 1's state file is gone: a clear flax_ckpt error, not
  # a KeyError from inside the handler
  os.remove(_state_file(two_process_ckpt, index=1, count=2))
  fresh = StreamIterator()
  with pytest.raises((flax_ckpt.StructureMismatchError, flax_ckpt.FormatError)):
    flax_ckpt.load_checkpointables(
        two_process_ckpt,
        {"dataset": flax_ckpt.StatefulRestore(fresh, process_mapping={0: 1})})
  assert fresh.set_state_calls == []


def test_process_mapping_with_the_same_process_count(ckpt_dir):
  it = StreamIterator(seed=9)
  _take(it, 2)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": it})
  fresh = StreamIterator()
  flax_ckpt.load_checkpointables(
      path, {"dataset": flax_ckpt.StatefulRestore(fresh, process_mapping={0: 0})})
  assert fresh.pos == 2


def test_process_mapping_to_a_bytes_state(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": Holder({"p": 0})})
  _fake_two_processes(path, b"\x01state-of-1", ext="bin")
  assert flax_ckpt.metadata(path).parts["dataset"] == flax_ckpt.StatefulMetadata(
      2, ("json", "bin"))
  out = flax_ckpt.load_checkpointables(
      path, {"dataset": flax_ckpt.StatefulRestore(Holder(), process_mapping=lambda i: 1)})
  assert out["dataset"].received == [b"\x01state-of-1"]
  out = flax_ckpt.load_checkpointables(
      path, {"dataset": flax_ckpt.StatefulRestore(Holder(), process_mapping={0: 0})})
  assert out["dataset"].received == [{"p": 0}]


def test_state_files_of_several_process_counts_are_a_format_error(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": Holder({"p": 0})})
  (path / "dataset" / "process_1-of-2.json").write_text('{"p": 1}')
  with pytest.raises(flax_ckpt.FormatError):
    flax_ckpt.load_checkpointables(path, {"dataset": Holder()})


# ------------------------------------------------------------ restoring into non-iterators


class GetStateOnly:
  def get_state(self):
    return {}


@pytest.mark.parametrize("target", [
    object(), [1, 2], {"pos": 0}, 3, GetStateOnly(), StreamIterator,
], ids=["object", "list", "dict", "int", "get_state-only", "the-class"])
def test_restoring_into_an_object_without_set_state_is_a_type_error(ckpt_dir, target):
  it = StreamIterator()
  _take(it, 2)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": it})
  with pytest.raises(TypeError, match="set_state"):
    flax_ckpt.load_checkpointables(path, {"dataset": target})
  with pytest.raises(TypeError, match="set_state"):
    flax_ckpt.load_checkpointables(path, {"dataset": flax_ckpt.StatefulRestore(target)})
  # the checkpoint is untouched
  assert flax_ckpt.load_checkpointables(path)["dataset"]["pos"] == 2


# ---------------------------------------------------------------------- Checkpointer


def test_checkpointer_with_the_stateful_handler(ckpt_dir):
  it = StreamIterator(seed=5)
  _take(it, 6)
  path = ckpt_dir / "ckpt"
  with flax_ckpt.Checkpointer(flax_ckpt.StatefulCheckpointHandler()) as ckptr:
    ckptr.save(path, args=flax_ckpt.args.StatefulSave(it))
    assert it.get_state_calls == 1
    expected = _take(it, 9)
    # the handler's files live in the checkpoint directory itself
    assert json.loads((path / "process_0-of-1.json").read_text()) == {
        "pos": 6, "seed": 5, "epoch_len": 7}
    fresh = StreamIterator()
    assert ckptr.restore(path, args=flax_ckpt.args.StatefulRestore(fresh)) is fresh
    assert _take(fresh, 9) == expected
    assert ckptr.restore(path) == {"pos": 6, "seed": 5, "epoch_len": 7}
    assert ckptr.restore(path, args=flax_ckpt.args.StatefulRestore()) == {
        "pos": 6, "seed": 5, "epoch_len": 7}
    assert ckptr.metadata(path) == flax_ckpt.StatefulMetadata(1, ("json",))
    with pytest.raises(TypeError, match="set_state"):
      ckptr.restore(path, args=flax_ckpt.args.StatefulRestore(object()))

    # a plain object is wrapped in StatefulSave; force replaces the checkpoint
    ckptr.save(path, args=it, force=True)
    assert ckptr.restore(path)["pos"] == 15


def test_checkpointer_bytes_state_and_process_mapping(ckpt_dir):
  path = ckpt_dir / "ckpt"
  with flax_ckpt.Checkpointer(flax_ckpt.StatefulCheckpointHandler()) as ckptr:
    ckptr.save(path, args=flax_ckpt.args.StatefulSave(Holder(b"p0")))
    assert (path / "process_0-of-1.bin").read_bytes() == b"p0"
    os.rename(path / "process_0-of-1.bin", path / "process_0-of-2.bin")
    (path / "process_1-of-2.bin").write_bytes(b"p1")
    reseal(path)
    with pytest.raises(flax_ckpt.StructureMismatchError):
      ckptr.restore(path, args=flax_ckpt.args.StatefulRestore(Holder()))
    h = ckptr.restore(path, args=flax_ckpt.args.StatefulRestore(Holder(),
                                                               process_mapping={0: 1}))
    assert h.received == [b"p1"]
    assert ckptr.metadata(path) == flax_ckpt.StatefulMetadata(2, ("bin", "bin"))


def test_async_checkpointer_takes_state_at_call_time(ckpt_dir):
  it = StreamIterator(seed=6)
  _take(it, 3)
  path = ckpt_dir / "ckpt"
  with flax_ckpt.AsyncCheckpointer(flax_ckpt.StatefulCheckpointHandler()) as ckptr:
    ckptr.save(path, args=flax_ckpt.args.StatefulSave(it))
    expected = _take(it, 5)
    fresh = ckptr.restore(path, args=flax_ckpt.args.StatefulRestore(StreamIterator()))
  assert _take(fresh, 5) == expected


def test_stateful_parts_are_restored_last(ckpt_dir):
  """A failing part must not leave the caller's iterator half-restored."""
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_checkpointables(path, {"dataset": Holder({"pos": 42}), "params": _params()})
  fresh = Holder({"pos": 0})
  with pytest.raises(flax_ckpt.StructureMismatchError):
    flax_ckpt.load_checkpointables(path, {"dataset": fresh, "params": {"w": None}})
  assert fresh.received == []


def test_grain_packing_iterator_state_with_tuples(ckpt_dir):
  grain = pytest.importorskip("grain")

  def make():
    src = grain.MapDataset.source([{"x": np.ones(i % 5 + 1, np.int32)} for i in range(60)])
    return iter(grain.experimental.ConcatThenSplitIterDataset(
        src.to_iter_dataset(), length_struct={"x": 8}))

  it = make()
  for _ in range(3):
    next(it)
  flax_ckpt.save_checkpointables(ckpt_dir / "c", {"dataset": it})
  want = [next(it)["x"].tolist() for _ in range(4)]
  got_it = flax_ckpt.load_checkpointables(ckpt_dir / "c", {"dataset": make()})["dataset"]
  assert [next(got_it)["x"].tolist() for _ in range(4)] == want
