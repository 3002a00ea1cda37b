"""Checkpoints of several named parts: save_checkpointables / load_checkpointables.

One atomic commit for all parts (params, optimizer state, a data iterator, a config), each
in ``<path>/<name>/``; loading named parts reads nothing of the others; ``save``/``load``
are the single-part case of the same format.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt

_TMP_TAG = ".flax_ckpt-tmp-"
_OLD_TAG = ".flax_ckpt-old-"
_SAVED_ORDER = ["params", "opt_state", "dataset", "config"]

# ----------------------------------------------------------------------------- helpers


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


class CountingIterator:
  """A data iterator following the stateful protocol: its position is its state."""

  def __init__(self, pos=0):
    self.pos = pos

  def __iter__(self):
    return self

  def __next__(self):
    self.pos += 1
    return self.pos

  def get_state(self):
    return {"pos": self.pos, "shard": "train-00001"}

  def set_state(self, state):
    self.pos = state["pos"]


class LiveStateIterator(CountingIterator):
  """get_state() returns its live state dict, which advancing mutates in place."""

  def __init__(self, pos=0):
    self.state = {"pos": pos, "seen": [pos]}

  def __next__(self):
    self.state["pos"] += 1
    self.state["seen"].append(self.state["pos"])
    return self.state["pos"]

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


class BrokenIterator(CountingIterator):
  def get_state(self):
    raise RuntimeError("iterator state is unavailable")


class SetStateIterator(CountingIterator):
  def get_state(self):
    return {"pos": {1, 2}}  # a set cannot be stored faithfully: refused


class PlainObject:
  pass


class WriteThenFailHandler(flax_ckpt.CheckpointHandler):
  """Writes a file into its part directory, then fails (after the temporary dir exists)."""

  def save(self, directory, args):
    (directory / "half.txt").write_text(args.text)
    raise OSError("simulated: disk full while saving this part")

  def restore(self, directory, args=None):
    return (directory / "half.txt").read_text()


@flax_ckpt.args.register_with_handler(WriteThenFailHandler, for_save=True)
@dataclasses.dataclass
class WriteThenFailSave(flax_ckpt.args.CheckpointArgs):
  text: str


class LateFailAsyncHandler(flax_ckpt.AsyncCheckpointHandler):
  """async_save returns at once; its background write fails after writing a file."""

  def async_save(self, directory, args):
    fut = concurrent.futures.Future()

    def work():
      (directory / "half.txt").write_text(args.text)
      fut.set_exception(OSError("simulated: background write failed"))

    threading.Thread(target=work, daemon=True).start()
    return [fut]

  def save(self, directory, args):
    (directory / "half.txt").write_text(args.text)
    raise OSError("simulated: write failed")

  def restore(self, directory, args=None):
    return (directory / "half.txt").read_text()


@flax_ckpt.args.register_with_handler(LateFailAsyncHandler, for_save=True)
@dataclasses.dataclass
class LateFailSave(flax_ckpt.args.CheckpointArgs):
  text: str


def _params():
  return {
      "dense": {
          "kernel": jnp.arange(32, dtype=jnp.float32).reshape(4, 8),
          "bias": jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16),
      },
      "embed": np.arange(12, dtype=np.int32).reshape(3, 4),
  }


def _parts():
  """A training checkpoint's parts: PyTrees, a data iterator and a config."""
  return {
      "params": _params(),
      "opt_state": {
          "count": 3,
          "mu": {"kernel": np.full((4, 8), 0.5, np.float32)},
          "nu": [np.zeros(2, np.float64), (1.5, True)],
      },
      "dataset": CountingIterator(7),
      "config": {"lr": 1e-3, "name": "run-1", "layers": [4, 8],
                 "flags": {"use_bias": True, "dropout": None}},
  }


