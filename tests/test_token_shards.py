"""Token sets (`vqfast tokenize ... encode DIR OUT_DIR`, vqfast.tokenset / vqfast.shards, TokenDataset):
shards and manifest, labels, views, bit-identical tokens, reruns, bad input. One process here; the
torchrun runs (two processes, two "nodes", a killed rank) are in test_token_shards_torchrun.py."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vqfast import shards, tokenset
from vqfast import tokenize as vtok
from vqfast import train as vtrain
from vqfast.cli import main as cli_main
from vqfast.data import TokenDataset, load_crop
from vqfast.errors import InputError

CLASSES = ("cat", "dog", "eel")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    vtrain.train(vtrain.make_config("tiny", steps=2), out, progress=False, finish=False)
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def model(ckpt):
    return vtok.load_model(ckpt)


def make_folder(root, per_class=4, corrupt=True):
    """ImageNet-style DIR/<class>/<image>, odd sizes (centre crops), one JPEG that does not decode."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = 16 + 3 * i, 24 - i
            ext = "jpg" if i % 2 else "png"
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / c / f"{i}.{ext}")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a picture")
    return sorted(f"{c}/{i}.{'jpg' if i % 2 else 'png'}" for c in CLASSES for i in range(per_class))


def encode(model, ckpt, src, out, **kw):
    return tokenset.encode_folder(model, src, out, checkpoint=ckpt, progress=False, **kw)


def alone(model, views):
    """img_to_idxBl of each view alone (batch size 1, default settings): the reference."""
    with torch.no_grad():
        return [model.img_to_idxBl(v[None]) for v in views]


def read_rows(out):
    ds = TokenDataset(out)
    return ds, [ds[i] for i in range(len(ds))]


def test_shards_and_manifest_hold_every_readable_image_once_with_its_tokens_and_label(tmp_path, model, ckpt):
    names = make_folder(tmp_path / "in")
    done = encode(model, ckpt, tmp_path / "in", tmp_path / "out", shard_size=5, batch_size=3)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m == done["manifest"]
    assert m["format"] == "vqfast-token-shards" and m["version"] == 1
    assert m["checkpoint"] == {"path": str(ckpt), "sha256": tokenset.sha256_file(ckpt)}
    assert (m["patch_nums"], m["vocab_size"], m["image_size"], m["token_dtype"]) == ([1, 2, 4, 8], 64, 16, "int16")
    assert m["augment"] == {"name": "none", "views": 1} and m["shard_size"] == 5
    assert m["labels"] == {"mode": "folders", "names": list(CLASSES)}
    # 13 files listed, 5 per shard: broken.jpg (4th of dog/) is skipped and listed, not lost or counted.
    assert [(s["name"], s["rows"]) for s in m["shards"]] == [("shard-00000", 5), ("shard-00001", 4), ("shard-00002", 3)]
    assert m["images"] == m["rows"] == 12
    assert [s[0] for s in m["skipped"]] == ["dog/broken.jpg"] and "OSError" in m["skipped"][0][1]
    shard = tmp_path / "out" / "shard-00001"
    assert sorted(p.name for p in shard.iterdir()) == ["labels.npy", "meta.json", "paths.npy", "scale0.npy",
                                                        "scale1.npy", "scale2.npy", "scale3.npy", "views.npy"]
    for s, p in enumerate(m["patch_nums"]):  # plain arrays: no pickle needed, memory-mappable
        a = np.load(shard / f"scale{s}.npy", mmap_mode="r", allow_pickle=False)
        assert isinstance(a, np.memmap) and a.dtype == np.int16 and a.shape == (4, p * p)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left
    ds, rows = read_rows(tmp_path / "out")
    assert ds.names == names and ds.patch_nums == (1, 2, 4, 8) and ds.vocab_size == 64
    assert ds.label_names == list(CLASSES)
    assert [label for _, label in rows] == [CLASSES.index(n.split("/")[0]) for n in names]
    for (tokens, _), name in zip(rows, names):
        ref = alone(model, load_crop(tmp_path / "in" / name, 16)[0][None])[0]
        assert all(t.dtype == torch.int64 and torch.equal(t, r[0]) for t, r in zip(tokens, ref)), name


def test_labels_none_and_auto_on_a_flat_folder(tmp_path, model, ckpt):
    make_folder(tmp_path / "in", per_class=2, corrupt=False)
    encode(model, ckpt, tmp_path / "in", tmp_path / "none", labels="none")
    ds = TokenDataset(tmp_path / "none")
    assert ds.manifest["labels"] == {"mode": "none", "names": []} and set(ds.labels().tolist()) == {-1}
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in" / "loose.png")
    encode(model, ckpt, tmp_path / "in", tmp_path / "auto")
    assert TokenDataset(tmp_path / "auto").manifest["labels"]["mode"] == "none"
    with pytest.raises(InputError, match=r"--labels folders: .*loose.png is not inside a class folder"):
        encode(model, ckpt, tmp_path / "in", tmp_path / "folders", labels="folders")


