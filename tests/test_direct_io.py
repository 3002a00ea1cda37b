"""Async saves write data files with direct I/O (O_DIRECT) through an aligned bounce buffer;
blocking saves and filesystems without direct I/O use buffered writes. Same bytes either way."""

import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

import flax_ckpt


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  # odd sizes: chunks end mid-block, gaps between them, one bigger than the bounce buffer
  sizes = [1, 3, 4095, 4097, 12345, 70_000, 5_000_001]
  tree = {f"a{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
  tree["j"] = jnp.asarray(rng.integers(-9, 9, (333, 77)).astype(np.int8))
  tree["b"] = bytes(rng.integers(0, 255, 100_000).astype(np.uint8))
  return tree


def _same(a, b):
  for k, v in b.items():
    if isinstance(v, bytes):
      assert a[k] == v
    else:
      assert np.array_equal(np.asarray(a[k]), np.asarray(v)), k


def _data_file(path):
  return os.path.join(path, "state", "data.p0.bin")


def test_async_save_uses_direct_io_and_round_trips(tmp_path):
  tree = _tree()
  flax_ckpt.save_async(tmp_path / "c", tree).result()
  _same(flax_ckpt.load(tmp_path / "c"), tree)
  assert os.path.getsize(_data_file(tmp_path / "c")) % 4096 == 0  # whole blocks
  flax_ckpt.save(tmp_path / "s", tree)  # blocking: buffered, same content
  _same(flax_ckpt.load(tmp_path / "s"), tree)
  with open(_data_file(tmp_path / "c"), "rb") as f:
    a = f.read()
  with open(_data_file(tmp_path / "s"), "rb") as f:
    b = f.read()
  assert a[:len(b)] == b and not any(a[len(b):])  # identical bytes, then zero padding


def test_direct_io_can_be_turned_off(tmp_path, monkeypatch):
  monkeypatch.setenv("FLAX_CKPT_DIRECT_IO", "0")
  tree = _tree(1)
  flax_ckpt.save_async(tmp_path / "c", tree).result()
  _same(flax_ckpt.load(tmp_path / "c"), tree)
  flax_ckpt.save(tmp_path / "s", tree)
  assert os.path.getsize(_data_file(tmp_path / "c")) == os.path.getsize(
      _data_file(tmp_path / "s"))


def test_filesystem_without_direct_io_falls_back(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  mnt = tmp_path / "tmpfs"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    tree = _tree(2)
    flax_ckpt.save_async(mnt / "c", tree).result()  # tmpfs refuses O_DIRECT
    _same(flax_ckpt.load(mnt / "c"), tree)
  finally:
    subprocess.run(["umount", str(mnt)], check=False)
