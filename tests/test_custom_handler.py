"""The custom TypeHandler example from the Orbax documentation, with ``flax_ckpt`` in place
of ``orbax.checkpoint``: a dataclass leaf written by its own handler into its own files."""

import asyncio
import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

import flax_ckpt


@dataclasses.dataclass
class MyState:
  a: np.ndarray
  b: np.ndarray


class MyStateHandler(flax_ckpt.type_handlers.TypeHandler):
  """Serializes MyState to a .npz file in the leaf's own directory."""

  def __init__(self):
    self._executor = ThreadPoolExecutor(max_workers=1)

  def close(self):
    self._executor.shutdown()

  def typestr(self):
    return "MyState"

  async def serialize(self, values, infos, args=None):
    del args
    futures = []
    for value, info in zip(values, infos, strict=True):
      info.path.mkdir(exist_ok=True)
      futures.append(self._executor.submit(functools.partial(_write_state, value, info.path)))
    return futures

  async def deserialize(self, infos, args=None):
    del args
    futures = []
    for info in infos:
      futures.append(await asyncio.get_event_loop().run_in_executor(
          self._executor, functools.partial(_from_state, info.path)))
    return futures

  async def metadata(self, infos):
    return [flax_ckpt.metadata.Metadata(name=info.name, directory=info.path) for info in infos]


def _write_state(state, path):
  path = path / "my_state.npz"
  np.savez(path, a=state.a, b=state.b)
  return str(path)


def _from_state(path):
  data = np.load(path / "my_state.npz")
  return MyState(a=data["a"], b=data["b"])


@dataclasses.dataclass
class MyStateMetadata(flax_ckpt.metadata.Metadata):
  a_shape: tuple
  b_shape: tuple


class MyStateHandlerWithMetadata(MyStateHandler):
  """Same files; metadata() reads the array shapes from the .npz."""

  async def metadata(self, infos):
    out = []
    for info in infos:
      with np.load(info.path / "my_state.npz") as data:
        out.append(MyStateMetadata(name=info.name, directory=info.path,
                                   a_shape=data["a"].shape, b_shape=data["b"].shape))
    return out


@pytest.fixture(scope="module", autouse=True)
def my_state_handler():
  handler = MyStateHandler()
  flax_ckpt.type_handlers.register_type_handler(MyState, handler, override=True)
  try:
    yield handler
  finally:
    # MyState exists only in this module, so leaving this handler registered is harmless.
    flax_ckpt.type_handlers.register_type_handler(MyState, handler, override=True)


def _tree():
  return {
      "state": {"a": np.array([1, 2, 3]), "b": np.array([4, 5, 6])},
      "my_state": MyState(a=np.array([10, 20, 30]), b=np.array([40, 50, 60])),
  }


def _assert_tree_equal(got, want):
  assert set(got) == {"state", "my_state"}
  assert set(got["state"]) == {"a", "b"}
  for k in ("a", "b"):
    assert isinstance(got["state"][k], np.ndarray)
    assert got["state"][k].dtype == want["state"][k].dtype
    np.testing.assert_array_equal(got["state"][k], want["state"][k])
  assert type(got["my_state"]) is MyState
  np.testing.assert_array_equal(got["my_state"].a, want["my_state"].a)
  np.testing.assert_array_equal(got["my_state"].b, want["my_state"].b)


def _npz_files(path):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                if f == "my_state.npz")


def test_has_type_handler():
  assert flax_ckpt.has_type_handler(MyState)
  assert flax_ckpt.type_handlers.has_type_handler(MyState)
  assert isinstance(flax_ckpt.get_type_handler(MyState), MyStateHandler)


def test_save_and_load_without_template(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, _tree())
  _assert_tree_equal(flax_ckpt.load(path), _tree())
  files = _npz_files(path)
  assert len(files) == 1, files
  with np.load(files[0]) as data:
    np.testing.assert_array_equal(data["a"], [10, 20, 30])
    np.testing.assert_array_equal(data["b"], [40, 50, 60])