@pytest.mark.parametrize("augment", ["flip", "ten-crop"])
def test_views_counts_and_tokens(tmp_path, model, ckpt, augment):
    names = make_folder(tmp_path / "in", per_class=1, corrupt=False)
    encode(model, ckpt, tmp_path / "in", tmp_path / "out", augment=augment, batch_size=2, shard_size=2)
    views = tokenset.AUGMENTS[augment]
    ds, rows = read_rows(tmp_path / "out")
    assert ds.views == views == (2 if augment == "flip" else 10)
    assert len(ds) == views * len(names) and ds.manifest["images"] == len(names)
    assert ds.names == [n for n in names for _ in range(views)]
    assert [ds.view(i) for i in range(len(ds))] == list(range(views)) * len(names)
    for j, name in enumerate(names):
        img = load_crop(tmp_path / "in" / name, 16 if augment == "flip" else 17)[0]
        if augment == "flip":
            expected = [img, img.flip(-1)]
        else:  # corners and centre of the 17 x 17 (1.1 x 16) resize, then their mirrors
            five = [img[:, y: y + 16, x: x + 16] for y, x in ((0, 0), (0, 1), (1, 0), (1, 1), (0, 0))]
            expected = five + [c.flip(-1) for c in five]
        for v, ref in enumerate(alone(model, expected)):
            tokens = rows[j * views + v][0]
            assert all(torch.equal(t, r[0]) for t, r in zip(tokens, ref)), (name, v)


def test_tokens_do_not_depend_on_batch_size_or_shard_size(tmp_path, model, ckpt):
    make_folder(tmp_path / "in", per_class=5)
    runs = [(1, 100), (4, 3), (32, 7)]
    for b, s in runs:  # the middle run decodes in a worker process
        encode(model, ckpt, tmp_path / "in", tmp_path / f"b{b}s{s}", batch_size=b, shard_size=s, workers=int(b == 4))
    first = read_rows(tmp_path / "b1s100")[1]
    for b, s in runs[1:]:
        other = read_rows(tmp_path / f"b{b}s{s}")[1]
        assert len(other) == len(first) == 15
        for (ta, la), (tb, lb) in zip(first, other):
            assert la == lb and all(torch.equal(x, y) for x, y in zip(ta, tb))


def test_rerun_skips_finished_shards_and_rewrites_only_missing_ones(tmp_path, model, ckpt):
    make_folder(tmp_path / "in")
    out = tmp_path / "out"
    encode(model, ckpt, tmp_path / "in", out, shard_size=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*/scale0.npy") for p in [p.parent]}
    manifest = json.loads((out / "manifest.json").read_text())
    import shutil
    shutil.rmtree(out / "shard-00001")
    (out / ".tmp-shard-00002-deadbeef").mkdir()  # what a killed process leaves
    (out / "manifest.json").unlink()
    done = encode(model, ckpt, tmp_path / "in", out, shard_size=4, batch_size=2)
    assert done["skipped_shards"] == 3 and done["encoded"] == 4  # shard 1 (images 4..7) only
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert all(after[n] == t for n, t in before.items() if n != "shard-00001")
    assert done["manifest"] == manifest
    assert not (out / ".tmp-shard-00002-deadbeef").exists()


def test_a_rerun_with_other_settings_is_refused_naming_the_difference(tmp_path, model, ckpt):
    make_folder(tmp_path / "in")
    out = tmp_path / "out"
    encode(model, ckpt, tmp_path / "in", out, shard_size=4)
    with pytest.raises(InputError, match=r"other settings \(--augment: 'none' then, 'flip' now\)"):
        encode(model, ckpt, tmp_path / "in", out, shard_size=4, augment="flip")
    with pytest.raises(InputError, match=r"--shard-size: 4 then, 5 now"):
        encode(model, ckpt, tmp_path / "in", out, shard_size=5)
    other = tmp_path / "other.pt"
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other)
    with pytest.raises(InputError, match=r"the tokenizer checkpoint \(sha256\): '[0-9a-f]{64}' then"):
        encode(vtok.load_model(other), other, tmp_path / "in", out, shard_size=4)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in" / "cat" / "new.png")
    with pytest.raises(InputError, match=r"the number of images: 13 then, 14 now; the image list"):
        encode(model, ckpt, tmp_path / "in", out, shard_size=4)


def _cli(*argv):
    return cli_main(["tokenize", *argv])


