"""The `vqfast` command tells the truth: every user error below runs the real command in a subprocess
and must exit with status 2 and one line on stderr naming the argument or file, before any work; a
file carrying pickled code is refused and its payload never runs.

All commands start at once (a module fixture, 4 at a time) since each pays torch's import."""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqfast
from vqfast import train as vtrain
from vqfast.tokenizer import CHECKPOINT_FORMAT

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling it runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cases(tmp: Path) -> dict:
    """name -> (argv, extra environment, expected status, stdout or stderr pattern, files that must not exist)."""
    ckpt = tmp / "tiny" / "checkpoint.pt"
    img = tmp / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(img)
    (tmp / "text.png").write_text("a text file with an image's name")
    one = tmp / "one_image"
    one.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(one / "a.png")
    (one / "b.jpg").write_text("not a jpeg")
    full = tmp / "full"
    full.mkdir()
    (full / "notes.txt").write_text("someone's earlier run")
    (tmp / "empty").mkdir()
    evil_run = tmp / "evil_run"
    evil_run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "config": Payload(tmp / "pwned_train")},
               evil_run / "checkpoint.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "model": Payload(tmp / "pwned_tokenize")}, tmp / "evil.pt")
    torch.save({"format": "vqfast-tokens-1", "names": Payload(tmp / "pwned_decode")}, tmp / "evil_tokens.pt")
    cut_run = tmp / "cut_run"
    cut_run.mkdir()
    data = ckpt.read_bytes()
    (cut_run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    tok = ["tokenize", "--checkpoint", str(ckpt)]
    out = str(tmp / "out_unused")
    cases = {
        "version": (["--version"], {}, 0, rf"^vqfast {re.escape(vqfast.__version__)} \(torch ", []),
        "demo --codes 0": (["demo", "--codes", "0"], {}, 2, r"^vqfast demo: error: --codes must be a positive int, got 0$", []),
        "demo --patch 0": (["demo", "--patch", "0"], {}, 2, r"^vqfast demo: error: --patch must be a positive int, got 0$", []),
        "train --steps 0": (["train", "--preset", "tiny", "--steps", "0", "--out", out], {}, 2,
                            r"^vqfast train: error: --steps must be a positive int, got 0$", [out]),
        "train --steps x": (["train", "--steps", "x"], {}, 2,
                            r"^vqfast train: error: argument --steps: invalid int value: 'x' \(see vqfast train --help\)$", []),
        "train --data missing": (["train", "--data", str(tmp / "nowhere"), "--out", out], {}, 2,
                                 r"^vqfast train: error: --data .*nowhere: no such folder$", [out]),
        "train --data a file": (["train", "--data", str(img), "--out", out], {}, 2,
                                r"^vqfast train: error: --data .*photo.png: is a file, not a folder of images$", [out]),
        "train --data too few": (["train", "--preset", "tiny", "--data", str(one), "--out", out], {}, 2,
                                 r"^vqfast train: error: --data .*one_image holds 1 readable image .*1 more could not "
                                 r"be read\); training needs at least 2", [out]),
        "train --out not empty": (["train", "--preset", "tiny", "--out", str(full)], {}, 2,
                                  r"^vqfast train: error: --out .*full is not empty \(it holds notes.txt\): pass "
                                  r"--resume .* or --overwrite", []),
        "train --resume nothing": (["train", "--preset", "tiny", "--resume", "--out", str(tmp / "empty")], {}, 2,
                                   r"^vqfast train: error: --resume: .*empty/checkpoint.pt does not exist$", []),
        "train --resume payload": (["train", "--preset", "tiny", "--resume", "--out", str(evil_run)], {}, 2,
                                   r"^vqfast train: error: refused to load checkpoint .*evil_run/checkpoint.pt: it "
                                   r"carries pickled Python objects \(posix.system\)", [tmp / "pwned_train"]),
        "train --resume truncated": (["train", "--preset", "tiny", "--resume", "--out", str(cut_run)], {}, 2,
                                     r"^vqfast train: error: checkpoint .*cut_run/checkpoint.pt is truncated or "
                                     r"corrupted", []),
        "train --image-size": (["train", "--preset", "demo", "--image-size", "30", "--out", out], {}, 2,
                               r"^vqfast train: error: --image-size must be a multiple of this model's downsampling "
                               r"factor 4, got 30 \(preset demo\)$", [out]),
        "train --batch-size vs processes": (["train", "--preset", "tiny", "--out", out], {"WORLD_SIZE": "3"}, 2,
                                            r"^vqfast train: error: --batch-size 8 \(the global batch\) must be a "
                                            r"multiple of the 3 processes$", [out]),
        "tokenize missing image": (tok + ["encode", str(tmp / "nope.png"), str(tmp / "t.pt")], {}, 2,
                                   r"^vqfast tokenize: error: input .*nope.png: no such file or folder$", []),
        "tokenize text as image": (tok + ["encode", str(tmp / "text.png"), str(tmp / "t.pt")], {}, 2,
                                   r"^vqfast tokenize: error: input .*text.png cannot be read as an image "
                                   r"\(UnidentifiedImageError", []),
        "tokenize output folder missing": (tok + ["encode", str(img), str(tmp / "no_dir" / "t.pt")], {}, 2,
                                           r"^vqfast tokenize: error: output .*t.pt: the folder .*no_dir does not "
                                           r"exist$", []),
        "tokenize --checkpoint payload": (["tokenize", "--checkpoint", str(tmp / "evil.pt"), "encode", str(img),
                                           str(tmp / "t.pt")], {}, 2,
                                          r"^vqfast tokenize: error: refused to load checkpoint .*evil.pt: it carries "
                                          r"pickled Python objects \(posix.system\)", [tmp / "pwned_tokenize", tmp / "t.pt"]),
        "tokenize --checkpoint an image": (["tokenize", "--checkpoint", str(img), "encode", str(img),
                                            str(tmp / "t.pt")], {}, 2,
                                           r"^vqfast tokenize: error: checkpoint .*photo.png is not a file written by "
                                           r"torch.save that loads safely", [tmp / "t.pt"]),
        "tokenize decode payload": (tok + ["decode", str(tmp / "evil_tokens.pt"), str(tmp / "d.png")], {}, 2,
                                    r"^vqfast tokenize: error: refused to load token file .*evil_tokens.pt: it carries "
                                    r"pickled Python objects \(posix.system\)", [tmp / "pwned_decode", tmp / "d.png"]),
        # With a --data folder that would fail its scan: the backend is checked before any data loads.
        "train --backend nope": (["train", "--preset", "tiny", "--data", str(one), "--backend", "nope", "--out", out],
                                 {}, 2,
                                 r"^vqfast train: error: --backend nope: .*'nope' is not a vqfast backend; choose one "
                                 r"of .*'auto'.*'cpu'", [out]),
        "train --preset var without --data": (["train", "--preset", "var", "--out", out], {}, 2,
                                              r"^vqfast train: error: --preset var trains on 256 x 256 crops, larger "
                                              r"than every bundled photograph's .* region: it needs --data DIR", [out]),
        "tokenize --backend nope": (tok + ["encode", str(img), str(tmp / "t.pt"), "--backend", "nope"], {}, 2,
                                    r"^vqfast tokenize: error: --backend nope: .*'nope' is not a vqfast backend; "
                                    r"choose one of .*'auto'", [tmp / "t.pt"]),
        "bench --device gpu": (["bench", "--preset", "tiny", "--device", "gpu"], {}, 2,
                               r"^vqfast bench: error: argument --device: invalid choice: '?gpu'? \(choose from "
                               r"'?cpu'?, '?cuda'?\)", []),
        "tokenize encode states the resize": (tok + ["encode", str(img), str(tmp / "ok.pt"), "--no-progress"], {}, 0,
                                              r"photo.png: 1 image, 24 x 20: centre crop 20 x 20, resized to 16 x 16 "
                                              r"\(the checkpoint's image size\)", []),
    }
    if not torch.cuda.is_available():
        cases["train --device cuda"] = (["train", "--preset", "tiny", "--device", "cuda", "--out", out], {}, 2,
                                        r"^vqfast train: error: --device cuda: no CUDA device is available", [out])
        cases["bench --device cuda"] = (["bench", "--preset", "tiny", "--device", "cuda", "--no-save"], {}, 2,
                                        r"^vqfast bench: error: --device cuda: no CUDA device is available to this "
                                        r"torch .*; use --device cpu$", [])
    return cases


def _run(argv, env_extra, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env_extra}
    return subprocess.run([sys.executable, "-m", "vqfast", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    vtrain.train(vtrain.make_config("tiny", steps=1), tmp / "tiny", progress=False, finish=False)
    cases = _cases(tmp)
    assert sorted(cases) == sorted(NAMES)
    # The payloads are live: loading them the unsafe way does create the files the tests look for.
    for name, marker in (("evil.pt", "pwned_tokenize"), ("evil_tokens.pt", "pwned_decode")):
        torch.load(tmp / name, weights_only=False)
        assert (tmp / marker).exists()
        (tmp / marker).unlink()
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(_run, argv, env, tmp) for name, (argv, env, *_) in cases.items()}
        return {name: (cases[name], f.result()) for name, f in futures.items()}


NAMES = [
    "version", "demo --codes 0", "demo --patch 0", "train --steps 0", "train --steps x", "train --data missing",
    "train --data a file", "train --data too few", "train --out not empty", "train --resume nothing",
    "train --resume payload", "train --resume truncated", "train --image-size", "train --batch-size vs processes",
    "tokenize missing image", "tokenize text as image", "tokenize output folder missing",
    "tokenize --checkpoint payload", "tokenize --checkpoint an image", "tokenize decode payload",
    "tokenize encode states the resize", "train --backend nope", "train --preset var without --data",
    "tokenize --backend nope", "bench --device gpu",
] + ([] if torch.cuda.is_available() else ["train --device cuda", "bench --device cuda"])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_command(results, name):
    (argv, _, status, pattern, absent), proc = results[name]
    text = proc.stdout if status == 0 else proc.stderr
    assert proc.returncode == status, f"{argv}: status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    if status == 2:
        assert len(proc.stderr.strip().splitlines()) == 1, f"not one line:\n{proc.stderr}"
    assert re.search(pattern, text.strip(), flags=re.M), f"{argv}:\n{text}"
    for path in absent:
        assert not Path(path).exists(), f"{argv} created {path}"


@pytest.mark.slow
def test_ctrl_c_from_a_terminal_checkpoints_and_says_how_to_resume(tmp_path):
    """SIGINT to the command's whole process group, as Ctrl-C in a terminal sends it, with data-loading
    workers running: exit 130, one line naming the step and the --resume command, a whole checkpoint."""
    import signal
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        Image.fromarray((np.random.default_rng(i).random((60, 70, 3)) * 255).astype(np.uint8)).save(photos / f"{i}.png")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "vqfast", "train", "--preset", "tiny", "--data", str(photos),
                             "--workers", "2", "--steps", "100000", "--checkpoint-every", "1", "--no-progress",
                             "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():  # the first step's checkpoint: the loop is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    match = re.fullmatch(r"vqfast train: interrupted at step (\d+) of 100000: checkpoint written to \S+; continue "
                         r"with: vqfast train --preset tiny --data \S+ --steps 100000 --checkpoint-every 1 --workers 2 "
                         r"--out \S+ --resume", lines[0])
    assert match, lines[0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == int(match.group(1)) >= 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]
