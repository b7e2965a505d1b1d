"""pytest-benchmark suite: ``pytest benchmarks/ [--vq-preset quick|full|tiny]``.

Not part of the default test run (pyproject's testpaths is tests/). The files here are named
bench_*.py, one per question, and are collected by the hook below; each also runs standalone
(``python benchmarks/bench_<question>.py --preset quick``) through the same runner as ``vqfast bench``.
Cases and providers come from vqfast.bench.presets and vqfast.bench.providers, so both entry
points measure the same things.
"""
import pytest
import torch

from vqfast.bench import forward, memory, providers, train_step
from vqfast.bench.presets import PRESETS, get_preset


def pytest_addoption(parser):
    parser.addoption("--vq-preset", default="quick", choices=tuple(PRESETS), help="vqfast benchmark preset")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _label(case: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


def pytest_generate_tests(metafunc):
    preset = get_preset(metafunc.config.getoption("--vq-preset"))
    device = _device()
    if "forward_case" in metafunc.fixturenames:
        cs = forward.cases(preset)
        metafunc.parametrize("forward_case", cs, ids=[_label(c) for c in cs])
    if "forward_provider" in metafunc.fixturenames:
        names = [p.name for p, _ in providers.forward_providers(device, preset.precisions)
                 if preset.forward_providers is None or p.name in preset.forward_providers]
        metafunc.parametrize("forward_provider", names)
    if "train_case" in metafunc.fixturenames:
        cs = train_step.cases(preset)
        metafunc.parametrize("train_case", cs, ids=[_label(c) for c in cs])
    if "train_provider" in metafunc.fixturenames:
        metafunc.parametrize("train_provider", [p.name for p, _, _ in providers.train_providers(device)])
    if "memory_case" in metafunc.fixturenames:
        cs = memory.cases(preset)
        metafunc.parametrize("memory_case", cs, ids=[_label(c) for c in cs])


@pytest.fixture
def preset(request):
    return get_preset(request.config.getoption("--vq-preset"))


@pytest.fixture
def device():
    return _device()


@pytest.fixture
def timed(benchmark, preset, device):
    """benchmark.pedantic with the preset's warm-up and rounds; synchronises CUDA after each call."""

    def run(fn):
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        return benchmark.pedantic(call, rounds=preset.repeats, warmup_rounds=preset.warmup, iterations=1)

    return run
