"""``vqfast demo``: quantise patches of real photographs with every available backend.

The photographs ship inside scikit-learn (load_sample_images) and scikit-image (skimage.data), so
nothing is downloaded. Each image is cut into non-overlapping p x p RGB patches (D = 3 p^2); a
codebook of K patches sampled from the images quantises them all; the table compares every vqfast
backend with the classic N x K implementation, and the reconstruction PSNR shows the result is real.
"""
from __future__ import annotations

import time

import numpy as np
import torch

import vqfast
from vqfast.errors import InputError
from vqfast.testing.seeds import seed_nearest_codeword


def add_arguments(parser) -> None:
    parser.add_argument("--patch", type=int, default=4, help="patch side p (D = 3 p^2), default 4")
    parser.add_argument("--codes", type=int, default=1024, help="codebook size K, default 1024")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per provider (best is shown)")
    parser.add_argument("--seed", type=int, default=0)


def load_photographs() -> list[np.ndarray]:
    """Real RGB photographs bundled in scikit-learn and scikit-image, as float32 arrays in [0, 1]."""
    from sklearn.datasets import load_sample_images
    from skimage import data

    images = [np.asarray(im) for im in load_sample_images().images]
    images += [data.astronaut(), data.coffee(), data.chelsea()]
    return [im[..., :3].astype(np.float32) / 255.0 for im in images]


def patches(image: np.ndarray, p: int) -> torch.Tensor:
    """[H, W, 3] -> [(H//p) * (W//p), 3 p^2]."""
    t = torch.from_numpy(image[: image.shape[0] // p * p, : image.shape[1] // p * p]).permute(2, 0, 1)
    return t.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p).contiguous()


def _best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main(args) -> int:
    for name in ("patch", "codes", "repeats"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be a positive int, got {getattr(args, name)}")
    images = load_photographs()
    smallest = min(min(im.shape[:2]) for im in images)
    if args.patch > smallest:
        raise InputError(f"--patch {args.patch} is larger than the smallest photograph's side ({smallest})")
    g = torch.Generator().manual_seed(args.seed)
    z = torch.cat([patches(im, args.patch) for im in images])
    if args.codes > z.shape[0]:
        raise InputError(f"--codes {args.codes} is more than the {z.shape[0]} patches of {args.patch} x {args.patch} "
                         f"pixels it samples them from")
    codebook = z[torch.randperm(z.shape[0], generator=g)[: args.codes]].clone()
    n, d = z.shape
    print(f"{n} patches of {args.patch}x{args.patch} RGB pixels (D={d}) from 5 photographs, K={codebook.shape[0]} codewords")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backends {vqfast.available_backends('cpu')}")

    rows = [("classic N x K (seeds' code)", lambda: seed_nearest_codeword(z, codebook))]
    for name in vqfast.available_backends("cpu"):
        rows.append((f"vqfast backend={name}", lambda name=name: vqfast.nearest_codeword(z, codebook, backend=name)))
    base = None
    print(f"\n{'provider':<30} {'best ms':>10} {'speed-up':>9}")
    for label, fn in rows:
        ms = _best_ms(fn, args.repeats)
        base = base or ms
        print(f"{label:<30} {ms:>10.1f} {base / ms:>8.1f}x")

    idx, q, dist = vqfast.nearest_codeword(z, codebook)
    mse = float(dist.double().sum() / z.numel())
    print(f"\nquantised with {codebook.shape[0]} codewords: PSNR {10 * np.log10(1.0 / mse):.2f} dB, "
          f"{int(torch.unique(idx).numel())} codewords used")
    return 0
