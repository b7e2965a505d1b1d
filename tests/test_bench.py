"""The benchmark runner's machinery on the tiny preset: records, ratios, tables, results files.

No timing is asserted (timings depend on the machine); what is checked is that every provider
finds the same codewords as the float64 oracle, that a wrong kernel or a crashing provider fails the
run (it cannot be reported as correct, or as skipped), that ratios are the quotients they claim to
be, that skips carry reasons, and that the files and tables hold what the runner measured.
"""
import argparse
import json
from pathlib import Path

import pytest
import torch

import vqfast
from tests import mutations
from tests.helpers import load_script
from vqfast import ops
from vqfast.bench import cli, forward, memory, presets, providers, results, table, timing
from vqfast.testing import oracle

ENV_FIELDS = ("device", "device_type", "torch", "triton", "date", "commit")


@pytest.fixture(scope="module")
def tiny_records(bench_cli):
    """The records `vqfast bench --preset tiny` appended (conftest.py runs it once per session)."""
    proc, results_dir = bench_cli
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [r for path in sorted(results_dir.glob("*.jsonl")) for r in results.read_jsonl(path)]
    assert records
    return {f: records[0][f] for f in ENV_FIELDS}, records


def test_measure_counts_runs_and_summarises():
    calls = []
    t = timing.measure(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert len(t.runs_ms) == 5
    assert t.best_ms == min(t.runs_ms) and t.best_ms <= t.median_ms <= max(t.runs_ms)
    assert t.stat("best") == t.best_ms and t.stat("median") == t.median_ms
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        timing.measure(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="stat"):
        t.stat("mean")


def test_add_ratios_are_quotients():
    case = {"n": 1}
    recs = [
        {"question": "q", "case": case, "provider": "seeds", "group": "seeds", "status": "ok", "value": 8.0},
        {"question": "q", "case": case, "provider": "peerA", "group": "peer", "status": "ok", "value": 4.0},
        {"question": "q", "case": case, "provider": "peerB", "group": "peer", "status": "skipped", "value": None},
        {"question": "q", "case": case, "provider": "mine", "group": "vqfast", "status": "ok", "value": 2.0},
        {"question": "q", "case": {"n": 2}, "provider": "alone", "group": "vqfast", "status": "ok", "value": 1.0},
    ]
    results.add_ratios(recs)
    seeds, peer_a, peer_b, mine, alone = recs
    assert mine["ratio_vs_seeds"] == 4.0 and mine["ratio_vs_best_peer"] == 2.0 and mine["best_peer"] == "peerA"
    assert peer_a["ratio_vs_seeds"] == 2.0 and peer_a["ratio_vs_best_peer"] == 2.0  # best other peer: seeds
    assert seeds["ratio_vs_seeds"] == 1.0 and seeds["ratio_vs_best_peer"] == 0.5
    assert peer_b["ratio_vs_seeds"] is None and peer_b["ratio_vs_best_peer"] is None
    assert alone["ratio_vs_seeds"] is None and alone["ratio_vs_best_peer"] is None


@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (37, 3, 5), (300, 17, 129), (65, 100, 7)])
def test_peer_searches_match_reference(n, d, k):
    z, cb = torch.randn(n, d), torch.randn(k, d)
    ref_idx = oracle.nearest(z, cb).indices
    ref_q = cb[ref_idx]
    fns = [providers.seeds_forward, providers.torch_chunked_forward]
    if providers._faiss_reason(torch.device("cpu"), torch.float32) is None:
        fns.append(providers.faiss_forward)
    for fn in fns:
        idx, q = fn(z, cb)
        assert torch.equal(idx, ref_idx), fn.__name__
        torch.testing.assert_close(q, ref_q, rtol=0, atol=0)


def test_torch_chunked_spans_several_chunks(monkeypatch):
    monkeypatch.setattr(providers, "CHUNK_ELEMENTS", 64)  # 64 // K=9 = 7 rows per chunk over 50 rows
    z, cb = torch.randn(50, 3), torch.randn(9, 3)
    idx, _ = providers.torch_chunked_forward(z, cb)
    assert torch.equal(idx, oracle.nearest(z, cb).indices)


