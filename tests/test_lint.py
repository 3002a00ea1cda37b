"""The code base is ruff-clean (part of the test command so CI enforces it)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_clean():
  ruff = shutil.which("ruff")
  if ruff is None:
    pytest.skip("ruff not installed (it is in the 'test' extra)")
  dirs = ["flax_ckpt", "tests", "benchmarks", "train_examples", "configs"]
  r = subprocess.run([ruff, "check", *dirs], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
