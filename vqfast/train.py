"""``vqfast train``: train a multi-scale VQ-VAE tokenizer on real images (vqfast.data).

    vqfast train --preset demo            # a few minutes on 2 CPU cores -> runs/demo/

Writes to ``--out`` (default runs/<preset>/): checkpoint.pt (atomic: temp file + os.replace),
metrics.json (held-out PSNR against the mean-colour baseline, codebook usage, perplexity,
tokens/s), reconstructions.png (held-out originals beside their reconstructions) and
loss_curve.png. ``--resume`` continues from checkpoint.pt exactly: model, optimizer, RNG states
and step are restored, and the data order is a function of (seed, step) (see vqfast.data).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vqfast.data import RealImageCrops, mean_colour_baseline, psnr, to_uint8
from vqfast.models import VQVAE

CHECKPOINT_FORMAT = "vqfast-train-1"

# ``model`` holds vqfast.models.VQVAE's constructor arguments (VAR's names; the codebook options of
# vqfast.models.MultiScaleQuantizer included), in plain types.
PRESETS: dict[str, dict] = {
    # For tests: 16 x 16 crops, 4 scales, VAR's architecture at 2 levels and width 8; a step takes milliseconds.
    "tiny": dict(
        model=dict(vocab_size=64, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                   v_patch_nums=(1, 2, 4, 8), image_size=16, share_quant_resi=2,
                   kmeans_init=True, dead_code_threshold=1.0),
        batch_size=8, steps=20, lr=2e-3, eval_images=16, train_items=100_000,
    ),
    # The main job on 2 CPU cores: 32 x 32 crops -> 8 x 8 latents, 6 scales = 130 tokens per image.
    "demo": dict(
        # VAR's network at width 8/16/32 (32/16/8 px), one residual block per encoder level, attention
        # kept: a step costs ~1.6x the previous demo model's on one core, so 900 steps instead of 1500
        # take no longer; without attention 1100 steps reached 24.5 dB held-out PSNR, with it 27.1 dB in 1000.
        # k-means init + dead-code restarts: held-out usage 37 % -> ~100 % (benchmarks/ablation_codebook.py).
        # lr 4e-3 (cosine-decayed): at 1e-3 the output bias alone needs ~500 Adam steps to reach the mean colour.
        model=dict(vocab_size=256, z_channels=16, ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=4,
                   v_patch_nums=(1, 2, 3, 4, 6, 8), image_size=32, kmeans_init=True, dead_code_threshold=1.0),
        batch_size=16, steps=900, lr=4e-3, eval_images=256, train_items=1_000_000,
    ),
    # VAR's published tokenizer (vae_ch160v4096z32.pth: 256 x 256, 10 scales, 680 tokens, vocabulary
    # 4096, z_channels 32, four Phi): GPU-sized.
    "var": dict(
        model=dict(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                   image_size=256),
        batch_size=8, steps=50_000, lr=2e-4, eval_images=64, train_items=10_000_000,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model and schedule (default: demo)")
    parser.add_argument("--steps", type=int, default=None, help="total optimisation steps (default: the preset's)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<preset>/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default 250)")
    parser.add_argument("--backend", default="auto", help="nearest-codeword backend (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often faster on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_config(preset: str, steps: int | None = None, seed: int = 0, backend: str = "auto") -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["model"].items()}
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        cfg["steps"] = steps
    cfg.update(preset=preset, seed=int(seed), backend=backend)
    return cfg


def _identity(cfg: dict) -> dict:
    # What must match for a checkpoint to be resumed: everything except the step budget and the
    # backend (both may change between runs without changing the maths: backends agree exactly).
    return {k: v for k, v in cfg.items() if k not in ("steps", "backend")}


def build_model(cfg: dict) -> VQVAE:
    return VQVAE(**cfg["model"], test_mode=False, backend=cfg.get("backend", "auto"))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: dict) -> dict:
    """Read and validate a checkpoint; ValueError naming the file on corruption or mismatch."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} is corrupt or not a vqfast checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    want, have = _identity(cfg), _identity(state["config"])
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError(
            f"checkpoint {path} does not match this run: it was written with "
            + ", ".join(f"{k}={have.get(k)!r}" for k in diff)
            + " but this run has "
            + ", ".join(f"{k}={want.get(k)!r}" for k in diff)
        )
    return state


def batch_indices(cfg: dict, step: int) -> range:
    """The data order: step t trains on items [t * B, (t + 1) * B) of the train split."""
    b = cfg["batch_size"]
    start = (step * b) % cfg["train_items"]
    return range(start, start + b)


