"""Every ``python`` code block in README.md and docs/*.md runs as written (issue 16).

Each runnable block is run as a script in a fresh subprocess on one CPU device (no
``XLA_FLAGS`` device count), with a fresh temporary directory as its working directory, and
then run a second time in that same directory: a block that leaves a fixed path behind
(``/tmp/ckpt`` without ``overwrite=True``) fails the second time.

An HTML comment on the line before a block's fence (blank lines allowed in between) changes
how it is run:

- ``<!-- snippet: skip (why) -->``: not run; the reason is required (a signature, a format
  layout, something that needs a server or several processes).
- ``<!-- snippet: continue -->``: run after the previous runnable block(s) of the same file,
  as one script (a block that builds on the one before it).
- ``<!-- snippet: devices=8 -->``: run with 8 simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``); the text must say so.

A block must not warn from its own lines (warnings raised inside libraries are not counted).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip\s*\((.*)\)$")
DEVICES = re.compile(r"^devices=(\d+)$")
TIMEOUT_S = 240
RUNS = 2  # twice in a row, in the same working directory


def _doc_files() -> list[pathlib.Path]:
  return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclasses.dataclass(frozen=True)
class Block:
  file: str  # relative to the repository
  line: int  # of the opening fence
  code: str
  directive: str | None  # the snippet marker's text, if any

  @property
  def id(self) -> str:
    return f"{self.file}:{self.line}"

  @property
  def skip_reason(self) -> str | None:
    m = SKIP.match(self.directive or "")
    return m.group(1).strip() if m else None

  @property
  def devices(self) -> int:
    m = DEVICES.match(self.directive or "")
    return int(m.group(1)) if m else 1


def _blocks(path: pathlib.Path) -> list[Block]:
  """The ``python`` fenced blocks of a markdown file, with the snippet marker before each."""
  lines = path.read_text().splitlines()
  out: list[Block] = []
  i = 0
  while i < len(lines):
    fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*(\S*)", lines[i])
    if not fence:
      i += 1
      continue
    indent, ticks, lang = fence.groups()
    start = i
    i += 1
    body = []
    while i < len(lines) and not lines[i].strip().startswith(ticks):
      body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
      i += 1
    i += 1  # the closing fence
    if lang not in ("python", "py"):
      continue
    j = start - 1
    while j >= 0 and not lines[j].strip():
      j -= 1
    m = MARKER.match(lines[j].strip()) if j >= 0 else None
    out.append(Block(str(path.relative_to(REPO)), start + 1, "\n".join(body) + "\n",
                     m.group(1) if m else None))
  return out


def _all_blocks() -> list[Block]:
  return [b for f in _doc_files() for b in _blocks(f)]


def _script(block: Block) -> str:
  """The block's code, after the previous runnable blocks it continues, if marked so."""
  same_file = [b for b in _all_blocks() if b.file == block.file]
  chain = [block]
  k = same_file.index(block)
  while chain[0].directive == "continue":
    k -= 1
    while k >= 0 and same_file[k].skip_reason is not None:
      k -= 1
    assert k >= 0, f"{block.id}: 'continue' with no runnable block before it"
    chain.insert(0, same_file[k])
  return "\n".join(f"# --- {b.id}\n{b.code}" for b in chain)


