"""API details users rely on: class registry timing, plain dataclasses, template kinds, None
subtrees, the public surface (one home per name, old spellings as aliases, metadata as a
function), errors naming leaves, concurrent saves to one path."""

import dataclasses
import doctest
import importlib
import inspect
import sys
import types
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_ckpt


class LatePoint(typing.NamedTuple):
  x: int
  y: float


def test_class_registered_after_saving_is_rebuilt(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"p": LatePoint(1, 2.5)})
  flax_ckpt.register_class(LatePoint, override=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = flax_ckpt.load(path)
  assert type(out["p"]) is LatePoint and out["p"] == LatePoint(1, 2.5)


@dataclasses.dataclass
class PlainConfig:
  lr: float
  w: np.ndarray
  name: str = "run"


flax_ckpt.register_class(PlainConfig)


def test_registered_plain_dataclass_round_trips(ckpt_dir):
  path = ckpt_dir / "ckpt"
  tree = {"cfg": PlainConfig(0.1, np.arange(3.0)), "more": [PlainConfig(0.2, np.ones(2), "b")]}
  flax_ckpt.save(path, tree)
  out = flax_ckpt.load(path)
  assert type(out["cfg"]) is PlainConfig and out["cfg"].lr == 0.1 and out["cfg"].name == "run"
  np.testing.assert_array_equal(out["cfg"].w, np.arange(3.0))
  assert type(out["more"][0]) is PlainConfig and out["more"][0].name == "b"
  # a template holding the dataclass: its fields act as template leaves
  tmpl = {"cfg": PlainConfig(0.0, jax.ShapeDtypeStruct((3,), jnp.float32))}
  got = flax_ckpt.load(path, tmpl, partial=True)
  assert type(got["cfg"]) is PlainConfig and isinstance(got["cfg"].w, jax.Array)
  assert got["cfg"].w.dtype == jnp.float32 and got["cfg"].lr == 0.1


def test_metadata_is_a_function_that_keeps_the_old_spellings(ckpt_dir):
  import flax_ckpt.metadata as md_module
  from flax_ckpt.metadata import ArrayMetadata, CheckpointMetadata, Metadata, ValueMetadata

  assert inspect.isfunction(flax_ckpt.metadata) and flax_ckpt.metadata.__name__ == "metadata"
  assert md_module is flax_ckpt.metadata and flax_ckpt.metadata.Metadata is Metadata
  assert isinstance(sys.modules["flax_ckpt.metadata"], types.ModuleType)
  assert (Metadata, ArrayMetadata, ValueMetadata) == (
      flax_ckpt.metadata_types.Metadata, flax_ckpt.metadata_types.ArrayMetadata,
      flax_ckpt.metadata_types.ValueMetadata)
  assert CheckpointMetadata is flax_ckpt.CheckpointMetadata is flax_ckpt.metadata.CheckpointMetadata
  assert flax_ckpt.metadata.ValueMetadata is ValueMetadata

  @dataclasses.dataclass(kw_only=True)
  class MyMetadata(flax_ckpt.metadata.Metadata):  # how custom handlers subclassed it
    extra: int = 0

  assert issubclass(MyMetadata, flax_ckpt.metadata_types.Metadata)
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"w": np.ones((2, 3), np.float32), "k": jax.random.key(0)})
  md = flax_ckpt.metadata(path)
  assert isinstance(md, CheckpointMetadata) and md_module(path) == md
  assert isinstance(md["w"], ArrayMetadata) and md["w"].shape == (2, 3)
  assert md["k"].dtype == jax.random.key(0).dtype  # a real key dtype, not a string
  assert flax_ckpt.type_handlers.ArrayHandler is flax_ckpt.ArrayHandler


# Every name flax_ckpt exported before it had one home per name; each still works.
_OLD_TOP_LEVEL = """
    abstract_with_sharding args AsyncCheckpointer AsyncCheckpointHandler CheckpointArgs
    Checkpointer CheckpointHandler CheckpointManager CheckpointManagerOptions
    checkpoints_iterator wait_for_new_checkpoint policies load_checkpointables
    PyTreeCheckpointHandler PyTreeRestore PyTreeSave register_checkpointable_handler
    register_with_handler RegistrationError save_checkpointables save_checkpointables_async
    StatefulCheckpointHandler StatefulMetadata StatefulRestore StatefulSave ArrayHandler
    ArrayMetadata AsyncResponse CheckpointError CheckpointExistsError CheckpointMetadata
    CheckpointNotFoundError CheckpointReplacedError FormatError IncompleteCheckpointError
    Metadata ParamInfo RestoreArgs SaveArgs ScalarHandler StructureMismatchError TypeHandler
    UnregisteredClassWarning UnsupportedLeafError ValueMetadata get_type_handler
    has_type_handler load metadata register_class register_type_handler save save_async
    type_handlers""".split()
