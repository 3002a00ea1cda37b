"""CheckpointHandler / CheckpointArgs / Checkpointer / AsyncCheckpointer.

The first tests follow the custom-handler walkthrough users know from Orbax's docs (a
``MyState`` dataclass saved as npz or JSON, args ``MyStateSave`` / ``MyStateRestore``, a
custom metadata object, and an async subclass that sleeps 0.5 s in the background), with
only the import name changed.
"""

import asyncio
import dataclasses
import functools
import json
import os
import threading
import time
from concurrent import futures

import numpy as np
import pytest
from etils import epath

import flax_ckpt
import flax_ckpt as ocp  # the examples below are written against this name

# --- the walkthrough, as users write it -------------------------------------------------


@dataclasses.dataclass
class MyState:
  a: np.ndarray
  b: np.ndarray


@dataclasses.dataclass
class MyStateMetadata:
  a_shape: tuple
  b_shape: tuple
  stored_as: str


class MyStateCheckpointHandler(ocp.CheckpointHandler):

  def save(self, directory: epath.Path, args: "MyStateSave"):
    if args.use_npz:
      np.savez(directory / "my_state.npz", a=args.item.a, b=args.item.b)
    else:
      with open(os.path.join(directory, "my_state.json"), "w") as f:
        f.write(json.dumps({"a": args.item.a.tolist(), "b": args.item.b.tolist()}))

  def restore(self, directory: epath.Path, args: "MyStateRestore"):
    if (directory / "my_state.npz").exists():
      data = np.load(directory / "my_state.npz")
      a, b = data["a"], data["b"]
    else:
      with open(os.path.join(directory, "my_state.json")) as f:
        data = json.loads(f.read())
      a, b = np.asarray(data["a"]), np.asarray(data["b"])
    if args.restore_as_dict:
      return {"a": a, "b": b}
    return MyState(a=a, b=b)

  def metadata(self, directory: epath.Path):
    if (directory / "my_state.npz").exists():
      data = np.load(directory / "my_state.npz")
      return MyStateMetadata(data["a"].shape, data["b"].shape, "npz")
    with open(os.path.join(directory, "my_state.json")) as f:
      data = json.loads(f.read())
    return MyStateMetadata(np.asarray(data["a"]).shape, np.asarray(data["b"]).shape, "json")


@ocp.args.register_with_handler(MyStateCheckpointHandler, for_save=True)
@dataclasses.dataclass
class MyStateSave(ocp.args.CheckpointArgs):
  item: MyState
  use_npz: bool = True


