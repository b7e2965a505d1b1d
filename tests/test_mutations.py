"""Planted bugs must be caught by the fast tier: each mutation of tests/mutations.py is applied in
memory to a fresh pytest process (VQFAST_MUTATION, read by tests/conftest.py) that runs the tests
listed for it, stopping at the first failure. A run that passes means the suite lets that bug through
("survives"); a run that fails anywhere but in a test's assertion (the planted code crashing, a
collection error, no test selected) is itself a failure here.

Those pytest processes run WITHOUT --slow, as the README's test command does: a planted bug must be
caught by the default (fast) tier, so a listed test that is marked slow is skipped there and cannot
catch anything. Starting about thirteen pytest processes is itself slow, so this file runs only
under --slow.

The mutations are of two kinds (tests/mutations.py says how each works):
  - simulated CPU kernel bugs: the cpu backend's op is wrapped, and its real outputs are corrupted in
    Python the way a kernel bug would corrupt them (second-nearest on 1 % of rows, exact mode run as
    fast mode i.e. without the float64 re-rank, wrong picks on near ties, the highest index on ties,
    codewords off by 1e-3, distances from the cancelling expansion, fast mode 10 % wrong). The C++
    kernel itself is not edited; these prove that the tests look closely enough at every output the
    kernel returns to see such a bug.
  - Python source mutations: the torch backend's reference search without its re-rank, the module
    loss (beta on the wrong term), EMA (Laplace smoothing off), dead-code restarts (<= for <) and the
    benchmark (mismatches against vqfast itself, a crash not failing the run).
"""
import os
import subprocess
import sys

import pytest

from tests.mutations import MUTATIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_with(name: str | None, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VQFAST_MUTATION", None)
    if name is not None:
        env["VQFAST_MUTATION"] = name
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_planted_bug_is_caught(name):
    mutation = MUTATIONS[name]
    out = _run_with(name, mutation.tests)
    tail = (out.stdout[-3000:] + out.stderr[-1500:]).strip()
    # pytest exits 1 when tests failed; 0 means the bug survived; anything else (2 collection error,
    # 4 usage error, 5 no tests) means the mutation or its test selection is broken.
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    hint = ("; the run has no --slow, so a test marked slow is skipped: the fast tier must catch every planted bug"
            if "skipped" in summary else "")
    assert out.returncode != 0, f"planted bug survived ({summary}{hint}): {mutation.what}\n{tail}"
    assert out.returncode == 1 and " failed" in out.stdout, f"the run did not fail on a test:\n{tail}"
    # The failure must be a test's assertion (or pytest.fail), not the planted code crashing.
    caught = [line for line in out.stdout.splitlines() if line.startswith("planted bug caught by: ")]
    assert caught and all(line.endswith(("(AssertionError)", "(Failed)")) for line in caught), tail


@pytest.mark.slow
def test_unknown_mutation_is_a_usage_error():
    out = _run_with("no-such-mutation", ("tests/test_readme.py",))
    assert out.returncode == 4 and "no-such-mutation" in out.stderr + out.stdout
