"""Planning reused by the next save of the same structure (parts/save_cache.py).

A save of a structure saved before takes the earlier save's ``_TREE.json`` and chunk
index template: the files must be byte for byte what a full save writes, and any change
of what a record depends on (shape, dtype, sharding, weak type, structure, key order,
leaf type) must be a miss.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_ckpt
from flax_ckpt._src.parts import save_cache

FILES = ("_TREE.json", "_CHUNKS.p0.json", "data.p0.bin")


@pytest.fixture(autouse=True)
def _fresh_cache():
  save_cache.clear()
  yield
  save_cache.clear()


def _files(path):
  return {f: (path / "state" / f).read_bytes() for f in FILES}


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))


def _state(seed=0, shape=(64, 48), dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  mesh = _mesh()
  return {
      "w": jnp.asarray(rng.random(shape), dtype),
      "sharded": jax.device_put(jnp.asarray(rng.random((16, 8)), jnp.float32),
                                NamedSharding(mesh, P("a", "b"))),
      "np": rng.integers(0, 9, (5, 3)).astype(np.int16),
      "empty": jnp.zeros((0, 4)),
      "step": jnp.asarray(3, jnp.int32) + 0,
      "nested": {"b": jnp.asarray(rng.random(300), jnp.bfloat16), "a": jnp.arange(7)},
  }


def _assert_same(tree, got):
  assert jax.tree.structure(tree) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(got)):
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, jax.Array):  # (shardings are in _TREE.json, compared as bytes)
      assert a.weak_type == b.weak_type


def test_second_save_hits_and_writes_the_same_bytes(tmp_path):
  state = _state()
  flax_ckpt.save(tmp_path / "full", state)
  hits = save_cache.STATS.hits
  flax_ckpt.save(tmp_path / "cached", state)
  assert save_cache.STATS.hits == hits + 1
  assert _files(tmp_path / "full") == _files(tmp_path / "cached")
  assert flax_ckpt.verify(tmp_path / "cached")
  _assert_same(state, flax_ckpt.load(tmp_path / "cached"))


def test_new_values_same_structure_fill_new_checksums(tmp_path):
  flax_ckpt.save(tmp_path / "a", _state(0))
  full_index = save_cache.STATS.full_index
  new = _state(1)
  flax_ckpt.save(tmp_path / "b", new)  # a hit: only the checksums differ
  assert save_cache.STATS.full_index == full_index
  save_cache.clear()
  flax_ckpt.save(tmp_path / "c", new)  # the same values, planned in full
  assert _files(tmp_path / "b") == _files(tmp_path / "c")
  assert flax_ckpt.verify(tmp_path / "b")
  _assert_same(new, flax_ckpt.load(tmp_path / "b"))


def _changed(state, how):
  s = dict(state)
  if how == "shape":
    s["w"] = jnp.ones((64, 49), jnp.float32)
  elif how == "dtype":
    s["w"] = s["w"].astype(jnp.float16)
  elif how == "sharding":
    s["sharded"] = jax.device_put(s["sharded"], NamedSharding(_mesh(), P("b", "a")))
  elif how == "weak_type":
    s["step"] = jnp.asarray(3) + 0  # a Python int: weakly typed
  elif how == "key_order":
    s["nested"] = {"a": s["nested"]["a"], "b": s["nested"]["b"]}
  elif how == "key_name":
    s["nested"] = {"c": s["nested"]["b"], "a": s["nested"]["a"]}
  elif how == "leaf_type":
    s["np"] = jnp.asarray(s["np"])
  elif how == "container":
    s["nested"] = [s["nested"]["b"], s["nested"]["a"]]
  return s


@pytest.mark.parametrize("how", ["shape", "dtype", "sharding", "weak_type", "key_order",
                                 "key_name", "leaf_type", "container"])
def test_any_change_of_what_records_depend_on_is_a_miss(tmp_path, how):
  state = _state()
  flax_ckpt.save(tmp_path / "a", state)
  flax_ckpt.save(tmp_path / "b", state)
  hits = save_cache.STATS.hits
  changed = _changed(state, how)
  flax_ckpt.save(tmp_path / "c", changed)
  assert save_cache.STATS.hits == hits, "a changed structure must not take the cache"
  got = flax_ckpt.load(tmp_path / "c")
  _assert_same(changed, got)
  if how == "key_order":
    assert list(got["nested"]) == ["a", "b"]
  # and the changed structure is cached in turn, for its next save
  flax_ckpt.save(tmp_path / "d", changed)
  assert save_cache.STATS.hits == hits + 1
  assert _files(tmp_path / "c") == _files(tmp_path / "d")


def test_async_save_hit_writes_the_same_bytes(tmp_path):
  state = _state()
  flax_ckpt.save_async(tmp_path / "full", state).result()  # (async: direct I/O writer)
  hits = save_cache.STATS.hits
  flax_ckpt.save_async(tmp_path / "async", state).result()
  assert save_cache.STATS.hits == hits + 1
  assert _files(tmp_path / "full") == _files(tmp_path / "async")
  _assert_same(state, flax_ckpt.load(tmp_path / "async"))


def test_async_hit_snapshots_numpy_leaves(tmp_path):
  state = _state()
  flax_ckpt.save(tmp_path / "a", state)
  want = state["np"].copy()
  fut = flax_ckpt.save_async(tmp_path / "b", state)
  state["np"][:] = -1  # the caller may reuse its buffers once save_async returns
  fut.result()
  np.testing.assert_array_equal(flax_ckpt.load(tmp_path / "b")["np"], want)


def test_deleted_array_on_a_hit_names_the_leaf(tmp_path):
  state = _state()
  flax_ckpt.save(tmp_path / "a", state)
  state["nested"]["b"].delete()
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match=r"nested.*b.*deleted"):
    flax_ckpt.save(tmp_path / "b", state)
  assert not os.path.exists(tmp_path / "b")


def test_trees_with_other_leaves_are_always_planned_in_full(tmp_path):
  state = {"w": jnp.ones(3), "lr": 0.1, "name": "run", "n": 3}
  flax_ckpt.save(tmp_path / "a", state)
  hits = save_cache.STATS.hits
  flax_ckpt.save(tmp_path / "b", state)
  assert save_cache.STATS.hits == hits
  got = flax_ckpt.load(tmp_path / "b")
  assert {k: v for k, v in got.items() if k != "w"} == {"lr": 0.1, "name": "run", "n": 3}
  np.testing.assert_array_equal(got["w"], np.ones(3))


def test_chunks_not_where_planned_fall_back_to_a_full_index(tmp_path):
  state = _state()
  flax_ckpt.save(tmp_path / "a", state)
  entry = save_cache._entries[0]
  entry.chunks = [(o + 64, n) for o, n in entry.chunks]  # as if the layout had moved
  full = save_cache.STATS.full_index
  flax_ckpt.save(tmp_path / "b", state)
  assert save_cache.STATS.full_index == full + 1
  assert _files(tmp_path / "a") == _files(tmp_path / "b")
  assert flax_ckpt.verify(tmp_path / "b")


def test_cache_keeps_a_few_recent_structures(tmp_path):
  for k in range(7):
    flax_ckpt.save(tmp_path / f"s{k}", {"w": jnp.ones(k + 1)})
  assert len(save_cache._entries) <= 2
  hits = save_cache.STATS.hits
  flax_ckpt.save(tmp_path / "again", {"w": jnp.ones(7)})  # the most recent one is kept
  assert save_cache.STATS.hits == hits + 1


def test_manager_saves_of_one_structure_stay_loadable(tmp_path):
  with flax_ckpt.CheckpointManager(tmp_path / "run") as mngr:
    for step in range(3):
      mngr.save(step, _state(step))
    mngr.wait_until_finished()
    for step in range(3):
      _assert_same(_state(step), mngr.restore(step))


def test_a_structure_too_big_to_keep_is_not_cached(tmp_path, monkeypatch):
  monkeypatch.setattr(save_cache, "_MAX_BYTES", 5000)  # ~7 leaves' worth
  tree = {f"a{i}": jnp.ones(3) for i in range(10)}
  flax_ckpt.save(tmp_path / "a", tree)
  assert save_cache._entries == []
  hits = save_cache.STATS.hits
  flax_ckpt.save(tmp_path / "b", tree)
  assert save_cache.STATS.hits == hits
  assert _files(tmp_path / "a") == _files(tmp_path / "b")


def _part_files(step_dir):
  part = step_dir / "state"
  return {f: (part / f).read_bytes() for f in sorted(os.listdir(part))}


@pytest.mark.parametrize("enable_async", [False, True])
def test_manager_hits_refer_to_unchanged_bytes_like_a_full_save(tmp_path, monkeypatch,
                                                                  enable_async):
  """Manager saves (reuse_unchanged, the default) of one structure hit the cache from the
  second on: frozen leaves are referred to, changed ones written, and every file is byte
  for byte that of the same saves planned in full; retention keeps the newest whole."""
  frozen = _state(0)

  def at(step):
    return {**frozen, "step": frozen["step"] + step, "np": frozen["np"] + step}

  def run(name):
    with flax_ckpt.CheckpointManager(tmp_path / name, enable_async=enable_async,
                                     max_to_keep=2) as mngr:
      for step in range(4):
        mngr.save(step, at(step))
      mngr.wait_until_finished()
      assert mngr.all_steps() == [2, 3]
      for step in (2, 3):
        _assert_same(at(step), mngr.restore(step))

  with monkeypatch.context() as m:
    m.setattr(save_cache, "lookup", lambda key: None)
    run("full")
  save_cache.clear()
  hits = save_cache.STATS.hits
  run("cached")
  assert save_cache.STATS.hits == hits + 3
  for step in (2, 3):
    full, cached = _part_files(tmp_path / "full" / str(step)), _part_files(
        tmp_path / "cached" / str(step))
    assert full == cached
    assert "data.p0.r0.bin" in cached  # the frozen leaves' bytes: linked, not written
    assert len(cached["data.p0.bin"]) <= len(cached["data.p0.r0.bin"]) // 2  # (async: padded)
    assert flax_ckpt.verify(tmp_path / "cached" / str(step))