def _run(block: Block) -> list[subprocess.CompletedProcess]:
  """Runs the block RUNS times in one fresh working directory; stops at a failure."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env["PYTHONWARNINGS"] = "default"  # shown once each, so that the test sees the block's own
  if block.devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={block.devices}"
  results = []
  with tempfile.TemporaryDirectory(prefix="doc_snippet_") as d:
    script = pathlib.Path(d) / "snippet.py"
    script.write_text(_script(block))
    cwd = pathlib.Path(d) / "cwd"
    cwd.mkdir()
    env["TMPDIR"] = str(cwd)  # tempfile's paths go away with the directory
    for _ in range(RUNS):
      r = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
      results.append(r)
      if r.returncode != 0:
        break
  return results


BLOCKS = _all_blocks()
RUNNABLE = [b for b in BLOCKS if b.skip_reason is None]


def test_the_docs_hold_python_blocks():
  files = {b.file for b in BLOCKS}
  assert {"README.md", "docs/format.md", "docs/migrating_from_orbax.md"} <= files
  assert len(RUNNABLE) >= 6


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_snippet_marker_is_known_and_a_skip_says_why(path):
  lines = path.read_text().splitlines()
  for n, line in enumerate(lines, 1):
    m = MARKER.match(line.strip())
    if line.strip().startswith("<!--") and "snippet" in line and not m:
      pytest.fail(f"{path.name}:{n}: malformed snippet marker {line.strip()!r}")
    if not m:
      continue
    d = m.group(1)
    skip = SKIP.match(d)
    if d.startswith("skip"):
      assert skip and skip.group(1).strip(), \
          f"{path.name}:{n}: a skip needs a reason: <!-- snippet: skip (why) -->"
    else:
      assert d == "continue" or DEVICES.match(d), f"{path.name}:{n}: unknown marker {d!r}"
    nxt = next((x for x in lines[n:] if x.strip()), "")
    assert re.match(r"^\s*(`{3,}|~{3,})\s*(python|py)\b", nxt), \
        f"{path.name}:{n}: a snippet marker must come right before a ```python fence"


def test_skips_are_rare():
  skipped = [b.id for b in BLOCKS if b.skip_reason is not None]
  assert len(skipped) <= len(BLOCKS) // 3, f"too many skipped blocks: {skipped}"


def test_eight_device_blocks_say_how_to_get_eight_devices():
  for b in BLOCKS:
    if b.devices > 1:
      text = (REPO / b.file).read_text()
      assert "xla_force_host_platform_device_count" in text, \
          f"{b.id} needs {b.devices} devices but {b.file} does not say how to simulate them"


def _readme_loop() -> Block:
  loops = [b for b in BLOCKS if b.file == "README.md" and "CheckpointManager(" in b.code
           and "for step in" in b.code]
  assert len(loops) == 1, "README.md holds one training-loop snippet"
  return loops[0]


def test_the_readme_training_loop_does_what_the_examples_do():
  code = _readme_loop().code
  assert _readme_loop().skip_reason is None
  # restores the data iterator with the state, not just the state
  assert re.search(r"\.restore\(.*dataset=", code), "restore() without dataset="
  assert re.search(r"\.save\([^)]*dataset=", code), "save() without dataset="
  # saves the final step, whatever the save interval says
  assert re.search(r"\.save\([^)]*force=", code), "the final step is not forced"
  # handles preemption: save (forced), wait, stop
  assert "reached_preemption(" in code and "wait_until_finished()" in code
  assert "best_fn" not in code or "best_mode" in code


# Runs every runnable block in a thread pool (two at a time) the first time one is asked
# for; each test then waits for its own block. Only the selected tests' blocks run.
_POOL_LOCK = threading.Lock()
_FUTURES: dict[str, concurrent.futures.Future] = {}


@pytest.fixture(scope="module")
def snippet_runs(request):
  selected = {item.callspec.params["block"].id for item in request.session.items
              if getattr(item, "callspec", None) and "block" in item.callspec.params}
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
  with _POOL_LOCK:
    for b in RUNNABLE:
      if b.id in selected:
        _FUTURES[b.id] = pool.submit(_run, b)
  yield _FUTURES
  pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow  # starts subprocesses
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_the_block_runs_twice_in_a_row(block, snippet_runs):
  results = snippet_runs[block.id].result()
  for n, r in enumerate(results, 1):
    assert r.returncode == 0, (f"{block.id} failed on run {n} of {RUNS} "
                               f"(status {r.returncode}):\n{_script(block)}\n"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}")
  assert len(results) == RUNS
  own = sorted({m.group(0) for r in results
                for m in re.finditer(r"snippet\.py:\d+: \w*Warning\b.*", r.stderr)})
  assert not own, f"{block.id} warns:\n" + "\n".join(own)


def _loop_script(kill_at: int | None) -> str:
  """The README loop with its workdir from argv, a SIGTERM sent to itself after step
  ``kill_at``, and the final params and saved steps printed."""
  lines = _readme_loop().code.splitlines()
  wd = [i for i, x in enumerate(lines) if re.match(r"^num_steps, workdir = \d+, tempfile", x)]
  step = [i for i, x in enumerate(lines) if "= train_step(state, next(data))" in x]
  assert len(wd) == 1 and len(step) == 1, "the README loop changed: update this test"
  lines[wd[0]] = lines[wd[0]].replace("tempfile.mkdtemp()", "sys.argv[1]")
  indent = re.match(r"^\s*", lines[step[0]]).group(0)
  if kill_at is not None:
    lines.insert(step[0] + 1, f"{indent}if step == {kill_at}: "
                              "os.kill(os.getpid(), signal.SIGTERM)")
  return "\n".join(["import os, signal, sys", *lines,
                    "print('PARAMS', [np.asarray(x).tobytes().hex() "
                    "for x in jax.tree.leaves(params)])",
                    "print('STEPS', flax_ckpt.CheckpointManager(workdir, "
                    "read_only=True).all_steps())", ""])


@pytest.mark.slow  # starts subprocesses
def test_the_readme_loop_resumes_exactly_after_sigterm(tmp_path):
  """Preempted at step 130 and run again, the README loop ends bitwise where an
  uninterrupted run does: it saved step 130 on SIGTERM, restored the data iterator with the
  state, and saved the final step."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

  def run(kill_at, workdir):
    script = tmp_path / f"loop_{kill_at}.py"
    script.write_text(_loop_script(kill_at))
    r = subprocess.run([sys.executable, str(script), str(workdir)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-6000:]}"
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines()
               if line.startswith(("PARAMS ", "STEPS ")))
    return out["PARAMS"], ast.literal_eval(out["STEPS"])

  straight, straight_steps = run(None, tmp_path / "straight")
  _, preempted_steps = run(130, tmp_path / "preempted")
  assert preempted_steps[-1] == 130, preempted_steps  # saved on SIGTERM, then stopped
  resumed, resumed_steps = run(None, tmp_path / "preempted")
  assert straight_steps[-1] == resumed_steps[-1] == 250  # the final step is saved
  assert resumed == straight, "the resumed run does not end where the uninterrupted one does"
