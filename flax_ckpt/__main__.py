"""``python -m flax_ckpt``: the ``flax-ckpt`` command line (see docs/cli.md)."""

import sys

from flax_ckpt._src.cli.main import main

if __name__ == "__main__":
  sys.exit(main())
