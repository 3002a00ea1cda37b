"""A lean install (issue 16): the library's dependencies are only what it imports, and it
saves, loads and runs a CheckpointManager without the examples' packages (clu,
ml_collections, absl, grain, scikit-learn, TensorFlow) or the optional extras."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# what `pip install flax_ckpt` may pull: the library's own imports
CORE = {"jax", "flax", "optax", "numpy", "tensorstore", "etils", "xxhash"}
# never imported by the library, and so never pulled by it (absl-py is not here: optax
# imports it; flax depends on orbax-checkpoint, which flax_ckpt never imports)
EXAMPLES_ONLY = ("clu", "ml_collections", "grain", "sklearn", "tensorflow", "tensorboard")
OPTIONAL = ("safetensors", "orbax", "boto3", "moto", "gcsfs")


def _name(req: str) -> str:
  for sep in "<>=!~[; ":
    req = req.split(sep)[0]
  return req.strip().lower()


def test_core_dependencies_are_what_the_library_imports():
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert {_name(r) for r in meta["dependencies"]} == CORE
  examples = {_name(r) for r in meta["optional-dependencies"]["examples"]}
  assert {"clu", "ml_collections", "absl-py", "grain", "tensorflow-cpu"} <= examples


_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, tempfile, os
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(f"{{name}} is not installed (lean install)")
        return None

    sys.meta_path.insert(0, Block())
    import numpy as np, jax.numpy as jnp, optax
    import flax_ckpt

    d = tempfile.mkdtemp()
    state = {{"params": {{"w": jnp.ones((4, 4))}}, "opt": optax.adam(1e-3).init(jnp.ones(2))}}
    flax_ckpt.save(os.path.join(d, "c"), state)
    back = flax_ckpt.load(os.path.join(d, "c"))
    assert type(back["opt"]) is type(state["opt"]), type(back["opt"])
    with flax_ckpt.CheckpointManager(os.path.join(d, "run"), max_to_keep=1) as mngr:
      for step in range(3):
        mngr.save(step, state, force=True)
      mngr.wait_until_finished()
      assert mngr.all_steps() == [2], mngr.all_steps()
      mngr.restore()
    assert flax_ckpt.verify(os.path.join(d, "c"))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("LEAN_OK")
    """)


@pytest.mark.slow
def test_the_library_runs_without_the_examples_and_optional_packages(tmp_path):
  blocked = sorted(EXAMPLES_ONLY + OPTIONAL)
  env = dict(os.environ, PYTHONPATH=os.fspath(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-c", _SCRIPT.format(blocked=blocked)], cwd=tmp_path,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "LEAN_OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.slow
def test_export_safetensors_without_the_extra_names_it(tmp_path):
  code = textwrap.dedent("""
      import importlib.abc, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] == "safetensors":
            raise ImportError("no safetensors")
      sys.meta_path.insert(0, Block())
      import numpy as np, flax_ckpt
      try:
        flax_ckpt.export_safetensors({"w": np.ones(2)}, sys.argv[1])
      except ImportError as e:
        assert "flax_ckpt[safetensors]" in str(e), e
        print("NAMED_THE_EXTRA")
      """)
  env = dict(os.environ, PYTHONPATH=os.fspath(ROOT), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code, os.fspath(tmp_path / "out")], cwd=tmp_path,
                     env=env, capture_output=True, text=True, timeout=300)
  assert "NAMED_THE_EXTRA" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
