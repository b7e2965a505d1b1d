import json
import os
import re
import shlex
import signal

import numpy as np
import pytest
import torch

from vqfast import tokenize as vtok
from vqfast import tokenizer
from vqfast import train as vtrain
from vqfast.data import load_crop, to_uint8


def tiny(steps, seed=0):
    return vtrain.make_config("tiny", steps=steps, seed=seed)


def test_twenty_steps_lower_the_loss(tmp_path):
    r = vtrain.train(tiny(20), tmp_path, progress=False, finish=False)
    losses = [h["loss"] for h in r["history"]]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_learning_rate_warms_up_then_decays():
    cfg = {**tiny(20), "lr": 1.0, "warmup_steps": 4}
    lrs = [vtrain.learning_rate(cfg, t) for t in range(20)]
    cosine = [0.5 * (1 + np.cos(np.pi * t / 20)) for t in range(20)]
    np.testing.assert_allclose(lrs[:4], [(t + 1) / 4 * cosine[t] for t in range(4)], rtol=1e-12)
    np.testing.assert_allclose(lrs[4:], cosine[4:], rtol=1e-12)
    assert vtrain.learning_rate({**cfg, "warmup_steps": 0}, 0) == 1.0


def test_gradient_norm_is_clipped(tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: seen.append(
        (max_norm, float(real(params, max_norm)))))
    vtrain.train({**tiny(3), "grad_clip": 1e-3}, tmp_path, progress=False, finish=False)
    # The norm before clipping is returned: every step's exceeded 1e-3, so every step was scaled down.
    assert len(seen) == 3 and all(max_norm == 1e-3 and norm > 1e-3 for max_norm, norm in seen)


