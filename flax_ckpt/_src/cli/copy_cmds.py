"""``flax-ckpt cp``, ``flax-ckpt rm`` and ``flax-ckpt convert``: the commands that write.

``cp`` copies a checkpoint file by file, so that the copy's commit marker (the manifest
with its checksums and a manager's record of the step) is the source's: it writes the
files where the destination's storage puts a save in progress, checks the copy with
:func:`flax_ckpt.verify`, and only then commits it the way a save does (a rename locally,
the commit marker last on an object store). A copy is thus atomic, and also the way
between local disk and object storage: a local data file copied to an object store is
split into segments as a save there would (:mod:`segments`); local readers read segments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import shutil
from typing import Any

import flax_ckpt
from flax_ckpt._src import env
from flax_ckpt._src.cli import common, segments
from flax_ckpt._src.format import COMMIT_MARKER, dump_json_bytes
from flax_ckpt._src.io import storage

CP_EXAMPLE = """examples:
  $ flax-ckpt cp /ckpts/run1/200 s3://bucket/run1/200
  copied /ckpts/run1/200 -> s3://bucket/run1/200 (9 files, 1.2 GiB), verified
  $ flax-ckpt cp /ckpts/run1 --step 200 /backup/run1-200 --force
"""

RM_EXAMPLE = """example:
  $ flax-ckpt rm /ckpts/run1 --step 100
  deleted step 100 of /ckpts/run1
"""

CONVERT_EXAMPLE = """examples:
  $ flax-ckpt convert /ckpts/run1/200 /export/hf --to safetensors --part params
  $ flax-ckpt convert /orbax/ckpt/1000/default /ckpts/from-orbax --to flax_ckpt
  $ flax-ckpt convert model.safetensors /ckpts/from-hf --to flax_ckpt
