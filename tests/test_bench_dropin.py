"""The dropin benchmark question's machinery: cases, skips with reasons, one measurement per process,
the original and the accelerated module agreeing on indices, and the table. No timing is asserted."""
import pytest
import torch

from tests.test_bench import _load_plot_script as load_plot_script
from vqfast.bench import dropin, presets, results


def test_cases_cover_every_model_in_both_modes():
    for name in ("tiny", "quick"):
        cases = dropin.cases(presets.get_preset(name))
        models = {c["model"] for c in cases}
        assert models == {"var", "taming", "diffusers", "vqpytorch-vq", "vqpytorch-rvq"}
        assert all({c["mode"] for c in cases if c["model"] == m} == set(dropin.MODES) for m in models)
    quick = dropin.cases(presets.get_preset("quick"))
    var = next(c for c in quick if c["model"] == "var")
    assert (var["batch"], var["k"], var["dim"], dropin._patch_nums(var)) == (16, 4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert {c["k"] for c in quick if c["model"] == "taming"} == {1024, 16384}


def test_repository_models_skip_with_the_reason_when_no_checkout_is_given(monkeypatch, tmp_path):
    for model, env in dropin.REPO_ENV.items():
        monkeypatch.delenv(env, raising=False)
        case = {"model": model}
        assert "--" + model + "-repo" in dropin.unavailable_reason(case)
        monkeypatch.setenv(env, str(tmp_path))
        assert "not found under" in dropin.unavailable_reason(case)
    records = dropin.run(presets.get_preset("tiny"), torch.device("cpu"), {}, log=lambda *a: None,
                         case_list=[{**dropin._tiny()[0], "mode": "forward"}])
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert all("not found under" in r["reason"] for r in records)


@pytest.mark.slow
def test_diffusers_original_and_accelerated_in_one_process_each(tmp_path):
    pytest.importorskip("diffusers")
    case = {**next(c for c in dropin._tiny() if c["model"] == "diffusers"), "mode": "train_step"}
    records = dropin.run(presets.get_preset("tiny"), torch.device("cpu"), results.environment("cpu"),
                         log=lambda *a: None, case_list=[case])
    assert [r["provider"] for r in records] == ["original", "accelerated"]
    for r in records:
        assert r["status"] == "ok", r["reason"]
        assert r["value"] > 0 and r["repeats"] == presets.get_preset("tiny").repeats
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
        assert r["index_mismatch"] == 0.0  # random data: both pick the nearest codeword
    table = dropin.format_table(records)
    assert dropin.case_label(case) in table and "x |" in table
    # The committed chart and table: benchmarks/plot.py reads the JSON-lines file the run appends to.
    results.append_jsonl(records, tmp_path / "dropin_cpu.jsonl")
    plot = load_plot_script()
    assert plot.main(["--results-dir", str(tmp_path)]) == 0
    assert (tmp_path / "dropin_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dropin.case_label(case) in (tmp_path / "latest_cpu.md").read_text()


@pytest.mark.slow
def test_a_crashing_provider_is_an_error_not_a_skip(monkeypatch, tmp_path):
    quantize = tmp_path / "taming" / "modules" / "vqvae" / "quantize.py"
    quantize.parent.mkdir(parents=True)
    quantize.write_text("raise ImportError('a broken checkout')\n")
    monkeypatch.setenv(dropin.REPO_ENV["taming"], str(tmp_path))
    case = {**next(c for c in dropin._tiny() if c["model"] == "taming"), "mode": "forward"}
    records = dropin.run(presets.get_preset("tiny"), torch.device("cpu"), {}, log=lambda *a: None, case_list=[case])
    assert [r["status"] for r in records] == ["error", "error"]
    assert all("a broken checkout" in r["reason"] for r in records)
    assert "error" in dropin.format_table(records)