@ocp.args.register_with_handler(MyStateCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class MyStateRestore(ocp.args.CheckpointArgs):
  restore_as_dict: bool = False


class MyStateAsyncCheckpointHandler(ocp.AsyncCheckpointHandler, MyStateCheckpointHandler):

  def __init__(self):
    self._executor = futures.ThreadPoolExecutor(max_workers=1)

  def close(self):
    self._executor.shutdown()

  def _background_save(self, directory: epath.Path, args: MyStateSave):
    time.sleep(0.5)  # a slow write
    super().save(directory, args)

  async def async_save(self, directory: epath.Path, args: MyStateSave):
    return [self._executor.submit(functools.partial(self._background_save, directory, args))]

  def save(self, directory: epath.Path, args: MyStateSave):
    async def run():
      for f in await self.async_save(directory, args):
        f.result()

    asyncio.run(run())


ocp.args.register_with_handler(MyStateAsyncCheckpointHandler, for_save=True)(MyStateSave)
ocp.args.register_with_handler(MyStateAsyncCheckpointHandler, for_restore=True)(MyStateRestore)


def _state():
  return MyState(a=np.arange(8), b=np.arange(16).reshape(4, 4))


# --- the walkthrough's checks ------------------------------------------------------------


@pytest.mark.parametrize("use_npz", [True, False])
def test_custom_handler_npz_and_json(tmp_path, use_npz):
  path = epath.Path(tmp_path) / "my_checkpoints"
  checkpointer = ocp.Checkpointer(MyStateCheckpointHandler())
  checkpointer.save(path / "abcde", args=MyStateSave(item=_state(), use_npz=use_npz))
  name = "my_state.npz" if use_npz else "my_state.json"
  assert (path / "abcde" / name).exists()  # the handler writes into the checkpoint dir

  restored = checkpointer.restore(path / "abcde", args=MyStateRestore(restore_as_dict=False))
  assert isinstance(restored, MyState)
  np.testing.assert_array_equal(restored.a, _state().a)
  np.testing.assert_array_equal(restored.b, _state().b)

  as_dict = checkpointer.restore(path / "abcde", args=MyStateRestore(restore_as_dict=True))
  assert set(as_dict) == {"a", "b"}
  np.testing.assert_array_equal(as_dict["b"], _state().b)

  md = checkpointer.metadata(path / "abcde")
  assert md == MyStateMetadata((8,), (4, 4), "npz" if use_npz else "json")


def test_checkpointer_refuses_existing_path_without_force(tmp_path):
  path = tmp_path / "ckpt"
  ckptr = ocp.Checkpointer(MyStateCheckpointHandler())
  ckptr.save(path, args=MyStateSave(item=_state()))
  other = MyState(a=np.zeros(2), b=np.ones(3))
  with pytest.raises(flax_ckpt.CheckpointExistsError, match="force=True"):
    ckptr.save(path, args=MyStateSave(item=other))
  np.testing.assert_array_equal(ckptr.restore(path, args=MyStateRestore()).a, _state().a)
  ckptr.save(path, args=MyStateSave(item=other, use_npz=False), force=True)
  got = ckptr.restore(path, args=MyStateRestore())
  np.testing.assert_array_equal(got.b, np.ones(3))
  assert not (path / "my_state.npz").exists()  # the old version is gone entirely


def test_async_checkpointer_temporary_directory(tmp_path):
  path = epath.Path(tmp_path) / "my_checkpoints"
  path.mkdir()
  checkpointer = ocp.AsyncCheckpointer(MyStateAsyncCheckpointHandler())
  t0 = time.monotonic()
  checkpointer.save(path / "async", args=MyStateSave(item=_state(), use_npz=True))
  returned_after = time.monotonic() - t0
  during = sorted(p.name for p in path.iterdir())
  assert returned_after < 0.4, returned_after  # the 0.5 s sleep runs in the background
  assert "async" not in during
  assert len(during) == 1 and during[0].startswith("async") and "tmp" in during[0], during
  checkpointer.wait_until_finished()
  assert sorted(p.name for p in path.iterdir()) == ["async"]
  restored = checkpointer.restore(path / "async", args=MyStateRestore())
  np.testing.assert_array_equal(restored.b, _state().b)
  checkpointer.close()
  assert checkpointer.handler._executor._shutdown


def test_async_checkpointer_context_manager_waits(tmp_path):
  with ocp.AsyncCheckpointer(MyStateAsyncCheckpointHandler()) as ckptr:
    ckptr.save(tmp_path / "x", args=MyStateSave(item=_state()))
  assert (tmp_path / "x" / "my_state.npz").exists()
  assert sorted(os.listdir(tmp_path)) == ["x"]


def test_async_checkpointer_one_save_in_flight(tmp_path):
  ckptr = ocp.AsyncCheckpointer(MyStateAsyncCheckpointHandler())
  ckptr.save(tmp_path / "a", args=MyStateSave(item=_state()))
  ckptr.save(tmp_path / "b", args=MyStateSave(item=_state()))  # waits for "a" first
  assert (tmp_path / "a" / "my_state.npz").exists()
  ckptr.close()
  assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# --- background errors surface from the next call ---------------------------------------


class _FailingAsync(MyStateAsyncCheckpointHandler):
  def _background_save(self, directory, args):
    raise OSError("disk on fire")


@ocp.args.register_with_handler(_FailingAsync, for_save=True)
@dataclasses.dataclass
class _FailingSave(MyStateSave):
  pass


@pytest.mark.parametrize("next_call", ["save", "wait_until_finished", "close", "restore"])
def test_async_error_surfaces_from_next_call(tmp_path, next_call):
  ckptr = ocp.AsyncCheckpointer(_FailingAsync())
  ckptr.save(tmp_path / "bad", args=_FailingSave(item=_state()))  # returns: error pending
  with pytest.raises(OSError, match="disk on fire"):
    if next_call == "save":
      ckptr.save(tmp_path / "next", args=_FailingSave(item=_state()))
    elif next_call == "restore":
      ckptr.restore(tmp_path / "bad", args=MyStateRestore())
    else:
      getattr(ckptr, next_call)()
  assert not (tmp_path / "bad").exists()
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
  ckptr.close()  # the error was reported once; closing again is clean


# --- the handler inside save_checkpointables ---------------------------------------------


def test_args_object_as_checkpointable(tmp_path):
  path = tmp_path / "ckpt"
  flax_ckpt.save_checkpointables(path, {
      "params": {"w": np.ones(3, np.float32)},
      "mine": MyStateSave(item=_state(), use_npz=False),
  })
  md = flax_ckpt.metadata(path)
  assert md.checkpointables["mine"]["kind"] == "handler"
  assert md.checkpointables["mine"]["handler"].endswith("MyStateAsyncCheckpointHandler")
  assert md.parts["mine"] == MyStateMetadata((8,), (4, 4), "json")
  out = flax_ckpt.load_checkpointables(path, {"mine": MyStateRestore(restore_as_dict=True)})
  assert list(out) == ["mine"]
  np.testing.assert_array_equal(out["mine"]["a"], np.arange(8))
  everything = flax_ckpt.load_checkpointables(path)  # default restore args
  assert isinstance(everything["mine"], MyState)
  np.testing.assert_array_equal(everything["params"]["w"], np.ones(3))


def test_async_handler_inside_save_checkpointables_async(tmp_path):
  path = tmp_path / "ckpt"
  t0 = time.monotonic()
  r = flax_ckpt.save_checkpointables_async(path, {"mine": MyStateSave(item=_state())})
  assert time.monotonic() - t0 < 0.4
  assert not path.exists()
  r.result()
  assert isinstance(flax_ckpt.load_checkpointables(path)["mine"], MyState)


class Opaque:
  def __init__(self, payload: str):
    self.payload = payload


class OpaqueHandler(ocp.CheckpointHandler):
  def save(self, directory, args):
    (directory / "payload.txt").write_text(args.item.payload)

  def restore(self, directory, args=None):
    return Opaque((directory / "payload.txt").read_text())


@ocp.args.register_with_handler(OpaqueHandler, for_save=True)
@dataclasses.dataclass
class OpaqueSave(ocp.args.CheckpointArgs):
  item: Opaque


def test_registered_type_goes_to_its_handler(tmp_path):
  flax_ckpt.register_checkpointable_handler(Opaque, OpaqueHandler)
  flax_ckpt.register_checkpointable_handler(Opaque, OpaqueHandler)  # same pair: no-op
  path = tmp_path / "ckpt"
  flax_ckpt.save_checkpointables(path, {"blob": Opaque("hello"), "step": 3})
  assert (path / "blob" / "payload.txt").read_text() == "hello"
  out = flax_ckpt.load_checkpointables(path)
  assert isinstance(out["blob"], Opaque) and out["blob"].payload == "hello"
  assert out["step"] == 3


# --- registration errors -----------------------------------------------------------------


class Unrelated(ocp.CheckpointHandler):
  def save(self, directory, args):
    pass

  def restore(self, directory, args=None):
    return None


def test_duplicate_registration_with_unrelated_handler_fails():
  with pytest.raises(flax_ckpt.RegistrationError, match="MyStateSave.*already registered"):
    ocp.args.register_with_handler(Unrelated, for_save=True)(MyStateSave)
  # the earlier registration still stands
  assert ocp.args.get_registered_handler_cls(MyStateSave) is MyStateAsyncCheckpointHandler


def test_duplicate_type_registration_fails_unless_override():
  class Thing:
    pass

  flax_ckpt.register_checkpointable_handler(Thing, OpaqueHandler)
  with pytest.raises(flax_ckpt.RegistrationError, match="override=True"):
    flax_ckpt.register_checkpointable_handler(Thing, Unrelated)
  flax_ckpt.register_checkpointable_handler(Thing, Unrelated, override=True)


def test_register_needs_a_flag_and_an_args_class():
  with pytest.raises(ValueError, match="for_save"):
    ocp.args.register_with_handler(Unrelated)
  with pytest.raises(TypeError, match="CheckpointArgs"):
    ocp.args.register_with_handler(Unrelated, for_save=True)(dict)


def test_missing_args_registration(tmp_path):
  @dataclasses.dataclass
  class NotRegistered(ocp.args.CheckpointArgs):
    item: int

  ckptr = ocp.Checkpointer(MyStateCheckpointHandler())
  with pytest.raises(flax_ckpt.RegistrationError, match="register_with_handler"):
    ckptr.save(tmp_path / "a", args=NotRegistered(1))
  with pytest.raises(flax_ckpt.RegistrationError, match="register_with_handler"):
    flax_ckpt.save_checkpointables(tmp_path / "b", {"x": NotRegistered(1)})
  # args registered with another handler are not accepted either
  with pytest.raises(flax_ckpt.RegistrationError, match="not registered for saving"):
    ocp.Checkpointer(Unrelated()).save(tmp_path / "c", args=MyStateSave(item=_state()))
  assert not os.listdir(tmp_path)


def test_unknown_type_lists_supported_kinds(tmp_path):
  class Mystery:
    pass

  with pytest.raises(flax_ckpt.UnsupportedLeafError) as e:
    flax_ckpt.save_checkpointables(tmp_path / "c", {"m": Mystery()})
  msg = str(e.value)
  for needle in ("PyTree", "get_state", "register_with_handler",
                 "register_checkpointable_handler", "'m'"):
    assert needle in msg
  assert not os.listdir(tmp_path)


def test_handler_unknown_in_this_process(tmp_path):
  path = tmp_path / "ckpt"
  flax_ckpt.save_checkpointables(path, {"mine": MyStateSave(item=_state())})
  marker = json.loads((path / "_CHECKPOINT").read_text())
  marker["checkpointables"]["mine"]["handler"] = "nowhere.NotAHandler"
  (path / "_CHECKPOINT").write_text(json.dumps(marker))
  with pytest.raises(flax_ckpt.CheckpointError, match="never imported"):
    flax_ckpt.load_checkpointables(path)
  # with explicit restore args the registered handler is used
  out = flax_ckpt.load_checkpointables(path, {"mine": MyStateRestore()})
  assert isinstance(out["mine"], MyState)


def test_checkpointer_handler_not_shared_between_threads_leaks_nothing(tmp_path):
  ckptr = ocp.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
  errs = []

  def work(i):
    try:
      ckptr.save(tmp_path / f"c{i}", args=flax_ckpt.args.PyTreeSave({"i": i}))
      assert ckptr.restore(tmp_path / f"c{i}")["i"] == i
    except Exception as e:  # noqa: BLE001
      errs.append(e)

  ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
  for t in ts:
    t.start()
  for t in ts:
    t.join()
  assert not errs
  assert sorted(os.listdir(tmp_path)) == [f"c{i}" for i in range(4)]


def test_pytree_checkpointer_is_loadable_with_load(tmp_path):
  path = tmp_path / "ckpt"
  ocp.Checkpointer(flax_ckpt.PyTreeCheckpointHandler()).save(
      path, args=flax_ckpt.args.PyTreeSave({"w": np.arange(4)}))
  np.testing.assert_array_equal(flax_ckpt.load(path)["w"], np.arange(4))
  assert flax_ckpt.metadata(path)["w"].shape == (4,)


def test_checkpointer_wraps_plain_objects_in_registered_args(tmp_path):
  import jax

  path = tmp_path / "ckpt"
  ckptr = ocp.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
  ckptr.save(path, {"w": np.arange(4, dtype=np.float32)})  # wrapped in PyTreeSave
  with pytest.warns(UserWarning, match=r"\['w'\] float32->int32"):  # a narrowing cast
    got = ckptr.restore(path, {"w": jax.ShapeDtypeStruct((4,), np.int32)})  # -> PyTreeRestore
  assert isinstance(got["w"], jax.Array) and got["w"].dtype == np.int32
  with pytest.raises(flax_ckpt.RegistrationError, match="for_restore"):
    ckptr.restore(path, MyStateRestore())


# --- regressions from review -------------------------------------------------------------


class OrbaxSignatureHandler(ocp.CheckpointHandler):
  """The signature Orbax's own handlers (and grain's) use: item first, args by keyword."""

  def save(self, directory, item=None, args=None):
    item = item if args is None else args.item
    (directory / "v.txt").write_text(str(item))

  def restore(self, directory, item=None, args=None):
    return (directory / "v.txt").read_text() + ("!" if args is not None else "?")


@ocp.args.register_with_handler(OrbaxSignatureHandler, for_save=True)
@dataclasses.dataclass
class OrbaxSigSave(ocp.args.CheckpointArgs):
  item: int


@ocp.args.register_with_handler(OrbaxSignatureHandler, for_restore=True)
@dataclasses.dataclass
class OrbaxSigRestore(ocp.args.CheckpointArgs):
  pass


class KeywordOnlyHandler(ocp.CheckpointHandler):
  def save(self, directory, *, args):
    (directory / "v.txt").write_text(str(args.item))

  def restore(self, directory, *, args=None):
    return int((directory / "v.txt").read_text())


@ocp.args.register_with_handler(KeywordOnlyHandler, for_save=True)
@dataclasses.dataclass
class KwSave(ocp.args.CheckpointArgs):
  item: int


def test_handlers_get_args_by_keyword_when_they_ask_for_it(tmp_path):
  ocp.Checkpointer(OrbaxSignatureHandler()).save(tmp_path / "a", args=OrbaxSigSave(5))
  assert ocp.Checkpointer(OrbaxSignatureHandler()).restore(tmp_path / "a") == "5!"
  flax_ckpt.save_checkpointables(tmp_path / "b", {"x": OrbaxSigSave(6), "y": KwSave(7)})
  assert flax_ckpt.load_checkpointables(tmp_path / "b") == {"x": "6!", "y": 7}


class ExtraFilePyTreeHandler(flax_ckpt.PyTreeCheckpointHandler):
  def save(self, directory, args):
    super().save(directory, args)
    (directory / "extra.txt").write_text("x")

  def restore(self, directory, args=None):
    out = super().restore(directory, args)
    out["extra"] = (directory / "extra.txt").read_text()
    return out


def test_subclass_of_builtin_handler_keeps_its_save(tmp_path):
  ckptr = ocp.Checkpointer(ExtraFilePyTreeHandler())
  ckptr.save(tmp_path / "c", args=flax_ckpt.args.PyTreeSave({"w": np.ones(2)}))
  out = ckptr.restore(tmp_path / "c")
  assert out["extra"] == "x"
  np.testing.assert_array_equal(out["w"], np.ones(2))


class AsyncioHandler(ocp.AsyncCheckpointHandler):
  """async_save returning asyncio tasks and run_in_executor futures."""

  async def _write(self, directory, text):
    await asyncio.sleep(0.2)
    (directory / "a.txt").write_text(text)

  async def async_save(self, directory, args):
    loop = asyncio.get_running_loop()
    return [asyncio.ensure_future(self._write(directory, args.text)),
            loop.run_in_executor(None, (directory / "b.txt").write_text, args.text)]

  def save(self, directory, args):
    (directory / "a.txt").write_text(args.text)
    (directory / "b.txt").write_text(args.text)

  def restore(self, directory, args=None):
    return (directory / "a.txt").read_text() + (directory / "b.txt").read_text()


@ocp.args.register_with_handler(AsyncioHandler, for_save=True)
@dataclasses.dataclass
class TextSave(ocp.args.CheckpointArgs):
  text: str


def test_async_save_may_return_asyncio_futures(tmp_path):
  with ocp.AsyncCheckpointer(AsyncioHandler()) as ckptr:
    ckptr.save(tmp_path / "c", args=TextSave("hi"))
  assert ocp.Checkpointer(AsyncioHandler()).restore(tmp_path / "c") == "hihi"
  r = flax_ckpt.save_checkpointables_async(tmp_path / "d", {"t": TextSave("yo")})
  r.result()
  assert flax_ckpt.load_checkpointables(tmp_path / "d")["t"] == "yoyo"


class SlowWriter(ocp.AsyncCheckpointHandler):
  def __init__(self):
    self._pool = futures.ThreadPoolExecutor(1)

  def _write(self, directory):
    time.sleep(0.4)
    (directory / "slow.txt").write_text("late")

  def async_save(self, directory, args):
    return [self._pool.submit(self._write, directory)]

  def save(self, directory, args):
    self._write(directory)

  def restore(self, directory, args=None):
    return (directory / "slow.txt").read_text()

  def close(self):
    self._pool.shutdown()


class Boom(ocp.AsyncCheckpointHandler):
  def async_save(self, directory, args):
    raise RuntimeError("boom in async_save")

  def save(self, directory, args):
    raise RuntimeError("boom in save")

  def restore(self, directory, args=None):
    return None


@ocp.args.register_with_handler(SlowWriter, for_save=True)
@dataclasses.dataclass
class SlowSave(ocp.args.CheckpointArgs):
  pass


@ocp.args.register_with_handler(Boom, for_save=True)
@dataclasses.dataclass
class BoomSave(ocp.args.CheckpointArgs):
  pass


def test_failed_part_waits_for_other_parts_before_cleaning_up(tmp_path):
  with pytest.raises(RuntimeError, match="boom in async_save"):
    flax_ckpt.save_checkpointables_async(tmp_path / "c", {"a": SlowSave(), "b": BoomSave()})
  time.sleep(0.6)  # the slow part's write would have re-created the temporary directory
  assert os.listdir(tmp_path) == []


def test_concurrent_saves_on_one_async_checkpointer_are_all_committed(tmp_path):
  ckptr = ocp.AsyncCheckpointer(SlowWriter())
  ts = [threading.Thread(target=ckptr.save, args=(tmp_path / f"c{i}", SlowSave()))
        for i in range(3)]
  for t in ts:
    t.start()
  for t in ts:
    t.join()
  ckptr.close()
  assert sorted(os.listdir(tmp_path)) == ["c0", "c1", "c2"]
  with pytest.raises(flax_ckpt.CheckpointError, match="closed"):
    ckptr.save(tmp_path / "late", SlowSave())


class BrokenMetadata(MyStateCheckpointHandler):
  def metadata(self, directory):
    raise NotImplementedError


@ocp.args.register_with_handler(BrokenMetadata, for_save=True)
@dataclasses.dataclass
class BrokenMetadataSave(MyStateSave):
  pass


class NeedsArg(ocp.CheckpointHandler):
  def __init__(self, sep):
    self.sep = sep

  def save(self, directory, args):
    (directory / "v.txt").write_text(self.sep)

  def restore(self, directory, args=None):
    return (directory / "v.txt").read_text()


@ocp.args.register_with_handler(NeedsArg, for_save=True)
@dataclasses.dataclass
class NeedsArgSave(ocp.args.CheckpointArgs):
  pass


def test_metadata_survives_handlers_without_metadata(tmp_path):
  flax_ckpt.save_checkpointables(tmp_path / "c", {"m": BrokenMetadataSave(item=_state()),
                                                  "w": np.ones(2)})
  md = flax_ckpt.metadata(tmp_path / "c")
  assert list(md.checkpointables) == ["m", "w"] and md.parts["m"] is None
  ocp.Checkpointer(NeedsArg(">")).save(tmp_path / "n", args=NeedsArgSave())
  assert flax_ckpt.metadata(tmp_path / "n").parts["state"] is None
  with pytest.raises(TypeError, match="without arguments"):
    flax_ckpt.load_checkpointables(tmp_path / "n")
  with pytest.raises(TypeError, match="without arguments"):
    flax_ckpt.save_checkpointables(tmp_path / "m", {"x": NeedsArgSave()})
  assert ocp.Checkpointer(NeedsArg(">")).restore(tmp_path / "n") == ">"


def test_with_block_error_is_not_replaced_by_a_failed_save(tmp_path):
  with pytest.raises(KeyError) as e:
    with ocp.AsyncCheckpointer(_FailingAsync()) as ckptr:
      ckptr.save(tmp_path / "bad", args=_FailingSave(item=_state()))
      raise KeyError("mine")
  assert any("disk on fire" in n for n in getattr(e.value, "__notes__", []))


def test_checkpointer_refuses_class_and_other_kinds(tmp_path):
  with pytest.raises(TypeError, match="instance"):
    ocp.Checkpointer(MyStateCheckpointHandler)
  flax_ckpt.save(tmp_path / "tree", {"w": np.ones(2)})
  with pytest.raises(flax_ckpt.CheckpointError, match="pytree handler"):
    ocp.Checkpointer(MyStateCheckpointHandler()).restore(tmp_path / "tree")
  ocp.Checkpointer(MyStateCheckpointHandler()).save(tmp_path / "mine",
                                                    args=MyStateSave(item=_state()))
  with pytest.raises(flax_ckpt.CheckpointError, match="MyStateAsyncCheckpointHandler|MyState"):
    ocp.Checkpointer(flax_ckpt.PyTreeCheckpointHandler()).restore(tmp_path / "mine")


def test_registered_type_object_works_as_restore_template(tmp_path):
  flax_ckpt.register_checkpointable_handler(Opaque, OpaqueHandler, override=True)
  flax_ckpt.save_checkpointables(tmp_path / "c", {"blob": Opaque("v")})
  out = flax_ckpt.load_checkpointables(tmp_path / "c", {"blob": Opaque("")})
  assert out["blob"].payload == "v"


def test_checkpointer_restore_during_overwrites_never_mixes_two_checkpoints(tmp_path):
  """Checkpointer reads through the same retrying reader as load (the manifest and the data
  of one version, again if an overwrite replaced the directory mid-read)."""
  import threading

  path = tmp_path / "ckpt"
  a = {"a": np.full(20_000, 1.0), "b": np.full(20_000, 2.0)}
  b = {"b": np.full(20_000, 4.0), "a": np.full(20_000, 3.0)}
  ckptr = flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
  ckptr.save(path, flax_ckpt.args.PyTreeSave(a))
  stop, problems, reads = threading.Event(), [], 0

  def writer():
    w = flax_ckpt.Checkpointer(flax_ckpt.PyTreeCheckpointHandler())
    for i in range(40):
      w.save(path, flax_ckpt.args.PyTreeSave(a if i % 2 else b), force=True)
    stop.set()

  t = threading.Thread(target=writer)
  t.start()
  while not stop.is_set():
    try:
      out = ckptr.restore(path)
      md = ckptr.metadata(path)
    except flax_ckpt.CheckpointError as e:  # only after repeated replacement mid-read
      problems.append(repr(e))
      continue
    reads += 1
    pair = (float(out["a"][0]), float(out["b"][0]))
    assert pair in ((1.0, 2.0), (3.0, 4.0)), pair
    assert np.all(out["a"] == pair[0]) and np.all(out["b"] == pair[1])
    assert md["a"].shape == (20_000,)
  t.join()
  assert reads > 0
  assert len(problems) <= 2, problems
