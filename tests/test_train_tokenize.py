"""`vqfast tokenize`: a folder into one token file and back; token files and checkpoints checked
before use (the command-line errors are in test_train_cli.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from vqfast import models
from vqfast import tokenize as vtok
from vqfast import tokenizer
from vqfast import train as vtrain
from vqfast.errors import InputError
from vqfast.data import load_crop, to_uint8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    vtrain.train(vtrain.make_config("tiny", steps=2), out, progress=False, finish=False)
    return out / "checkpoint.pt"


def _images(root):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    shapes = {"a.png": (16, 16), "b.jpg": (30, 20), "sub/c.png": (40, 64), "sub/d.webp": (17, 33), "e.bmp": (9, 9)}
    for name, (h, w) in shapes.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / name)
    big = root / "f.jpg"
    Image.fromarray((rng.random((200, 200, 3)) * 255).astype(np.uint8)).save(big)
    big.write_bytes(big.read_bytes()[:1500])  # a header, then nothing: fails to decode
    return sorted(shapes)


def test_encode_folder_and_decode_roundtrip(tmp_path, ckpt):
    names = _images(tmp_path / "in")
    model = vtok.load_model(ckpt)
    done = vtok.encode(model, tmp_path / "in", tmp_path / "tok.pt", batch_size=2, progress=False)
    assert [n for n, _ in done["skipped"]] == ["f.jpg"]
    assert "4 resized to 16 x 16 (the checkpoint's image size), 3 of them centre-cropped" in done["summary"]
    assert "1 already 16 x 16" in done["summary"]
    t = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert t["names"] == names and t["patch_nums"] == [1, 2, 4, 8] and t["vocab_size"] == 64
    assert all(x.dtype == torch.int16 and x.shape == (len(names), p * p) for x, p in zip(t["tokens"], t["patch_nums"]))
    # Batched over the folder = each image alone.
    for i, name in enumerate(names):
        alone = model.img_to_idxBl(load_crop(tmp_path / "in" / name, 16)[0][None])
        assert all(torch.equal(x[i].long(), y[0]) for x, y in zip(t["tokens"], alone)), name
    tokens = vtok.read_tokens(tmp_path / "tok.pt", model)
    paths = vtok.decode(model, tokens, tmp_path / "out", batch_size=3, progress=False)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == [
        "a.png", "b.png", "e.png", "sub/c.png", "sub/d.png"]
    expected = to_uint8(tokenizer.decode_tokens(model, tokens["tokens"]))
    for path, img in zip(paths, expected):
        assert np.array_equal(np.asarray(Image.open(path)), img)
    with pytest.raises(InputError, match="holds 5: give a folder"):
        vtok.decode(model, tokens, tmp_path / "one.png", progress=False)


def test_an_input_none_of_whose_images_decode_says_why(tmp_path, ckpt):
    img = tmp_path / "cut.jpg"
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(img)
    img.write_bytes(img.read_bytes()[:20000])  # the header passes the probe, the body does not decode
    with pytest.raises(InputError, match=r"input .*cut.jpg: none of its 1 image could be decoded \(skipped 1 "
                                         r"unreadable file: .*cut.jpg \(OSError"):
        vtok.encode(vtok.load_model(ckpt), img, tmp_path / "tok.pt", progress=False)
    assert not (tmp_path / "tok.pt").exists()


def test_token_files_are_checked(tmp_path, ckpt):
    model = vtok.load_model(ckpt)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    vtok.encode(model, img, tmp_path / "tok.pt", progress=False)
    good = torch.load(tmp_path / "tok.pt", weights_only=True)

    def check(payload, pattern):
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=pattern):
            vtok.read_tokens(tmp_path / "bad.pt", model)

    check([1, 2], r"bad.pt is not a vqfast-tokens-1 file \(format: 'list'\)")
    check({**good, "format": "other"}, "format: 'other'")
    check({**good, "patch_nums": [1, 2, 4, 16], "tokens": good["tokens"][:3] + [torch.zeros(1, 256, dtype=torch.int16)]},
          r"written for scales \(1, 2, 4, 16\) and vocabulary 64, but the checkpoint has scales \(1, 2, 4, 8\)")
    check({**good, "tokens": good["tokens"][:3] + [torch.full((1, 64), 64, dtype=torch.int16)]},
          r"the 8 x 8 scale has indices outside \[0, 64\)")
    check({**good, "tokens": good["tokens"][:3] + [torch.zeros(2, 64, dtype=torch.int16)]},
          r"the 8 x 8 scale's tokens are not an integer \[1, 64\] tensor")
    check({**good, "tokens": good["tokens"][:3]}, "holds 3 token maps for 4 scales")
    assert vtok.read_tokens(tmp_path / "tok.pt", model)["tokens"][0].dtype == torch.int64


def test_checkpoints_are_checked(tmp_path, ckpt):
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format": "vqfast-train-1"}, tmp_path / "old.pt")
    with pytest.raises(InputError, match="has format 'vqfast-train-1', not 'vqfast-train-2'"):
        vtok.load_model(tmp_path / "old.pt")
    bad = dict(state["model"])
    key = next(k for k in bad if k.endswith("embedding.weight"))  # the codebook, whatever the model
    bad[key] = bad[key][:10]
    torch.save({**state, "model": bad}, tmp_path / "shape.pt")
    with pytest.raises(InputError, match="shape.pt does not fit its model: Error"):
        vtok.load_model(tmp_path / "shape.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="foreign.pt is not a VQVAE state_dict"):
        vtok.load_model(tmp_path / "foreign.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(InputError, match="neither a vqfast train checkpoint nor a VQVAE state_dict"):
        vtok.load_model(tmp_path / "list.pt")


def test_bare_var_state_dict(tmp_path):
    """A state_dict as VAR saves it (no vqfast wrapper): configuration read from it, same tokens."""
    torch.manual_seed(0)
    var = models.VQVAE(vocab_size=64, z_channels=8, ch=32, test_mode=True)
    torch.save(var.state_dict(), tmp_path / "vae.pth")
    model = vtok.load_model(tmp_path / "vae.pth")
    geo = tokenizer.model_geometry(model)
    assert geo["image_size"] == 256 and geo["vocab_size"] == 64
    Image.fromarray((np.random.default_rng(0).random((300, 256, 3)) * 255).astype(np.uint8)).save(tmp_path / "p.png")
    vtok.encode(model, tmp_path / "p.png", tmp_path / "tok.pt", progress=False)
    tokens = vtok.read_tokens(tmp_path / "tok.pt", model)["tokens"]
    expected = var.img_to_idxBl(load_crop(tmp_path / "p.png", 256)[0][None])
    assert all(torch.equal(a, b) for a, b in zip(tokens, expected))


def test_decode_output_names_never_collide(tmp_path):
    """decode's rule: the input's relative path with .png for its extension; inputs sharing a stem in
    one folder keep their extension (x_jpg.png); a name still taken gets _2."""
    out = tmp_path / "out"
    names = ["a/x.png", "b/x.png", "x.jpg", "x.png", "y.jpeg", "z.PNG", "sub/w.webp", "v.jpg", "v_jpg.png", "V.png"]
    paths = vtok.output_paths(names, out)
    assert [p.relative_to(out).as_posix() for p in paths] == [
        "a/x.png", "b/x.png", "x_jpg.png", "x_png.png", "y.png", "z.png", "sub/w.png", "v_jpg.png", "v_jpg_2.png",
        "V_png.png"]
    assert len({p.as_posix().lower() for p in paths}) == len(names)
    assert vtok.output_paths(["photo.jpg"], tmp_path / "one.png") == [tmp_path / "one.png"]
    assert vtok.output_paths(["photo.jpg"], out) == [out / "photo.png"]  # not photo.jpg.png
    for bad in ("../up.png", "/abs.png", "a/../../b.png"):
        with pytest.raises(InputError, match="is not a relative path inside the output folder"):
            vtok.output_paths(["ok.png", bad], out)


def test_decode_writes_every_image_of_colliding_stems(tmp_path, ckpt):
    model = vtok.load_model(ckpt)
    root = tmp_path / "in"
    for name in ("a/x.png", "b/x.png", "x.jpg", "x.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(len(name)).random((16, 16, 3)) * 255).astype(np.uint8)).save(root / name)
    vtok.encode(model, root, tmp_path / "tok.pt", progress=False)
    paths = vtok.decode(model, vtok.read_tokens(tmp_path / "tok.pt", model), tmp_path / "out", progress=False)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "a/x.png", "b/x.png", "x_jpg.png", "x_png.png"]
    assert len(paths) == 4