def test_resume_equals_uninterrupted_run(tmp_path):
    full = vtrain.train(tiny(6), tmp_path / "a", progress=False, finish=False)
    part = vtrain.train(tiny(6), tmp_path / "b", progress=False, stop_after=3, finish=False)
    assert part["step"] == 3
    rest = vtrain.train(tiny(6), tmp_path / "b", resume=True, progress=False, finish=False)
    assert rest["step"] == 6
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in full["history"]]
    a, b = full["model"].state_dict(), rest["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert torch.equal(sa["rng"]["cpu"][0], sb["rng"]["cpu"][0])
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"])


def test_outputs_and_tokenize_roundtrip(tmp_path):
    r = vtrain.train(tiny(2), tmp_path, progress=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("heldout_psnr_db", "mean_colour_baseline_psnr_db", "heldout_codebook_usage", "perplexity",
                "encode_tokens_per_s", "train_tokens_per_s", "train_recent_code_use"):
        assert key in m and m[key] > 0, key
    assert 1 <= m["perplexity"] <= 64 and 0 < m["heldout_codebook_usage"] <= 1
    # Per-scale usage: one entry per scale; the 1 x 1 scale of 16 images uses at most 16 codes.
    used = m["heldout_codebook_used_per_scale"]
    assert m["patch_nums"] == [1, 2, 4, 8] and len(used) == 4
    assert 1 <= used[0] <= 16
    assert max(used) <= m["heldout_codebook_used"] <= sum(used)
    assert m["heldout_codebook_usage_per_scale"] == [u / 64 for u in used]
    # The training figure is the last step's recent code use, a fraction like the held-out one.
    assert m["train_recent_code_use"] == r["history"][-1]["recent_code_use"] <= 1
    # The previous names still read the held-out figures.
    for old, new in (("codebook_used", "heldout_codebook_used"), ("codebook_usage", "heldout_codebook_usage"),
                     ("codebook_used_per_scale", "heldout_codebook_used_per_scale"),
                     ("codebook_usage_per_scale", "heldout_codebook_usage_per_scale")):
        assert m[old] == m[new], old
    for name in ("reconstructions.png", "loss_curve.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))

    from PIL import Image

    img = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    model = vtok.load_model(tmp_path / "checkpoint.pt")
    done = vtok.encode(model, tmp_path / "in.png", tmp_path / "tok.pt", progress=False)
    assert "centre crop 20 x 20, resized to 16 x 16" in done["summary"]
    tokens = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert tokens["names"] == ["in.png"]
    assert [tuple(t.shape) for t in tokens["tokens"]] == [(1, p * p) for p in (1, 2, 4, 8)]
    expected = model.img_to_idxBl(load_crop(tmp_path / "in.png", 16)[0][None])
    assert all(torch.equal(a.long(), b) for a, b in zip(tokens["tokens"], expected))
    paths = vtok.decode(model, vtok.read_tokens(tmp_path / "tok.pt", model), tmp_path / "out.png", progress=False)
    decoded = np.asarray(Image.open(paths[0]))
    assert decoded.shape == (16, 16, 3)
    assert np.array_equal(decoded, to_uint8(tokenizer.decode_tokens(model, expected))[0])


def test_corrupt_and_mismatched_checkpoint(tmp_path):
    vtrain.train(tiny(1), tmp_path, progress=False, finish=False)
    with pytest.raises(ValueError, match="does not match.*seed"):
        vtrain.train(tiny(2, seed=1), tmp_path, resume=True, progress=False, finish=False)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        vtrain.train(tiny(2), tmp_path, resume=True, progress=False, finish=False)
    with pytest.raises(ValueError, match="corrupt"):
        vtok.load_model(ckpt)
    with pytest.raises(ValueError, match="does not exist"):
        vtrain.train(tiny(2), tmp_path / "none", resume=True, progress=False, finish=False)


def test_bad_preset_and_steps():
    with pytest.raises(ValueError, match="preset"):
        vtrain.make_config("huge")
    with pytest.raises(ValueError, match="steps"):
        vtrain.make_config("tiny", steps=0)


def test_presets_build():
    demo = tokenizer.build_model(vtrain.make_config("demo"))
    assert demo.num_tokens == 130 and demo.image_size == 32
    var = vtrain.PRESETS["var"]["model"]
    assert sum(p * p for p in var["v_patch_nums"]) == 680 and var["vocab_size"] == 4096 and var["z_channels"] == 32


def test_kill_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # First run: a complete checkpoint at step 3.
    vtrain.train(tiny(6), tmp_path, progress=False, stop_after=3, checkpoint_every=1, finish=False)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):  # the process dies half-way through writing
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(max(1, len(before) // 2))
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        vtrain.train(tiny(6), tmp_path, resume=True, progress=False, checkpoint_every=1, finish=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing lost: the old file is intact
    full = vtrain.train(tiny(6), tmp_path / "ref", progress=False, finish=False)
    rest = vtrain.train(tiny(6), tmp_path, resume=True, progress=False, finish=False)
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in full["history"]]


def test_train_command_on_a_folder(tmp_path, capsys):
    from PIL import Image

    from vqfast import cli

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        y, x = np.mgrid[0:40, 0:56] / 40
        img = np.stack([np.sin(3 * x + i), np.cos(4 * y - i), np.sin(2 * (x + y) + i)], -1)
        Image.fromarray(((img + 1) * 127.5 + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)).save(
            photos / ("more" if i % 2 else "") / f"p{i}.{'png' if i % 3 else 'jpg'}")
    (photos / "broken.png").write_text("not a png")
    Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(photos / "cut.jpg")
    cut = (photos / "cut.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(cut[: len(cut) // 2])  # the header passes the scan, the body does not decode
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(photos), "--out", str(out), "--steps", "3", "--no-progress",
            "--workers", "1"]
    assert cli.main(args) == 0
    said = capsys.readouterr()
    # Warnings are plain lines: what was skipped at the scan, what failed to decode later (counted, named).
    warned = [line for line in said.err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2 and "skipped 1 unreadable file: broken.png (UnidentifiedImageError" in warned[0]
    assert warned[1].startswith("warning: 1 file failed to decode and was replaced by the next file of its epoch: "
                                "cut.jpg (OSError"), warned
    assert "UserWarning" not in said.err
    assert "data: 10 training and 1 held-out images under" in said.out
    assert "random square crops resized to 16 x 16 (the tiny preset's size)" in said.out
    m = json.loads((out / "metrics.json").read_text())
    assert (m["data"]["train_files"], m["data"]["heldout_files"], m["data"]["skipped_files"]) == (10, 1, 1)
    assert m["data"]["decode_failures"] == 1
    assert m["steps"] == 3 and m["image_size"] == 16
    # A second run into the same --out must say what to do; --overwrite replaces the first run.
    assert cli.main(args) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli.main(args[:-4] + ["2", "--no-progress", "--image-size", "32", "--overwrite"]) == 0
    assert "crops resized to 32 x 32 (--image-size)" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["image_size"] == 32 and m["patch_nums"] == [1, 4, 8, 16]
    # Resuming after the folder changed would change the data order: refused, naming the difference.
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photos / "new.png")
    assert cli.main(args[:-4] + ["4", "--image-size", "32", "--resume"]) == 2
    assert re.search(r"checkpoint .*checkpoint.pt does not match this run: it was written with data=",
                     capsys.readouterr().err)


def test_image_size_and_batch_shares():
    demo = vtrain.PRESETS["demo"]["model"]
    key = "patch_nums" if "patch_nums" in demo else "v_patch_nums"
    assert vtrain.with_image_size(demo, 32)[key] == demo[key]
    assert vtrain.with_image_size(demo, 64)[key] == [1, 4, 6, 8, 12, 16]
    assert vtrain.with_image_size(demo, 16)[key] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="multiple of this model's downsampling factor 4"):
        vtrain.with_image_size(demo, 30)
    cfg = vtrain.make_config("tiny", batch_size=6)
    for step in (0, 5, 12345):
        shares = [vtrain.batch_indices(cfg, step, r, 3) for r in range(3)]
        assert sum(shares, []) == vtrain.batch_indices(cfg, step)


def test_ctrl_c_checkpoints_the_step_reached_and_resume_continues(tmp_path, capsys, monkeypatch):
    """Ctrl-C in `vqfast train`: the step ends, checkpoint.pt is written, one line gives the step and
    the command that continues; that command finishes the run exactly as an uninterrupted one, and
    --resume of the finished run does nothing."""
    from vqfast import cli
    from vqfast.train import loop

    real, calls = loop.model_forward, []

    def forward(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # delivered at once to this (the main) thread
        return real(*args)

    monkeypatch.setattr(loop, "model_forward", forward)
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--steps", "5", "--out", str(out), "--no-progress"]) == 130
    said = capsys.readouterr()
    lines = said.err.strip().splitlines()
    assert len(lines) == 1, said.err
    match = re.fullmatch(r"vqfast train: interrupted at step 3 of 5: checkpoint written to (\S+); continue with: "
                         r"(vqfast train --preset tiny --steps 5 --out \S+ --resume)", lines[0])
    assert match and match.group(1) == str(out / "checkpoint.pt"), lines[0]
    assert sorted(os.listdir(out)) == ["checkpoint.pt"] and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(loop, "model_forward", real)
    assert cli.main(shlex.split(match.group(2))[1:] + ["--no-progress"]) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    full = vtrain.train(tiny(5), tmp_path / "ref", progress=False, finish=False)
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    # --resume of the finished run: one line, nothing re-evaluated or rewritten.
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert cli.main(["train", "--preset", "tiny", "--steps", "5", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr()
    assert said.err == "" and re.fullmatch(r"--resume: the run in \S+ finished at step 5 of 5 \(its metrics.json "
                                           r"is written\): nothing to do; a larger --steps trains further\n", said.out)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_second_ctrl_c_stops_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    from vqfast import cli
    from vqfast.train import loop

    def forward(*args):
        signal.raise_signal(signal.SIGINT)  # the first asks for a stop at the step's end
        signal.raise_signal(signal.SIGINT)  # the second does not wait
        raise AssertionError("the second Ctrl-C did not stop the step")

    monkeypatch.setattr(loop, "model_forward", forward)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err == "vqfast train: interrupted; nothing was written\n"
    assert not (out / "checkpoint.pt").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def test_every_preset_runs_on_the_bundled_images_or_asks_for_data():
    """tiny and demo train on the bundled images (test_entrypoints runs them); the others must say
    in one line that they need --data, before any work."""
    from vqfast.data import RealImageCrops
    from vqfast.errors import InputError
    from vqfast.train.cli import check_bundled_size

    needs_data = set()
    for name in vtrain.PRESETS:
        size = vtrain.config_geometry(vtrain.make_config(name))["image_size"]
        try:
            check_bundled_size(name, size, image_size_given=False)
        except InputError as e:
            needs_data.add(name)
            assert re.fullmatch(rf"--preset {name} trains on {size} x {size} crops, larger than every bundled "
                                rf"photograph's (held-out|training) region: it needs --data DIR, a folder of your own "
                                rf"images at least {size} pixels on each side \(or a smaller --image-size\)", str(e))
        else:
            RealImageCrops("train", size, 1), RealImageCrops("heldout", size, 1)
    assert needs_data == {"var"}


def test_reconstruction_grid_labels_originals_and_reconstructions(tmp_path):
    from vqfast.train.evaluation import grid_figure, save_grid

    originals = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    recons = -originals
    fig = grid_figure(originals, recons)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["original", "reconstruction"] * 4  # a header over each column
    assert "original | reconstruction" in fig._suptitle.get_text()
    # Under each label its images: pair i's original at the left of its cell, its reconstruction beside it.
    grid = np.asarray(ax.images[0].get_array())
    o, r = to_uint8(originals), to_uint8(recons)
    for i in range(6):
        y, x = (i // 4) * 18 + 1, (i % 4) * 38 + 1
        assert np.array_equal(grid[y: y + 16, x: x + 16], o[i]) and np.array_equal(grid[y: y + 16, x + 17: x + 33], r[i])
    # Each label is centred over its column.
    assert [t.get_position()[0] for t in ax.texts] == [38 * (j // 2) + 1 + 17 * (j % 2) + 8 for j in range(8)]
    save_grid(tmp_path / "grid.png", originals, recons)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_names_the_training_figure_apart_from_the_held_out_usage(tmp_path, capsys):
    vtrain.train(tiny(1), tmp_path, progress=True, finish=False)
    bar = capsys.readouterr().err
    assert re.search(r"recent_use=\d+%", bar) and "usage" not in bar, bar
