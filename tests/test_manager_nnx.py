"""CheckpointManager with a Flax nnx model and its nnx.Optimizer: separate parts, exact
resume into fresh objects, params-only restore."""

import shutil

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_ckpt


class Net(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.l2 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _make(seed):
  model = Net(nnx.Rngs(seed, dropout=seed + 1))
  return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@nnx.jit
def _step(model, opt, x):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
  opt.update(model, grads)
  return loss


def _flat(model, opt):
  return [np.asarray(v) for v in
          __import__("jax").tree.leaves(nnx.to_pure_dict(nnx.state((model, opt))))
          if hasattr(v, "shape") and v.dtype != object and "key" not in str(v.dtype)]


def test_nnx_model_and_optimizer_resume_bitwise(ckpt_dir):
  x = jnp.linspace(-1, 1, 32).reshape(8, 4)
  model, opt = _make(0)
  for _ in range(3):
    _step(model, opt, x)
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=True) as mngr:
    assert mngr.save(3, {"model": model, "optimizer": opt, "epoch": 2})
    mngr.wait_until_finished()
    assert sorted(p.name for p in (ckpt_dir / "3").iterdir()) == [
        "_CHECKPOINT", "extra", "opt_state", "params"]
    model2, opt2 = _make(7)  # other initial values: everything must come from the checkpoint
    out = mngr.restore(abstract_state={"model": model2, "optimizer": opt2, "epoch": 0})
  assert out["model"] is model2 and out["optimizer"] is opt2 and out["epoch"] == 2
  for _ in range(3):
    assert float(_step(model, opt, x)) == float(_step(model2, opt2, x))
  for a, b in zip(_flat(model, opt), _flat(model2, opt2)):
    assert a.tobytes() == b.tobytes()


def test_nnx_params_only_restore_reads_no_optimizer_state(ckpt_dir):
  model, opt = _make(0)
  with flax_ckpt.CheckpointManager(ckpt_dir, enable_async=False) as mngr:
    mngr.save(1, {"model": model, "optimizer": opt})
  shutil.rmtree(ckpt_dir / "1" / "opt_state")
  reader = flax_ckpt.CheckpointManager(ckpt_dir, read_only=True)
  params = reader.restore(only="params")
  fresh, _ = _make(3)
  nnx.update(fresh, params)
  np.testing.assert_array_equal(np.asarray(fresh.l1.kernel[...]), np.asarray(model.l1.kernel[...]))
  assert isinstance(params["l1"]["kernel"], nnx.Param)
  reader.close()


def test_wait_for_new_checkpoint(ckpt_dir):
  import threading
  import time

  assert flax_ckpt.wait_for_new_checkpoint(ckpt_dir, timeout=0.05, poll_interval_s=0.01) is None
  mngr = flax_ckpt.CheckpointManager(ckpt_dir, enable_async=False)

  def later():
    time.sleep(0.2)
    mngr.save(5, {"w": np.ones(2)})

  t = threading.Thread(target=later)
  t.start()
  assert flax_ckpt.wait_for_new_checkpoint(ckpt_dir, timeout=30, poll_interval_s=0.02) == 5
  t.join()
  assert flax_ckpt.wait_for_new_checkpoint(ckpt_dir, 5, timeout=0.05) is None
  mngr.close()


def test_review_regressions(ckpt_dir):
  """Rollbacks are refused clearly, a failing best_fn never loses a later save, NaN ranks
  worst, bad steps and datasets fail at once, a dropped manager releases its lock."""
  import gc

  import pytest

  m = flax_ckpt.CheckpointManager(ckpt_dir / "a", enable_async=False, max_to_keep=3)
  for s in range(11):
    m.save(s, {"w": np.full(2, s)})
  m.restore(8)
  with pytest.raises(flax_ckpt.CheckpointError, match="abandoned"):
    m.save(9, {"w": np.zeros(2)})
  for s in [s for s in m.all_steps() if s > 8]:
    m.delete(s)
  assert m.save(9, {"w": np.zeros(2)}) and m.latest_step() == 9
  with pytest.raises(TypeError):
    m.save(2.7, {"w": np.zeros(2)})
  with pytest.raises(TypeError, match="get_state"):
    m.save(12, {"w": np.zeros(2)}, dataset=(i for i in range(3)))
  m.close()

  b = flax_ckpt.CheckpointManager(ckpt_dir / "b", enable_async=False, max_to_keep=2,
                                  best_fn=lambda mt: mt["loss"], best_mode="min")
  with pytest.raises(ValueError, match="best_fn"):
    b.save(0, {"w": np.ones(1)}, metrics={"acc": 1.0})  # no 'loss': refused before writing
  for s, loss in enumerate([1.0, float("nan"), 0.5, 2.0, 3.0, 0.7]):
    b.save(s, {"w": np.ones(1)}, metrics={"loss": loss})
  assert b.all_steps() == [2, 5] and b.best_step() == 2  # NaN ranks worst
  b.close()

  c = flax_ckpt.CheckpointManager(ckpt_dir / "c")
  del c
  gc.collect()
  flax_ckpt.CheckpointManager(ckpt_dir / "c").close()  # the dropped one let go of the lock
