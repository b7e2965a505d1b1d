"""vqfast.data.load_crop on every kind of valid image: sizes from 1 x 1 to large, portrait and landscape,
the 8 EXIF orientations, JPEG (colour at 4:4:4, 4:2:2 and 4:2:0, greyscale, progressive), PNG (RGB,
16-bit greyscale, greyscale, palette, RGBA), WebP and BMP, any square and any target size.

The reference is the full decode, built here without load_crop: PIL decodes the stored pixels (no
orientation, no reduced decode), this file's own table of the EXIF orientations turns them upright and
its own rules convert them (greyscale repeated, palette looked up, alpha over white, 16 bits / 65535);
the square is then resized with the call load_crop documents (PIL bicubic, box, reducing_gap 3). Where
load_crop decodes at full size the two must agree exactly; where it decodes a JPEG at 1/2, 1/4 or 1/8
(the crop at least twice the target size), within the measured resampling tolerance below.
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import examples
from vqfast.data import (FolderCrops, ImageFolder, centred_square, format_skipped, jpeg_colour_factor, jpeg_scale,
                         load_crop, random_square)

# Upright view of a stored [H, W, ...] array for each EXIF orientation (EXIF 2.3, tag 0x0112: "row 0 is
# the visual ..."): 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
# 8 rotate 90 counter-clockwise.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}

# Reduced (DCT-scaled) JPEG decode against the full decode: RMSE in 8-bit levels over the [3, size, size]
# output, per decode scale. Measured on 8,064 examples of test_reduced_jpeg_matches_full_decode's strategy
# at random seeds (2,688 per scale): at 1/2 max 3.30, 99th percentile 2.54, median 0.76; at 1/4 max 2.08,
# 1.38, 0.74; at 1/8 max 1.56, 1.12, 0.67 (1/2 keeps half the DCT band: its filter differs most from the
# full path's bicubic). Each limit is twice its scale's maximum, rounded up. Over the same examples they
# fail: the decoder before the per-axis fix (one width ratio for both axes) on 29 % (10 % raised); the
# box without the reversed axes' offset on 15 %; a ratio per axis from the rounded-up reduced size on
# 10 %; 4:2:2 reduced as far as 4:2:0 on 18 % of the 4:2:2 examples.
REDUCED_JPEG_RMSE = {2: 6.6, 4: 4.2, 8: 3.2}

KINDS = ("jpeg", "jpeg-grey", "jpeg-progressive", "png", "png-grey", "png16", "png-palette", "png-rgba",
         "webp", "bmp")


def suffix(kind: str) -> str:
    return {"jpeg": "jpg", "png16": "png"}.get(kind.split("-")[0], kind.split("-")[0])


def picture(w: int, h: int, seed: int, stride: float = 1.0) -> np.ndarray:
    """A photo-like uint8 [h, w, 3]: per channel two plane waves in random directions and a sharp-edged
    disc. ``stride``: picture pixels per output pixel of the crop that will be taken; the waves' periods
    are 8 to 32 output pixels, steep enough that a crop off by a fraction of a pixel shows, and well
    below the output's Nyquist rate, where two antialiasing filters disagree most."""
    rng = np.random.default_rng(seed)
    y = np.arange(h, dtype=np.float32)[:, None] + 0.5
    x = np.arange(w, dtype=np.float32)[None, :] + 0.5
    cx, cy, r = rng.uniform(0.2, 0.8, 3) * (w, h, 0.4 * min(w, h))
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    out = np.empty((h, w, 3), np.float32)
    for c in range(3):
        out[..., c] = 0.5 + np.where(disc, np.float32(rng.uniform(-0.15, 0.15)), np.float32(0))
        for _ in range(2):
            period, angle, phase = rng.uniform(8, 32) * stride, rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
            u = 2 * np.pi * x * np.float32(np.cos(angle) / period)
            v = 2 * np.pi * y * np.float32(np.sin(angle) / period) + np.float32(phase)
            out[..., c] += 0.2 * (np.sin(u) * np.cos(v) + np.cos(u) * np.sin(v))  # sin(u + v), separably
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def write(path, kind: str, stored: np.ndarray, orientation: int, seed: int = 0, quality: int = 90,
          subsampling: int = 2):
    """Save ``stored`` (uint8 [H, W, 3]) as ``kind`` with EXIF ``orientation`` (BMP has no EXIF: 1)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    opts = {"exif": exif}
    if kind.startswith("jpeg"):
        opts.update(quality=quality, subsampling=subsampling, progressive=kind == "jpeg-progressive")
    if kind in ("jpeg-grey", "png-grey"):
        img = Image.fromarray(stored).convert("L")
    elif kind == "png16":
        # 16-bit greyscale: the full range, so a scaling by 255 or 256 instead of 65535 shows.
        img = Image.fromarray(stored[..., 1].astype(np.uint16) * 256 + stored[..., 0])
    elif kind == "png-palette":
        img = Image.fromarray(stored).quantize(64)
    elif kind == "png-rgba":
        alpha = np.random.default_rng(seed).integers(0, 256, stored.shape[:2], dtype=np.uint8)
        img = Image.fromarray(np.dstack([stored, alpha]))
    else:
        img = Image.fromarray(stored)
    if kind == "bmp":
        opts = {}
    img.save(path, **opts)
    return path


def full_decode(path, orientation: int) -> Image.Image:
    """The upright picture at full size, as load_crop resamples it: "RGB" (8-bit) or "F" (16-bit / 65535)."""
    with Image.open(path) as img:
        img.load()
        mode, a = img.mode, np.asarray(img)
        palette = img.getpalette()
    if mode in ("I;16", "I"):
        return Image.fromarray(np.ascontiguousarray(UPRIGHT[orientation](a.astype(np.float32) / 65535)))
    if mode == "L":
        a = np.repeat(a[..., None], 3, axis=2)
    elif mode == "P":
        a = np.array(palette, np.uint8).reshape(-1, 3)[a]
    elif mode == "RGBA":
        alpha = a[..., 3:].astype(np.float64)
        # Over opaque white: c a / 255 + 255 - a, rounded (255 is odd, so there are no halves).
        a = np.floor(a[..., :3] * alpha / 255 + 255 - alpha + 0.5).astype(np.uint8)
    else:
        assert mode == "RGB", mode
    return Image.fromarray(np.ascontiguousarray(UPRIGHT[orientation](a)))


def reference(full: Image.Image, square, size: int) -> torch.Tensor:
    x, y, s = square
    out = full.resize((size, size), Image.Resampling.BICUBIC, box=(x, y, x + s, y + s), reducing_gap=3.0)
    a = np.array(out, np.float32)
    t = torch.from_numpy(a)[None].expand(3, -1, -1) if a.ndim == 2 else torch.from_numpy(a).permute(2, 0, 1) / 255
    return (t * 2 - 1).clamp(-1, 1)


def rmse_levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b) * 127.5).pow(2).mean().sqrt().item()


def check_decode(path, kind, orientation, upright_w, upright_h, square, size, scale=None):
    """load_crop's output is the requested shape and range, and matches the full decode: exactly, or
    within REDUCED_JPEG_RMSE[scale] where the JPEG is decoded at 1/scale (default: a 4:2:0 JPEG's rule)."""
    t, info = load_crop(path, size, square=square)
    assert t.shape == (3, size, size) and t.dtype == torch.float32
    assert torch.isfinite(t).all() and t.min() >= -1 and t.max() <= 1
    assert (info.width, info.height, info.crop) == (upright_w, upright_h, square[2])
    expected = reference(full_decode(path, orientation), square, size)
    if scale is None:
        scale = jpeg_scale(square[2], size) if kind.startswith("jpeg") else 1
    if scale > 1:
        err = rmse_levels(t, expected)
        assert err <= REDUCED_JPEG_RMSE[scale], f"decoded at 1/{scale}: {err:.2f} levels RMSE off the full decode"
    else:
        diff = (t - expected).abs().max().item()
        assert diff <= 1e-6, f"full-size decode differs from the reference by {diff * 127.5:.3f} levels"


# Sides: tiny, odd, prime, the 641 x 479 of the report, and anything up to large.
SIDES = st.one_of(st.sampled_from([1, 2, 3, 5, 8, 13, 31, 97, 479, 641]), st.integers(1, 1200))
TARGETS = st.one_of(st.sampled_from([1, 2, 8, 32]), st.integers(1, 96))


@pytest.mark.parametrize("kind", KINDS)
@examples(8)
@given(w=SIDES, h=SIDES, orientation=st.integers(1, 8), size=TARGETS, seed=st.integers(0, 2 ** 16), data=st.data())
def test_every_valid_image_decodes(tmp_path_factory, kind, w, h, orientation, size, seed, data):
    orientation = 1 if kind == "bmp" else orientation
    uw, uh = (h, w) if orientation >= 5 else (w, h)
    s = data.draw(st.integers(1, min(uw, uh)), label="side")
    square = (data.draw(st.integers(0, uw - s), label="x"), data.draw(st.integers(0, uh - s), label="y"), s)
    path = write(tmp_path_factory.mktemp("img") / f"a.{suffix(kind)}", kind, picture(w, h, seed, s / size),
                 orientation, seed)
    check_decode(path, kind, orientation, uw, uh, square, size)


@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("kind", ["jpeg", "jpeg-grey", "jpeg-progressive"])
@examples(8)
@given(size=st.integers(8, 64), orientation=st.integers(1, 8), quality=st.integers(40, 95),
       subsampling=st.sampled_from([0, 1, 2]), seed=st.integers(0, 2 ** 16), data=st.data())
def test_reduced_jpeg_matches_full_decode(tmp_path_factory, scale, kind, size, orientation, quality, subsampling,
                                          seed, data):
    """Crops that load_crop decodes at 1/scale, at every orientation, in pictures of any aspect. The
    documented rule: the largest scale that keeps the crop at least size x jpeg_colour_factor wide
    (2 for 4:2:2, PIL's subsampling 1)."""
    need = 2 * size if subsampling == 1 and kind != "jpeg-grey" else size
    if scale * need > 1200:
        size, need = size // 2, need // 2
    w = data.draw(st.integers(scale * need, 1200), label="w")
    h = data.draw(st.integers(scale * need, 1200), label="h")
    uw, uh = (h, w) if orientation >= 5 else (w, h)
    top = min(w, h) if scale == 8 else min(w, h, 2 * scale * need - 1)
    s = data.draw(st.integers(scale * need, top), label="side")
    square = (data.draw(st.integers(0, uw - s), label="x"), data.draw(st.integers(0, uh - s), label="y"), s)
    assert jpeg_scale(s, need) == scale
    path = write(tmp_path_factory.mktemp("img") / "a.jpg", kind, picture(w, h, seed, s / size), orientation, seed,
                 quality, subsampling)
    check_decode(path, kind, orientation, uw, uh, square, size, scale)


@pytest.mark.parametrize("orientation", [1, 6])
def test_641_by_479_jpeg_at_32_every_random_crop(tmp_path, orientation):
    """The reported case. Before the fix, of these 100 crops (orientation 1) 8 raised "box can't exceed
    original image size", 86 of the other 92 were off by more than the limit, and the centred one raised."""
    path = write(tmp_path / "a.jpg", "jpeg", picture(641, 479, 0, 479 * 0.75 / 32), orientation)
    w, h = (479, 641) if orientation == 6 else (641, 479)
    full = full_decode(path, orientation)
    for i in range(100):
        t, info = load_crop(path, 32, np.random.default_rng([0, i]))
        square = random_square(w, h, np.random.default_rng([0, i]))
        assert info.crop == square[2]
        assert rmse_levels(t, reference(full, square, 32)) <= REDUCED_JPEG_RMSE[jpeg_scale(square[2], 32)], i
    t, _ = load_crop(path, 32)  # the centred square, as `vqfast tokenize` decodes: 479 px at 1/8
    assert rmse_levels(t, reference(full, centred_square(w, h), 32)) <= REDUCED_JPEG_RMSE[8]


def test_12_megapixel_photo_turned_by_exif(tmp_path):
    """A phone's 4032 x 3024 JPEG stored sideways (orientation 6), decoded at 1/8 and 1/4."""
    path = write(tmp_path / "a.jpg", "jpeg", picture(4032, 3024, 0, 3024 / 256), 6)
    full = full_decode(path, 6)
    for square, size in [(centred_square(3024, 4032), 256), (centred_square(3024, 4032), 32), ((11, 2000, 2013), 64)]:
        t, info = load_crop(path, size, square=square)
        assert (info.width, info.height) == (3024, 4032)
        assert rmse_levels(t, reference(full, square, size)) <= REDUCED_JPEG_RMSE[jpeg_scale(square[2], size)]


@pytest.mark.parametrize(("side", "size"), [(64, 8), (128, 16), (256, 32)])
def test_422_jpeg_is_reduced_one_step_less(tmp_path, side, size):
    """4:2:2 colour at 1/8 is one value per 16 x 8 pixels: such a JPEG cropped to 8 x size decodes at
    1/4 (jpeg_colour_factor 2; measured on these pictures: 0.9 to 1.3 levels RMSE, at 1/8 3.5 to 7.6)."""
    for seed in range(2):
        path = write(tmp_path / "a.jpg", "jpeg", picture(side, side, seed, side / size), 1, seed, 90, subsampling=1)
        check_decode(path, "jpeg", 1, side, side, (0, 0, side), size, scale=4)


def test_jpeg_colour_factor(tmp_path):
    for kind, subsampling, factor in [("jpeg", 0, 1), ("jpeg", 1, 2), ("jpeg", 2, 1), ("jpeg-grey", 1, 1)]:
        with Image.open(write(tmp_path / "a.jpg", kind, picture(32, 32, 0), 1, subsampling=subsampling)) as img:
            assert jpeg_colour_factor(img) == factor, (kind, subsampling)

    class Layers:  # what PIL reads from a JPEG's frame header: (component id, h, v, table) per component
        def __init__(self, *luma):
            self.layer = [(1, *luma, 0), (2, 1, 1, 1), (3, 1, 1, 1)]

    assert [jpeg_colour_factor(Layers(h, v)) for h, v in [(1, 2), (4, 1), (4, 2), (2, 2)]] == [2, 4, 2, 1]


def test_random_crop_flip_and_square_argument(tmp_path):
    path = write(tmp_path / "a.png", "png", picture(50, 30, 1), 1)
    t, info = load_crop(path, 16, np.random.default_rng(5), flip=True)
    rng = np.random.default_rng(5)
    square = random_square(50, 30, rng)
    mirrored = bool(rng.integers(2))
    u, _ = load_crop(path, 16, square=square)
    assert torch.equal(t, u.flip(-1) if mirrored else u) and info.crop == square[2]
    with pytest.raises(ValueError, match="square"):
        load_crop(path, 16, square=(40, 0, 20))
    with pytest.raises(ValueError, match="exclusive"):
        load_crop(path, 16, np.random.default_rng(0), square=(0, 0, 10))
    with pytest.raises(ValueError, match="size must be a positive int"):
        load_crop(path, 0)


@examples(50)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), seed=st.integers(0, 2 ** 32 - 1))
def test_random_square_inside_and_at_least_half_the_side(w, h, seed):
    x, y, s = random_square(w, h, np.random.default_rng(seed))
    assert 0 <= x <= w - s and 0 <= y <= h - s
    assert s <= min(w, h) and s >= max(1, round(min(w, h) / 2))


def test_folder_of_valid_images_skips_none(tmp_path):
    """Every kind, orientation and an awkward size each: none is skipped, none fails to decode."""
    for i, kind in enumerate(KINDS):
        for orientation in (1, 6, 8):
            w, h = (641, 479) if i % 2 else (97, 131)
            write(tmp_path / f"{kind}-{orientation}.{suffix(kind)}", kind,
                  picture(w, h, i), 1 if kind == "bmp" else orientation, i)
    folder = ImageFolder.scan(tmp_path)
    assert folder.skipped == [], format_skipped(folder.skipped)
    for split in ("train", "heldout"):
        data = FolderCrops(folder, split, 32, 200, seed=0)
        images, failed = data.load_batch(range(3 * len(data.files)))
        assert failed == () and images.shape == (3 * len(data.files), 3, 32, 32)