def test_load_with_same_tree_as_template(ckpt_dir):
  path = ckpt_dir / "ckpt"
  tree = _tree()
  flax_ckpt.save(path, tree)
  got = flax_ckpt.load(path, _tree())
  _assert_tree_equal(got, tree)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(tree)


def test_save_async_with_custom_handler(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save_async(path, _tree()).result()
  _assert_tree_equal(flax_ckpt.load(path), _tree())
  assert len(_npz_files(path)) == 1


def test_base_metadata(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, _tree())
  md = flax_ckpt.metadata(path)
  leaf = md["my_state"]
  assert type(leaf) is flax_ckpt.metadata.Metadata
  assert leaf.name == "['my_state']"
  assert (leaf.directory / "my_state.npz").is_file()
  assert os.fspath(leaf.directory).startswith(os.fspath(path))
  assert md["state"]["a"].shape == (3,)


def test_metadata_subclass(ckpt_dir, my_state_handler):
  path = ckpt_dir / "ckpt"
  handler = MyStateHandlerWithMetadata()
  flax_ckpt.type_handlers.register_type_handler(MyState, handler, override=True)
  try:
    tree = _tree()
    tree["my_state"] = MyState(a=np.zeros((2, 3)), b=np.ones(5))
    flax_ckpt.save(path, tree)
    md = flax_ckpt.metadata(path)
    for leaf in (md["my_state"], md.tree["my_state"]):
      assert isinstance(leaf, MyStateMetadata)
      assert isinstance(leaf, flax_ckpt.Metadata)
      assert leaf.a_shape == (2, 3)
      assert leaf.b_shape == (5,)
      assert leaf.name == "['my_state']"
    assert md["state"]["b"].shape == (3,)
    # Loading still goes through the same files.
    got = flax_ckpt.load(path)
    np.testing.assert_array_equal(got["my_state"].a, np.zeros((2, 3)))
  finally:
    flax_ckpt.type_handlers.register_type_handler(MyState, my_state_handler, override=True)
    handler.close()


def test_leaf_directories_are_distinct(ckpt_dir):
  path = ckpt_dir / "ckpt"
  tree = {
      "a.2": MyState(a=np.array([1]), b=np.array([2])),
      "a": MyState(a=np.array([3]), b=np.array([4])),
      "a_": MyState(a=np.array([5]), b=np.array([6])),
  }
  flax_ckpt.save(path, tree)
  assert len(_npz_files(path)) == 3
  got = flax_ckpt.load(path)
  for k, want in tree.items():
    np.testing.assert_array_equal(got[k].a, want.a, err_msg=k)
    np.testing.assert_array_equal(got[k].b, want.b, err_msg=k)


def test_a_handler_sees_the_same_keypath_when_saving_and_loading(tmp_path):
  """ParamInfo.keypath is a tuple of (kind, key) tuples on both sides (the file holds lists)."""
  seen = {}

  class Tag:
    pass

  class TagHandler:
    def typestr(self):
      return "test_custom_handler.Tag"

    async def serialize(self, values, infos, args=None):
      seen["save"] = [info.keypath for info in infos]
      return []

    async def deserialize(self, infos, args=None):
      seen["load"] = [info.keypath for info in infos]
      return [Tag() for _ in infos]

    async def metadata(self, infos):
      return [flax_ckpt.metadata_types.Metadata(name=info.name) for info in infos]

  flax_ckpt.type_handlers.register_type_handler(Tag, TagHandler(), override=True)
  flax_ckpt.save(tmp_path / "ckpt", {"a": [Tag(), {"b": Tag()}]})
  flax_ckpt.load(tmp_path / "ckpt")
  assert seen["save"] == seen["load"] == [(("d", "a"), ("i", 0)),
                                          (("d", "a"), ("i", 1), ("d", "b"))]
  assert all(isinstance(p, tuple) and all(isinstance(e, tuple) for e in p)
             for p in seen["load"])
