"""Real images for training and evaluation: a folder of the user's images, or images bundled in
installed packages (no downloads).

Bundled (``RealImageCrops``, what ``vqfast train`` uses without ``--data``):
- photographs bundled in scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``);
  greyscale ones are repeated over three channels;
- scikit-learn's 1,797 handwritten 8 x 8 digits, upsampled (nearest) to the crop size.
Every photograph's top 80 % of rows feeds ``train`` crops and its bottom 20 % ``heldout`` crops;
digits 0..1437 are ``train`` and 1438..1796 ``heldout``.

A folder (``ImageFolder`` + ``FolderCrops``, ``vqfast train --data DIR``): every PNG, JPEG, WebP and
BMP file under DIR (recursive), decoded on the fly, so memory does not grow with the folder (only the
list of names is kept). The held-out split is by file and deterministic: the files whose SHA-1 of
their relative path is smallest (10 %, at least 1, at most 1000) are held out, whatever the listing
order. Items are random square crops (area U[1/4, 1] of the largest centred square's area, uniform
position) resized to ``size`` with antialiasing; train items are also flipped with probability 1/2.
A file that cannot be read is named with its reason: at the scan (header only) in
``ImageFolder.skipped``, later (a body that fails to decode) in what ``FolderCrops.load_batch``
returns; ``format_skipped`` writes every one of them on one line.

For both sources, item i of a split is a pure function of (seed, split, i): the file (a fresh
permutation of the files every epoch) and the crop come from generators seeded with those numbers,
so the data order of a run is fixed by its seed and step, any number of loader workers gives the
same batches, and resuming needs no loader state. Items are [3, size, size] float32 in [-1, 1].

Tokens (``TokenDataset``, defined in vqfast.shards): the rows of a token set written by
``vqfast tokenize ... encode DIR OUT_DIR``, memory-mapped, as (tokens per scale, label).

``load_crop`` is the one decoder: PIL, EXIF orientation applied; pixels are scaled by their dtype
(8 bits / 255, 16-bit greyscale / 65535; PIL reads 16-bit colour as its high byte, so / 255 is within
1/255 of / 65535 there); greyscale, palette, CMYK and the like become RGB; an alpha channel is
composited over white. A JPEG whose crop is at least twice ``size`` is decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling), the largest that keeps the crop at least ``size`` pixels wide (2 or 4 times
that for colour subsampled more along one axis, ``jpeg_colour_factor``); the crop box is then mapped
per axis into the reduced image, so the result matches a full decode up to resampling (tests/test_data_decode.py
states the measured tolerance).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqfast.shards import TokenDataset  # noqa: F401  (re-exported: vqfast.data.TokenDataset)

# skimage photographs that load offline (shipped inside the wheel); the larger ones ("retina",
# "hubble_deep_field") are fetched on demand by some versions, so they are left out.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "camera", "brick",
                  "grass", "gravel", "coins", "moon")
SPLITS = ("train", "heldout")
TRAIN_FRACTION = 0.8
# One crop in DIGIT_SHARE comes from the digits: they are 1,797 tiny images next to 14 large
# photographs, and 1/4 keeps both kinds in every batch of 32 on average (8 digits).
DIGIT_SHARE = 4

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL's names for those formats (MPO: the multi-picture JPEG some cameras write).
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB"})
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
HELDOUT_FRACTION = 0.1
MAX_HELDOUT_FILES = 1000
MIN_IMAGES = 2  # one held out, one to train on
# Random crops cover U[1/4, 1] of the largest square's area: at least half its side, so a crop still
# shows a recognisable part of the picture (torchvision's default 0.08 cuts out near-textures).
MIN_CROP_AREA = 0.25
# Decoding tries the next file of the epoch when a file fails (a truncated body the header scan
# cannot see); this many failures in a row means the folder is broken, not one file.
MAX_DECODE_ATTEMPTS = 16


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def load_photographs() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 [H, W, 3]) for every bundled photograph, in a fixed order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [(name, _rgb(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        photos.append((fname.rsplit("/", 1)[-1].split(".")[0], _rgb(img)))
    return tuple(photos)


@functools.lru_cache(maxsize=1)
def load_digits_images() -> np.ndarray:
    """uint8 [1797, 8, 8], scaled from 0..16 to 0..255."""
    from sklearn.datasets import load_digits

    return np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)


def _check_item_args(split: str, size: int, length: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        raise ValueError(f"size must be an int in [8, 4096], got {size!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")


class RealImageCrops(torch.utils.data.Dataset):
    """Random crops of bundled real images; see the module docstring for the split and the seeding.

    ``length`` is how many distinct items the split exposes (crops are drawn per index, so any
    length is valid).
    """

    def __init__(self, split: str = "train", size: int = 32, length: int = 10_000, seed: int = 0,
                 use_digits: bool = True):
        _check_item_args(split, size, length)
        self.split, self.size, self.length, self.seed = split, size, length, int(seed)
        self.use_digits = use_digits
        self.regions = []
        for _, img in load_photographs():
            cut = int(round(img.shape[0] * TRAIN_FRACTION))
            region = img[:cut] if split == "train" else img[cut:]
            if region.shape[0] >= size and region.shape[1] >= size:
                self.regions.append(region)
        if not self.regions:
            raise ValueError(f"size={size} is larger than every bundled photograph's {split} region")
        digits = load_digits_images()
        cut = int(round(len(digits) * TRAIN_FRACTION))
        self.digits = digits[:cut] if split == "train" else digits[cut:]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        if self.use_digits and rng.integers(DIGIT_SHARE) == 0:
            d = self.digits[rng.integers(len(self.digits))]
            rep = -(-self.size // 8)
            crop = np.kron(d, np.ones((rep, rep), dtype=np.uint8))[: self.size, : self.size]
            crop = np.repeat(crop[:, :, None], 3, axis=2)
        else:
            region = self.regions[rng.integers(len(self.regions))]
            y = rng.integers(region.shape[0] - self.size + 1)
            x = rng.integers(region.shape[1] - self.size + 1)
            crop = region[y: y + self.size, x: x + self.size]
        if self.split == "train" and rng.integers(2):
            crop = crop[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()
        return t / 127.5 - 1.0

    def batch(self, indices) -> torch.Tensor:
        """Stack items ``indices`` into [len, 3, size, size]."""
        return torch.stack([self[int(i)] for i in indices])

    def load_batch(self, indices) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(batch, names of files that failed to decode): the loader protocol shared with FolderCrops."""
        return self.batch(indices), ()

    def describe(self) -> dict:
        return {"source": "bundled", "photographs": len(self.regions), "digits": len(self.digits)}


