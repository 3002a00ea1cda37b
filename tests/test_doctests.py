"""The examples in the public API's docstrings run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import flax_ckpt

_MODULES = ["flax_ckpt", "flax_ckpt.args", "flax_ckpt.metadata", "flax_ckpt.policies",
            "flax_ckpt.type_handlers"] + [
    m.name for m in pkgutil.walk_packages(flax_ckpt._src.__path__, "flax_ckpt._src.")]


@pytest.mark.parametrize("name", _MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0
