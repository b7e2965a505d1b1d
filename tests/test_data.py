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