_OLD_NAMESPACES = {
    "args": """CheckpointArgs PyTreeRestore PyTreeSave RegistrationError StatefulRestore
               StatefulSave get_registered_handler_cls register_with_handler""".split(),
    "type_handlers": """ArrayHandler ArrayMetadata Metadata ParamInfo RestoreArgs SaveArgs
                        ScalarHandler TypeHandler ValueMetadata get_type_handler
                        has_type_handler register_type_handler""".split(),
}
# (flax_ckpt.metadata is not one: that name is the function; the module stays importable for
# the old ``from flax_ckpt.metadata import Metadata``.)
_PUBLIC_MODULES = ["flax_ckpt", "flax_ckpt.args", "flax_ckpt.handlers", "flax_ckpt.metadata_types",
                   "flax_ckpt.policies", "flax_ckpt.type_handlers"]


def _homes() -> dict[str, list[str]]:
  """Public name -> the modules whose ``__all__`` lists it."""
  homes: dict[str, list[str]] = {}
  for name in _PUBLIC_MODULES:
    for attr in importlib.import_module(name).__all__:
      homes.setdefault(attr, []).append(name)
  return homes


def test_each_public_name_has_one_home_and_sorted_all():
  homes = _homes()
  assert {k: v for k, v in homes.items() if len(v) > 1} == {}
  for name in _PUBLIC_MODULES:
    module = importlib.import_module(name)
    assert all(hasattr(module, attr) for attr in module.__all__), name
    # isort-style, as ruff's RUF022 sorts: classes (CamelCase) first, then the rest
    assert module.__all__ == sorted(module.__all__, key=lambda a: (not a[0].isupper(), a))
  # StorageError, kvstore_spec: object stores (issue 13); CorruptCheckpointError, Problem,
  # VerifyReport, verify: integrity (issue 14); is_orbax_checkpoint,
  # export_safetensors: interop (issue 15); LossyCastWarning: readable errors (issue 16)
  assert len(flax_ckpt.__all__) == 39


def test_old_names_are_aliases_of_their_one_home():
  homes = _homes()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # only ArrayRestoreArgs warns, and it is not listed here
    for module_name, names in [("flax_ckpt", _OLD_TOP_LEVEL)] + [
        (f"flax_ckpt.{ns}", names) for ns, names in _OLD_NAMESPACES.items()]:
      module = importlib.import_module(module_name)
      for name in names:
        (home,) = homes[name]
        obj = getattr(importlib.import_module(home), name)
        assert getattr(module, name) is obj, (module_name, name, home)
        exec(f"from {module_name} import {name}", {})


def test_array_restore_args_is_a_deprecated_alias():
  for module in (flax_ckpt, flax_ckpt.type_handlers):
    with pytest.warns(DeprecationWarning, match="RestoreArgs"):
      assert module.ArrayRestoreArgs is flax_ckpt.type_handlers.RestoreArgs
  with pytest.warns(DeprecationWarning):
    from flax_ckpt import ArrayRestoreArgs  # noqa: F401
  with pytest.raises(AttributeError, match="no attribute 'ArrayRestoreArg'"):
    flax_ckpt.ArrayRestoreArg  # noqa: B018


@pytest.mark.parametrize("name", ["flax_ckpt.handlers", "flax_ckpt.metadata_types"])
def test_docstring_examples_of_the_new_namespaces(name):
  # tests/test_doctests.py lists the public modules that existed before these two
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


def test_deleted_array_names_the_leaf_and_writes_nothing(ckpt_dir):
  x = jnp.ones(3)
  x.delete()
  with pytest.raises(flax_ckpt.UnsupportedLeafError, match=r"\['params'\]\['x'\].*deleted"):
    flax_ckpt.save(ckpt_dir / "ckpt", {"params": {"x": x}})
  assert list(ckpt_dir.iterdir()) == []


class Fragile:
  pass


class FragileHandler:
  def typestr(self):
    return "test.Fragile"

  async def serialize(self, values, infos, args=None):
    raise KeyError("disk on fire")

  async def deserialize(self, infos, args=None):
    return [Fragile() for _ in infos]

  async def metadata(self, infos):
    return [flax_ckpt.Metadata(name=i.name) for i in infos]


def test_failing_custom_handler_keeps_its_error_type_and_names_leaves(ckpt_dir):
  flax_ckpt.register_type_handler(Fragile, FragileHandler(), override=True)
  with pytest.raises(KeyError) as info:
    flax_ckpt.save(ckpt_dir / "ckpt", {"a": {"f": Fragile()}})
  assert any("['a']['f']" in n for n in getattr(info.value, "__notes__", []))
  assert list(ckpt_dir.iterdir()) == []


def test_second_concurrent_save_to_one_path_fails_at_once(ckpt_dir):
  path = ckpt_dir / "ckpt"
  resp = flax_ckpt.save_async(path, {"w": np.ones(4 << 20)})
  with pytest.raises(flax_ckpt.CheckpointExistsError, match="already in progress"):
    flax_ckpt.save_async(path, {"w": np.zeros(3)})
  resp.result()
  assert flax_ckpt.load(path)["w"].shape == (4 << 20,)
  flax_ckpt.save_async(path, {"w": np.zeros(3)}, overwrite=True).result()
  assert flax_ckpt.load(path)["w"].shape == (3,)


