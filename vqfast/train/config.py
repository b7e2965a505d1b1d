"""A training run's configuration: the presets, ``make_config``, the learning-rate schedule and the
data order. Plain values only (no torch), so ``vqfast train --help`` and checkpoints can use them
without building anything.

A configuration is a dict:

    {"model": VQVAE's constructor arguments, "batch_size" (global), "steps", "lr", "warmup_steps",
     "grad_clip", "eval_images", "train_items", "preset", "seed", "backend",
     "data": {"source": "bundled"} or the folder's identity (vqfast.data.ImageFolder.describe())}
"""
from __future__ import annotations

import copy
import math

# ``model`` holds vqfast.models.VQVAE's constructor arguments (VAR's names; the codebook options of
# vqfast.models.MultiScaleQuantizer included), in plain types.
PRESETS: dict[str, dict] = {
    # For tests: 16 x 16 crops, 4 scales, VAR's architecture at 2 levels and width 8; a step takes milliseconds.
    "tiny": dict(
        model=dict(vocab_size=64, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                   v_patch_nums=(1, 2, 4, 8), image_size=16, share_quant_resi=2,
                   kmeans_init=True, dead_code_threshold=1.0),
        batch_size=8, steps=20, lr=2e-3, warmup_steps=4, grad_clip=1.0, eval_images=16, train_items=100_000,
    ),
    # The main job on 2 CPU cores: 32 x 32 crops -> 8 x 8 latents, 6 scales = 130 tokens per image.
    "demo": dict(
        # VAR's network at width 8/16/32 (32/16/8 px), one residual block per encoder level, attention kept.
        # k-means init + dead-code restarts: held-out usage 2.7 % -> 95.7 % (benchmarks/ablation_codebook.py).
        # lr 8e-3 with a 100-step warm-up and gradient-norm clipping at 1: 24.3 -> 26.7 dB held-out PSNR
        # over lr 4e-3 without them (at lr 8e-3 alone one seed in two stalled near 22 dB). Batch 16 for 900
        # steps: on 2 cores a step of 16 images costs about what a step of 8 does (torch's two threads
        # only pay at 16), and it trains no longer than the previous demo model's 1500 steps.
        model=dict(vocab_size=256, z_channels=16, ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=4,
                   v_patch_nums=(1, 2, 3, 4, 6, 8), image_size=32, kmeans_init=True, dead_code_threshold=1.0),
        batch_size=16, steps=900, lr=8e-3, warmup_steps=100, grad_clip=1.0, eval_images=256, train_items=1_000_000,
    ),
    # VAR's published tokenizer (vae_ch160v4096z32.pth: 256 x 256, 10 scales, 680 tokens, vocabulary
    # 4096, z_channels 32, four Phi): GPU-sized. Its 256 x 256 crops are larger than the held-out part of
    # every bundled photograph, so it needs --data.
    "var": dict(
        model=dict(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                   image_size=256),
        batch_size=8, steps=50_000, lr=2e-4, eval_images=64, train_items=10_000_000,
    ),
}


def with_image_size(model_cfg: dict, size: int) -> dict:
    """The model config at another image size: the latent side is size / downsampling, and the scales
    are the preset's stretched to it (the first stays 1 x 1). ValueError when size does not divide."""
    down = 2 ** (len(model_cfg.get("ch_mult", (1, 1, 2, 2, 4))) - 1)
    if size % down:
        raise ValueError(f"must be a multiple of this model's downsampling factor {down}, got {size}")
    old = list(model_cfg["v_patch_nums"])
    side = size // down
    if side == old[-1]:
        return {**model_cfg, **({"image_size": size} if "image_size" in model_cfg else {})}
    scaled = sorted({1, *(min(side, max(1, round(p * side / old[-1]))) for p in old[1:]), side})
    out = {**model_cfg, "v_patch_nums": scaled}
    if "image_size" in model_cfg:
        out["image_size"] = size
    return out


def make_config(preset: str, steps: int | None = None, seed: int = 0, backend: str = "auto", *,
                image_size: int | None = None, batch_size: int | None = None, data: dict | None = None) -> dict:
    """The run's configuration (plain values only). ``data``: the data set's identity
    (``ImageFolder.describe()``; None for the bundled images)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg["model"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["model"].items()}
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            cfg[name] = value
    if image_size is not None:
        try:
            cfg["model"] = with_image_size(cfg["model"], image_size)
        except ValueError as e:
            raise ValueError(f"image_size {e}") from None
    if data is None:
        data = {"source": "bundled"}
    # The folder's location may change between runs; its files (and so the data order) may not.
    data = {k: v for k, v in data.items() if k != "root"}
    cfg.update(preset=preset, seed=int(seed), backend=backend, data=data)
    return cfg


def config_geometry(cfg: dict) -> dict:
    """vqfast.tokenizer.model_geometry without building the model (from the config's plain values)."""
    m = cfg["model"]
    patch_nums = list(m["v_patch_nums"])
    size = m.get("image_size") or patch_nums[-1] * 2 ** (len(m.get("ch_mult", (1, 1, 2, 2, 4))) - 1)
    return {"image_size": size, "patch_nums": patch_nums, "vocab_size": m["vocab_size"],
            "num_tokens": sum(p * p for p in patch_nums)}


def run_identity(cfg: dict) -> dict:
    """What must match for a checkpoint to be resumed: everything except the step budget and the
    backend (both may change between runs without changing the maths: backends agree exactly)."""
    return {k: v for k, v in cfg.items() if k not in ("steps", "backend")}


def learning_rate(cfg: dict, step: int) -> float:
    """Linear warm-up over cfg["warmup_steps"] (if any), then cosine decay to 0 at cfg["steps"]: a
    function of the step alone, so that a resumed run follows the same schedule."""
    warm = min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg.get("warmup_steps") else 1.0
    return cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / cfg["steps"]))


def batch_indices(cfg: dict, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """The data order: step t trains on items [t * B, (t + 1) * B) of the train split (B the global
    batch), rank r of ``world`` on the r-th of ``world`` equal consecutive shares."""
    b = cfg["batch_size"]
    share = b // world
    start = step * b + rank * share
    return [(start + j) % cfg["train_items"] for j in range(share)]
