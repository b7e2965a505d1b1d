"""vqfast.data for `vqfast train --data DIR` and `vqfast tokenize`: folder scanning, the held-out split,
pixel scaling by dtype, mode conversions, random crops, decoding failures."""
import hashlib
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vqfast.data import (MIN_IMAGES, FolderCrops, ImageFolder, format_skipped, load_crop, probe_image, psnr)
from vqfast.train import StepBatches, make_config


def _png16(path, a: np.ndarray) -> None:
    """A 16-bit PNG of uint16 [H, W] or [H, W, 3 | 4] (PIL writes 16-bit greyscale only)."""
    a = a[..., None] if a.ndim == 2 else a
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    colour = {1: 0, 3: 2, 4: 6}[c]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _photo(h, w, seed=0) -> np.ndarray:
    """A smooth, structured uint8 RGB picture (gradients and a blob): crops of it differ visibly."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    c = rng.random(3)
    img = np.stack([np.sin(6 * x + c[0] * 6), np.cos(5 * y + c[1] * 6), np.sin(4 * (x + y) + c[2] * 6)], -1)
    img += 1.5 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) * 30)[..., None]
    return np.clip((img + 1) / 3.5 * 255, 0, 255).astype(np.uint8)


def _folder(root, n=12):
    """n readable images in several formats and folders, two unreadable ones, one ignored text file."""
    kinds = ["png", "jpg", "JPEG", "webp", "bmp"]
    for i in range(n):
        sub = root / ("a" if i % 3 == 0 else "b/c" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(40 + i, 50, seed=i)).save(sub / f"img{i}.{kinds[i % len(kinds)]}")
    (root / "b" / "notes.png").write_text("not an image")
    (root / "empty.jpg").write_bytes(b"")
    (root / "readme.txt").write_text("ignored: not an image suffix")
    return root


def test_folder_scan_recursive_split_and_skips(tmp_path):
    folder = ImageFolder.scan(_folder(tmp_path / "photos"))
    names = folder.train + folder.heldout
    assert len(names) == 12 and len(set(names)) == 12
    assert {n.rsplit(".", 1)[1] for n in names} == {"png", "jpg", "JPEG", "webp", "bmp"}
    assert any(n.startswith("b/c/") for n in names)  # recursive
    assert sorted(n for n, _ in folder.skipped) == ["b/notes.png", "empty.jpg"]
    line = format_skipped(folder.skipped)
    assert line.startswith("skipped 2 unreadable files") and "b/notes.png" in line and "empty.jpg" in line
    # The split is by file: 10 % (here 1) held out, the smallest SHA-1 of the relative path, so the
    # same files give the same split whatever the listing order or the folder's location.
    assert folder.heldout == [min(names, key=lambda n: hashlib.sha1(n.encode()).digest())]
    moved = ImageFolder.scan(_folder(tmp_path / "elsewhere"))
    assert (moved.train, moved.heldout) == (folder.train, folder.heldout)
    assert moved.digest() == folder.digest()
    (tmp_path / "elsewhere" / "a" / "img0.png").unlink()
    Image.fromarray(_photo(40, 50, seed=99)).save(tmp_path / "elsewhere" / "new.png")
    assert ImageFolder.scan(tmp_path / "elsewhere").digest() != folder.digest()


def test_too_few_images_is_a_clear_error(tmp_path):
    Image.fromarray(_photo(20, 20)).save(tmp_path / "one.png")
    (tmp_path / "two.png").write_text("text")
    with pytest.raises(ValueError, match=rf"holds 1 readable image .*1 more could not be read.*at least {MIN_IMAGES}"):
        ImageFolder.scan(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolder.scan(tmp_path / "one.png")


def test_pixels_scaled_by_dtype_and_modes_converted(tmp_path):
    """Exact values: the crop is the whole image at its own size, so nothing is resampled."""
    s = 8

    def loaded(name):
        t, info = load_crop(tmp_path / name, s)
        assert t.shape == (3, s, s) and t.dtype == torch.float32
        return t, info

    Image.fromarray(np.full((s, s, 3), 3, np.uint8)).save(tmp_path / "dark8.png")
    t, info = loaded("dark8.png")
    assert torch.allclose(t, torch.tensor(3 / 255 * 2 - 1)) and info.note == ""  # dark stays dark
    Image.fromarray(np.full((s, s), 100, np.uint16)).save(tmp_path / "dark16.png")
    t, info = loaded("dark16.png")
    assert torch.allclose(t, torch.tensor(100 / 65535 * 2 - 1)) and "16-bit" in info.note
    Image.fromarray(np.full((s, s), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert torch.allclose(loaded("white16.png")[0], torch.tensor(1.0))
    rgb16 = np.zeros((s, s, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1] = 65535, 771  # 771 / 65535 = 3 / 255
    _png16(tmp_path / "rgb16.png", rgb16)
    t, _ = loaded("rgb16.png")
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 3 / 255 * 2 - 1, -1.0]))
    grey = np.arange(s * s, dtype=np.uint8).reshape(s, s) * 3
    Image.fromarray(grey).save(tmp_path / "grey.png")
    t, info = loaded("grey.png")
    assert info.note == "greyscale" and torch.equal(t[0], t[2])
    assert torch.allclose(t[1], torch.from_numpy(grey).float() / 255 * 2 - 1)
    rgba = np.zeros((s, s, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[: s // 2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    t, info = loaded("rgba.png")
    assert "alpha composited over white" in info.note
    assert torch.allclose(t[:, 0, 0], torch.tensor([200 / 255 * 2 - 1, -1.0, -1.0]))
    assert torch.allclose(t[:, -1, 0], torch.tensor(1.0))  # transparent -> white
    pal = Image.fromarray(np.array([[0, 1] * (s // 2)] * s, np.uint8), "L").convert("P")
    pal.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    t, info = loaded("palette.png")
    assert info.note == "palette"
    assert torch.allclose(t[:, 0, 0], torch.tensor([10, 20, 30]) / 255 * 2 - 1)
    assert torch.allclose(t[:, 0, 1], torch.tensor([250, 240, 230]) / 255 * 2 - 1)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: top black, bottom white
    Image.fromarray(a).save(tmp_path / "rot.png", exif=exif)
    t, info = load_crop(tmp_path / "rot.png", 20)
    assert (info.width, info.height) == (20, 40)
    top, bottom = t[:, :8].mean().item(), t[:, -8:].mean().item()
    assert top < -0.9 and bottom > 0.9


def test_random_crops_and_reduced_jpeg_decoding(tmp_path):
    big = _photo(768, 1024)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB"))
    Image.fromarray(full).save(tmp_path / "big_decoded.png")  # the same pixels, decoded at full size
    for i in range(4):
        rng = np.random.default_rng([1, i])
        a, info = load_crop(tmp_path / "big.jpg", 32, np.random.default_rng([1, i]), flip=True)
        b, _ = load_crop(tmp_path / "big_decoded.png", 32, rng, flip=True)
        assert 384 <= info.crop <= 768  # at least half the shorter side
        # JPEG's reduced-size decoding (DCT scaling) changes pixels a little, not the crop's place.
        assert psnr(a[None], b[None]).item() > 30
    crops = [load_crop(tmp_path / "big_decoded.png", 32, np.random.default_rng([2, i]))[0] for i in range(3)]
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])


def test_folder_items_deterministic_and_independent_of_workers(tmp_path):
    folder = ImageFolder.scan(_folder(tmp_path))
    cfg = make_config("tiny", seed=3, data=folder.describe())
    data = FolderCrops(folder, "train", 16, cfg["train_items"], seed=3)
    again = FolderCrops(ImageFolder.scan(tmp_path), "train", 16, cfg["train_items"], seed=3)
    assert torch.equal(data.batch(range(30)), again.batch(range(30)))
    # An epoch visits every training file once (11 files here; items 0..10 are epoch 0).
    assert len({tuple(data[i].flatten()[:50].tolist()) for i in range(len(folder.train))}) == len(folder.train)
    steps = StepBatches(data, cfg)
    serial = [steps[t][0] for t in range(4)]
    loader = torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(4), num_workers=2)
    assert all(torch.equal(a, b) for a, (b, failed) in zip(serial, loader))
    # The dataset holds names, not pixels: its pickled size (what each worker gets) stays small.
    assert len(pickle.dumps(data)) < 4000


def test_file_that_fails_to_decode_is_replaced_and_named(tmp_path):
    for i in range(3):
        Image.fromarray(_photo(256, 256, seed=i)).save(tmp_path / f"ok{i}.jpg")
    full = (tmp_path / "ok0.jpg").read_bytes()
    (tmp_path / "ok0.jpg").write_bytes(full[: len(full) // 2])  # the header survives, the body does not
    assert probe_image(tmp_path / "ok0.jpg") is None
    with pytest.raises(OSError):
        load_crop(tmp_path / "ok0.jpg", 16)
    folder = ImageFolder.scan(tmp_path)
    files = folder.train + folder.heldout
    data = FolderCrops(folder, "train" if "ok0.jpg" in folder.train else "heldout", 16, 100, seed=0)
    images, failed = data.load_batch(range(len(data.files)))
    assert images.shape == (len(data.files), 3, 16, 16) and torch.isfinite(images).all()
    assert len(failed) == 1 and failed[0].startswith("ok0.jpg (OSError") and "ok0.jpg" in files


def _valid_images(root) -> list[str]:
    """A folder of valid images of the kinds people have: camera-like JPEGs of odd sizes (641 x 479
    landscape, portrait, greyscale), PNG (RGB, RGBA, palette, greyscale, 16-bit), WebP and BMP."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    rng = np.random.default_rng(5)

    def picture(h, w, seed):  # structure plus noise: JPEG's coefficients are not all zero
        noise = rng.normal(0, 12, (h, w, 3))
        return np.clip(_photo(h, w, seed).astype(float) + noise, 0, 255).astype(np.uint8)

    made = {
        "landscape.jpg": Image.fromarray(picture(479, 641, 0)),
        "sub/portrait.JPG": Image.fromarray(picture(641, 479, 1)),
        "odd.jpeg": Image.fromarray(picture(331, 257, 2)),
        "grey.jpg": Image.fromarray(picture(300, 401, 3)).convert("L"),
        "big.jpg": Image.fromarray(picture(1200, 1601, 4)),
        "rgb.png": Image.fromarray(picture(97, 131, 5)),
        "rgba.png": Image.fromarray(np.dstack([picture(64, 90, 6), np.full((64, 90), 200, np.uint8)])),
        "palette.png": Image.fromarray(picture(120, 80, 7)).convert("P", palette=Image.ADAPTIVE, colors=64),
        "grey.png": Image.fromarray(picture(50, 70, 8)).convert("L"),
        "sub/photo.webp": Image.fromarray(picture(211, 300, 9)),
        "tiny.bmp": Image.fromarray(picture(17, 23, 10)),
    }
    for name, img in made.items():
        img.save(root / name, **({"quality": 90} if name.lower().endswith((".jpg", ".jpeg")) else {}))
    _png16(root / "sixteen.png", (rng.random((45, 60, 3)) * 65535).astype(np.uint16))
    return sorted([*made, "sixteen.png"])


def test_no_valid_image_is_skipped_by_train_or_tokenize(tmp_path):
    """Every file of a folder of valid images is used: the trainer's scan skips none, 40 random crops
    of each at the demo and tiny sizes decode, and tokenize encodes them all."""
    from vqfast import tokenize as vtok
    from vqfast import tokenizer

    names = _valid_images(tmp_path / "photos")
    folder = ImageFolder.scan(tmp_path / "photos")
    assert folder.skipped == [] and sorted(folder.train + folder.heldout) == names
    for size in (32, 16):
        for split in ("train", "heldout"):
            files = folder.train if split == "train" else folder.heldout
            data = FolderCrops(folder, split, size, 40 * len(files), seed=size)
            for start in range(0, len(data), 64):
                images, failed = data.load_batch(range(start, min(len(data), start + 64)))
                assert failed == (), f"{split} crops at size {size} failed: {failed}"
                assert torch.isfinite(images).all()
    model = tokenizer.build_model(make_config("tiny"))
    done = vtok.encode(model, tmp_path / "photos", tmp_path / "tokens.pt", batch_size=16, progress=False)
    assert done["skipped"] == []
    assert sorted(done["payload"]["names"]) == names
