"""The package type-checks (basedpyright, configured in pyproject.toml), and so does code written
against its public API as users install it, old spellings included."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What users wrote against the installed package: every spelling that worked before the public
# surface got one home per name, and the new homes. It must type-check without errors.
USER_CODE = '''
import dataclasses

import numpy as np

import flax_ckpt
from flax_ckpt import (
    ArrayHandler, ArrayMetadata, ArrayRestoreArgs, AsyncCheckpointer, AsyncCheckpointHandler,
    AsyncResponse, CheckpointArgs, CheckpointError, CheckpointExistsError, Checkpointer,
    CheckpointHandler, CheckpointManager, CheckpointManagerOptions, CheckpointMetadata,
    CheckpointNotFoundError, CheckpointReplacedError, FormatError, IncompleteCheckpointError,
    Metadata, ParamInfo, PyTreeCheckpointHandler, PyTreeRestore, PyTreeSave, RegistrationError,
    RestoreArgs, SaveArgs, ScalarHandler, StatefulCheckpointHandler, StatefulMetadata,
    StatefulRestore, StatefulSave, StructureMismatchError, TypeHandler, UnregisteredClassWarning,
    UnsupportedLeafError, ValueMetadata, abstract_with_sharding, args, checkpoints_iterator,
    get_type_handler, has_type_handler, load, load_checkpointables, metadata, policies,
    register_checkpointable_handler, register_class, register_type_handler,
    register_with_handler, save, save_async, save_checkpointables, save_checkpointables_async,
    type_handlers, wait_for_new_checkpoint,
)
from flax_ckpt import handlers, metadata_types
from flax_ckpt.args import RegistrationError as ArgsRegistrationError
from flax_ckpt.args import get_registered_handler_cls
from flax_ckpt.metadata import ArrayMetadata as MdArrayMetadata
from flax_ckpt.metadata import CheckpointMetadata as MdCheckpointMetadata
from flax_ckpt.metadata import Metadata as MdMetadata
from flax_ckpt.metadata import ValueMetadata as MdValueMetadata
from flax_ckpt.policies import SaveDecisionPolicy
from flax_ckpt.type_handlers import ArrayMetadata as ThArrayMetadata
from flax_ckpt.type_handlers import ArrayRestoreArgs as ThArrayRestoreArgs
from flax_ckpt.type_handlers import Metadata as ThMetadata
from flax_ckpt.type_handlers import ValueMetadata as ThValueMetadata


@dataclasses.dataclass(kw_only=True)
class MyMetadata(flax_ckpt.metadata.Metadata):
  extra: int = 0


@dataclasses.dataclass(kw_only=True)
class MyOtherMetadata(flax_ckpt.metadata_types.Metadata):
  extra: int = 0


def use(path: str) -> None:
  flax_ckpt.save(path, {"w": np.ones(2)})
  md: flax_ckpt.CheckpointMetadata = flax_ckpt.metadata(path)
  leaf: MdArrayMetadata = md["w"]
  assert isinstance(leaf, flax_ckpt.metadata.ArrayMetadata)
  cls: type[flax_ckpt.metadata_types.ValueMetadata] = flax_ckpt.metadata.ValueMetadata
  with handlers.Checkpointer(handlers.PyTreeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=flax_ckpt.args.PyTreeSave({"step": 1}), force=True)
  restore: flax_ckpt.type_handlers.RestoreArgs = flax_ckpt.ArrayRestoreArgs()
  del leaf, cls, restore
'''

# Mistakes the checker must still report (so the module __getattr__ that serves deprecated
# names does not hide misspelled ones, and metadata's declared type is not Any).
USER_MISTAKES = '''
import flax_ckpt

flax_ckpt.sav("/tmp/x", {})
flax_ckpt.metadata("/tmp/x", 2)
flax_ckpt.metadata.Nope
flax_ckpt.type_handlers.Nope
'''


def _basedpyright() -> str:
  exe = shutil.which("basedpyright")
  if exe is None:
    pytest.skip("basedpyright not installed (it is in the 'test' extra)")
  return exe


def test_package_type_checks(tmp_path):
  # Zero errors, with no baseline of known ones: a baseline file that does not exist keeps
  # basedpyright from reading (or honouring) a .basedpyright/baseline.json written later.
  no_baseline = tmp_path / "no-baseline.json"
  r = subprocess.run([_basedpyright(), "--baselinefile", str(no_baseline)], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and "0 errors" in r.stdout, (
      r.stdout + r.stderr + "\nFix these errors in the code (pyproject.toml `[tool.basedpyright]` "
      "says how). Where the checker or a library's stubs are wrong, use the narrowest fix: a "
      "`typing.cast`, an `assert x is not None` the code already guarantees, or a line-level "
      "`# pyright: ignore[ruleName]  # why`; no baseline and no rule turned off globally.")


def _as_installed(tmp_path: pathlib.Path, code: str) -> subprocess.CompletedProcess:
  """Type-checks ``code`` with flax_ckpt seen as an installed (third-party, py.typed) package.

  That is when the PEP 561 export rules apply: a name imported without ``as`` and left out
  of ``__all__`` is private to its module.
  """
  site = tmp_path / "site"
  site.mkdir()
  (site / "flax_ckpt").symlink_to(ROOT / "flax_ckpt")
  python = tmp_path / "python"  # an interpreter whose sys.path starts with `site`
  pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
  python.write_text(f'#!/bin/sh\nPYTHONPATH="{pythonpath}" exec "{sys.executable}" "$@"\n')
  python.chmod(0o755)
  project = tmp_path / "project"
  project.mkdir()
  (project / "pyrightconfig.json").write_text('{"typeCheckingMode": "standard"}')
  (project / "user.py").write_text(textwrap.dedent(code))
  return subprocess.run([_basedpyright(), "--pythonpath", str(python), "user.py"], cwd=project,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as the interpreter")
def test_public_api_type_checks_for_users(tmp_path):
  r = _as_installed(tmp_path, USER_CODE)
  assert r.returncode == 0 and "0 errors" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="uses a shell script as the interpreter")
def test_checker_still_reports_misspelled_names(tmp_path):
  r = _as_installed(tmp_path, USER_MISTAKES)
  for needle in ['"sav" is not a known attribute of module "flax_ckpt"',
                 "Expected 1 positional argument", 'Cannot access attribute "Nope"',
                 '"Nope" is not a known attribute of module "flax_ckpt.type_handlers"']:
    assert needle in r.stdout, r.stdout + r.stderr
  assert "4 errors" in r.stdout, r.stdout
