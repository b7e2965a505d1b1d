"""What a finished run reports: held-out metrics (``evaluate``), the picture of held-out originals
beside their reconstructions (``save_grid``) and the training curves (``save_curve``).

Two codebook figures exist and are named apart everywhere (progress bar, summary line, metrics.json):
- held-out codebook usage (``heldout_codebook_used`` of ``vocab_size`` codes, here): the codes the
  trained model picks for the held-out images, counted over every scale;
- recent code use in training (``recent_use`` in the progress bar, ``train_recent_code_use`` in
  metrics.json): VAR's running statistic, the share of codes whose moving average of hits over recent
  training batches reaches 8 % of a uniform share, averaged over the scales.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vqfast.data import mean_colour_baseline, psnr, to_uint8
from vqfast.tokenizer import amp_context, decode_tokens, encode_images, model_geometry

# metrics.json keys of the previous releases, kept beside the held-out names they duplicate so that
# readers of older results (benchmarks/ablation_codebook.py) keep working.
OLD_KEYS = {"codebook_used": "heldout_codebook_used", "codebook_usage": "heldout_codebook_usage",
            "codebook_used_per_scale": "heldout_codebook_used_per_scale",
            "codebook_usage_per_scale": "heldout_codebook_usage_per_scale"}


@torch.no_grad()
def evaluate(model: nn.Module, data, count: int, device: torch.device = torch.device("cpu"), dtype: str = "fp32",
             batch_size: int = 64) -> tuple[dict, torch.Tensor, torch.Tensor, list[str]]:
    """Held-out metrics over items 0..count-1 of ``data``: PSNR of reconstructions vs the mean-colour
    baseline, held-out codebook usage overall and per scale, perplexity of the token distribution, and
    encode throughput. Returns (metrics, the first 16 originals, their reconstructions, the files that
    failed to decode and were replaced by the next of their epoch)."""
    geo = model_geometry(model)
    was_training = model.training
    model.eval()
    vocab = geo["vocab_size"]
    counts = torch.zeros(len(geo["patch_nums"]), vocab, dtype=torch.float64)
    psnrs, baselines, shown, encode_s, tokens, failures = [], [], None, 0.0, 0, []
    for i in range(0, count, batch_size):
        images, failed = data.load_batch(range(i, min(count, i + batch_size)))
        failures += failed
        images = images.to(device)
        t0 = time.perf_counter()
        with amp_context(device, dtype):
            idx_list = encode_images(model, images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        encode_s += time.perf_counter() - t0
        tokens += sum(idx.numel() for idx in idx_list)
        for s, idx in enumerate(idx_list):
            counts[s] += torch.bincount(idx.flatten().cpu(), minlength=vocab).double()
        with amp_context(device, dtype):
            recon = decode_tokens(model, idx_list).float()
        psnrs.append(psnr(recon, images).cpu())
        baselines.append(psnr(mean_colour_baseline(images), images).cpu())
        if shown is None:
            shown = (images[:16].cpu(), recon[:16].cpu())
    model.train(was_training)
    total = counts.sum(0)
    p = total / total.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((total > 0).sum())
    used_per_scale = [int((c > 0).sum()) for c in counts]
    metrics = {
        "heldout_images": count,
        "heldout_psnr_db": torch.cat(psnrs).mean().item(),
        "mean_colour_baseline_psnr_db": torch.cat(baselines).mean().item(),
        "heldout_codebook_used": used,
        "heldout_codebook_usage": used / vocab,
        "vocab_size": vocab,
        "heldout_codebook_used_per_scale": used_per_scale,
        "heldout_codebook_usage_per_scale": [u / vocab for u in used_per_scale],
        "perplexity": math.exp(entropy),
        "encode_tokens_per_s": tokens / encode_s if encode_s else None,
    }
    metrics.update({old: metrics[new] for old, new in OLD_KEYS.items()})
    return metrics, shown[0], shown[1], failures


def summary_line(m: dict) -> str:
    """The held-out results in one line, as ``vqfast train`` prints them."""
    return (f"held-out PSNR {m['heldout_psnr_db']:.2f} dB (mean-colour baseline "
            f"{m['mean_colour_baseline_psnr_db']:.2f} dB), held-out codebook usage "
            f"{m['heldout_codebook_used']}/{m['vocab_size']} codes "
            f"(per scale: {', '.join(map(str, m['heldout_codebook_used_per_scale']))}), "
            f"perplexity {m['perplexity']:.1f}")


def grid_figure(originals: torch.Tensor, recons: torch.Tensor, pairs_per_row: int = 4):
    """A matplotlib figure of held-out images in labelled pairs: each original (column headed
    "original") beside its reconstruction ("reconstruction"), 1-pixel white gutters, pixels enlarged
    (nearest) so that small crops stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o, r = to_uint8(originals), to_uint8(recons)
    n, s = len(o), o.shape[1]
    pairs = min(n, pairs_per_row)
    rows = -(-n // pairs)
    cell, pair_w = s + 2, 2 * s + 6
    grid = np.full((rows * cell, pairs * pair_w, 3), 255, dtype=np.uint8)
    for i in range(n):
        y, x = (i // pairs) * cell + 1, (i % pairs) * pair_w + 1
        grid[y: y + s, x: x + s] = o[i]
        grid[y: y + s, x + s + 1: x + 2 * s + 1] = r[i]
    zoom = max(1, -(-64 // s))  # cells at least 64 pixels wide: room for the column labels
    header = 44
    dpi = 100
    fig = plt.figure(figsize=(grid.shape[1] * zoom / dpi, (grid.shape[0] * zoom + header) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, grid.shape[0] * zoom / (grid.shape[0] * zoom + header)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle("held-out images: original | reconstruction (encoded to tokens and decoded)", fontsize=8,
                 y=1 - 4 / (grid.shape[0] * zoom + header), va="top")
    for j in range(pairs):
        for k, label in enumerate(("original", "reconstruction")):
            ax.text(j * pair_w + 1 + k * (s + 1) + s / 2, -2, label, ha="center", va="bottom", fontsize=6.5)
    return fig


def save_grid(path: Path, originals: torch.Tensor, recons: torch.Tensor, pairs_per_row: int = 4) -> None:
    """grid_figure saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = grid_figure(originals, recons, pairs_per_row)
    fig.savefig(path)
    plt.close(fig)


def save_curve(path: Path, history: list[dict]) -> None:
    """Training loss and training-batch PSNR against the step, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [h["loss"] for h in history])
    ax[0].set(xlabel="step", ylabel="loss (recon mse + vq)", yscale="log", title="training loss")
    ax[1].plot(steps, [h["psnr"] for h in history])
    ax[1].set(xlabel="step", ylabel="PSNR (dB)", title="training-batch PSNR")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
