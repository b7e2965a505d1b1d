"""Question 4: peak memory of the nearest-codeword forward and of one training step.

pytest-benchmark records time, so here each case's peaks (one subprocess per provider on CPU,
max_memory_allocated on CUDA) go into extra_info of a single timed measuring pass.

    pytest benchmarks/bench_memory.py --vq-preset quick
    python benchmarks/bench_memory.py --preset quick     # table + results/memory_<device>.jsonl
"""
import sys

from vqfast.bench import memory


def test_peak_memory(benchmark, memory_case, preset, device):
    records = benchmark.pedantic(
        lambda: memory.run(preset, device, {}, log=lambda *a, **k: None, case_list=[memory_case]), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        {r["provider"]: (r["value"] if r["status"] == "ok" else f"skipped: {r['reason']}") for r in records},
        **memory_case)
    assert records and all(r["status"] == "skipped" or r["value"] >= 0 for r in records)


if __name__ == "__main__":
    from vqfast.bench import cli

    sys.exit(cli.standalone("memory", sys.argv[1:]))
