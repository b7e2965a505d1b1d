import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("VQFAST_NO_EXT_WARNING", "0")

# Hypothesis. Without --slow (the README's test command): the "ci" profile, the same examples on every
# run (derandomize) and no example database. `pytest --slow` draws ten times as many examples
# (tests/helpers.py: examples()): at random seeds on a developer's machine ("slow"), but still
# derandomized where the CI variable is set ("slow-ci"; CI runners set CI=true), so that a CI run of
# the slow tier is repeatable.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, database=None, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("slow", derandomize=False, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("slow-ci", derandomize=True, database=None, deadline=None, suppress_health_check=_QUIET)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def hypothesis_profile(slow: bool) -> str:
    if not slow:
        return "ci"
    return "slow-ci" if in_ci() else "slow"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run the tests marked slow and ten times the hypothesis examples (at random seeds "
                          "unless the CI variable is set)")


def pytest_configure(config):
    slow = config.getoption("--slow")
    settings.load_profile(hypothesis_profile(slow))
    # Set either way, so that a pytest started by a test (tests/test_mutations.py) follows its own
    # command line, not the --slow of the run that started it.
    os.environ["VQFAST_SLOW_TESTS"] = "1" if slow else "0"
    # tests/test_mutations.py runs parts of this suite with one planted bug applied (in memory).
    planted = os.environ.get("VQFAST_MUTATION")
    if planted:
        from tests import mutations

        if planted not in mutations.MUTATIONS:
            raise pytest.UsageError(f"VQFAST_MUTATION={planted!r} is not one of {sorted(mutations.MUTATIONS)}")
        mutations.MUTATIONS[planted].apply()


@pytest.fixture(scope="session")
def bench_cli(tmp_path_factory):
    """`vqfast bench --preset tiny --device cpu` run once, as a user runs it, into a fresh results folder:
    (CompletedProcess, results folder). tests/test_entrypoints.py checks the command, tests/test_bench.py
    the records it appended."""
    results = tmp_path_factory.mktemp("bench_results")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), VQFAST_NO_EXT_WARNING="1")
    cmd = [sys.executable, "-m", "vqfast", "bench", "--preset", "tiny", "--device", "cpu",
           "--results-dir", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=1200)
    return proc, results


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="a long sweep: run with --slow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)


# Under VQFAST_MUTATION: which tests failed, and with what (tests/test_mutations.py accepts only a
# failed assertion, never a crash of the planted code itself).
_CAUGHT: list[str] = []


def _leaf_types(exc: BaseException) -> set[str]:
    if isinstance(exc, BaseExceptionGroup):
        return set().union(*(_leaf_types(e) for e in exc.exceptions))
    return {type(exc).__name__}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if os.environ.get("VQFAST_MUTATION") and call.excinfo is not None and call.when == "call":
        _CAUGHT.append(f"{item.nodeid} ({'+'.join(sorted(_leaf_types(call.excinfo.value)))})")


def pytest_terminal_summary(terminalreporter):
    from tests.helpers import FAST_MISMATCH

    for line in _CAUGHT:
        terminalreporter.write_line(f"planted bug caught by: {line}")
    if FAST_MISMATCH:
        parts = [f"{key}: index differs on {differ}/{rows} rows ({differ / rows:.2%}), distance above the "
                 f"minimum on {above} ({above / rows:.2%})"
                 for key, (differ, above, rows) in sorted(FAST_MISMATCH.items())]
        terminalreporter.write_line("fast precision against the oracle, " + "; ".join(parts))
