"""The migration docs do what they say.

- docs/format.md, "Moving a checkpoint back to Orbax": its script is run for real on a
  flax_ckpt checkpoint, a several-part checkpoint and a CheckpointManager directory, and
  orbax (from the test extra) reads every value back bitwise.
- docs/migrating_from_orbax.md: every ``flax_ckpt.<name>`` it mentions exists, and every
  ``ocp.<name>`` exists in the installed orbax-checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_ckpt

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMAT_MD = REPO / "docs" / "format.md"
MIGRATING_MD = REPO / "docs" / "migrating_from_orbax.md"
BACK_TO_ORBAX = "Moving a checkpoint back to Orbax"


@pytest.fixture(scope="module")
def ocp():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return pytest.importorskip("orbax.checkpoint")


def _section(markdown: str, heading: str) -> str:
  """The text under ``## heading``, up to the next heading of the same level."""
  m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
  assert m, f"no section '## {heading}'"
  return m.group(1)


def _python_blocks(markdown: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", markdown, re.M | re.S)


def _export_script(tmp_path: pathlib.Path) -> pathlib.Path:
  blocks = _python_blocks(_section(FORMAT_MD.read_text(), BACK_TO_ORBAX))
  assert len(blocks) == 1, "the section holds one python block: the script"
  script = tmp_path / "export_to_orbax.py"
  script.write_text(blocks[0])
  return script


def _run(script: pathlib.Path, src: pathlib.Path, dst: pathlib.Path) -> None:
  env = dict(os.environ)  # conftest's JAX_PLATFORMS=cpu and XLA_FLAGS included
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  r = subprocess.run([sys.executable, str(script), str(src), str(dst)], cwd=script.parent,
                     env=env, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, f"the script failed:\n{r.stdout}\n{r.stderr}"


def _awkward_floats(dtype, shape, seed):
  """Random values plus -0.0, inf, -inf, nan and a subnormal (bitwise comparisons)."""
  x = np.random.default_rng(seed).standard_normal(int(np.prod(shape))).astype(np.float32)
  x[:5] = [-0.0, np.inf, -np.inf, np.nan, 1e-40]
  return jnp.asarray(x.reshape(shape)).astype(dtype)


def _tree(seed: int = 0) -> dict:
  return {
    "w": _awkward_floats(jnp.bfloat16, (3, 5), seed),
    "nested": {
      "b": jnp.arange(7, dtype=jnp.int32) - 3,
      "c": _awkward_floats(jnp.float32, (2, 4), seed + 1),
      "deeper": {"u8": jnp.asarray(np.arange(250, 256, dtype=np.uint8))},
    },
  }


def _train_state(step: int) -> dict:
  """A dict with params/opt_state/step: flax_ckpt's manager stores it as three parts."""
  return {"params": {"dense": {"kernel": _awkward_floats(jnp.bfloat16, (4, 3), step),
                               "bias": jnp.full((3,), step, jnp.float32)}},
          "opt_state": {"mu": _awkward_floats(jnp.float32, (4, 3), step + 100),
                        "count": jnp.asarray(step, jnp.int32)},
          "step": step}


def _assert_bitwise(got, want) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    where = jax.tree_util.keystr(path)
    assert (g.dtype, g.shape) == (w.dtype, w.shape), where
    assert g.tobytes() == w.tobytes(), where


@pytest.mark.slow  # runs the script in a subprocess
def test_the_script_moves_a_checkpoint_back_to_orbax(ocp, tmp_path):
  script = _export_script(tmp_path)
  want = _tree()
  flax_ckpt.save(tmp_path / "ckpt", want)
  _run(script, tmp_path / "ckpt", tmp_path / "orbax_ckpt")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.StandardCheckpointer() as ckptr:
      got = ckptr.restore(tmp_path / "orbax_ckpt")
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, want)
      got_templated = ckptr.restore(tmp_path / "orbax_ckpt", abstract)
  _assert_bitwise(got, want)
  _assert_bitwise(got_templated, want)
  assert got["w"].dtype == jnp.bfloat16


@pytest.mark.slow  # runs the script in a subprocess
def test_the_script_moves_a_several_part_checkpoint_as_one_dict(ocp, tmp_path):
  script = _export_script(tmp_path)
  want = {"params": _tree(1), "opt_state": {"mu": _awkward_floats(jnp.float32, (6,), 2)}}
  flax_ckpt.save_checkpointables(tmp_path / "ckpt", want)
  _run(script, tmp_path / "ckpt", tmp_path / "orbax_ckpt")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.StandardCheckpointer() as ckptr:
      got = ckptr.restore(tmp_path / "orbax_ckpt")
  _assert_bitwise(got, want)


@pytest.mark.slow  # runs the script in a subprocess
def test_the_script_moves_a_manager_directory_to_an_orbax_manager(ocp, tmp_path):
  script = _export_script(tmp_path)
  steps = (10, 20)
  with flax_ckpt.CheckpointManager(tmp_path / "run") as mngr:
    for step in steps:
      assert mngr.save(step, _train_state(step))
    mngr.wait_until_finished()
    assert mngr.all_steps() == list(steps)
  # stored as three parts, which restore() puts back together for the script
  assert {"params", "opt_state", "extra"} <= set(os.listdir(tmp_path / "run" / "10"))
  _run(script, tmp_path / "run", tmp_path / "orbax_run")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.CheckpointManager(tmp_path / "orbax_run") as orbax_mngr:
      assert list(orbax_mngr.all_steps()) == list(steps)
      assert orbax_mngr.latest_step() == steps[-1]
      got = {s: orbax_mngr.restore(s, args=ocp.args.StandardRestore()) for s in steps}
  for step in steps:
    _assert_bitwise(got[step], _train_state(step))


def _referenced(markdown: str, prefix: str) -> set[str]:
  """Dotted names after ``prefix.`` (``flax_ckpt.args.PyTreeSave`` -> 'args.PyTreeSave')."""
  return {m.rstrip(".") for m in re.findall(rf"(?<![\w/.]){re.escape(prefix)}\.([A-Za-z_][\w.]*)",
                                           markdown)}


def _resolves(root, dotted: str) -> bool:
  obj = root
  for part in dotted.split("."):
    if not hasattr(obj, part):
      return False
    obj = getattr(obj, part)
  return True


def test_every_flax_ckpt_name_in_the_migration_guide_exists():
  names = _referenced(MIGRATING_MD.read_text(), "flax_ckpt")
  assert {"CheckpointManager", "load", "save", "export_safetensors",
          "is_orbax_checkpoint"} <= names  # the guide is about these
  missing = sorted(n for n in names if not _resolves(flax_ckpt, n))
  assert not missing, f"docs/migrating_from_orbax.md names flax_ckpt.{missing}"


def test_every_orbax_name_in_the_migration_guide_exists(ocp):
  names = _referenced(MIGRATING_MD.read_text(), "ocp")
  assert {"CheckpointManager", "args.StandardSave", "args.Composite"} <= names
  missing = sorted(n for n in names if not _resolves(ocp, n))
  assert not missing, f"docs/migrating_from_orbax.md names ocp.{missing}"
