"""Question 1: nearest-codeword forward over a grid of (N, D, K) and dtypes.

    pytest benchmarks/bench_nearest_codeword.py --vq-preset quick
    python benchmarks/bench_nearest_codeword.py --preset quick     # table + results/forward_<device>.jsonl
"""
import sys

import pytest
import torch

import vqfast
from vqfast.bench import forward, providers
from vqfast.bench.results import available_memory_bytes


def test_nearest_codeword(timed, benchmark, forward_case, forward_provider, preset, device):
    prov, fn = next((p, f) for p, f in providers.forward_providers(device, preset.precisions) if p.name == forward_provider)
    dtype = forward.DTYPES[forward_case["dtype"]]
    reason = prov.reason(device, dtype)
    if reason is not None:
        pytest.skip(reason)
    need = prov.working_bytes(forward_case["n"], forward_case["k"], forward_case["d"], dtype)
    if need > forward.MEMORY_SHARE * available_memory_bytes(device):
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB of working memory")
    z, codebook = forward.make_inputs(forward_case, device)
    with torch.no_grad():
        exact_idx = vqfast.nearest_codeword(z, codebook)[0]
        idx, _ = fn(z, codebook)
        mismatch = float((idx.to(exact_idx.device) != exact_idx).double().mean())
        benchmark.extra_info.update(provider=prov.name, group=prov.group, index_mismatch=mismatch, **forward_case)
        if prov.group == "vqfast" and prov.precision == "exact":
            assert mismatch == 0.0
        timed(lambda: fn(z, codebook))


if __name__ == "__main__":
    from vqfast.bench import cli

    sys.exit(cli.standalone("forward", sys.argv[1:]))