# ---- one image file ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    """What ``load_crop`` did to a file, for messages: the upright picture's size (EXIF orientation applied),
    the conversion note ("" when the file was 8-bit RGB), and the square crop's side."""

    width: int
    height: int
    note: str
    crop: int


def _open(path):
    from PIL import Image

    img = Image.open(path)
    if img.format not in IMAGE_FORMATS:
        fmt = img.format
        img.close()
        raise ValueError(f"{fmt} is not a supported format (PNG, JPEG, WebP, BMP)")
    return img


EXIF_ORIENTATION = 0x0112


def _orientation(img) -> int:
    """The EXIF orientation tag (1..8; anything else, or none, is 1: shown as stored)."""
    value = img.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _transpose(orientation: int):
    """PIL's transpose that shows a picture stored with EXIF ``orientation`` upright (None for 1)."""
    from PIL import Image

    t = Image.Transpose
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
            7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)


def _swaps_axes(orientation: int) -> bool:
    # Orientations 5..8 turn the picture by 90 degrees: its width is the stored height.
    return orientation >= 5


def _reverses_axes(orientation: int) -> tuple[bool, bool]:
    """Whether the upright picture's x and y run against the stored axes they come from (2 mirrors x,
    3 turns both, 4 flips y; 6, turned clockwise, reads x from the stored y bottom up; 7 both; 8 y)."""
    return orientation in (2, 3, 6, 7), orientation in (3, 4, 7, 8)