@pytest.mark.parametrize("key,template,needle", [
    ("none", jax.ShapeDtypeStruct((), jnp.float32), "None leaf"),
    ("s", jax.ShapeDtypeStruct((), jnp.float32), "str leaf"),
    ("by", np.zeros(2, np.uint8), "bytes leaf"),
    ("arr", "text", "np.ndarray leaf"),
    ("arr", 1.5, r"checkpoint shape \(3,\), template shape \(\)"),
    ("key", jax.ShapeDtypeStruct((2,), jnp.uint32), "jax.PRNGKey leaf"),
])
def test_template_leaf_of_the_wrong_kind_is_a_clear_error(ckpt_dir, key, template, needle):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"none": None, "s": "x", "by": b"ab", "arr": np.arange(3.0),
                        "key": jax.random.key(0)})
  with pytest.raises(flax_ckpt.StructureMismatchError, match=needle) as info:
    flax_ckpt.load(path, {key: template}, partial=True)
  assert f"['{key}']" in str(info.value)


def test_none_in_the_template_loads_a_whole_subtree_as_saved(ckpt_dir):
  path = ckpt_dir / "ckpt"
  tree = {"params": {"w": np.ones(2), "b": [np.zeros(1), 3]}, "opt": [(1, 2), {}], "step": 5}
  flax_ckpt.save(path, tree)
  out = flax_ckpt.load(path, {"params": None, "opt": [None, None], "step": None})
  assert out["opt"] == [(1, 2), {}] and out["step"] == 5
  np.testing.assert_array_equal(out["params"]["b"][0], np.zeros(1))
  assert out["params"]["b"][1] == 3
  with pytest.raises(flax_ckpt.StructureMismatchError, match=r"\['step'\]"):
    flax_ckpt.load(path, {"params": None, "opt": None})
  assert set(flax_ckpt.load(path, {"params": None}, partial=True)) == {"params"}


def test_restore_type_without_template(ckpt_dir):
  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, {"j": jnp.arange(3.0), "n": np.zeros(2, np.int8), "k": jax.random.key(1),
                        "s": 1})
  as_np = flax_ckpt.load(path, restore_type=np.ndarray)
  assert type(as_np["j"]) is np.ndarray and type(as_np["n"]) is np.ndarray
  np.testing.assert_array_equal(as_np["j"], np.arange(3.0, dtype=np.float32))
  assert as_np["s"] == 1 and jax.dtypes.issubdtype(as_np["k"].dtype, jax.dtypes.prng_key)
  as_jax = flax_ckpt.load(path, {"j": None, "n": None, "k": None, "s": None},
                          restore_type=jax.Array)
  assert isinstance(as_jax["n"], jax.Array) and as_jax["n"].dtype == np.int8
  with pytest.raises(TypeError, match="restore_type"):
    flax_ckpt.load(path, restore_type=list)


def test_loads_during_overwrites_never_mix_two_checkpoints(ckpt_dir):
  import threading

  path = ckpt_dir / "ckpt"
  a = {"a": np.full(20_000, 1.0), "b": np.full(20_000, 2.0)}
  b = {"b": np.full(20_000, 4.0), "a": np.full(20_000, 3.0)}  # same leaves, other order
  flax_ckpt.save(path, a)
  stop, seen, problems = threading.Event(), set(), []

  def writer():
    for i in range(40):
      flax_ckpt.save(path, a if i % 2 else b, overwrite=True)
    stop.set()

  t = threading.Thread(target=writer)
  t.start()
  while not stop.is_set():
    try:
      out = flax_ckpt.load(path)
    except flax_ckpt.CheckpointError as e:  # only after repeated replacement mid-read
      problems.append(repr(e))
      continue
    pair = (float(out["a"][0]), float(out["b"][0]))
    seen.add(pair)
    assert pair in ((1.0, 2.0), (3.0, 4.0)), pair
    assert np.all(out["a"] == pair[0]) and np.all(out["b"] == pair[1])
  t.join()
  assert len(problems) <= 2, problems


def test_overwrites_commit_in_call_order(ckpt_dir):
  path = ckpt_dir / "ckpt"
  resp = flax_ckpt.save_async(path, {"w": np.random.default_rng(0).random(8 << 20),
                                     "tag": "A"}, overwrite=True)
  flax_ckpt.save(path, {"tag": "B"}, overwrite=True)  # called later, so it must win
  resp.result()
  assert flax_ckpt.load(path) == {"tag": "B"}


def test_concurrent_overwrites_to_a_new_path(ckpt_dir):
  import concurrent.futures

  path = ckpt_dir / "new"
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futs = [pool.submit(flax_ckpt.save, path, {"i": i}, overwrite=True) for i in range(8)]
    for f in futs:
      f.result()  # no "Directory not empty" from a lost race
  assert flax_ckpt.load(path) == {"i": 7}
  assert [p.name for p in ckpt_dir.iterdir()] == ["new"]