"""


def _parent(path: str) -> str:
  return posixpath.dirname(path) if "://" in path else os.path.dirname(path)


def _copy_one(rel: str, src_base: str, tmp: str, split: segments.Resegmenting | None) -> int:
  """Copies ``src_base/rel`` to ``tmp/rel`` (its parent exists); the bytes written.

  Local to local, the file is streamed. A local data file copied to an object store is
  written as segments (:mod:`segments`), one at a time. Otherwise the storage layer moves
  the file whole: a small file, or one segment of a data file on an object store.
  """
  source, target = common.join(src_base, rel), common.join(tmp, rel)
  if split is not None and rel in split.rewritten:
    data = split.rewritten[rel]
  elif split is not None and rel in split.segmented:
    return segments.write_segments(source, target, split.segment_bytes)
  elif "://" not in src_base and "://" not in tmp:  # a data file may exceed memory
    shutil.copyfile(source, target)
    return os.path.getsize(target)
  else:
    data = storage.backend_for(src_base).read_bytes(source)
  storage.backend_for(tmp).write_bytes(target, data, fsync=False)
  return len(data)


def _copy_files(src_base: str, files: list[str], tmp: str,
                split: segments.Resegmenting | None) -> int:
  """Copies each file ``src_base/rel`` to ``tmp/rel``; the bytes written."""
  dst = storage.backend_for(tmp)
  made: set[str] = set()
  total = 0
  for rel in files:
    parent = _parent(common.join(tmp, rel))
    if parent not in made:
      dst.makedirs(parent)
      made.add(parent)
    total += _copy_one(rel, src_base, tmp, split)
  return total


def _verify_staged(tmp: str, manifest: Any) -> None:
  """Verifies the files staged at ``tmp`` against ``manifest`` before they are committed.

  The marker is written into the staging place for the check only (``flax_ckpt.verify``
  reads committed checkpoints) and removed again: the commit writes the real one.
  """
  backend = storage.backend_for(tmp)
  marker = common.join(tmp, COMMIT_MARKER)
  backend.write_bytes(marker, dump_json_bytes(manifest.to_json()), fsync=False)
  try:
    report = flax_ckpt.verify(tmp)
  finally:
    backend.remove_file(marker)
  if not report:
    raise common.CliError(f"the copy does not verify; nothing was committed:\n{report}")


def _refuse_outside_links(src: str, base: str) -> None:
  """A copy reads the bytes a link points at: as a load, it refuses links that leave the
  checkpoint (a crafted one could copy any file) unless the layout is trusted."""
  if env.allow_symlinks():
    return
  links = storage.backend_for(base).outside_links(base, src)
  if links:
    raise common.CliError(f"{links[0]} is a symlink that resolves outside the checkpoint "
                          f"{src}; if this layout is trusted, set {env.ALLOW_SYMLINKS}=1")


def copy_checkpoint(src: str, dst: str, *, force: bool) -> tuple[int, int]:
  """Copies the checkpoint ``src`` to ``dst`` atomically; ``(files, bytes)`` copied.

  Raises:
    CliError: ``dst`` holds a checkpoint and not ``force``; the copy does not verify; or
      ``src`` was replaced while it was copied. Nothing is committed then.
  """
  manifest = common.manifest(src)
  base = src if manifest.generation is None else common.join(src, manifest.generation)
  files = sorted(f for f in storage.backend_for(base).list_files(base) if f != COMMIT_MARKER)
  _refuse_outside_links(src, base)
  backend = storage.backend_for(dst)
  if common.is_checkpoint(dst) and not force:
    raise common.CliError(f"a checkpoint already exists at {dst}; pass --force to replace "
                          "it (the old one stays intact until the copy is committed)")
  backend.check_destination(dst, force, "--force")
  split = None
  if "://" in dst and "://" not in base:  # local data files become segment objects
    split = segments.plan(manifest, base, files, env.object_bytes())
  # the destination's storage names the generation (object stores) when it commits
  staged = dataclasses.replace(manifest, generation=None, version=0, checksums=(
      manifest.checksums if split is None else split.checksums))
  tmp, created = backend.begin(dst)
  try:
    nbytes = _copy_files(base, files, tmp, split)
    backend.sync_tree(tmp)
    _verify_staged(tmp, staged)
    if common.manifest(src) != manifest:  # overwritten meanwhile: the copy may mix both
      raise common.CliError(f"{src} was replaced while it was copied; nothing was "
                            "committed, copy it again")
    backend.commit(tmp, dst, staged, overwrite=force, fsync=True)
  except BaseException:
    backend.abort(tmp, created)
    raise
  return len(files), nbytes


def run_cp(args: argparse.Namespace) -> int:
  """``flax-ckpt cp SRC DST``: an atomic, verified copy of a checkpoint or a step."""
  src, dst = common.norm(args.src), common.norm(args.dst)
  if args.step is not None:
    src = common.step_path(src, args.step)
  elif not common.is_checkpoint(src):
    common.checkpoint_or_steps(src)  # the clear error when there is nothing at all
    raise common.CliError(f"{src} is a directory of steps; copy one with --step N "
                          "(or name the step's directory)")
  files, nbytes = copy_checkpoint(src, dst, force=args.force)
  if args.json:
    common.print_json({"src": src, "dst": dst, "files": files, "bytes": nbytes,
                       "verified": True})
  else:
    print(f"copied {src} -> {dst} ({files} files, {common.human_bytes(nbytes)}), verified")
  return common.OK


def _naming(name: str, step: int) -> dict[str, Any]:
  """The manager options that name ``step``'s directory ``name``: a step prefix and a
  fixed width, when the directory uses them."""
  m = re.fullmatch(r"(?:(.+)_)?(\d+)", name)
  if m is None or int(m.group(2)) != step:
    raise common.CliError(f"{name}: not a step directory a CheckpointManager names")
  digits = m.group(2)
  fixed = len(digits) if len(digits) > 1 and digits.startswith("0") else None
  return {"step_prefix": m.group(1), "step_format_fixed_length": fixed}


def run_rm(args: argparse.Namespace) -> int:
  """``flax-ckpt rm DIR --step N``: deletes a step as the manager's retention does."""
  root = common.norm(args.dir)
  path = common.step_path(root, args.step)
  naming = _naming(path.rstrip("/").rsplit("/", 1)[-1], args.step)
  # a writable manager takes the directory's owner lock: refused while a writer holds it
  with flax_ckpt.CheckpointManager(root, create=False, **naming) as mngr:
    if args.step not in mngr.all_steps():
      raise common.CliError(f"{root} has no committed step {args.step}")
    mngr.delete(args.step)
  if args.json:
    common.print_json({"directory": root, "deleted_step": args.step, "path": path})
  else:
    print(f"deleted step {args.step} of {root}")
  return common.OK