def _to_rgb_or_grey16(img):
    """-> (image in mode "RGB" or "F" (greyscale in [0, 1]), note)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.float32)
        return Image.fromarray(np.clip(a, 0, 65535) / np.float32(65535)), "16-bit greyscale (/ 65535)"
    if mode in ("F", "I;32", "I;32B", "I;32L"):
        raise ValueError(f"pixel mode {mode} (floating-point or 32-bit) has no defined scale")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} (alpha composited over white)"
    names = {"1": "1-bit", "L": "greyscale", "P": "palette", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "LAB",
             "HSV": "HSV", "RGBX": "RGBX"}
    if mode not in names:
        raise ValueError(f"pixel mode {mode} is not supported")
    return img.convert("RGB"), names[mode]


def _to_tensor(img) -> torch.Tensor:
    """PIL "RGB" (uint8 / 255) or "F" ([0, 1]) -> [3, H, W] float32 in [-1, 1]."""
    if img.mode == "F":
        t = torch.from_numpy(np.array(img, dtype=np.float32))[None].expand(3, -1, -1)
    else:
        t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (t * 2 - 1).contiguous()


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return int(size)


def random_square(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(x, y, side) of a random square inside a width x height picture: area U[1/4, 1] of the largest
    square's, uniform position (two integer draws after one uniform draw, in that order)."""
    side = min(width, height)
    s = min(side, max(1, int(round(side * math.sqrt(rng.uniform(MIN_CROP_AREA, 1.0))))))
    return int(rng.integers(width - s + 1)), int(rng.integers(height - s + 1)), s


