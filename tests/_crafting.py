"""Crafting checkpoints in tests: edit a file, then :func:`reseal` the checkpoint.

A crafted checkpoint's author can recompute its checksums, so the validation behind them
must hold on its own. ``reseal`` recomputes the commit marker's file checksums (XXH3-64,
docs/format.md "Checksums") from the files now present, written here independently of
flax_ckpt's own code, so tests that craft metadata reach the checks they are about.
"""

from __future__ import annotations

import json
import os
import re

import xxhash

_DATA = re.compile(r"data\.p\d+(\.r\d+)?\.bin(\.\d+)?")  # data files (reused ones too)


def reseal(ckpt) -> None:
  """Rewrites ``ckpt/_CHECKPOINT``'s checksums to match the files now in ``ckpt``."""
  marker = os.path.join(ckpt, "_CHECKPOINT")
  with open(marker, "rb") as f:
    manifest = json.load(f)
  if "checksums" not in manifest:
    return
  files = {}
  for d, _, names in os.walk(ckpt):
    for n in names:
      rel = os.path.relpath(os.path.join(d, n), ckpt).replace(os.sep, "/")
      if rel == "_CHECKPOINT" or _DATA.fullmatch(n):
        continue
      with open(os.path.join(d, n), "rb") as f:
        files[rel] = xxhash.xxh3_64_hexdigest(f.read())
  manifest["checksums"]["files"] = files
  with open(marker, "w") as f:
    json.dump(manifest, f)