@torch.no_grad()
def evaluate(model: VQVAE, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Held-out metrics: PSNR of reconstructions vs the mean-colour baseline, codebook usage (overall
    and per scale), perplexity of the token distribution, and encode throughput."""
    model.eval()
    recons, tokens = [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        tokens.append(torch.cat(model.img_to_idxBl(images[i: i + batch_size]), dim=1))
    encode_s = time.perf_counter() - t0
    tokens = torch.cat(tokens)
    for i in range(0, len(images), batch_size):
        recons.append(model.idxBl_to_img(_split_tokens(model, tokens[i: i + batch_size]), same_shape=True, last_one=True))
    recon = torch.cat(recons)
    counts = torch.bincount(tokens.flatten(), minlength=model.vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used_per_scale = [int(torch.unique(t).numel()) for t in _split_tokens(model, tokens)]
    model.train()
    return {
        "heldout_images": len(images),
        "heldout_psnr_db": psnr(recon, images).mean().item(),
        "mean_colour_baseline_psnr_db": psnr(mean_colour_baseline(images), images).mean().item(),
        "codebook_usage": int((counts > 0).sum().item()) / model.vocab_size,
        "codebook_used": int((counts > 0).sum().item()),
        "perplexity": math.exp(entropy),
        "codebook_used_per_scale": used_per_scale,
        "codebook_usage_per_scale": [u / model.vocab_size for u in used_per_scale],
        "encode_tokens_per_s": tokens.numel() / encode_s,
    }, recon


def _split_tokens(model: VQVAE, flat: torch.Tensor) -> list[torch.Tensor]:
    return list(flat.split([p * p for p in model.v_patch_nums], dim=1))


def _save_grid(path: Path, originals: torch.Tensor, recons: torch.Tensor, pairs_per_row: int = 4) -> None:
    """Pairs (original | reconstruction), 1-pixel white gutters, upscaled 2x (nearest) for viewing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o, r = to_uint8(originals), to_uint8(recons)
    n, s = len(o), o.shape[1]
    rows = -(-n // pairs_per_row)
    cell = s + 2
    grid = np.full((rows * cell, pairs_per_row * (2 * s + 6), 3), 255, dtype=np.uint8)
    for i in range(n):
        y, x = (i // pairs_per_row) * cell + 1, (i % pairs_per_row) * (2 * s + 6) + 1
        grid[y: y + s, x: x + s] = o[i]
        grid[y: y + s, x + s + 1: x + 2 * s + 1] = r[i]
    plt.imsave(path, grid.repeat(2, axis=0).repeat(2, axis=1))


def _save_curve(path: Path, history: list[dict]) -> None:
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


def train(cfg: dict, out: str | Path, resume: bool = False, checkpoint_every: int = 250, progress: bool = True,
          stop_after: int | None = None, finish: bool = True) -> dict:
    """Train to cfg["steps"] (or stop early after ``stop_after`` total steps, checkpointing there).

    Returns {"model", "step", "history", "metrics" (None when finish=False)}.
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    seed = cfg["seed"]
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95))
    step, history = 0, []
    data = RealImageCrops("train", cfg["model"]["image_size"], cfg["train_items"], seed=seed)
    if resume:
        if not ckpt_path.exists():
            raise ValueError(f"--resume given but {ckpt_path} does not exist")
        state = load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        # VAR keeps the schedule counter of ema_vocab_hit_SV outside its state_dict.
        model.quantize.record_hit = state["record_hit"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "config": cfg, "step": step, "history": history,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "record_hit": model.quantize.record_hit,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        })

    end = cfg["steps"] if stop_after is None else min(stop_after, cfg["steps"])
    tokens_per_image = model.num_tokens
    model.train()
    train_time, trained = 0.0, 0
    bar = tqdm(total=end, initial=step, disable=not progress, desc=f"train {cfg['preset']}", dynamic_ncols=True)
    while step < end:
        # Cosine decay, a function of the step alone so that a resumed run follows the same schedule.
        for group in opt.param_groups:
            group["lr"] = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))
        img = data.batch(batch_indices(cfg, step))
        t0 = time.perf_counter()
        model.quantize.reset_usage()  # the progress bar shows this batch's codebook usage
        recon, _, vq_loss = model(img)
        rec_loss = F.mse_loss(recon, img)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_time += time.perf_counter() - t0
        trained += len(img)
        step += 1
        with torch.no_grad():
            batch_psnr = psnr(recon, img).mean().item()
            used = round(model.quantize.codebook_usage() * model.vocab_size)
        history.append({"step": step, "loss": loss.item(), "rec_loss": rec_loss.item(), "psnr": batch_psnr})
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{batch_psnr:.2f}", usage=f"{used}/{model.vocab_size}")
        bar.update(1)
        if step % checkpoint_every == 0 or step == end:
            checkpoint()
    bar.close()
    if step == end and (not history or history[-1]["step"] != step or not ckpt_path.exists()):
        checkpoint()
    result = {"model": model, "step": step, "history": history, "metrics": None}
    if not finish or step < cfg["steps"]:
        return result
    held = RealImageCrops("heldout", cfg["model"]["image_size"], cfg["eval_images"], seed=seed)
    images = held.batch(range(len(held)))
    metrics, recon = evaluate(model, images)
    metrics.update(
        preset=cfg["preset"], steps=step, tokens_per_image=tokens_per_image,
        train_tokens_per_s=trained * tokens_per_image / train_time if train_time else None,
        final_train_loss=history[-1]["loss"] if history else None,
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _save_grid(out / "reconstructions.png", images[:16], recon[:16])
    _save_curve(out / "loss_curve.png", history)
    result["metrics"] = metrics
    return result


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args.preset, args.steps, args.seed, args.backend)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("runs") / args.preset
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be a positive int, got {args.checkpoint_every}")
    t0 = time.perf_counter()
    result = train(cfg, out, resume=args.resume, checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    m = result["metrics"]
    print(f"held-out PSNR {m['heldout_psnr_db']:.2f} dB (mean-colour baseline {m['mean_colour_baseline_psnr_db']:.2f} dB), "
          f"codebook usage {m['codebook_used']}/{round(m['codebook_used'] / m['codebook_usage'])}, "
          f"perplexity {m['perplexity']:.1f}, wall {time.perf_counter() - t0:.0f} s")
    print(f"wrote {out / 'reconstructions.png'}, {out / 'metrics.json'}, {out / 'loss_curve.png'}, {out / 'checkpoint.pt'}")
    return 0