def centred_square(width: int, height: int) -> tuple[int, int, int]:
    """(x, y, side) of the largest centred square."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


# JPEG's DCT scaling decodes at 1/8, 1/4 or 1/2 of the stored size, nothing in between.
JPEG_SCALES = (8, 4, 2)


def jpeg_scale(crop: int, size: int) -> int:
    """The reduction a JPEG crop of ``crop`` pixels resized to ``size`` is decoded at: the largest of
    8, 4, 2 that keeps the crop at least ``size`` wide, else 1 (full size)."""
    return next((k for k in JPEG_SCALES if crop >= k * size), 1)


def jpeg_colour_factor(img) -> int:
    """How many times ``size`` a JPEG crop must keep per decode step for its colour to survive a
    reduced decode: 1 for greyscale, 4:4:4 and 4:2:0; 2 for 4:2:2 and 4:4:0; 4 for 4:1:1.

    libjpeg scales colour planes up by IDCT scaling only as far as both axes allow, then upsamples:
    colour subsampled more along one axis keeps, at 1/k, that ratio less resolution along it than the
    reduced size (4:2:2 at 1/8: one colour value per 16 x 8 pixels), where the full decode feeds the
    resize all of it. Measured on a 64 x 64 4:2:2 picture at 1/8: Cb 9 levels RMSE from the full
    decode's, against 0.6 for 4:2:0.
    """
    layers = getattr(img, "layer", None) or ()
    if not layers:
        return 1
    max_h, max_v = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
    ratio = max(max((max_h / h) / (max_v / v), (max_v / v) / (max_h / h)) for _, h, v, _ in layers)
    return int(math.ceil(ratio - 1e-9))


def load_crop(path, size: int, rng: np.random.Generator | None = None, flip: bool = False,
              square: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, ImageInfo]:
    """One image file -> ([3, size, size] float32 in [-1, 1], ImageInfo).

    The square is, in the upright picture's pixels: ``square`` = (x, y, side) when given; else with
    rng None the largest centred square (what ``vqfast tokenize`` does); else ``random_square``. The
    square is resized to size; with ``rng`` and ``flip`` it is mirrored with probability 1/2.
    Raises OSError or ValueError (with the reason) for a file that cannot be decoded.
    """
    from PIL import Image

    size = _check_size(size)
    if square is not None and rng is not None:
        raise ValueError("square and rng are exclusive: give the square, or a generator to draw it")
    with _open(path) as img:
        orientation = _orientation(img)
        stored_w, stored_h = img.size
        w, h = (stored_h, stored_w) if _swaps_axes(orientation) else (stored_w, stored_h)
        if min(w, h) < 1:
            raise ValueError("the image is empty")
        mirror = False
        if square is not None:
            x, y, s = (int(v) for v in square)
            if not (s >= 1 and 0 <= x <= w - s and 0 <= y <= h - s):
                raise ValueError(f"square {tuple(square)} is not inside the {w} x {h} picture")
        elif rng is None:
            x, y, s = centred_square(w, h)
        else:
            x, y, s = random_square(w, h, rng)
            mirror = flip and bool(rng.integers(2))
        # Where the stored picture lies in the decoded one, in decoded pixels: all of it, or after a
        # reduced JPEG decode stored / k of the ceil(stored / k) pixels (reduced pixel i holds stored
        # pixels [i k, (i + 1) k), the last one partly empty).
        extent_w, extent_h = float(stored_w), float(stored_h)
        k = 1
        if img.format in ("JPEG", "MPO"):
            k = jpeg_scale(s, size * jpeg_colour_factor(img))
        if k > 1:
            # A 12 MP photo cropped to 256 px decodes ~10x faster at 1/8. draft() keeps the largest
            # scale with stored // requested >= k, so asking for stored // k gives exactly k; it answers
            # the stored picture's extent in reduced pixels.
            drafted = img.draft(None, (max(1, stored_w // k), max(1, stored_h // k)))
            if drafted is not None:
                _, (_, _, extent_w, extent_h) = drafted
        img.load()
        method = _transpose(orientation)
        img_rgb, note = _to_rgb_or_grey16(img.transpose(method) if method is not None else img)
        if _swaps_axes(orientation):
            extent_w, extent_h = extent_h, extent_w
        # Per axis: the reduced image's size / stored size differs between the axes (641 x 479 at 1/8:
        # 81 / 641 > 60 / 479), so one ratio for both can carry the box past an edge; the extent's
        # ratio is exactly 1/k on both. An axis the orientation reverses starts with the partly empty
        # pixel: the picture begins (decoded size - extent) in.
        kx, ky = extent_w / w, extent_h / h
        reverse_x, reverse_y = _reverses_axes(orientation)
        ox = img_rgb.width - extent_w if reverse_x else 0.0
        oy = img_rgb.height - extent_h if reverse_y else 0.0
        box = (ox + x * kx, oy + y * ky, ox + (x + s) * kx, oy + (y + s) * ky)
        box = tuple(min(max(v, 0.0), lim) for v, lim in zip(box, (img_rgb.width, img_rgb.height) * 2))
        out = img_rgb.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        if mirror:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        t = _to_tensor(out)
    return t.clamp_(-1, 1), ImageInfo(w, h, note, s)


def probe_image(path) -> str | None:
    """None when ``path`` opens as a supported image (header only: cheap), else the reason."""
    try:
        with _open(path) as img:
            w, h = img.size
            if w < 1 or h < 1:
                return "the image is empty"
            if img.mode in ("F", "I;32", "I;32B", "I;32L"):
                return f"pixel mode {img.mode} has no defined scale"
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return _reason(e)
    return None


def _reason(e: Exception) -> str:
    text = str(e).split("\n")[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---- a folder of images --------------------------------------------------------------------------

def list_images(root) -> list[str]:
    """Relative POSIX paths of the files under ``root`` with an image suffix, sorted."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def _heldout_rank(name: str) -> bytes:
    return hashlib.sha1(name.encode("utf-8")).digest()


@dataclass
class ImageFolder:
    """The readable images under ``root``, split by file into train and held-out lists."""

    root: Path
    train: list[str]
    heldout: list[str]
    skipped: list[tuple[str, str]]  # (relative path, reason)

    @classmethod
    def scan(cls, root, threads: int = 8) -> "ImageFolder":
        """List and probe (header only) every image file; ValueError when too few are readable."""
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder")
        names = list_images(root)
        with ThreadPoolExecutor(max(1, threads)) as pool:  # file opens wait on I/O, not the GIL
            reasons = list(pool.map(lambda n: probe_image(root / n), names))
        good = [n for n, r in zip(names, reasons) if r is None]
        skipped = [(n, r) for n, r in zip(names, reasons) if r is not None]
        if len(good) < MIN_IMAGES:
            extra = f" ({len(skipped)} more could not be read)" if skipped else ""
            raise ValueError(
                f"{root} holds {len(good)} readable image{'s' if len(good) != 1 else ''} "
                f"({', '.join(s[1:].upper() for s in IMAGE_SUFFIXES)}, searched recursively){extra}; "
                f"training needs at least {MIN_IMAGES}: one held out, one to train on"
            )
        n_held = min(MAX_HELDOUT_FILES, max(1, round(len(good) * HELDOUT_FRACTION)))
        by_hash = sorted(good, key=_heldout_rank)
        held = set(by_hash[:n_held])
        return cls(root, [n for n in good if n not in held], [n for n in good if n in held], skipped)

    def digest(self) -> str:
        """SHA-256 of the two file lists: a resumed run must see the same files in the same split."""
        h = hashlib.sha256()
        for split, names in (("train", self.train), ("heldout", self.heldout)):
            h.update(split.encode())
            for n in names:
                h.update(b"\0" + n.encode("utf-8"))
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": "folder", "root": str(self.root), "train_files": len(self.train),
                "heldout_files": len(self.heldout), "skipped_files": len(self.skipped), "digest": self.digest()}


