"""Every command the README names runs end to end, as a user runs it (a subprocess, a fresh --out):
the `vqfast` dispatcher and each subcommand's --help, `vqfast train --preset tiny`, the README's main
job `vqfast train --preset demo` on a schedule short enough for CI whose held-out PSNR must beat the
mean-colour baseline, `vqfast tokenize` encode / decode with a checkpoint, `vqfast demo` and
`vqfast bench --preset tiny` (run once per session by conftest.py's bench_cli fixture, whose records
tests/test_bench.py checks in detail)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ("train", "tokenize", "demo", "bench")
# The demo preset (32 x 32 crops, 130 tokens, vocabulary 256) shortened to 300 steps, one thread
# (~45 s of CPU): held-out PSNR 22.91 / 23.11 dB against mean-colour baselines of 18.24 / 19.32 dB at
# seeds 0 / 3 (256 held-out crops), with 205 / 197 of the 256 codes used (perplexity 88 / 80); at the
# full 900 steps VAR's quantizer alone (no k-means init, no dead-code restarts) uses 7. The bounds
# leave room for another CPU's rounding. The tiny preset does not learn reliably, so it only runs end
# to end here.
LEARNING_STEPS = 300


def vqfast_command(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m vqfast ARGS` with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("VQFAST_NO_EXT_WARNING", "1")
    return subprocess.run([sys.executable, "-m", "vqfast", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dispatcher_help_lists_every_subcommand(capsys):
    out = _ok(vqfast_command("--help"))
    for name in SUBCOMMANDS:
        assert name in out
    # Each subcommand's --help through the same dispatcher, in this process (a subprocess each would
    # only add interpreter start-ups).
    from vqfast import cli

    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0 and "usage: vqfast " + name in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


HELP_PROBE = """
import sys, types
if {bare}:
    # A bare package in place of vqfast/__init__.py (the library's API, which imports torch): the probe
    # then sees what the command line's own modules import.
    package = types.ModuleType("vqfast")
    package.__path__ = [{package_dir!r}]
    sys.modules["vqfast"] = package
from vqfast import cli
try:
    cli.main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
print("imported torch" if "torch" in sys.modules else "no torch")
"""


def _help_imports(argv: list[str], bare: bool) -> str:
    code = HELP_PROBE.format(bare=bare, package_dir=os.path.join(ROOT, "vqfast"), argv=argv)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=" ".join)
def test_help_of_the_command_line_modules_imports_no_torch(argv):
    """The dispatcher imports only the chosen subcommand, and vqfast.train's command line no torch."""
    assert _help_imports(argv, bare=True) == "no torch"


def test_vqfast_help_imports_no_torch():
    """`vqfast --help` as a user runs it: the vqfast package's own import must not pull in torch either."""
    assert _help_imports(["--help"], bare=False) == "no torch", (
        "vqfast/__init__.py imports torch when the package is imported: its public names must be loaded on "
        "first use (a module __getattr__) for `vqfast --help` to stay fast")


def test_warnings_print_as_plain_lines(capsys, monkeypatch):
    import warnings

    from vqfast import cli, demo

    def warn_and_succeed(args):
        warnings.warn("3 files were skipped")
        return 0

    monkeypatch.setattr(demo, "main", warn_and_succeed)
    assert cli.main(["demo"]) == 0
    assert capsys.readouterr().err == "warning: 3 files were skipped\n"


def test_installed_console_script_is_the_dispatcher():
    script = os.path.join(os.path.dirname(sys.executable), "vqfast")
    if not os.path.exists(script):
        pytest.skip("no `vqfast` console script next to this Python (pip install -e . installs it)")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and all(name in proc.stdout for name in SUBCOMMANDS), proc.stderr


def _train(tmp_path_factory, *args: str):
    out = tmp_path_factory.mktemp("train") / "run"  # fresh: no --overwrite needed
    return vqfast_command("train", *args, "--out", str(out), "--no-progress"), out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`vqfast train --preset tiny` with its own schedule: (CompletedProcess, output folder)."""
    return _train(tmp_path_factory, "--preset", "tiny")


@pytest.mark.slow
def test_train_tiny_end_to_end(trained):
    proc, out = trained
    _ok(proc)
    for name in ("checkpoint.pt", "metrics.json", "reconstructions.png", "loss_curve.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "reconstructions.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    m = json.loads((out / "metrics.json").read_text())
    for key in ("heldout_psnr_db", "mean_colour_baseline_psnr_db", "heldout_codebook_usage", "perplexity"):
        assert m[key] > 0, key
    assert "held-out PSNR" in proc.stdout


@pytest.mark.slow
def test_train_demo_learns_past_the_mean_colour_baseline(tmp_path_factory):
    proc, out = _train(tmp_path_factory, "--preset", "demo", "--steps", str(LEARNING_STEPS), "--threads", "1")
    _ok(proc)
    m = json.loads((out / "metrics.json").read_text())
    assert m["heldout_psnr_db"] > m["mean_colour_baseline_psnr_db"] + 2.5, m
    assert m["heldout_codebook_used"] >= 160 and m["perplexity"] > 40, m  # no codebook collapse


@pytest.mark.slow
def test_tokenize_encode_decode_roundtrip(trained, tmp_path):
    _, out = trained
    _ok(trained[0])
    import matplotlib.pyplot as plt
    import numpy as np

    image = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    plt.imsave(tmp_path / "in.png", image)
    ckpt = str(out / "checkpoint.pt")
    _ok(vqfast_command("tokenize", "--checkpoint", ckpt, "encode", str(tmp_path / "in.png"), str(tmp_path / "tok.pt")))
    assert (tmp_path / "tok.pt").stat().st_size > 0
    _ok(vqfast_command("tokenize", "--checkpoint", ckpt, "decode", str(tmp_path / "tok.pt"), str(tmp_path / "out.png")))
    assert plt.imread(tmp_path / "out.png").shape[:2] == (16, 16)  # the tiny model's image size


@pytest.mark.slow
def test_demo_runs_on_real_photographs():
    out = _ok(vqfast_command("demo", "--codes", "64", "--repeats", "1"))
    assert "vqfast backend=cpu" in out or "vqfast backend=torch" in out
    assert "PSNR" in out


@pytest.mark.slow
def test_bench_tiny_runs_end_to_end(bench_cli):
    proc, results_dir = bench_cli
    out = _ok(proc)
    for question in ("forward", "train_step", "multiscale", "memory"):
        assert f"## {question}" in out
        assert (results_dir / f"{question}_cpu.jsonl").exists(), question
    assert "FAILED" not in out