def test_bad_input_is_one_line(tmp_path, ckpt, capsys):
    make_folder(tmp_path / "in", per_class=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "net.pt")
    cases = {
        "empty": ([str(ckpt), "encode", str(tmp_path / "empty"), str(tmp_path / "o1")], r"input .*empty is an empty folder"),
        "no images": ([str(ckpt), "encode", str(tmp_path / "texts"), str(tmp_path / "o2")],
                      r"input .*texts holds no PNG/JPG/JPEG/WEBP/BMP images"),
        "busy": ([str(ckpt), "encode", str(tmp_path / "in"), str(tmp_path / "busy")],
                 r"output .*busy holds files that are not a vqfast token set \(notes.txt\); choose an empty"),
        "not a tokenizer": ([str(tmp_path / "net.pt"), "encode", str(tmp_path / "in"), str(tmp_path / "o3")],
                            r"checkpoint .*net.pt is not a VQVAE state_dict"),
        "augment one file": ([str(ckpt), "encode", str(tmp_path / "in"), str(tmp_path / "t.pt"), "--augment", "flip"],
                             r"--augment and --labels apply to a token set"),
        "shard size": ([str(ckpt), "encode", str(tmp_path / "in"), str(tmp_path / "o4"), "--shard-size", "0"],
                       r"--shard-size must be a positive int, got 0"),
    }
    for name, (argv, pattern) in cases.items():
        assert _cli("--checkpoint", argv[0], *argv[1:], "--no-progress") == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        import re
        assert re.match(r"^vqfast tokenize: error: " + pattern, err), (name, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_the_command_writes_a_token_set_and_reports(tmp_path, ckpt, capsys):
    make_folder(tmp_path / "in", per_class=2)
    assert _cli("--checkpoint", str(ckpt), "encode", str(tmp_path / "in"), str(tmp_path / "out"), "--no-progress",
                "--shard-size", "4", "--augment", "flip") == 0
    out, err = capsys.readouterr()
    assert "6 images -> 12 rows (2 per image) of 85 tokens over scales (1, 2, 4, 8) (vocabulary 64) in 2 shards" in out
    assert "labels: 3 classes from the folder names" in out and "images/s" in out
    assert err.strip().splitlines() == ["warning: skipped 1 unreadable file: dog/broken.jpg (OSError: Truncated File Read)"]
    assert len(TokenDataset(tmp_path / "out")) == 12


def test_token_dataset_under_distributed_sampler_covers_every_row_once(tmp_path, model, ckpt):
    make_folder(tmp_path / "in", per_class=3)
    encode(model, ckpt, tmp_path / "in", tmp_path / "out", shard_size=4, augment="flip")
    ds = TokenDataset(tmp_path / "out")
    seen = []
    for rank in range(3):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=1,
                                                      drop_last=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=1 if rank == 0 else 0)
        for tokens, labels in loader:
            assert [t.shape for t in tokens] == [(len(labels), p * p) for p in ds.patch_nums]
            seen += [tuple(int(x) for x in torch.cat([t[i] for t in tokens])) + (int(labels[i]),)
                     for i in range(len(labels))]
    every = [tuple(int(x) for x in torch.cat(t)) + (label,) for t, label in (ds[i] for i in range(len(ds)))]
    assert len(ds) == 18 and sorted(seen) == sorted(every)


def test_token_dataset_refuses_what_is_not_a_finished_token_set(tmp_path, model, ckpt):
    with pytest.raises(InputError, match="has no manifest.json"):
        TokenDataset(tmp_path)
    make_folder(tmp_path / "in", per_class=1, corrupt=False)
    encode(model, ckpt, tmp_path / "in", tmp_path / "out")
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(InputError, match="the job has not finished; rerun it"):
        TokenDataset(tmp_path / "out")


def test_var_teacher_forcing_input_from_a_row(tmp_path, model, ckpt):
    """The documented helper: a row's tokens -> VAR's teacher-forcing input."""
    make_folder(tmp_path / "in", per_class=1, corrupt=False)
    encode(model, ckpt, tmp_path / "in", tmp_path / "out")
    ds = TokenDataset(tmp_path / "out")
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    x = model.quantize.idxBl_to_var_input(batch[0])
    assert x.shape == (3, sum(p * p for p in ds.patch_nums[1:]), model.quantize.Cvae)


def test_batch_invariant_features_equal_one_image_features(model):
    """Why the tokens cannot depend on the batch: under tokenset.batch_invariant every image's encoder
    output is bit-equal to the one-image call with PyTorch's default settings (the demo model's shape
    too: attention, three levels)."""
    demo = vtok.build_model(vtrain.make_config("demo")).eval()
    for net, size in ((model, 16), (demo, 32)):
        x = torch.rand(9, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            one = torch.cat([net.quant_conv(net.encoder(x[i: i + 1])) for i in range(9)])
            with tokenset.batch_invariant(torch.device("cpu")):
                batched = net.quant_conv(net.encoder(x))
        assert torch.equal(batched, one)
        assert torch.backends.mkldnn.enabled  # restored on the way out


def test_token_dtype_is_int16_up_to_32768_codes():
    assert shards.token_dtype(4096) == shards.token_dtype(2 ** 15) == np.int16
    assert shards.token_dtype(2 ** 15 + 1) == shards.token_dtype(2 ** 20) == np.int32
