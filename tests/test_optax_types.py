"""Every optax optimizer's state round-trips: real types without a template, exact values
with one, and training continues bit for bit from the loaded state.

The optimizers are discovered by walking optax's public API: every function of ``optax``
and ``optax.contrib`` that builds a GradientTransformation from default arguments (plus a
learning rate), so a new optax release is covered by the same test; compositions are a
fixed list on top.
"""

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import flax_ckpt

_LR = 1e-2


def _discover() -> dict:
  out = {}
  for modname, mod in (("optax", optax), ("optax.contrib", optax.contrib)):
    for name in sorted(dir(mod)):
      fn = getattr(mod, name)
      if name.startswith("_") or not inspect.isfunction(fn):
        continue
      try:
        params = inspect.signature(fn).parameters.values()
      except (TypeError, ValueError):
        continue
      required = {p.name for p in params if p.default is p.empty
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
      if required - {"learning_rate"}:
        continue
      kwargs = {"learning_rate": _LR} if "learning_rate" in required else {}
      try:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          tx = fn(**kwargs)
      except Exception:  # noqa: BLE001 - not buildable from defaults: not in scope
        continue
      if isinstance(tx, optax.GradientTransformation):
        out[f"{modname}.{name}"] = lambda fn=fn, kwargs=kwargs: fn(**kwargs)
  return out


_FACTORIES = _discover()

_COMPOSITIONS = {
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_LR)),
    "masked": lambda: optax.masked(optax.adam(_LR), {"w": True, "b": False}),
    "multi_transform": lambda: optax.multi_transform(
        {"fast": optax.adam(_LR), "slow": optax.sgd(_LR, momentum=0.9)},
        {"w": "fast", "b": "slow"}),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.linear_schedule(_LR, 0.0, 100), weight_decay=1e-4),
    "inject_stateful_hyperparams": lambda: optax.inject_stateful_hyperparams(optax.sgd)(
        learning_rate=optax.WrappedSchedule(optax.cosine_decay_schedule(_LR, 100))),
    "MultiSteps": lambda: optax.MultiSteps(optax.adam(_LR), every_k_schedule=2),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(_LR), max_consecutive_errors=3),
    "sgd_momentum_nesterov": lambda: optax.sgd(_LR, momentum=0.9, nesterov=True),
    "named_chain": lambda: optax.named_chain(("clip", optax.clip(1.0)),
                                             ("adam", optax.adam(_LR))),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(_LR),
    "schedule_free_sgd": lambda: optax.contrib.schedule_free(optax.sgd(_LR), _LR),
    "lookahead_free_ema": lambda: optax.chain(optax.adam(_LR), optax.ema(0.9)),
    "masked_with_masked_nodes": lambda: optax.chain(
        optax.masked(optax.sgd(_LR, momentum=0.9), {"w": False, "b": True}),
        optax.masked(optax.adam(_LR), {"w": True, "b": False})),
}


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
          "b": jnp.arange(4, dtype=jnp.float32) / 4}


def _loss(p, x):
  return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)


# extra arguments some optimizers need in update() (line searches, Polyak steps, ...)
def _extra_arg_sets(v, g, f):
  return [{}, {"value": v, "grad": g, "value_fn": f}, {"value": v}, {"obj_fn": f}]


def _make_step(tx):
  def step(p, s, i):
    x = jnp.ones((2, 3), jnp.float32) * (i + 1.0) / 3
    f = lambda q: _loss(q, x)
    v, g = jax.value_and_grad(f)(p)
    last = None
    for extra in _extra_arg_sets(v, g, f):
      try:
        u, s2 = tx.update(g, s, p, **extra)
        break
      except (TypeError, ValueError) as e:
        last = e
    else:
      raise last
    return optax.apply_updates(p, u), s2
  return jax.jit(step)


def _run(step, p, s, start, n):
  for i in range(start, start + n):
    p, s = step(p, s, jnp.float32(i))
  return p, s


def _bits(x):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x)


def _assert_same_types(a, b, path="root", ordered=True):
  """Exact node types at every level (not just equal tree structures)."""
  assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
  if isinstance(a, dict):
    # a template (from jax.eval_shape) has JAX's sorted key order; without one the saved
    # insertion order comes back
    assert list(a) == list(b) if ordered else sorted(a, key=repr) == sorted(b, key=repr), path
    for k in a:
      _assert_same_types(a[k], b[k], f"{path}[{k!r}]", ordered)
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same_types(x, y, f"{path}[{i}]", ordered)
  elif isinstance(a, jax.Array):
    assert a.dtype == b.dtype and a.shape == b.shape, path


def _assert_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    xb, yb = _bits(x), _bits(y)
    assert xb.dtype == yb.dtype and xb.shape == yb.shape
    assert xb.tobytes() == yb.tobytes()


@pytest.mark.parametrize("name", sorted(_FACTORIES) + sorted(_COMPOSITIONS))
def test_optimizer_state_round_trip_and_bitwise_continuation(ckpt_dir, name):
  make = _FACTORIES.get(name) or _COMPOSITIONS[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # some factories warn about experimental status
    tx = make()
  step = _make_step(tx)
  p0 = _params()
  s0 = tx.init(p0)
  try:
    p, s = _run(step, p0, s0, 0, 3)
  except (TypeError, ValueError) as e:
    pytest.skip(f"{name} cannot take a step on this toy problem with default arguments: "
                f"{type(e).__name__}: {str(e)[:120]}")
  saved = {"params": p, "opt_state": s}
  ref = _run(step, p, s, 3, 3)  # a run that never stopped

  path = ckpt_dir / "ckpt"
  flax_ckpt.save(path, saved)

  as_saved = flax_ckpt.load(path)  # no template: the real optax classes come back
  _assert_same_types(as_saved, saved)
  assert jax.tree.structure(as_saved) == jax.tree.structure(saved)
  _assert_bitwise(as_saved, saved)

  template = jax.eval_shape(lambda: saved)
  loaded = flax_ckpt.load(path, template)
  _assert_same_types(loaded, saved, ordered=False)
  _assert_bitwise(loaded, saved)

  for start in (loaded, as_saved):
    _assert_bitwise(_run(step, start["params"], start["opt_state"], 3, 3), ref)


def test_discovery_covers_the_usual_optimizers():
  for name in ("adam", "adamw", "sgd", "lion", "lamb", "lars", "adafactor", "adagrad",
               "rmsprop", "adabelief", "yogi", "radam", "novograd", "sm3", "fromage",
               "noisy_sgd"):
    assert f"optax.{name}" in _FACTORIES
  assert len(_FACTORIES) > 60


def test_every_optax_state_class_is_known():
  """Each NamedTuple optax defines loads back as itself (checked on an instance of each)."""
  from flax_ckpt._src.tree import class_registry, library_types

  classes = library_types._optax_public_classes()
  assert optax.EmptyState in classes and optax.MaskedNode in classes
  assert optax.contrib.ScheduleFreeState in classes
  for cls in classes:
    assert class_registry.is_registered_class(cls) or library_types.resolve_class(cls), cls


def test_public_names_are_stored(ckpt_dir):
  flax_ckpt.save(ckpt_dir / "c", {"s": optax.adam(0.1).init({"w": jnp.ones(2)}),
                                  "m": optax.MaskedNode()})
  text = (ckpt_dir / "c" / "state" / "_TREE.json").read_text()
  for name in ("optax.ScaleByAdamState", "optax.EmptyState", "optax.MaskedNode"):
    assert f'"{name}"' in text
  assert "optax._src" not in text  # private module paths would break on optax upgrades