def format_skipped(skipped: list[tuple[str, str]], limit: int | None = None) -> str:
    """One line for files that could not be read: the count, then every file's name and reason
    ("skipped 2 unreadable files: a.png (OSError: ...); b/c.jpg (...)"); a reason's first line only.
    ``limit``: name only the first ``limit`` files, then say how many more."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    n = len(skipped)
    head = f"skipped {n} unreadable file{'s' if n != 1 else ''}"
    if not n:
        return head
    named = skipped if limit is None else skipped[:limit]
    parts = [f"{name} ({(str(reason).strip() or 'no reason given').splitlines()[0]})" for name, reason in named]
    if n > len(named):
        parts.append(f"and {n - len(named)} more")
    return f"{head}: " + "; ".join(parts)


class FolderCrops(torch.utils.data.Dataset):
    """Random crops of one split of an ``ImageFolder``; see the module docstring for the seeding."""

    def __init__(self, folder: ImageFolder, split: str = "train", size: int = 32, length: int = 10_000,
                 seed: int = 0):
        _check_item_args(split, size, length)
        self.folder, self.split, self.size, self.length, self.seed = folder, split, size, length, int(seed)
        self.files = folder.train if split == "train" else folder.heldout
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), per worker

    def __len__(self) -> int:
        return self.length

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, SPLITS.index(self.split), epoch, 1])
            self._order = (epoch, rng.permutation(len(self.files)))
        return self._order[1]

    def item(self, i: int) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(item i, names of files that failed to decode on the way): a file that fails is replaced by
        the next one of the epoch's order, deterministically."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        n = len(self.files)
        order = self._epoch_order(i // n)
        failed = []
        for attempt in range(min(n, MAX_DECODE_ATTEMPTS)):
            name = self.files[order[(i + attempt) % n]]
            rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i, attempt])
            try:
                return load_crop(self.folder.root / name, self.size, rng, flip=self.split == "train")[0], tuple(failed)
            except Exception as e:  # a corrupt body: PIL raises OSError, ValueError, SyntaxError, ...
                failed.append(f"{name} ({_reason(e)})")
        raise RuntimeError(f"{len(failed)} files in a row failed to decode under {self.folder.root}: "
                           + "; ".join(failed))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.item(i)[0]

    def load_batch(self, indices) -> tuple[torch.Tensor, tuple[str, ...]]:
        """Items ``indices`` stacked into [len, 3, size, size], and the files that failed to decode."""
        items = [self.item(int(i)) for i in indices]
        return torch.stack([t for t, _ in items]), tuple(f for _, fs in items for f in fs)

    def batch(self, indices) -> torch.Tensor:
        return self.load_batch(indices)[0]

    def describe(self) -> dict:
        return self.folder.describe()


# ---- metrics -------------------------------------------------------------------------------------

def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[-1, 1] [B, 3, H, W] or [3, H, W] -> uint8 channels-last numpy."""
    x = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2, i.e. 255 on a 0..255 scale)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def mean_colour_baseline(img: torch.Tensor) -> torch.Tensor:
    """The trivial reconstruction: every pixel replaced by its image's mean colour."""
    return img.mean(dim=(2, 3), keepdim=True).expand_as(img)