def _bits(x):
  return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _assert_same(actual, expected):
  """Exact container and leaf types, equal keys in order, bitwise-equal arrays."""
  assert type(actual) is type(expected), (type(actual), type(expected))
  if isinstance(expected, dict):
    assert list(actual) == list(expected)
    for k in expected:
      _assert_same(actual[k], expected[k])
  elif isinstance(expected, (list, tuple)):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
      _assert_same(a, e)
  elif isinstance(expected, (np.ndarray, jax.Array)):
    a, e = np.asarray(actual), np.asarray(expected)
    assert (a.dtype, a.shape) == (e.dtype, e.shape)
    np.testing.assert_array_equal(_bits(a), _bits(e))
  else:
    assert actual == expected


def _expected_loaded(parts):
  """What loading every part without templates gives: stateful parts as their state."""
  return {k: (v.get_state() if hasattr(v, "get_state") else v) for k, v in parts.items()}


def _leftovers(parent):
  return [n for n in os.listdir(parent) if _TMP_TAG in n or _OLD_TAG in n]


def _snapshot(path):
  """Every file under ``path`` with its bytes, and every directory."""
  out = {}
  for dirpath, _, files in os.walk(path):
    rel = os.path.relpath(dirpath, path)
    out[rel + "/"] = None
    for f in files:
      with open(os.path.join(dirpath, f), "rb") as fh:
        out[os.path.join(rel, f)] = fh.read()
  return out


def _save(mode, path, checkpointables, **kwargs):
  if mode == "sync":
    flax_ckpt.save_checkpointables(path, checkpointables, **kwargs)
  else:
    flax_ckpt.save_checkpointables_async(path, checkpointables, **kwargs).result()


@pytest.fixture
def saved(ckpt_dir):
  """A committed four-part checkpoint and the values it was saved from."""
  path = ckpt_dir / "ckpt"
  parts = _parts()
  flax_ckpt.save_checkpointables(path, parts)
  return path, parts


# Audit-hook based access log (works as root, unlike permission checks). A hook cannot be
# removed, so it is installed once and records only inside _record_fs_access().
_FS_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})
_audit_log = None
_audit_installed = False


def _audit_hook(event, args):
  log = _audit_log
  if log is not None and event in _FS_EVENTS and args:
    log.append((event, args[0]))


@contextlib.contextmanager
def _record_fs_access():
  global _audit_log, _audit_installed
  if not _audit_installed:
    sys.addaudithook(_audit_hook)
    _audit_installed = True
  log = []
  _audit_log = log
  try:
    yield log
  finally:
    _audit_log = None


def _touched_parts(log, path, names):
  """The part names among ``names`` whose directory (or a file in it) was accessed."""
  root = os.path.realpath(path)
  hit = set()
  for _, target in log:
    if isinstance(target, bytes):
      target = os.fsdecode(target)
    if not isinstance(target, str):
      continue  # a file descriptor
    rel = os.path.relpath(os.path.realpath(target), root) if os.path.isabs(target) else target
    first = rel.split(os.sep)[0]
    if first in names:
      hit.add(first)
  return hit


# ------------------------------------------------------------- 1. saved and loaded together


def test_parts_are_saved_in_their_own_directories_with_one_commit_marker(saved):
  path, _ = saved
  assert sorted(os.listdir(path)) == sorted(["_CHECKPOINT", *_SAVED_ORDER])
  for name in _SAVED_ORDER:
    assert os.path.isdir(path / name)
  with open(path / "_CHECKPOINT", encoding="utf-8") as f:
    manifest = json.load(f)
  entries = manifest["checkpointables"]
  assert list(entries) == _SAVED_ORDER
  assert {n: e["kind"] for n, e in entries.items()} == {
      "params": "pytree", "opt_state": "pytree", "dataset": "stateful", "config": "pytree"}
  assert _leftovers(path.parent) == []


def test_all_parts_load_together_exactly(saved):
  path, parts = saved
  out = flax_ckpt.load_checkpointables(path)
  assert list(out) == _SAVED_ORDER
  _assert_same(out, _expected_loaded(parts))
  assert out["dataset"] == {"pos": 7, "shard": "train-00001"}
  assert isinstance(out["params"]["dense"]["kernel"], jax.Array)
  assert isinstance(out["params"]["embed"], np.ndarray)


