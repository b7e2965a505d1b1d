"""Question 2: a training step (forward + backward + SGD step) of VQ and residual VQ.

    pytest benchmarks/bench_train_step.py --vq-preset quick
    python benchmarks/bench_train_step.py --preset quick     # table + results/train_step_<device>.jsonl
"""
import sys

import pytest
import torch

from vqfast.bench import providers, train_step
from vqfast.bench.results import available_memory_bytes


def test_train_step(timed, benchmark, train_case, train_provider, device):
    prov, make, residual = next(t for t in providers.train_providers(device) if t[0].name == train_provider)
    if residual != train_case["residual"]:
        pytest.skip("single-stage provider on a residual case, or the reverse")
    reason = prov.reason(device, torch.float32)
    if reason is not None:
        pytest.skip(reason)
    need = prov.working_bytes(train_case["n"], train_case["k"], train_case["d"], torch.float32)
    if need > train_step.MEMORY_SHARE * available_memory_bytes(device):
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB of working memory")
    torch.manual_seed(0)
    module = make(train_case["stages"], train_case["k"], train_case["d"]).to(device)
    benchmark.extra_info.update(provider=prov.name, group=prov.group, **train_case)
    timed(providers.train_step_fn(module, train_step.make_input(train_case, device)))


if __name__ == "__main__":
    from vqfast.bench import cli

    sys.exit(cli.standalone("train_step", sys.argv[1:]))