@pytest.mark.slow
def test_forward_records(tiny_records):
    env, records = tiny_records
    rows = [r for r in records if r["question"] == "forward"]
    expected_cases = forward.cases(presets.get_preset("tiny"))
    names = {p.name for p, _ in providers.forward_providers(torch.device("cpu"), ("exact", "fast"))}
    assert {"seeds", "torch-chunked", "vqfast-torch", "vqfast-torch-fast"} <= names
    assert len(rows) == len(expected_cases) * len(names)
    for r in rows:
        for f in ENV_FIELDS:
            assert r[f] == env[f]
        assert r["preset"] == "tiny" and r["metric_name"] == "ms"
        if r["status"] != "ok":
            assert r["reason"] and r["value"] is None
            continue
        assert r["value"] == r[r["stat"] + "_ms"] > 0 and r["repeats"] == 2
        c = r["case"]
        assert r["tflops"] == pytest.approx(2 * c["n"] * c["k"] * c["d"] / (r["value"] * 1e-3) / 1e12)
        assert 0.0 <= r["index_mismatch"] <= 1.0
        c = r["case"]
        assert r["checked_rows"] == c["n"]  # the tiny shapes fit the oracle's budget whole
        if r["group"] == "vqfast":
            assert r["wrong_rows"] == 0  # exact: the oracle's answer; fast: within its rounding bound
            if r["precision"] == "exact":
                assert r["index_mismatch"] == 0.0 and r["qerr_increase"] == 0.0
        else:
            assert r["wrong_rows"] is None  # peers promise no precision contract
        assert r["qerr_increase"] >= -1e-12  # nothing beats the exact nearest codeword
    assert not table.failures(records)
    # faiss is skipped off float32 with its reason, never silently dropped.
    bf16 = [r for r in rows if r["case"]["dtype"] == "bfloat16" and r["provider"] == "faiss-cpu"]
    assert all(r["status"] == "skipped" and "float32" in r["reason"] for r in bf16)


@pytest.mark.slow
def test_ratios_and_table(tiny_records):
    _, records = tiny_records
    by_case = {}
    for r in records:
        by_case.setdefault(results.case_key(r), []).append(r)
    checked = 0
    for rows in by_case.values():
        ok = [r for r in rows if r["status"] == "ok"]
        seeds = [r for r in ok if r["group"] == "seeds"]
        for r in ok:
            if seeds:
                assert r["ratio_vs_seeds"] == pytest.approx(seeds[0]["value"] / r["value"])
                checked += 1
            others = [p["value"] for p in ok if p["group"] != "vqfast" and p is not r]
            if others:
                assert r["ratio_vs_best_peer"] == pytest.approx(min(others) / r["value"])
    assert checked > 0
    text = table.format_table(records, "forward")
    lines = [line for line in text.splitlines() if line.startswith("| N=")]
    assert len(lines) == len([r for r in records if r["question"] == "forward"])
    ok_row = next(r for r in records if r["question"] == "forward" and r["provider"] == "vqfast-torch")
    assert f"{ok_row['ratio_vs_seeds']:.2f}x" in text and "x best peer" in text
    assert "skipped" in text and "float32 vectors only" in text


@pytest.mark.slow
def test_train_step_records(tiny_records):
    _, records = tiny_records
    rows = [r for r in records if r["question"] == "train_step"]
    names = {r["provider"] for r in rows}
    assert {"seeds-vq", "seeds-rvq", "vqfast-vq-torch", "vqfast-rvq-torch"} <= names
    assert all(r["status"] == "ok" and r["value"] > 0 for r in rows if r["provider"].startswith(("seeds", "vqfast")))
    assert "RVQ x2" in table.format_table(records, "train_step")