@pytest.mark.parametrize("name", _SAVED_ORDER)
def test_each_part_loads_alone(saved, name):
  path, parts = saved
  out = flax_ckpt.load_checkpointables(path, {name: None})
  assert list(out) == [name]
  _assert_same(out[name], _expected_loaded(parts)[name])


def test_result_is_in_saved_order_whatever_the_request_order(saved):
  path, parts = saved
  out = flax_ckpt.load_checkpointables(path, {"config": None, "dataset": None, "params": None})
  assert list(out) == ["params", "dataset", "config"]
  _assert_same(out["config"], parts["config"])


def test_stateful_part_restores_into_a_fresh_object(saved):
  path, _ = saved
  fresh = CountingIterator()
  out = flax_ckpt.load_checkpointables(path, {"dataset": fresh})
  assert out["dataset"] is fresh
  assert fresh.pos == 7
  assert next(fresh) == 8  # the iterator goes on from where it was saved


def test_leaves_and_bytes_state_as_whole_parts(ckpt_dir):
  class BytesStateIterator(CountingIterator):
    def get_state(self):
      return b"\x00pos=" + bytes([self.pos])

    def set_state(self, state):
      self.pos = state[-1]

  path = ckpt_dir / "ckpt"
  parts = {"step": 1000, "w": jnp.arange(3.0), "tag": "best", "lr": 0.5, "done": False,
           "scale": np.float32(1.5), "raw": b"\x01\x02", "reader": BytesStateIterator(9)}
  flax_ckpt.save_checkpointables(path, parts)
  out = flax_ckpt.load_checkpointables(path)
  _assert_same(out, _expected_loaded(parts))
  assert out["reader"] == b"\x00pos=\x09"
  assert flax_ckpt.load_checkpointables(path, {"reader": BytesStateIterator()})["reader"].pos == 9


# ------------------------------------------------- 2. loading params reads no other part


def test_params_load_after_other_parts_are_deleted(saved):
  path, parts = saved
  shutil.rmtree(path / "opt_state")
  shutil.rmtree(path / "dataset")
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), parts["params"])
  out = flax_ckpt.load_checkpointables(path, {"params": template})
  assert list(out) == ["params"]
  # the template's structure (jax.tree.map sorts dict keys) and leaf kinds (jax.Array)
  assert jax.tree.structure(out["params"]) == jax.tree.structure(template)
  for leaf, want in zip(jax.tree.leaves(out["params"]), jax.tree.leaves(parts["params"])):
    assert isinstance(leaf, jax.Array)
    _assert_same(np.asarray(leaf), np.asarray(want))
  _assert_same(flax_ckpt.load_checkpointables(path, {"params": None})["params"],
               parts["params"])
  restored = flax_ckpt.load_checkpointables(
      path, {"params": flax_ckpt.PyTreeRestore(None), "config": None})
  _assert_same(restored, {"params": parts["params"], "config": parts["config"]})


def test_params_load_with_sharded_abstract_template_after_other_parts_are_deleted(saved):
  path, parts = saved
  shutil.rmtree(path / "opt_state")
  shutil.rmtree(path / "dataset")
  mesh = _mesh()
  specs = {"dense": {"kernel": P("x", "y"), "bias": P("y")}, "embed": P(None, "y")}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(_params), shardings)
  out = flax_ckpt.load_checkpointables(path, {"params": abstract})["params"]
  for leaf, sharding, want in zip(jax.tree.leaves(out), jax.tree.leaves(shardings),
                                  jax.tree.leaves(parts["params"])):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding == sharding
    assert len(leaf.addressable_shards) == 8
    _assert_same(np.asarray(leaf), np.asarray(want))


def test_params_load_when_other_parts_are_unreadable(saved):
  if os.geteuid() == 0:
    pytest.skip("root ignores directory permissions")
  path, parts = saved
  locked = [path / "opt_state", path / "dataset"]
  for d in locked:
    os.chmod(d, 0)
  try:
    out = flax_ckpt.load_checkpointables(path, {"params": None})
    _assert_same(out, {"params": parts["params"]})
    with pytest.raises(PermissionError):
      os.listdir(locked[0])  # the check is real: these parts cannot be read
  finally:
    for d in locked:
      os.chmod(d, 0o755)


