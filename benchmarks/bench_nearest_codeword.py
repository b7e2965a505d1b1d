"""Question 1: nearest-codeword forward over a grid of (N, D, K) and dtypes.

    pytest benchmarks/bench_nearest_codeword.py --vq-preset quick
    python benchmarks/bench_nearest_codeword.py --preset quick     # table + results/forward_<device>.jsonl
"""
import sys

import pytest
import torch

from vqfast.bench import forward, providers
from vqfast.bench.results import available_memory_bytes
from vqfast.testing import oracle


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
    rows = oracle.sample_rows(forward_case["n"], forward_case["k"], forward_case["d"])
    answer = forward.oracle_answer(z, codebook, rows)  # the float64 oracle, not vqfast's own search
    with torch.no_grad():
        idx, _ = fn(z, codebook)
        picked = idx[rows.to(idx.device)]
        wrong = forward.wrong_rows(prov, answer, picked, z[rows.to(z.device)], codebook)
        benchmark.extra_info.update(provider=prov.name, group=prov.group, wrong_rows=wrong,
                                    index_mismatch=oracle.mismatch_fraction(answer, picked), **forward_case)
        assert not wrong, f"{prov.name}: {wrong} of {rows.numel()} checked rows break its {prov.precision} contract"
        timed(lambda: fn(z, codebook))


if __name__ == "__main__":
    from vqfast.bench import cli

    sys.exit(cli.standalone("forward", sys.argv[1:]))
