"""Real images for training and evaluation, all bundled in installed packages (no downloads).

Sources:
- photographs bundled in scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``);
  greyscale ones are repeated over three channels;
- scikit-learn's 1,797 handwritten 8 x 8 digits, upsampled (nearest) to the crop size.

Deterministic split, no overlap: every photograph's top 80 % of rows feeds ``train`` crops and its
bottom 20 % ``heldout`` crops; digits 0..1437 are ``train`` and 1438..1796 ``heldout`` (80 / 20).

Item i of a split is a pure function of (seed, split, i): a crop position (and, for train, a
horizontal flip) drawn from a generator seeded with those numbers, so the data order of a run is
fixed by its seed and step, and resuming needs no loader state. Items are [3, size, size] float32
in [-1, 1].
"""
from __future__ import annotations

import functools

import numpy as np
import torch

# skimage photographs that load offline (shipped inside the wheel); the larger ones ("retina",
# "hubble_deep_field") are fetched on demand by some versions, so they are left out.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "camera", "brick",
                  "grass", "gravel", "coins", "moon")
SPLITS = ("train", "heldout")
TRAIN_FRACTION = 0.8
# One crop in DIGIT_SHARE comes from the digits: they are 1,797 tiny images next to 14 large
# photographs, and 1/4 keeps both kinds in every batch of 32 on average (8 digits).
DIGIT_SHARE = 4


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


class RealImageCrops(torch.utils.data.Dataset):
    """Random crops of bundled real images; see the module docstring for the split and the seeding.

    ``length`` is how many distinct items the split exposes (crops are drawn per index, so any
    length is valid).
    """

    def __init__(self, split: str = "train", size: int = 32, length: int = 10_000, seed: int = 0,
                 use_digits: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 256:
            raise ValueError(f"size must be an int in [8, 256], got {size!r}")
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.split, self.size, self.length, self.seed = split, size, length, int(seed)
        self.use_digits = use_digits
        self.regions = []
        for _, img in load_photographs():
            cut = int(round(img.shape[0] * TRAIN_FRACTION))
            region = img[:cut] if split == "train" else img[cut:]
            if region.shape[0] >= size and region.shape[1] >= size:
                self.regions.append(region)
        if not self.regions:
            raise ValueError(f"size={size} is larger than every photograph's {split} region")
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