def test_train_step_updates_parameters():
    module = vqfast.VectorQuantizer(7, 3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    before_z, before_cb = z.detach().clone(), module.embedding.weight.detach().clone()
    providers.train_step_fn(module, z)()
    assert not torch.equal(z.detach(), before_z)
    assert not torch.equal(module.embedding.weight.detach(), before_cb)


@pytest.mark.slow
def test_multiscale_record(tiny_records):
    _, records = tiny_records
    rows = [r for r in records if r["question"] == "multiscale"]
    assert rows
    for r in rows:
        if r["status"] == "skipped":
            assert r["reason"] == "vqfast.models not available"
        else:
            assert r["tokens_per_image"] == 680 and r["value"] > 0


TINY_CASE = {"set": "headline", "n": 300, "d": 5, "k": 40, "dtype": "float32"}


def test_a_wrong_kernel_fails_the_benchmark(monkeypatch, tmp_path, capsys):
    # The CPU kernel returns the second-nearest codeword on every other row: the benchmark must show
    # its mismatch against the oracle, call it wrong, leave the correct peers alone, and exit 1.
    monkeypatch.setattr(ops, "_op_for", ops._op_for)  # restored after the test

    def second_nearest(op, z, cb, metric, precision):
        out = op(z, cb, metric, precision)
        rows = torch.arange(0, z.shape[0], 2)
        return mutations._with_indices(z, cb, metric, out, rows, mutations._second_best(oracle.distances(z[rows], cb)))

    mutations.wrap_backend("cpu", second_nearest)
    recs = forward.run_case(TINY_CASE, presets.get_preset("tiny"), torch.device("cpu"), {}, log=lambda *a: None)
    by_name = {r["provider"]: r for r in recs}
    assert by_name["vqfast-cpu"]["wrong_rows"] == 150 and by_name["vqfast-cpu"]["index_mismatch"] == 0.5
    for name in ("seeds", "torch-chunked", "vqfast-torch"):
        assert by_name[name]["index_mismatch"] == 0.0 and not by_name[name]["wrong_rows"], name
    assert any("vqfast-cpu" in line and "150 of 300" in line for line in table.failures(recs))
    assert "150 of 300" in table.format_table(recs, "forward")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", "--questions", "forward", "--no-save", "--quiet"])
    assert cli.main(args) == 1
    assert "FAILED: forward vqfast-cpu" in capsys.readouterr().out


def test_a_crashing_provider_is_an_error_not_a_skip(monkeypatch):
    def crash(z, codebook):
        raise RuntimeError("segfault-like failure")

    monkeypatch.setattr(providers, "faiss_forward", crash)
    monkeypatch.setattr(providers, "_faiss_reason", lambda device, dtype: None)
    recs = forward.run_case(TINY_CASE, presets.get_preset("tiny"), torch.device("cpu"), {}, log=lambda *a: None)
    faiss = next(r for r in recs if r["provider"] == "faiss-cpu")
    assert faiss["status"] == "error" and "segfault-like failure" in faiss["reason"]
    text = table.format_table(results.add_ratios(recs), "forward")
    assert "ERROR" in text and "faiss-cpu FAILED" in text and "skipped" not in text
    assert any("faiss-cpu" in line and "raised" in line for line in table.failures(recs))
    # The memory question too: a measuring subprocess that fails is an error.
    monkeypatch.setattr(memory, "_measure_subprocess", lambda case, provider: crash(None, None))
    case = {"kind": "forward", "n": 9, "d": 2, "k": 3}
    mem = memory.run(presets.get_preset("tiny"), torch.device("cpu"), {}, log=lambda *a: None, case_list=[case])
    assert mem and all(r["status"] == "error" for r in mem)
    assert len(table.failures(mem)) == len(mem)


def test_memory_guard_skips_with_reason(monkeypatch):
    monkeypatch.setattr(forward, "available_memory_bytes", lambda device: 0)
    recs = forward.run_case({"set": "headline", "n": 9, "d": 2, "k": 3, "dtype": "float32"},
                            presets.get_preset("tiny"), torch.device("cpu"), {}, log=lambda *a: None)
    assert recs and all(r["status"] == "skipped" and "GiB of working memory" in r["reason"] for r in recs)


@pytest.mark.slow
def test_memory_subprocess_measures_seeds_n_by_k():
    # The seeds' forward holds N x K fp32 temporaries: 4096 x 4096 x 4 B = 64 MiB each (three at
    # its peak); the chunked search holds one 16 MiB block and its scaled copy, so the subprocess
    # measurement must tell them apart by well over 2x.
    case = {"kind": "forward", "n": 4096, "d": 4, "k": 4096}
    seeds_peak = memory._measure_subprocess(case, "seeds")
    assert seeds_peak >= 2 * 64 * 2**20
    chunked_peak = memory._measure_subprocess(case, "torch-chunked")
    assert 0 <= chunked_peak < seeds_peak / 2


def test_cli_appends_results(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", "--questions", "train_step",
                              "--results-dir", str(tmp_path), "--quiet"])
    assert cli.main(args) == 0
    path = results.results_path(tmp_path, "train_step", "cpu")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = capsys.readouterr().out
    assert rows and all(r["question"] == "train_step" for r in rows)
    assert "## train_step" in out and rows[0]["commit"] in out
    with pytest.raises(ValueError, match="questions"):
        cli.run_questions("tiny", torch.device("cpu"), ["nope"])
    with pytest.raises(ValueError, match="preset"):
        presets.get_preset("huge")


def test_cli_writes_to_bench_results_in_the_current_directory_by_default(tmp_path, monkeypatch, capsys):
    """Never into the package: benchmarks/results holds the committed runs and is written only when named."""
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in committed.iterdir()}
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", "--questions", "train_step", "--quiet"])
    assert args.results_dir == "bench-results"
    assert cli.main(args) == 0
    path = tmp_path / "bench-results" / "train_step_cpu.jsonl"
    assert path.read_text().strip()
    count = len(path.read_text().splitlines())
    assert f"appended {count} records to bench-results/train_step_cpu.jsonl" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in committed.iterdir()} == before


def _load_plot_script():
    return load_script("benchmarks/plot.py", "vqfast_bench_plot")


@pytest.mark.slow
def test_plot_script_draws_a_users_results_dir(tiny_records, tmp_path, monkeypatch):
    _, records = tiny_records
    forward_rows = [r for r in records if r["question"] == "forward"]
    results.append_jsonl(forward_rows, tmp_path / "bench-results" / "forward_cpu.jsonl")
    monkeypatch.chdir(tmp_path)
    assert _load_plot_script().main(["--results-dir", "bench-results"]) == 0
    assert (tmp_path / "bench-results" / "forward_speedup_cpu.png").exists()


@pytest.mark.slow
def test_plot_script_renders_pngs(tiny_records, tmp_path):
    plot = _load_plot_script()
    _, records = tiny_records
    results.append_jsonl([r for r in records if r["question"] == "forward"], tmp_path / "forward_cpu.jsonl")
    assert plot.main(["--results-dir", str(tmp_path)]) == 0
    for name in ("forward_time_vs_k_cpu.png", "forward_speedup_cpu.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not (tmp_path / "forward_roofline_cuda.png").exists()  # CPU records: no roofline
    latest = plot.latest(records)
    assert len(latest) == len({(r["question"], tuple(sorted(r["case"].items())), r["provider"])
                               for r in records if r["status"] == "ok"})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot.main(["--results-dir", str(empty)]) == 1