def run_convert(args: argparse.Namespace) -> int:
  """``flax-ckpt convert SRC DST --to FORMAT``."""
  src, dst = common.norm(args.src), common.norm(args.dst)
  if args.to == "safetensors":
    kwargs: dict[str, Any] = {"part": args.part or "params"}
    if args.max_shard_bytes is not None:
      kwargs["max_shard_bytes"] = args.max_shard_bytes
    # the files written, as paths (export_safetensors names them relative to dst)
    written = [common.join(dst, posixpath.basename(os.fspath(f)))
               for f in flax_ckpt.export_safetensors(src, dst, **kwargs)]
  else:
    kwargs = {} if args.part is None else {"checkpointable_name": args.part}
    tree = flax_ckpt.load(src, **kwargs)  # Orbax, flax msgpack, safetensors, flax_ckpt
    flax_ckpt.save(dst, tree, overwrite=args.force)
    written = [dst]
  if args.json:
    common.print_json({"src": src, "dst": dst, "to": args.to, "written": written})
  else:
    print(f"converted {src} -> {args.to}: " + ", ".join(written))
  return common.OK


def add_parsers(sub: Any) -> None:
  """Adds ``cp``, ``rm`` and ``convert`` to the subcommands ``sub``."""
  p = common.command(sub, "cp", run_cp,
                     help="copy a checkpoint or a step atomically (local <-> gs/s3)",
                     description="Copies a checkpoint (or a step of a directory, --step N) "
                     "file by file, keeping its manifest, checksums and manager record; the "
                     "copy is verified, then committed atomically. An existing DST is "
                     "refused unless --force.",
                     example=CP_EXAMPLE)
  p.add_argument("src", help="a checkpoint, or a directory of steps with --step")
  p.add_argument("dst", help="the new checkpoint's path")
  p.add_argument("--step", type=int, help="with a directory SRC: the step to copy")
  p.add_argument("--force", action="store_true", help="replace a checkpoint at DST")
  p = common.command(sub, "rm", run_rm,
                     help="delete a step of a directory, as retention does",
                     description="Deletes a step of a CheckpointManager directory the way "
                     "retention does (never seen half-deleted). Takes the directory's lock: "
                     "refused while another writer holds it.",
                     example=RM_EXAMPLE)
  p.add_argument("dir", help="the manager's directory")
  p.add_argument("--step", type=int, required=True, help="the step to delete")
  p = common.command(sub, "convert", run_convert, help="to flax_ckpt or safetensors",
                     description="--to safetensors: flax_ckpt.export_safetensors of a "
                     "checkpoint's params. --to flax_ckpt: an Orbax checkpoint, a flax "
                     "msgpack file or a safetensors file, loaded without a template and "
                     "saved with flax_ckpt.save.", example=CONVERT_EXAMPLE)
  p.add_argument("src", help="what to convert")
  p.add_argument("dst", help="the directory to write")
  p.add_argument("--to", required=True, choices=("flax_ckpt", "safetensors"))
  p.add_argument("--part", help="safetensors: the part to export (default params); "
                 "flax_ckpt: the part/item of SRC to read")
  p.add_argument("--max-shard-bytes", type=int, help="safetensors: bytes per file")
  p.add_argument("--force", action="store_true", help="flax_ckpt: replace DST")
