"""The whole-object extension point: :class:`CheckpointHandler` and its async variant.

A handler saves one object into a directory it is given and restores it from there. It
never deals with atomicity: the caller (``Checkpointer``, ``save_checkpointables``) hands it
a directory inside the temporary checkpoint and commits only after the handler finished.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, Protocol, runtime_checkable

from etils import epath

from flax_ckpt._src.parts.handlers import CheckpointArgs


@runtime_checkable
class CheckpointHandler(Protocol):
  """Saves and restores one object in a directory, driven by :class:`CheckpointArgs`.

  Subclass it (or write a class with the same methods) and bind your args classes to it
  with :func:`flax_ckpt.args.register_with_handler`. ``save`` is called with an existing,
  empty directory inside the temporary checkpoint; in a multi-process job only process 0
  calls it (read ``jax.process_index()`` yourself if every process must write; set the
  class attribute ``save_on_all_processes = True`` to be called on every process).
  ``restore`` is called on every process.

  Example:
    >>> import dataclasses, flax_ckpt, tempfile, os
    >>> class TextHandler(flax_ckpt.CheckpointHandler):
    ...   def save(self, directory, args):
    ...     (directory / 'text.txt').write_text(args.text)
    ...   def restore(self, directory, args=None):
    ...     return (directory / 'text.txt').read_text()
    >>> @flax_ckpt.args.register_with_handler(TextHandler, for_save=True)
    ... @dataclasses.dataclass
    ... class TextSave(flax_ckpt.args.CheckpointArgs):
    ...   text: str
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> flax_ckpt.Checkpointer(TextHandler()).save(path, TextSave('hello'))
    >>> flax_ckpt.Checkpointer(TextHandler()).restore(path)
    'hello'
  """

  @abc.abstractmethod
  def save(self, directory: epath.Path, args: CheckpointArgs) -> None:
    """Writes the object described by ``args`` into ``directory`` (which exists)."""

  @abc.abstractmethod
  def restore(self, directory: epath.Path, args: CheckpointArgs | None = None) -> Any:
    """Reads the object back from ``directory``."""

  def metadata(self, directory: epath.Path) -> Any:
    """Describes the saved object cheaply (default: None)."""
    return None

  def close(self) -> None:
    """Releases resources (thread pools, files); default: nothing to release."""


@runtime_checkable
class AsyncCheckpointHandler(CheckpointHandler, Protocol):
  """A handler whose save continues in the background.

  ``async_save`` (a coroutine function or a plain function) copies whatever the caller may
  change afterwards, starts the rest of the work and returns a list of futures
  (``concurrent.futures.Future``, asyncio futures or awaitables). The caller waits for those
  futures in a background thread before committing; ``save`` must still save synchronously.

  Example:
    >>> import asyncio, concurrent.futures, dataclasses, flax_ckpt
    >>> class SlowText(flax_ckpt.AsyncCheckpointHandler):
    ...   def __init__(self):
    ...     self._pool = concurrent.futures.ThreadPoolExecutor(1)
    ...   def _write(self, directory, text):
    ...     (directory / 'text.txt').write_text(text)
    ...   async def async_save(self, directory, args):
    ...     return [self._pool.submit(self._write, directory, args.text)]
    ...   def save(self, directory, args):
    ...     self._write(directory, args.text)
    ...   def restore(self, directory, args=None):
    ...     return (directory / 'text.txt').read_text()
    ...   def close(self):
    ...     self._pool.shutdown()
  """

  @abc.abstractmethod
  def async_save(self, directory: epath.Path, args: CheckpointArgs) -> Any:
    """Starts saving; returns a list of futures the caller waits for before committing."""


def call_with_args(method: Any, directory: epath.Path, args: Any) -> Any:
  """Calls a handler's ``save``/``restore``/``async_save`` the way it was written for.

  Handlers written for Orbax take ``(directory, item=None, args=None)`` or a keyword-only
  ``args``; they get ``args=`` by name. Others get it as the second positional argument.
  """
  try:
    params = inspect.signature(method).parameters
  except (TypeError, ValueError):
    return method(directory, args)
  p = params.get("args")
  if p is not None:
    positional = [q for q in params.values()
                  if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 and positional[1].name == "args":
      return method(directory, args)
    return method(directory, args=args)
  return method(directory, args)
