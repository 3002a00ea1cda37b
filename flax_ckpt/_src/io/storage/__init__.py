"""The storage layer: where checkpoints live and how their bytes move.

Backends are objects (:class:`StorageBackend`), chosen once per save or load by
:func:`backend_for`:

* ``posix.py``: buffered ``pwritev`` writer, coalescing ``preadv`` reader, and
  :class:`CheckpointFiles` (a directory-fd reader that one overwrite cannot tear);
* ``direct.py``: the O_DIRECT writer for background saves;
* ``kvstore.py``: the tensorstore kvstore backend for local paths;
* ``objstore.py`` (bytes), ``objcommit.py`` (the backend and its commit protocol) and
  ``cloud.py`` (URLs, specs from the clouds' environment, errors): ``s3://`` and ``gs://``.

See docs/format.md for the file layout.
"""

from __future__ import annotations

from flax_ckpt._src.io.storage.backend import BACKEND_ENV as BACKEND_ENV
from flax_ckpt._src.io.storage.backend import BACKENDS as BACKENDS
from flax_ckpt._src.io.storage.backend import CheckpointDir as CheckpointDir
from flax_ckpt._src.io.storage.backend import DataWriter as DataWriter
from flax_ckpt._src.io.storage.backend import StorageBackend as StorageBackend
from flax_ckpt._src.io.storage.backend import backend_for as backend_for
from flax_ckpt._src.io.storage.backend import backend_name as backend_name
from flax_ckpt._src.io.storage.buffers import ALIGN as ALIGN
from flax_ckpt._src.io.storage.buffers import READ_STATS as READ_STATS
from flax_ckpt._src.io.storage.buffers import aligned_empty as aligned_empty
from flax_ckpt._src.io.storage.buffers import as_bytes_view as as_bytes_view
from flax_ckpt._src.io.storage.buffers import flat_bytes as flat_bytes
from flax_ckpt._src.io.storage.checksums import bad_blocks as bad_blocks
from flax_ckpt._src.io.storage.checksums import read_and_verify as read_and_verify
from flax_ckpt._src.io.storage.checksums import (
    start_read_and_verify as start_read_and_verify,
)
from flax_ckpt._src.io.storage.checksums import verify_all as verify_all
from flax_ckpt._src.io.storage.checksums import verify_reads as verify_reads
from flax_ckpt._src.io.storage.checksums import verifying as verifying
from flax_ckpt._src.io.storage.direct import DirectWriter as DirectWriter
from flax_ckpt._src.io.storage.kvstore import kvstore_spec as kvstore_spec
from flax_ckpt._src.io.storage.posix import BufferedWriter as BufferedWriter
from flax_ckpt._src.io.storage.posix import CheckpointFiles as CheckpointFiles

