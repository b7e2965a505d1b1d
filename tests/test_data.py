import numpy as np
import pytest
import torch

from vqfast.data import RealImageCrops, load_digits_images, load_photographs, mean_colour_baseline, psnr, to_uint8


def test_sources_are_real_images():
    photos = load_photographs()
    assert len(photos) >= 10
    for name, img in photos:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert img.std() > 10, name  # not a flat or noise-free placeholder
    digits = load_digits_images()
    assert digits.shape == (1797, 8, 8) and digits.max() == 255


def test_items_deterministic_and_in_range():
    a = RealImageCrops("train", size=24, length=50, seed=3)
    b = RealImageCrops("train", size=24, length=50, seed=3)
    x = a.batch(range(10))
    assert x.shape == (10, 3, 24, 24) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, b.batch(range(10)))
    assert not torch.equal(x, RealImageCrops("train", size=24, length=50, seed=4).batch(range(10)))
    # Real photographs are spatially smooth: neighbouring pixels correlate far more than noise's.
    d = (x[..., 1:] - x[..., :-1]).abs().mean()
    assert d < 0.5 * x.std()


def test_split_regions_do_not_overlap():
    tr, ho = RealImageCrops("train", size=16), RealImageCrops("heldout", size=16)
    for r_tr, r_ho, (_, img) in zip(tr.regions, ho.regions, load_photographs()):
        assert r_tr.shape[0] + r_ho.shape[0] == img.shape[0]
    assert len(tr.digits) + len(ho.digits) == 1797


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        RealImageCrops("test")
    with pytest.raises(ValueError, match="size"):
        RealImageCrops(size=4)
    with pytest.raises(ValueError, match="length"):
        RealImageCrops(length=0)
    with pytest.raises(IndexError):
        RealImageCrops(length=2)[2]


def test_metrics():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    assert torch.isinf(psnr(x, x)).sum() == 0 and (psnr(x, x) > 90).all()
    noisy = (x + 0.02).clamp(-1, 1)
    assert (psnr(noisy, x) > psnr(mean_colour_baseline(x), x)).all()
    assert to_uint8(torch.ones(3, 2, 2)).tolist() == [[[255] * 3] * 2] * 2


def test_scan_names_every_unreadable_file_with_its_reason(tmp_path):
    from PIL import Image

    from vqfast.data import ImageFolder, format_skipped

    for i in range(2):
        Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    broken = []
    for i in range(25):  # more than any short list would show
        (tmp_path / f"d{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 3}" / f"text{i}.png").write_text("not an image")
        broken.append(f"d{i % 3}/text{i}.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "anim.webp.png", format="GIF")
    broken += ["empty.jpg", "anim.webp.png"]
    folder = ImageFolder.scan(tmp_path)
    reasons = dict(folder.skipped)
    assert sorted(reasons) == sorted(broken) and sorted(folder.train + folder.heldout) == ["ok0.png", "ok1.png"]
    assert all(r.strip() for r in reasons.values())
    assert reasons["anim.webp.png"].endswith("GIF is not a supported format (PNG, JPEG, WebP, BMP)")
    line = format_skipped(folder.skipped)
    assert line.startswith("skipped 27 unreadable files: ") and "\n" not in line
    assert all(f"{name} ({reason})" in line for name, reason in folder.skipped)
    short = format_skipped(folder.skipped, limit=3)
    assert short.endswith("; and 24 more")
    assert [f"{n} (" in short for n, _ in folder.skipped] == [True] * 3 + [False] * 24


def test_format_skipped_lines():
    from vqfast.data import format_skipped

    assert format_skipped([("a.png", "OSError: bad\nsecond line"), ("b.jpg", " ")]) == \
        "skipped 2 unreadable files: a.png (OSError: bad); b.jpg (no reason given)"
    assert format_skipped([("a.png", "r")]) == "skipped 1 unreadable file: a.png (r)"
    assert format_skipped([("a.png", "r")] * 2, limit=0) == "skipped 2 unreadable files: and 2 more"
    assert format_skipped([]) == "skipped 0 unreadable files"
    with pytest.raises(ValueError, match="limit"):
        format_skipped([("a.png", "r")], limit=-1)
