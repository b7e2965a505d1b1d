"""The dropin benchmark question's machinery: cases, skips with reasons, one measurement per process,
the original and the accelerated module agreeing on indices, and the table. No timing is asserted."""
import pytest
import torch

from tests.test_bench import _load_plot_script as load_plot_script
from vqfast.bench import dropin, presets, results
from vqfast.bench.table import failures


def test_cases_cover_every_model_in_both_modes():
    for name in ("tiny", "quick"):
        cases = dropin.cases(presets.get_preset(name))
        models = {c["model"] for c in cases}
        assert models == {"var", "taming", "diffusers", "vqpytorch-vq", "vqpytorch-rvq", "llamagen"}
        assert all({c["mode"] for c in cases if c["model"] == m} == set(dropin.MODES) for m in models)
        assert len({dropin.case_label(c) for c in cases}) == len(cases)
    quick = dropin.cases(presets.get_preset("quick"))
    var = next(c for c in quick if c["model"] == "var")
    assert (var["batch"], var["k"], var["dim"], dropin._patch_nums(var)) == (16, 4096, 32, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert {c["k"] for c in quick if c["model"] == "taming"} == {1024, 16384}
    # LlamaGen: batch 8 at 256 px (16 x 16 latents), K 16384, D 8; training at entropy ratios 0 and 0.1.
    llamagen = [c for c in quick if c["model"] == "llamagen"]
    assert {(c["batch"], c["side"], c["dim"], c["k"]) for c in llamagen} == {(8, 16, 8, 16384)}
    assert sorted((c["entropy_loss_ratio"], c["mode"]) for c in llamagen) == [
        (0.0, "forward"), (0.0, "train_step"), (0.1, "train_step")]
    assert all("modes" not in c for c in quick)


def _llamagen_search(monkeypatch):
    """The tiny LlamaGen case (the oracle stands in for LlamaGen) and the float64 nearest code of each row."""
    monkeypatch.delenv(dropin.LLAMAGEN_ENV, raising=False)
    case = {**next(c for c in dropin._tiny() if c["model"] == "llamagen"), "mode": "forward"}
    rows, codebook = dropin.search_inputs(case, None)
    assert rows.shape == (case["batch"] * case["side"] ** 2, case["dim"]) and codebook.shape == (case["k"], case["dim"])
    d = ((rows.double()[:, None, :] - codebook.double()[None]) ** 2).sum(-1)
    return case, d, d.argmin(1)


def test_mismatches_are_classified_by_the_float64_distance(monkeypatch):
    case, d, truth = _llamagen_search(monkeypatch)
    farther = d.argsort(1)[:, 1]  # each row's second-nearest code
    original = truth.clone()
    original[[0, 5, 7]] = farther[[0, 5, 7]]  # the original misses the nearest code on three rows
    found = dropin.classify_mismatches(case, original, truth, None)
    assert found["mismatch_rows"] == 3 and found["index_mismatch"] == 3 / truth.numel()
    assert (found["mismatch_original_farther"], found["mismatch_vqfast_farther"], found["mismatch_tied"]) == (3, 0, 0)
    assert (found["wrong_rows"], found["checked_rows"]) == (0, 3)
    # vqfast farther: the run fails (table.failures), and the column says so.
    found = dropin.classify_mismatches(case, truth, original, None)
    assert (found["mismatch_original_farther"], found["mismatch_vqfast_farther"]) == (0, 3)
    assert (found["wrong_rows"], found["checked_rows"]) == (3, 3)
    rec = {"question": "dropin", "provider": "accelerated", "case": case, "status": "ok", "precision": "exact",
           **found}
    assert len(failures([rec])) == 1 and "3 of 3 checked rows" in failures([rec])[0]
    assert "vqfast farther on 3: FAILED" in dropin.mismatch_text(rec)
    # No mismatch: zero counts, nothing to check.
    found = dropin.classify_mismatches(case, truth, truth.clone(), None)
    assert found["mismatch_rows"] == 0 and found["index_mismatch"] == 0.0
    assert (found["wrong_rows"], found["checked_rows"]) == (0, 0)


def test_residual_quantizers_mismatches_are_counted_unclassified():
    case = {**dropin._tiny()[0], "mode": "forward"}
    assert case["model"] == "var" and dropin.search_inputs(case, None) is None
    a, b = torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long)
    b[3] = 1
    found = dropin.classify_mismatches(case, a, b, None)
    assert found["mismatch_unclassified"] == 1 and "wrong_rows" not in found
    assert "not classified" in dropin.mismatch_text({**found, "index_mismatch": 0.1})


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


@pytest.mark.slow
def test_llamagen_original_and_accelerated_with_the_oracle(monkeypatch):
    """LlamaGen without a checkout: the oracle is the original, accelerate converts it through trust=."""
    monkeypatch.delenv(dropin.LLAMAGEN_ENV, raising=False)
    cases = [c for c in dropin.cases(presets.get_preset("tiny")) if c["model"] == "llamagen"]
    records = dropin.run(presets.get_preset("tiny"), torch.device("cpu"), results.environment("cpu"),
                         log=lambda *a: None, case_list=cases)
    assert len(records) == 6
    for r in records:
        assert r["status"] == "ok", r["reason"]
        assert "oracle" in r["original_code"]
        assert r["mismatch_rows"] == 0 and r["index_mismatch"] == 0.0
    assert all(r["checked_rows"] == 0 for r in records if r["provider"] == "accelerated")
    assert not failures(records)
    table = dropin.format_table(records)
    assert "entropy ratio 0.1, train_step" in table and "llamagen's original: oracle" in table
