"""`vqfast bench --questions faiss --isa ...`: vqfast's cpu backend against faiss-cpu at one
instruction level, and the CPU fields every benchmark record carries."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import vqfast
from vqfast import _ext
from vqfast.bench import cli, faiss_cpu, presets, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss-cpu is not installed")


def test_every_record_names_the_cpu_and_its_level():
    env = results.environment("cpu")
    assert env["cpu_model"] and env["cpu_isa"] == vqfast.cpu_isa()
    assert env["cpu_isa_levels"] == list(_ext.cpu_isa_levels())
    assert env["threads"] == torch.get_num_threads()
    if importlib.util.find_spec("faiss") is not None:
        assert env["faiss_simd"]
    if os.path.exists("/proc/cpuinfo") and "cpu family" in open("/proc/cpuinfo").read():
        assert "family" in env["cpu_model"]  # tells Zen 3 from Zen 4 when the name is a bare "AMD EPYC"


def test_faiss_cases_cover_the_quick_forward_shapes_and_the_issue_shapes():
    quick = presets.get_preset("quick")
    shapes = {(c["n"], c["d"], c["k"]) for c in faiss_cpu.cases(quick) if c["set"] == "faiss"}
    assert set(quick.forward_shapes) <= shapes
    assert {(quick.sweep_n, d, k) for d in quick.sweep_ds for k in quick.sweep_ks} <= shapes
    assert set(faiss_cpu.EXTRA_SHAPES) <= shapes
    assert faiss_cpu.cases(quick)[0]["set"] == "peak"


@needs_faiss
def test_faiss_question_records_and_table():
    env, records = cli.run_questions("tiny", torch.device("cpu"), ["faiss"], log=lambda *a, **k: None)
    peak = [r for r in records if r["provider"] == "torch.mm"]
    assert len(peak) == 1 and peak[0]["gflops"] > 0
    shapes = [c for c in faiss_cpu.cases(presets.get_preset("tiny")) if c["set"] == "faiss"]
    for case in shapes:
        rows = {r["provider"]: r for r in records if r["case"] == case}
        assert set(rows) == {"vqfast-cpu", "faiss-cpu"}
        for r in rows.values():
            assert r["status"] == "ok" and r["value"] > 0 and r["cpu_isa"] == vqfast.cpu_isa()
            assert r["cpu_ms"] >= 0
            assert r["gflops"] == pytest.approx(2 * case["n"] * case["k"] * case["d"] / (r["value"] * 1e6))
            assert r["of_peak"] == pytest.approx(r["gflops"] / peak[0]["gflops"])
        # faiss ranks by the plain fp32 expansion: it may differ from vqfast's exact answer only on near-ties
        assert rows["vqfast-cpu"]["index_mismatch"] < 0.01
        assert rows["vqfast-cpu"]["ratio_vs_best_peer"] == pytest.approx(rows["faiss-cpu"]["value"] / rows["vqfast-cpu"]["value"])
    table = faiss_cpu.format_table(records)
    assert f"vqfast cpu level {vqfast.cpu_isa()}" in table and "of mm peak" in table and "CPU time" in table
    assert table.count("\n| ") == 1 + len(shapes)  # header + one row per shape


def test_level_environment_sets_both_libraries():
    env = cli.level_environment("avx2")
    assert env["VQFAST_CPU_ISA"] == "avx2" and env["FAISS_OPT_LEVEL"] == "avx2" and env["FAISS_SIMD_LEVEL"] == "AVX2"
    env = cli.level_environment("generic")
    assert env["FAISS_SIMD_LEVEL"] == "NONE"


@pytest.mark.slow
@needs_faiss
def test_cli_runs_a_forced_level_in_its_own_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("VQFAST_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-m", "vqfast", "bench", "--preset", "tiny", "--questions", "faiss",
                          "--isa", "generic", "--results-dir", str(tmp_path), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "== CPU instruction level generic" in out.stdout
    assert "vqfast cpu level generic, faiss NONE" in out.stdout
    saved = results.read_jsonl(tmp_path / "faiss_cpu.jsonl")
    assert saved and all(r["cpu_isa"] == "generic" and r["faiss_simd"] == "NONE" for r in saved)


@pytest.mark.slow
@needs_faiss
def test_cli_runs_each_thread_count_in_its_own_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("VQFAST_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-m", "vqfast", "bench", "--preset", "tiny", "--questions", "faiss",
                          "--threads", "1", "2", "--results-dir", str(tmp_path), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "== 1 threads" in out.stdout and "== 2 threads" in out.stdout
    assert "1 threads: vqfast cpu level" in out.stdout and "2 threads: vqfast cpu level" in out.stdout
    saved = results.read_jsonl(tmp_path / "faiss_cpu.jsonl")
    assert {r["threads"] for r in saved} == {1, 2}
    bad = subprocess.run([sys.executable, "-m", "vqfast", "bench", "--questions", "faiss", "--threads", "0", "--no-save"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--threads must be positive" in bad.stderr
