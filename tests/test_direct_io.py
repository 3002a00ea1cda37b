"""Async saves write data files with direct I/O (O_DIRECT) through an aligned bounce buffer;
blocking saves and filesystems without direct I/O use buffered writes. Same bytes either way."""

import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

import flax_ckpt
from flax_ckpt._src.io import storage
from flax_ckpt._src.io.storage import direct, posix


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  # odd sizes: chunks end mid-block, gaps between them, one bigger than the bounce buffer
  sizes = [1, 3, 4095, 4097, 12345, 70_000, 5_000_001]
  tree = {f"a{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
  tree["j"] = jnp.asarray(rng.integers(-9, 9, (333, 77)).astype(np.int8))
  # a jax buffer big enough for zero-copy direct I/O (placed at its address modulo 4096)
  tree["z"] = jnp.asarray(rng.standard_normal((1 << 18) + 5).astype(np.float32)) * 2
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
  small = {k: v for k, v in tree.items() if k not in ("a6", "j", "z")}  # no zero-copy
  flax_ckpt.save_async(tmp_path / "c2", small).result()
  flax_ckpt.save(tmp_path / "s2", small)
  with open(_data_file(tmp_path / "c2"), "rb") as f:
    a = f.read()
  with open(_data_file(tmp_path / "s2"), "rb") as f:
    b = f.read()
  assert a[:len(b)] == b and not any(a[len(b):])  # identical bytes, then zero padding


def _writer_round_trip(path, arrays):
  w = direct.DirectWriter(str(path))
  placed = [w.add(a) for a in arrays]
  w.write(fsync=True)
  views = [memoryview(storage.aligned_empty(n)) for _, n in placed]
  posix.read_into(str(path), [(off, v) for (off, _), v in zip(placed, views)])
  for a, v in zip(arrays, views):
    assert bytes(v) == storage.as_bytes_view(a).tobytes()
  return w, placed


def test_big_aligned_buffers_go_straight_from_memory(tmp_path):
  """Buffers of >= 1 MiB whose address is 64-byte aligned skip the bounce buffer: all their
  whole blocks are written from the caller's memory, whatever their offset in a page."""
  rng = np.random.default_rng(3)
  base = storage.aligned_empty((8 << 20) + 3 * 4096)
  base[:] = rng.integers(0, 256, base.size, dtype=np.uint8)
  arrays = [rng.standard_normal(10).astype(np.float32)]  # small first: the file is unaligned
  for shift, n in [(64, (1 << 20) + 7), (4096, 3 << 20), (1984, (2 << 20) + 4096)]:
    start = (-base.ctypes.data) % 4096 + shift  # address = page + shift
    arrays.append(base[start:start + n])
    arrays.append(rng.integers(0, 9, 77).astype(np.int8))  # something between them
  arrays.append(np.asarray(jnp.arange(1 << 19, dtype=jnp.float32) * 3))  # a jax buffer
  w, placed = _writer_round_trip(tmp_path / "d.bin", arrays)
  if not w.direct_used:
    pytest.skip("this filesystem refuses direct I/O")
  big = [n for _, n in placed if n >= 1 << 20]
  assert w.zero_copy_bytes >= sum(big) - len(big) * 2 * 4096
  assert all(off % storage.ALIGN == 0 for off, _ in placed)
  assert os.path.getsize(tmp_path / "d.bin") % 4096 == 0


def test_unaligned_big_buffers_are_staged(tmp_path):
  rng = np.random.default_rng(4)
  raw = rng.integers(0, 256, (2 << 20) + 64, dtype=np.uint8)
  arrays = [raw[1:1 + (1 << 20)], raw[5:5 + (1 << 20)].view(np.float32)]  # not 64-aligned
  w, placed = _writer_round_trip(tmp_path / "d.bin", arrays)
  assert w.zero_copy_bytes == 0
  assert all(off % storage.ALIGN == 0 for off, _ in placed)


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
