"""The docs are tested: every code block of README.md and docs/*.md runs, every benchmark table is
what benchmarks/results gives, every relative link resolves.

A ```python block runs with this interpreter, a ```bash or ```sh block with bash (-e, pipefail),
each in a fresh temporary directory with the checkout on PYTHONPATH and `vqfast` / `python` on PATH.
The fast tier's Python blocks share one interpreter (torch is imported once, not once per block):
each runs in fresh globals and its own directory, so a block that forgets an import still fails;
slow blocks run in a process each.
A block is left out only when the line just above it is one of SKIP_MARKERS (an HTML comment saying
why); SLOW_MARKER runs it in the slow tier. Any other HTML comment in the docs, except the table
markers of benchmarks/plot.py, and any fence in a language outside LANGUAGES fails
test_every_block_is_run_or_marked, so no block can escape by a new marker or a new language.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SKIP_MARKERS = {
    "<!-- not run: needs a GPU -->",
    "<!-- not run: downloads packages -->",
    "<!-- not run: needs files you provide -->",
    "<!-- not run: takes minutes -->",
}
SLOW_MARKER = "<!-- slow -->"
RUN_LANGUAGES = {"python", "bash", "sh"}
LANGUAGES = RUN_LANGUAGES | {"text"}  # text: output and listings, never run
TABLE_MARKER = re.compile(r"<!-- (table: [\w-]+|/table) -->")
COMMENT = re.compile(r"^\s*<!--.*-->\s*$")


@dataclasses.dataclass
class Block:
    path: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse(text: str, path: str = "<text>") -> tuple[list[Block], list[str]]:
    """(code blocks, problems): a problem is an unknown or stray marker, an unknown fence language or an
    unclosed fence."""
    lines = text.splitlines()
    blocks, problems = [], []
    used_markers: set[int] = set()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("```"):
            i += 1
            continue
        language = stripped[3:].strip()
        indent = len(lines[i]) - len(lines[i].lstrip())
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            problems.append(f"{path}:{start + 1}: a fence that is never closed")
            break
        i += 1
        if language not in LANGUAGES:
            problems.append(f"{path}:{start + 1}: fence language {language!r} is not one of {sorted(LANGUAGES)}")
            continue
        above = lines[start - 1].strip() if start > 0 else ""
        marker = None
        if COMMENT.match(above):
            used_markers.add(start - 1)
            if above in SKIP_MARKERS or above == SLOW_MARKER:
                marker = above
            else:
                problems.append(f"{path}:{start}: unknown marker {above!r} above a block; known: "
                                f"{sorted(SKIP_MARKERS | {SLOW_MARKER})}")
        if language == "text":
            if marker is not None:
                problems.append(f"{path}:{start}: marker {marker!r} above a text block, which never runs")
            continue
        blocks.append(Block(path, start + 1, language, "\n".join(body) + "\n", marker))
    for n, line in enumerate(lines):
        if COMMENT.match(line) and n not in used_markers and not TABLE_MARKER.fullmatch(line.strip()):
            problems.append(f"{path}:{n + 1}: {line.strip()!r} is not a table marker and is not just above a code block")
    return blocks, problems


def _all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in DOCS:
        b, p = parse(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
        blocks += b
        problems += p
    return blocks, problems


BLOCKS, PROBLEMS = _all_blocks()


def expected_output(code: str) -> list[str]:
    """The output a Python block promises: full-line comments right after a line that prints (a
    ``print(`` call or ``verbose=True``); each must appear in what the block writes."""
    out, printing = [], False
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith("# ") and printing:
            out.append(stripped[2:])
            continue
        printing = bool(stripped) and not stripped.startswith("#") and ("print(" in stripped or "verbose=True" in stripped)
    return out


def _check_output(block: Block, output: str) -> None:
    missing = [line for line in expected_output(block.code) if line not in output]
    assert not missing, f"{block.id}: the block promises output it did not write: {missing}\n--- output\n{output[-3000:]}"


def _params():
    for block in BLOCKS:
        marks = [pytest.mark.slow] if block.marker == SLOW_MARKER else []
        yield pytest.param(block, id=block.id, marks=marks)


def _environment(tmp_path: Path) -> dict[str, str]:
    """The checkout on PYTHONPATH; `python` and `vqfast` on PATH run this interpreter and this checkout."""
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    for name, command in (("python", f'exec "{sys.executable}" "$@"'), ("vqfast", f'exec "{sys.executable}" -m vqfast "$@"')):
        shim = bin_dir / name
        shim.write_text(f"#!/usr/bin/env bash\n{command}\n")
        shim.chmod(0o755)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    env["MPLBACKEND"] = "Agg"
    return env


def test_every_block_is_run_or_marked():
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert BLOCKS, "no code block found in README.md or docs/"


# Runs the fast Python blocks in one interpreter: argv[1] is a JSON list of [id, code, directory],
# argv[2] the JSON file for {id: [status, output]}.
_SHARED_RUNNER = """
import contextlib, io, json, os, sys, traceback
results = {}
for block_id, code, directory in json.load(open(sys.argv[1])):
    os.chdir(directory)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            exec(compile(code, block_id, "exec"), {"__name__": "__main__"})
        results[block_id] = [0, out.getvalue()]
    except BaseException:
        results[block_id] = [1, out.getvalue() + traceback.format_exc()]
json.dump(results, open(sys.argv[2], "w"))
"""


def _shared(block: Block) -> bool:
    return block.language == "python" and block.marker is None


@pytest.fixture(scope="module")
def shared_python_results(tmp_path_factory):
    """{block id: [exit status, output]} of the fast Python blocks, run in one interpreter."""
    import json

    root = tmp_path_factory.mktemp("docs_blocks")
    todo = []
    for n, block in enumerate(b for b in BLOCKS if _shared(b)):
        directory = root / f"block{n}"
        directory.mkdir()
        todo.append([block.id, block.code, str(directory)])
    (root / "blocks.json").write_text(json.dumps(todo))
    (root / "runner.py").write_text(_SHARED_RUNNER)
    proc = subprocess.run([sys.executable, str(root / "runner.py"), str(root / "blocks.json"), str(root / "results.json")],
                          cwd=root, env=_environment(root), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


@pytest.mark.parametrize("block", list(_params()))
def test_block_runs(block: Block, tmp_path, request):
    if block.marker in SKIP_MARKERS:
        pytest.skip(f"marked {block.marker}")
    if _shared(block):
        status, output = request.getfixturevalue("shared_python_results")[block.id]
        assert status == 0, f"{block.id} (python) failed\n--- block\n{block.code}--- output\n{output[-6000:]}"
        _check_output(block, output)
        return
    work = tmp_path / "work"
    work.mkdir()
    if block.language == "python":
        script = work / "block.py"
        cmd = [sys.executable, str(script)]
    else:
        script = work / "block.sh"
        cmd = ["bash", "-e", "-o", "pipefail", str(script)]
    script.write_text(block.code)
    proc = subprocess.run(cmd, cwd=work, env=_environment(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (f"{block.id} ({block.language}) exited {proc.returncode}\n--- block\n{block.code}"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    if block.language == "python":
        _check_output(block, proc.stdout + proc.stderr)


# ----------------------------------------------------------------------------- the parser itself


def test_parser_runs_unmarked_blocks_and_rejects_unknown_markers():
    text = "\n".join([
        "```python", "print(1)", "```",
        "<!-- slow -->", "```bash", "echo slow", "```",
        "<!-- not run: needs a GPU -->", "```python", "import cuda_only", "```",
        "<!-- not run: I would rather not -->", "```sh", "false", "```",
        "```console", "$ ls", "```",
        "<!-- not run: takes minutes -->",
        "",
        "```text", "output", "```",
    ])
    blocks, problems = parse(text)
    assert [(b.language, b.marker) for b in blocks] == [
        ("python", None), ("bash", SLOW_MARKER), ("python", "<!-- not run: needs a GPU -->"), ("sh", None)]
    assert len(problems) == 3, problems
    assert "unknown marker" in problems[0] and "'console'" in problems[1] and "not just above" in problems[2]


# ----------------------------------------------------------------------------- tables and links


def _plot_module():
    return load_script("benchmarks/plot.py", "benchmarks_plot")


def test_benchmark_tables_match_the_committed_results():
    """`python benchmarks/plot.py --check`: every table between `<!-- table: NAME -->` markers is what
    benchmarks/results gives (regenerated in memory, nothing drawn)."""
    stale = _plot_module().stale_docs()
    assert not stale, ("tables differ from benchmarks/results; run `python benchmarks/plot.py`:\n"
                       + "\n".join(stale.values()))


def test_tables_show_no_record_from_a_dirty_tree():
    plot = _plot_module()
    shown = "\n".join(path.read_text(encoding="utf-8") for path in DOCS)
    for name, render in plot.TABLES.items():
        assert f"<!-- table: {name} -->" in shown, f"table {name!r} is in benchmarks/plot.py but in no doc"
    for m in plot.TABLE_RE.finditer(shown):
        body = m.group("body")
        if "Awaiting a clean re-run" in body:
            body = body.split("Awaiting a clean re-run", 1)[0]
        assert "-dirty" not in body, f"table {m.group('name')} shows a record from a dirty tree"


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_relative_links_resolve():
    problems = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}: link to {target}: no such file")
                continue
            if anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), flags=re.M)}
                if anchor not in slugs:
                    problems.append(f"{path.name}: link to {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_named_paths_and_tests_exist():
    """Every repository path the docs name in `code` (vqfast/..., tests/..., csrc/...) exists, and every
    tests/<file>.py::<test> they cite is defined there."""
    problems = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for code in re.findall(r"`([^`\n]+)`", text):
            for name in re.findall(r"\b(?:vqfast|csrc|tests|benchmarks|scripts|docs|\.ci)/[\w./-]*\w", code):
                if not (ROOT / name).exists():
                    problems.append(f"{path.name}: `{code}` names {name}, which does not exist")
        for file, test in re.findall(r"\b(test_\w+\.py)::(test_\w+)", text):
            source = ROOT / "tests" / file
            if not source.exists() or not re.search(rf"def {test}\b", source.read_text(encoding="utf-8")):
                problems.append(f"{path.name}: cites tests/{file}::{test}, which is not defined")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_the_commands_come_first():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; docs/ holds the rest"
    first_screen = "\n".join(lines[:50])
    for command in ("python scripts/install.py && vqfast train --preset demo",
                    "python scripts/install.py --test && python -m pytest tests -q --durations=20"):
        assert command in first_screen, f"{command!r} is not on the README's first screen"
    assert "No GPU has ever run" in "\n".join(lines[:15]), "the GPU status belongs in the README's first lines"


def test_expected_output_is_the_comments_after_a_print():
    code = "x = 1\nprint(x)\n# 1\n# and 2\ny = 2  # not output\n# a note, not after a print\nf(verbose=True)\n# f: done\n"
    assert expected_output(code) == ["1", "and 2", "f: done"]


def test_shared_runner_gives_each_block_fresh_globals(tmp_path):
    """A block that relies on an earlier block's import fails in the shared interpreter too."""
    import json

    blocks = [["a", "import json\nprint(json.dumps(1))\n", str(tmp_path)], ["b", "print(json.dumps(2))\n", str(tmp_path)],
              ["c", "open('here.txt', 'w').write('x')\n", str(tmp_path)]]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(_SHARED_RUNNER)
    subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json"), str(tmp_path / "out.json")],
                   check=True, timeout=60)
    results = json.loads((tmp_path / "out.json").read_text())
    assert [results[k][0] for k in "abc"] == [0, 1, 0]
    assert results["a"][1] == "1\n" and "NameError" in results["b"][1] and (tmp_path / "here.txt").exists()
