"""The code keeps the shape docs/design.md draws: layers, sizes, private names.

- Imports point down the layers (format and encoding -> storage -> tree and leaves -> parts
  -> engine -> API -> training), never up, including imports inside functions.
- No module reads another module's underscore names.
- No module over 500 lines and no function over 60 lines of code (docstrings, comments and
  blank lines not counted), except the ones listed here with the reason.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "flax_ckpt"
SRC = ROOT / "_src"

# rank of each layer: a module may import its own rank or lower ones
LAYERS = {
    "errors": 0, "format": 0, "env": 0,
    "encoding": 1,
    "io": 2,
    "tree": 3, "leaves": 4,
    "parts": 5,
    "engine": 6,
    "api": 7, "checkpointer": 7, "registration": 7, "interop": 7,
    "training": 8,
    "cli": 9,  # the flax-ckpt command line: on top of everything
}
PUBLIC = 9  # flax_ckpt/*.py

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# functions allowed to be longer, with the reason (none today)
LONG_FUNCTIONS: dict[str, str] = {}


def _modules():
  return sorted(p for p in ROOT.rglob("*.py"))


def _dotted(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _rank(dotted: str) -> int | None:
  parts = dotted.split(".")
  if parts[:2] != ["flax_ckpt", "_src"]:
    return PUBLIC if parts[0] == "flax_ckpt" else None
  if len(parts) == 2:
    return 0
  return LAYERS[parts[2]]


def _imports(tree: ast.AST):
  """(module imported, names imported from it, line) for every flax_ckpt import."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flax_ckpt"):
      yield node.module, [a.name for a in node.names], node.lineno
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("flax_ckpt"):
          yield a.name, [], node.lineno


def _is_module(dotted: str) -> bool:
  p = ROOT.parent / pathlib.Path(*dotted.split("."))
  return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_and_no_private_names(path):
  me = _dotted(path)
  my_rank = _rank(me)
  tree = ast.parse(path.read_text())
  bad = []
  module_aliases = {}
  for module, names, line in _imports(tree):
    targets = [module] + [f"{module}.{n}" for n in names if _is_module(f"{module}.{n}")]
    for t in targets:
      r = _rank(t)
      if r is not None and my_rank is not None and r > my_rank:
        bad.append(f"line {line}: {me} (layer {my_rank}) imports {t} (layer {r})")
    for n in names:
      if _is_module(f"{module}.{n}"):
        module_aliases[n] = f"{module}.{n}"
      elif n.startswith("_") and not n.startswith("__") and module != me:
        bad.append(f"line {line}: imports the private name {module}.{n}")
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in module_aliases and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      bad.append(f"line {node.lineno}: reads {module_aliases[node.value.id]}.{node.attr}")
  assert not bad, "\n".join(bad)


def _code_lines(fn: ast.AST, source: list[str]) -> int:
  body = fn.body
  start = body[0].lineno
  if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)):
    start = body[0].end_lineno + 1
  lines = source[start - 1:fn.end_lineno]
  return sum(1 for s in lines if s.strip() and not s.strip().startswith("#"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_sizes(path):
  text = path.read_text()
  source = text.splitlines()
  assert len(source) <= MAX_MODULE_LINES, f"{path.name}: {len(source)} lines"
  long = []
  for node in ast.walk(ast.parse(text)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = _code_lines(node, source)
      key = f"{_dotted(path)}.{node.name}"
      if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
        long.append(f"{key} (line {node.lineno}): {n} lines of code")
  assert not long, "\n".join(long)