def test_params_load_opens_nothing_of_the_other_parts(saved):
  path, parts = saved
  others = {"opt_state", "dataset", "config"}
  with _record_fs_access() as log:
    out = flax_ckpt.load_checkpointables(path, {"params": None})
  _assert_same(out, {"params": parts["params"]})
  assert _touched_parts(log, path, {"params"}) == {"params"}  # the log sees real accesses
  assert _touched_parts(log, path, others) == set()
  with _record_fs_access() as log:
    flax_ckpt.load_checkpointables(path)
  assert _touched_parts(log, path, others) == others


# --------------------------------------------------------------------------- 3. atomicity


_FAILING_PARTS = {
    # name: (make the failing part, the error it raises)
    "stateful_get_state_raises": (BrokenIterator, RuntimeError),
    "stateful_state_not_storable": (SetStateIterator, flax_ckpt.UnsupportedLeafError),
    "unsupported_leaf_in_pytree": (lambda: {"ok": np.ones(2), "bad": PlainObject()},
                                   flax_ckpt.UnsupportedLeafError),
    "unsupported_object": (object, flax_ckpt.UnsupportedLeafError),
    "handler_fails_after_writing": (lambda: WriteThenFailSave("half"), OSError),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("failing", list(_FAILING_PARTS))
def test_a_failing_part_commits_nothing(ckpt_dir, failing, mode):
  make, error = _FAILING_PARTS[failing]
  path = ckpt_dir / "ckpt"
  parts = {**_parts(), "broken": make()}
  with pytest.raises(error):
    _save(mode, path, parts)
  assert not os.path.exists(path)
  assert os.listdir(ckpt_dir) == []  # no temporary sibling, no half-written part
  # nothing is left claimed either: the same path saves normally afterwards
  good = _parts()
  _save(mode, path, good)
  _assert_same(flax_ckpt.load_checkpointables(path), _expected_loaded(good))


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("failing", list(_FAILING_PARTS))
def test_a_failing_overwrite_leaves_the_old_checkpoint_intact(saved, failing, mode):
  path, old = saved
  before = _snapshot(path)
  make, error = _FAILING_PARTS[failing]
  new = {"params": {"w": np.zeros(3)}, "broken": make(), "step": 2}
  with pytest.raises(error):
    _save(mode, path, new, overwrite=True)
  assert _snapshot(path) == before
  assert _leftovers(path.parent) == []
  _assert_same(flax_ckpt.load_checkpointables(path), _expected_loaded(old))


def test_a_background_failure_commits_nothing(ckpt_dir):
  path = ckpt_dir / "ckpt"
  r = flax_ckpt.save_checkpointables_async(
      path, {**_parts(), "late": LateFailSave("half")})
  with pytest.raises(OSError, match="background write failed"):
    r.result()
  assert os.listdir(ckpt_dir) == []


def test_a_background_failure_on_overwrite_leaves_the_old_checkpoint_intact(saved):
  path, old = saved
  before = _snapshot(path)
  r = flax_ckpt.save_checkpointables_async(
      path, {"params": {"w": np.zeros(3)}, "late": LateFailSave("half")}, overwrite=True)
  with pytest.raises(OSError, match="background write failed"):
    r.result()
  assert _snapshot(path) == before
  assert _leftovers(path.parent) == []
  _assert_same(flax_ckpt.load_checkpointables(path), _expected_loaded(old))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_successful_overwrite_replaces_every_part(saved, mode):
  path, _ = saved
  new = {"params": {"w": np.arange(4)}, "ema": {"w": np.ones(4)}}
  _save(mode, path, new, overwrite=True)
  assert sorted(os.listdir(path)) == ["_CHECKPOINT", "ema", "params"]
  _assert_same(flax_ckpt.load_checkpointables(path), new)
  assert _leftovers(path.parent) == []


# ------------------------------------------------------------------- 4. asynchronous save


def test_async_save_returns_a_response_and_everything_loads(ckpt_dir):
  path = ckpt_dir / "ckpt"
  parts = _parts()
  expected = _expected_loaded(parts)
  r = flax_ckpt.save_checkpointables_async(path, parts, custom_metadata={"step": 3})
  assert isinstance(r, flax_ckpt.AsyncResponse)
  r.result()
  _assert_same(flax_ckpt.load_checkpointables(path), expected)
  assert flax_ckpt.metadata(path).custom_metadata == {"step": 3}


def test_async_save_is_not_affected_by_changes_after_the_call(ckpt_dir):
  path = ckpt_dir / "ckpt"
  w = np.arange(6, dtype=np.float32)
  params = {"w": w, "layers": [np.ones(2, np.int64)]}
  config = {"lr": 0.1, "name": "a"}
  r = flax_ckpt.save_checkpointables_async(path, {"params": params, "config": config})
  w[:] = -1
  params["layers"][0][:] = 7
  params["extra"] = np.zeros(1)
  config["lr"] = 5.0
  config["new"] = True
  r.result()
  out = flax_ckpt.load_checkpointables(path)
  _assert_same(out, {
      "params": {"w": np.arange(6, dtype=np.float32), "layers": [np.ones(2, np.int64)]},
      "config": {"lr": 0.1, "name": "a"},
  })


def test_async_save_takes_the_iterator_state_at_call_time(ckpt_dir):
  path = ckpt_dir / "ckpt"
  it = CountingIterator()
  for _ in range(3):
    next(it)
  r = flax_ckpt.save_checkpointables_async(path, {"params": _params(), "dataset": it})
  next(it)
  next(it)
  r.result()
  assert it.pos == 5
  assert flax_ckpt.load_checkpointables(path, {"dataset": None})["dataset"]["pos"] == 3
  fresh = CountingIterator()
  assert flax_ckpt.load_checkpointables(path, {"dataset": fresh})["dataset"] is fresh
  assert fresh.pos == 3


def test_async_save_copies_a_live_state_dict_at_call_time(ckpt_dir):
  path = ckpt_dir / "ckpt"
  it = LiveStateIterator(2)
  r = flax_ckpt.save_checkpointables_async(path, {"dataset": it, "step": 2})
  next(it)
  next(it)
  r.result()
  assert flax_ckpt.load_checkpointables(path)["dataset"] == {"pos": 2, "seen": [2]}


# ------------------------------------------------------------------------- 5. metadata


def test_metadata_lists_parts_kinds_and_leaf_metadata(ckpt_dir):
  path = ckpt_dir / "ckpt"
  custom = {"step": 1200, "note": "ünïcode", "nested": {"xs": [1, 2.5, None, True]}}
  flax_ckpt.save_checkpointables(path, _parts(), custom_metadata=custom)
  md = flax_ckpt.metadata(path)
  assert list(md.checkpointables) == _SAVED_ORDER
  assert {n: e["kind"] for n, e in md.checkpointables.items()} == {
      "params": "pytree", "opt_state": "pytree", "dataset": "stateful", "config": "pytree"}
  assert list(md.parts) == _SAVED_ORDER
  kernel = md.parts["params"]["dense"]["kernel"]
  assert isinstance(kernel, flax_ckpt.ArrayMetadata)
  assert (kernel.shape, kernel.dtype) == ((4, 8), np.dtype(np.float32))
  assert md.parts["params"]["dense"]["bias"].shape == (8,)
  assert md.parts["params"]["embed"].shape == (3, 4)
  assert md.parts["params"]["embed"].dtype == np.dtype(np.int32)
  assert md.parts["opt_state"]["mu"]["kernel"].shape == (4, 8)
  assert isinstance(md.parts["config"]["lr"], flax_ckpt.ValueMetadata)
  assert isinstance(md.parts["dataset"], flax_ckpt.StatefulMetadata)
  assert md.parts["dataset"].process_count == 1
  assert md.tree is None  # several parts, none named 'state'
  assert md.custom_metadata == custom
  assert md.format_version == 1


def test_metadata_tree_is_the_state_part_or_the_only_part(ckpt_dir):
  with_state = ckpt_dir / "with_state"
  flax_ckpt.save_checkpointables(
      with_state, {"extra": {"a": 1}, "state": {"w": np.zeros((2, 5))}})
  assert flax_ckpt.metadata(with_state).tree["w"].shape == (2, 5)
  only = ckpt_dir / "only"
  flax_ckpt.save_checkpointables(only, {"params": {"w": np.zeros((3, 1))}})
  md = flax_ckpt.metadata(only)
  assert md.tree["w"].shape == (3, 1)
  assert md["w"].shape == (3, 1)


# ----------------------------------------------------------- 6. save() is the single part


def test_load_checkpointables_on_a_save_checkpoint(ckpt_dir):
  path = ckpt_dir / "ckpt"
  state = {"params": _params(), "step": 4}
  flax_ckpt.save(path, state)
  out = flax_ckpt.load_checkpointables(path)
  assert list(out) == ["state"]
  _assert_same(out["state"], state)
  md = flax_ckpt.metadata(path)
  assert {n: e["kind"] for n, e in md.checkpointables.items()} == {"state": "pytree"}
  assert md.tree["params"]["embed"].shape == (3, 4)
  _assert_same(flax_ckpt.load(path), state)


def test_save_and_load_with_a_checkpointable_name(ckpt_dir):
  path = ckpt_dir / "ckpt"
  params = _params()
  flax_ckpt.save(path, params, checkpointable_name="params")
  assert sorted(os.listdir(path)) == ["_CHECKPOINT", "params"]
  _assert_same(flax_ckpt.load(path, checkpointable_name="params"), params)
  _assert_same(flax_ckpt.load_checkpointables(path), {"params": params})
  with pytest.raises(flax_ckpt.StructureMismatchError, match="params"):
    flax_ckpt.load(path)
  other = ckpt_dir / "async"
  flax_ckpt.save_async(other, {"lr": 0.5}, checkpointable_name="config").result()
  assert flax_ckpt.load_checkpointables(other) == {"config": {"lr": 0.5}}
  assert flax_ckpt.load(other, checkpointable_name="config") == {"lr": 0.5}


def test_load_of_a_multi_part_checkpoint_without_state_names_its_parts(saved):
  path, _ = saved
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load(path)
  for name in ["state", *_SAVED_ORDER]:
    assert repr(name) in str(e.value)


def test_load_of_a_multi_part_checkpoint_with_a_state_part(ckpt_dir):
  path = ckpt_dir / "ckpt"
  state = {"w": np.arange(3), "step": 1}
  flax_ckpt.save_checkpointables(path, {"dataset": CountingIterator(2), "state": state})
  _assert_same(flax_ckpt.load(path), state)


# ----------------------------------------------------------------------------- 7. errors


def test_a_missing_part_names_the_available_parts(saved):
  path, _ = saved
  with pytest.raises(flax_ckpt.StructureMismatchError) as e:
    flax_ckpt.load_checkpointables(path, {"params": None, "ema_params": None})
  msg = str(e.value)
  assert "'ema_params'" in msg
  for name in _SAVED_ORDER:
    assert repr(name) in msg
  with pytest.raises(flax_ckpt.StructureMismatchError, match="opt_state"):
    flax_ckpt.load(path, checkpointable_name="ema_params")


@pytest.mark.parametrize("obj", [object(), PlainObject()], ids=["object", "plain_class"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_unsupported_object_is_explained_and_nothing_is_written(ckpt_dir, obj, mode):
  path = ckpt_dir / "ckpt"
  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    _save(mode, path, {"params": _params(), "thing": obj})
  msg = str(e.value)
  assert "'thing'" in msg
  assert type(obj).__qualname__ in msg
  assert "PyTree" in msg
  assert "get_state()/set_state()" in msg
  assert "register_checkpointable_handler" in msg
  assert os.listdir(ckpt_dir) == []


@pytest.mark.parametrize(
    "name", ["", "_x", ".x", "-x", "a/b", "..", "a b", "x\n", "ünï", "a\\b"],
    ids=["empty", "underscore", "dot", "dash", "slash", "dotdot", "space", "trailing_newline",
         "non_ascii", "backslash"])
def test_bad_part_names_are_rejected_and_nothing_is_written(ckpt_dir, name):
  path = ckpt_dir / "ckpt"
  with pytest.raises(ValueError, match="checkpointable name"):
    flax_ckpt.save_checkpointables(path, {"params": _params(), name: {"a": 1}})
  with pytest.raises(ValueError, match="checkpointable name"):
    flax_ckpt.save_checkpointables_async(path, {name: {"a": 1}})
  with pytest.raises(ValueError, match="checkpointable name"):
    flax_ckpt.save(path, {"a": 1}, checkpointable_name=name)
  assert os.listdir(ckpt_dir) == []


def test_good_part_names(ckpt_dir):
  path = ckpt_dir / "ckpt"
  parts = {"0": 0, "A.b-c_d": 1, "x..y": 2, "step_9": 3}
  flax_ckpt.save_checkpointables(path, parts)
  assert flax_ckpt.load_checkpointables(path) == parts


@pytest.mark.parametrize("bad", [{}, None, [("params", {"w": 1})], "params", ({"w": 1},)],
                         ids=["empty_dict", "none", "list_of_pairs", "str", "tuple"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_checkpointables_must_be_a_non_empty_dict(ckpt_dir, bad, mode):
  with pytest.raises(TypeError):
    _save(mode, ckpt_dir / "ckpt", bad)
  assert os.listdir(ckpt_dir) == []


def test_abstract_checkpointables_must_be_a_dict(saved):
  path, _ = saved
  with pytest.raises(TypeError):
    flax_ckpt.load_checkpointables(path, [("params", None)])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_existing_path_needs_overwrite(saved, mode):
  path, old = saved
  before = _snapshot(path)
  with pytest.raises(flax_ckpt.CheckpointExistsError):
    _save(mode, path, {"params": {"w": np.zeros(2)}})
  assert _snapshot(path) == before
  assert _leftovers(path.parent) == []
  _assert_same(flax_ckpt.load_checkpointables(path), _expected_loaded(old))


# --------------------------------------------------------------- 8. partial PyTree parts


def test_partial_template_with_pytree_restore(saved):
  path, parts = saved
  out = flax_ckpt.load_checkpointables(path, {
      "params": flax_ckpt.PyTreeRestore({"dense": {"kernel": None}}, partial=True),
      "dataset": None,
  })
  assert list(out) == ["params", "dataset"]
  _assert_same(out["params"], {"dense": {"kernel": parts["params"]["dense"]["kernel"]}})
  assert out["dataset"]["pos"] == 7


def test_partial_keyword_applies_to_every_pytree_part(saved):
  path, parts = saved
  template = {
      "params": {"embed": jax.ShapeDtypeStruct((3, 4), jnp.int32)},
      "opt_state": {"count": None, "nu": [None, (None, None)]},
      "dataset": CountingIterator(),
  }
  out = flax_ckpt.load_checkpointables(path, template, partial=True)
  assert isinstance(out["params"]["embed"], jax.Array)
  np.testing.assert_array_equal(np.asarray(out["params"]["embed"]), parts["params"]["embed"])
  assert list(out["params"]) == ["embed"]
  _assert_same(out["opt_state"], {"count": 3, "nu": parts["opt_state"]["nu"]})
  assert out["dataset"].pos == 7


def test_a_subset_template_without_partial_is_a_mismatch(saved):
  path, _ = saved
  with pytest.raises(flax_ckpt.StructureMismatchError):
    flax_ckpt.load_checkpointables(path, {"params": {"embed": None}})
  with pytest.raises(flax_ckpt.StructureMismatchError):
    flax_ckpt.load_checkpointables(path, {"params": flax_ckpt.PyTreeRestore({"embed": None})})


def test_restore_type_for_pytree_parts(saved):
  path, _ = saved
  out = flax_ckpt.load_checkpointables(path, {"params": None, "opt_state": None},
                                       restore_type=np.ndarray)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(out["params"]))
  assert isinstance(out["opt_state"]["mu"]["kernel"], np.ndarray)
  out = flax_ckpt.load_checkpointables(
      path, {"params": flax_ckpt.PyTreeRestore(None, restore_type=jax.Array)})
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out["params"]))
