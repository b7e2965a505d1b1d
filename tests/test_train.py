import json

import pytest
import torch

from vqfast import train as vtrain
from vqfast import tokenize as vtok


def tiny(steps, seed=0):
    return vtrain.make_config("tiny", steps=steps, seed=seed)


def test_twenty_steps_lower_the_loss(tmp_path):
    r = vtrain.train(tiny(20), tmp_path, progress=False, finish=False)
    losses = [h["loss"] for h in r["history"]]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_resume_equals_uninterrupted_run(tmp_path):
    full = vtrain.train(tiny(6), tmp_path / "a", progress=False, finish=False)
    part = vtrain.train(tiny(6), tmp_path / "b", progress=False, stop_after=3, finish=False)
    assert part["step"] == 3
    rest = vtrain.train(tiny(6), tmp_path / "b", resume=True, progress=False, finish=False)
    assert rest["step"] == 6
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in full["history"]]
    a, b = full["model"].state_dict(), rest["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"])


def test_outputs_and_tokenize_roundtrip(tmp_path):
    r = vtrain.train(tiny(2), tmp_path, progress=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("heldout_psnr_db", "mean_colour_baseline_psnr_db", "codebook_usage", "perplexity",
                "encode_tokens_per_s", "train_tokens_per_s"):
        assert key in m and m[key] > 0, key
    assert 1 <= m["perplexity"] <= 64 and 0 < m["codebook_usage"] <= 1
    for name in ("reconstructions.png", "loss_curve.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))

    import matplotlib.pyplot as plt
    import numpy as np

    img = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    plt.imsave(tmp_path / "in.png", img)
    args = vtok.argparse.Namespace(checkpoint=str(tmp_path / "checkpoint.pt"), mode="encode",
                                   input=str(tmp_path / "in.png"), output=str(tmp_path / "tok.pt"))
    assert vtok.main(args) == 0
    tokens = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert [tuple(t.shape) for t in tokens["idx_list"]] == [(1, p * p) for p in (1, 2, 4, 8)]
    model = vtok.load_model(tmp_path / "checkpoint.pt")
    assert all(torch.equal(a, b) for a, b in zip(
        tokens["idx_list"], model.img_to_idxBl(vtok.image_to_tensor(tmp_path / "in.png", 16))))
    args = vtok.argparse.Namespace(checkpoint=args.checkpoint, mode="decode", input=str(tmp_path / "tok.pt"),
                                   output=str(tmp_path / "out.png"))
    assert vtok.main(args) == 0
    assert plt.imread(tmp_path / "out.png").shape[:2] == (16, 16)


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
    demo = vtrain.build_model(vtrain.make_config("demo"))
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

    monkeypatch.setattr(vtrain.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        vtrain.train(tiny(6), tmp_path, resume=True, progress=False, checkpoint_every=1, finish=False)
    monkeypatch.setattr(vtrain.torch, "save", real_save)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # nothing lost: the old file is intact
    full = vtrain.train(tiny(6), tmp_path / "ref", progress=False, finish=False)
    rest = vtrain.train(tiny(6), tmp_path, resume=True, progress=False, finish=False)
    assert [h["loss"] for h in rest["history"]] == [h["loss"] for h in full["history"]]
