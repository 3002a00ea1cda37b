"""``flax-ckpt``: the command line entry point (``flax-ckpt`` and ``python -m flax_ckpt``).

Each command lives in a module of this package with its ``add_parsers``; :func:`main`
parses the arguments, runs the command and turns its outcome into an exit status: 0 all
good, 1 a check failed (``verify`` found a problem, ``diff`` a difference), 2 the command
could not run (usage errors, nothing at the path, a held lock ...).

Example:
  >>> import numpy as np, flax_ckpt, tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> flax_ckpt.save(path, {'w': np.ones(2)})
  >>> main(['verify', path, '--json']) == 0  # doctest: +ELLIPSIS
  {...
  True
"""

from __future__ import annotations

import argparse

from flax_ckpt._src import errors
from flax_ckpt._src.cli import check_cmds, common, copy_cmds, inspect_cmds

EXAMPLES = """examples:
  flax-ckpt ls /ckpts/run1                  the steps, latest and best marked
  flax-ckpt show /ckpts/run1/200 --depth 2  the tree, summed two keys deep
  flax-ckpt verify /ckpts/run1              every step checked (exit 1 on a problem)
  flax-ckpt diff /ckpts/a /ckpts/b --values per-leaf differences (exit 1 if any)
  flax-ckpt cp /ckpts/run1/200 s3://bucket/run1/200
  flax-ckpt rm /ckpts/run1 --step 100
  flax-ckpt convert /ckpts/run1/200 /export --to safetensors
Each command has --help with an example; --json prints machine-readable output.
"""


def build_parser() -> argparse.ArgumentParser:
  """The parser of every command."""
  parser = argparse.ArgumentParser(
      prog="flax-ckpt", description="Inspect, check, copy and convert flax_ckpt checkpoints "
      "(local paths, gs:// and s3:// URLs).", epilog=EXAMPLES,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  inspect_cmds.add_parsers(sub)
  check_cmds.add_parsers(sub)
  copy_cmds.add_parsers(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs ``flax-ckpt`` with ``argv`` (default ``sys.argv[1:]``); the exit status.

  Args:
    argv: the arguments after the program name.

  Returns:
    0 all good, 1 a check failed, 2 the command could not run (its error on stderr).
  """
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2): a status, not an exit
    return e.code if isinstance(e.code, int) else common.ERROR
  try:
    return args.run(args)
  except common.CliError as e:
    common.err(str(e))
  except (errors.CheckpointError, OSError, ValueError) as e:
    # the library's own errors say what is wrong and what to do: print them, no traceback
    common.err(f"{type(e).__name__}: {e}")
  except KeyboardInterrupt:
    common.err("interrupted")
    return 130  # as a shell reports a program ended by SIGINT
  return common.ERROR
