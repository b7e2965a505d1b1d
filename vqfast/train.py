"""``vqfast train``: train a multi-scale VQ-VAE tokenizer on real images (vqfast.data).

    vqfast train --preset demo                                  # bundled images, 2 CPU cores -> runs/demo/
    vqfast train --preset demo --data ~/photos --out runs/mine  # any folder of PNG/JPEG/WebP/BMP files
    torchrun --nproc-per-node 8 -m vqfast train --preset var --data ~/photos --out runs/var

Writes to ``--out`` (default runs/<preset>/; a non-empty folder needs ``--resume`` or ``--overwrite``):
checkpoint.pt (atomic: temp file + os.replace), metrics.json (held-out PSNR against the mean-colour
baseline, codebook usage overall and per scale, perplexity, tokens/s), reconstructions.png (held-out
originals beside their reconstructions) and loss_curve.png.

``--resume`` continues from checkpoint.pt exactly: model, optimizer, every process's RNG states and
the step are restored, and the data order is a function of (seed, step) (see vqfast.data). Checkpoints
hold only tensors and plain values and are read with ``weights_only=True``.

Under torchrun (gloo on CPU, nccl on GPU) the model is wrapped in DistributedDataParallel, the global
batch ``batch_size`` is split across the processes in rank order (each decodes only its share), the
quantizers synchronise their codebook statistics themselves, and only rank 0 writes. The result equals
one process with the same global batch, up to the order of floating-point sums.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vqfast.checkpoint import load_safely, save_atomic
from vqfast.errors import InputError
from vqfast.data import (FolderCrops, ImageFolder, RealImageCrops, format_skipped, mean_colour_baseline, psnr,
                         to_uint8)
from vqfast.models import VQVAE

CHECKPOINT_FORMAT = "vqfast-train-2"
OUTPUT_FILES = ("checkpoint.pt", "checkpoint.pt.tmp", "metrics.json", "reconstructions.png", "loss_curve.png")

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
    # 4096, z_channels 32, four Phi): GPU-sized.
    "var": dict(
        model=dict(vocab_size=4096, z_channels=32, ch=160, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                   image_size=256),
        batch_size=8, steps=50_000, lr=2e-4, eval_images=64, train_items=10_000_000,
    ),
}


# ---- the model: build_model and PRESETS pick it (vqfast.models.VQVAE, VAR's tokenizer); the functions
# below are the trainer's and `vqfast tokenize`'s only contact with its API.

def build_model(cfg: dict) -> VQVAE:
    return VQVAE(**cfg["model"], test_mode=False, backend=cfg.get("backend", "auto"))


def _inner(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_geometry(model: nn.Module) -> dict:
    """{"image_size", "patch_nums", "vocab_size", "num_tokens"} of a tokenizer."""
    model = _inner(model)
    patch_nums = tuple(model.quantize.v_patch_nums)
    return {"image_size": model.downsample * patch_nums[-1], "patch_nums": patch_nums,
            "vocab_size": model.vocab_size, "num_tokens": sum(p * p for p in patch_nums)}


def model_forward(model: nn.Module, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Training forward (model may be DDP-wrapped) -> (reconstruction, vq_loss, codebook usage in %)."""
    recon, usages, vq_loss = model(img, ret_usages=True)
    return recon, vq_loss, float(np.mean(usages))  # VAR's per-scale EMA hit rates, averaged


@torch.no_grad()
def decode_tokens(model: nn.Module, idx_list: list[torch.Tensor]) -> torch.Tensor:
    """Index maps (one [B, p * p] per scale) -> images [B, 3, H, W] in [-1, 1]."""
    return model.idxBl_to_img(idx_list, same_shape=True, last_one=True)


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


# ---- configuration and checkpoints ---------------------------------------------------------------

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


def _identity(cfg: dict) -> dict:
    # What must match for a checkpoint to be resumed: everything except the step budget and the
    # backend (both may change between runs without changing the maths: backends agree exactly).
    return {k: v for k, v in cfg.items() if k not in ("steps", "backend")}


def read_checkpoint(path) -> dict:
    """A ``vqfast train`` checkpoint, read safely; InputError naming the file when it is not one."""
    state = load_safely(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise InputError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint (format: {found!r})")
    for key in ("config", "model", "step"):
        if key not in state:
            raise InputError(f"checkpoint {path} has no {key!r} entry")
    return state


def load_checkpoint(path, cfg: dict) -> dict:
    """Read a checkpoint to resume ``cfg``; InputError naming the file on corruption or mismatch."""
    state = read_checkpoint(path)
    want, have = _identity(cfg), _identity(state["config"])
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise InputError(
            f"checkpoint {path} does not match this run: it was written with "
            + ", ".join(f"{k}={have.get(k)!r}" for k in diff)
            + " but this run has "
            + ", ".join(f"{k}={want.get(k)!r}" for k in diff)
        )
    for key in ("optimizer", "history", "rng"):
        if key not in state:
            raise InputError(f"checkpoint {path} has no {key!r} entry")
    return state


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


# ---- data ----------------------------------------------------------------------------------------

def make_datasets(cfg: dict, folder: ImageFolder | None):
    """(train items, held-out items) of the bundled images or of ``folder``."""
    size, seed = model_geometry_of_config(cfg)["image_size"], cfg["seed"]
    if folder is None:
        if cfg["data"].get("source") != "bundled":
            raise ValueError("this configuration trains on a folder: pass it")
        return (RealImageCrops("train", size, cfg["train_items"], seed=seed),
                RealImageCrops("heldout", size, cfg["eval_images"], seed=seed))
    have = {k: v for k, v in folder.describe().items() if k != "root"}
    if have != cfg["data"]:
        raise ValueError(f"the folder {folder.root} is not the configuration's data set ({cfg['data']})")
    return (FolderCrops(folder, "train", size, cfg["train_items"], seed=seed),
            FolderCrops(folder, "heldout", size, cfg["eval_images"], seed=seed))


def model_geometry_of_config(cfg: dict) -> dict:
    """model_geometry without building the model (from the config's plain values)."""
    m = cfg["model"]
    patch_nums = list(m["v_patch_nums"])
    size = m.get("image_size") or patch_nums[-1] * 2 ** (len(m.get("ch_mult", (1, 1, 2, 2, 4))) - 1)
    return {"image_size": size, "patch_nums": patch_nums, "vocab_size": m["vocab_size"],
            "num_tokens": sum(p * p for p in patch_nums)}


class StepBatches(torch.utils.data.Dataset):
    """Step t -> (this rank's share of global batch t, names of files that failed to decode): the
    data loader's unit, so workers build whole batches and any number of them gives the same ones."""

    def __init__(self, data, cfg: dict, rank: int = 0, world: int = 1):
        self.data, self.cfg, self.rank, self.world = data, cfg, rank, world

    def __len__(self) -> int:
        return self.cfg["steps"]

    def __getitem__(self, step: int):
        return self.data.load_batch(batch_indices(self.cfg, step, self.rank, self.world))


# ---- torch.distributed ---------------------------------------------------------------------------

def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rng_states(device: torch.device, world: int) -> dict:
    """Every process's RNG states (rank order), as uint8 tensors."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states = _gather((torch.get_rng_state(), cuda), world)
    return {"cpu": [s[0] for s in states], "cuda": [s[1] for s in states if s[1] is not None]}


def _restore_rng(rng: dict, rank: int, world: int, device: torch.device) -> None:
    saved = len(rng["cpu"])
    # Another process count: the new ranks take rank 0's streams (only rank 0's draws decide
    # anything: the quantizers broadcast its k-means and restart choices).
    i = rank if rank < saved else 0
    torch.set_rng_state(rng["cpu"][i])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(rng["cuda"][min(i, len(rng["cuda"]) - 1)], device)


def _check_replicas(model: nn.Module, world: int) -> None:
    """All processes must hold the same parameters and buffers: compare per-tensor float64 sums."""
    if world == 1:
        return
    items = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    sums = torch.stack([v.detach().double().sum() for _, v in items]).cpu()
    every = _gather(sums, world)
    for r, other in enumerate(every[1:], start=1):
        bad = [k for (k, _), a, b in zip(items, every[0], other) if not torch.equal(a, b)]
        if bad:
            raise RuntimeError(f"process {r} diverged from process 0 in {bad[:5]}: the codebook or model "
                               f"state is not synchronised")


# ---- evaluation and outputs ----------------------------------------------------------------------

def amp_context(device: torch.device, dtype: str):
    """bf16 autocast when dtype is "bf16" (the quantizers run their search in fp32 inside it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, data, count: int, device: torch.device = torch.device("cpu"), dtype: str = "fp32",
             batch_size: int = 64) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Held-out metrics over items 0..count-1 of ``data``: PSNR of reconstructions vs the mean-colour
    baseline, codebook usage overall and per scale, perplexity of the token distribution, and encode
    throughput. Returns (metrics, the first 16 originals, their reconstructions)."""
    geo = model_geometry(model)
    was_training = model.training
    model.eval()
    vocab = geo["vocab_size"]
    counts = torch.zeros(len(geo["patch_nums"]), vocab, dtype=torch.float64)
    psnrs, baselines, shown, encode_s, tokens = [], [], None, 0.0, 0
    for i in range(0, count, batch_size):
        images = data.load_batch(range(i, min(count, i + batch_size)))[0].to(device)
        t0 = time.perf_counter()
        with amp_context(device, dtype):
            idx_list = model.img_to_idxBl(images)
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
        "codebook_usage": used / vocab,
        "codebook_used": used,
        "vocab_size": vocab,
        "codebook_used_per_scale": used_per_scale,
        "codebook_usage_per_scale": [u / vocab for u in used_per_scale],
        "perplexity": math.exp(entropy),
        "encode_tokens_per_s": tokens / encode_s if encode_s else None,
    }
    return metrics, shown[0], shown[1]


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
    zoom = 2 if s < 128 else 1
    plt.imsave(path, grid.repeat(zoom, axis=0).repeat(zoom, axis=1))


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


# ---- the loop ------------------------------------------------------------------------------------

def train(cfg: dict, out: str | Path, resume: bool = False, checkpoint_every: int = 250, progress: bool = True,
          stop_after: int | None = None, finish: bool = True, *, folder: ImageFolder | None = None,
          device: str | torch.device = "cpu", dtype: str = "fp32", workers: int = 0) -> dict:
    """Train to cfg["steps"] (or stop early after ``stop_after`` total steps, checkpointing there).

    Runs in one process, or in every process of an initialised torch.distributed group (the caller
    initialises it; ``device`` is this process's device). Returns {"model" (unwrapped), "step",
    "history", "metrics" (None when finish=False, the run stopped early, or rank != 0)}.
    """
    from tqdm import tqdm

    rank, world = rank_and_world()
    device = torch.device(device)
    if cfg["batch_size"] % world:
        raise InputError(f"the global batch size {cfg['batch_size']} does not split into {world} equal shares")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    out = Path(out)
    ckpt_path = out / "checkpoint.pt"
    state = load_checkpoint(ckpt_path, cfg) if resume else None  # every process reads it: ranks stay alike
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data, held = make_datasets(cfg, folder)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(device)
    step, history, failures = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        step, history, failures = state["step"], state["history"], list(state.get("decode_failures", []))
        # VAR keeps the schedule counter of ema_vocab_hit_SV outside its state_dict.
        model.quantize.record_hit = int(state["record_hit"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"], rank, world, device)
    net = model
    if world > 1:
        # Buffers (EMA statistics, usage counts) are synchronised by the quantizers themselves;
        # _check_replicas verifies it at every checkpoint instead of masking a divergence.
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers")  # torch >= 2.13 renamed it
        net = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})

    def checkpoint() -> None:
        _check_replicas(model, world)
        rng = _rng_states(device, world)
        all_failures = sorted(set(sum(_gather(failures, world), [])))
        if rank == 0:
            save_atomic({
                "format": CHECKPOINT_FORMAT, "config": cfg, "step": step, "history": history,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng, "world_size": world,
                "record_hit": model.quantize.record_hit,
                "decode_failures": all_failures,
            }, ckpt_path)

    end = cfg["steps"] if stop_after is None else min(stop_after, cfg["steps"])
    loader = torch.utils.data.DataLoader(
        StepBatches(data, cfg, rank, world), batch_size=None, sampler=range(step, max(step, end)),
        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(cfg["seed"]))  # its own: creating it draws no global random numbers
    geo = model_geometry(model)
    model.train()
    train_time, trained = 0.0, 0
    bar = tqdm(total=end, initial=min(step, end), disable=not progress or rank != 0, desc=f"train {cfg['preset']}",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    for img, failed in loader:
        failures += failed
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        img = img.to(device, non_blocking=True)
        with amp_context(device, dtype):
            recon, vq_loss, usage = model_forward(net, img)
        rec_loss = F.mse_loss(recon.float(), img)
        loss = rec_loss + vq_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        step += 1
        # Logged values are global means: one small all-reduce, so every process logs the same.
        stats = torch.stack([loss.detach(), rec_loss.detach(), psnr(recon.detach(), img).mean()]).float()
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        loss_v, rec_v, psnr_v = stats.tolist()
        trained += cfg["batch_size"]
        history.append({"step": step, "loss": loss_v, "rec_loss": rec_v, "psnr": psnr_v})
        bar.set_postfix(loss=f"{loss_v:.4f}", psnr=f"{psnr_v:.2f}", usage=f"{usage:.0f}%")
        bar.update(1)
        if step % checkpoint_every == 0 or step == end:
            train_time += time.perf_counter() - t0
            checkpoint()
            t0 = time.perf_counter()
    bar.close()
    if state is None and not trained:
        checkpoint()  # stop_after=0: still a checkpoint to resume from
    result = {"model": model, "step": step, "history": history, "metrics": None}
    all_failures = sorted(set(sum(_gather(failures, world), [])))
    if not finish or step < cfg["steps"] or rank != 0:
        return result
    if all_failures:
        warnings.warn(f"{len(all_failures)} files failed to decode during training and were replaced by the next "
                      f"file of their epoch: " + "; ".join(all_failures[:20])
                      + (f"; and {len(all_failures) - 20} more" if len(all_failures) > 20 else ""), stacklevel=2)
    metrics, originals, recon = evaluate(model, held, cfg["eval_images"], device, dtype)
    metrics.update(
        preset=cfg["preset"], steps=step, tokens_per_image=geo["num_tokens"], image_size=geo["image_size"],
        patch_nums=list(geo["patch_nums"]), world_size=world, device=str(device), dtype=dtype,
        global_batch_size=cfg["batch_size"],
        train_tokens_per_s=trained * geo["num_tokens"] / train_time if train_time else None,
        final_train_loss=history[-1]["loss"] if history else None,
        data={**(folder.describe() if folder is not None else held.describe()), "decode_failures": len(all_failures)},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _save_grid(out / "reconstructions.png", originals, recon)
    _save_curve(out / "loss_curve.png", history)
    result["metrics"] = metrics
    return result


# ---- the command ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model and schedule (default: demo)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a folder of PNG / JPEG / WebP / BMP images, searched recursively "
                             "(default: the images bundled with scikit-image and scikit-learn)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the square training crops (default: the preset's; the scales are "
                             "stretched to it)")
    parser.add_argument("--steps", type=int, default=None, help="total optimisation steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch, split over torchrun's processes (default: the preset's)")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<preset>/)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default 250)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="default: cuda when available (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                        help="autocast dtype of the encoder and decoder (the quantizer's search stays fp32); "
                             "default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loading processes per training process (default: 0 for the bundled images, "
                             "else up to 8 of the CPU cores)")
    parser.add_argument("--backend", default="auto", help="nearest-codeword backend (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is often faster on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise InputError(f"environment variable {name}={os.environ[name]!r} is not an int") from None


def _check_args(args: argparse.Namespace) -> tuple[Path, torch.device, str, int]:
    """Every user error, before any work: -> (out, device, dtype, workers)."""
    for name in ("steps", "batch_size", "image_size", "checkpoint_every", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}")
    if args.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {args.seed}")
    if args.data is not None and not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: " + ("is a file, not a folder of images" if Path(args.data).exists()
                                                     else "no such folder"))
    if args.image_size is not None:
        try:
            with_image_size(PRESETS[args.preset]["model"], args.image_size)
        except ValueError as e:
            raise InputError(f"--image-size {e} (preset {args.preset})") from None
    world, local_rank = _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    batch = args.batch_size or PRESETS[args.preset]["batch_size"]
    if batch % world:
        raise InputError(f"--batch-size {batch} (the global batch) must be a multiple of the {world} processes")
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available to this torch "
                             f"({torch.__version__}); use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"--device cuda: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    out = Path(args.out) if args.out else Path("runs") / args.preset
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if args.resume and args.overwrite:
        raise InputError("--resume and --overwrite contradict each other: pick one")
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise InputError(f"--resume: {out / 'checkpoint.pt'} does not exist")
    if not args.resume and not args.overwrite and out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise InputError(f"--out {out} is not empty (it holds {held}): pass --resume to continue that run "
                         f"or --overwrite to replace it, or choose another --out")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {out}: {parent} is not writable")
    if args.workers is not None:
        workers = args.workers
    elif args.data is None:
        workers = 0  # crops of in-memory arrays take ~0.1 ms: a worker process would only add start-up time
    else:
        workers = min(8, max(1, (os.cpu_count() or 2) // _env_int("LOCAL_WORLD_SIZE", world) - 1))
    return out, device, dtype, workers


def _scan_folder(path: str | None, rank: int, world: int) -> ImageFolder | None:
    """Rank 0 scans the folder and sends the result (or its error) to every process."""
    if path is None:
        return None
    result = None
    if rank == 0:
        try:
            result = ImageFolder.scan(path)
        except ValueError as e:
            result = f"--data {e}"
    result = _gather(result, world)[0]
    if isinstance(result, str):
        raise InputError(result)
    return result


def main(args: argparse.Namespace) -> int:
    out, device, dtype, workers = _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    world = _env_int("WORLD_SIZE", 1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest convolutions once
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank = rank_and_world()[0]
        say = print if rank == 0 else (lambda *a, **k: None)
        folder = _scan_folder(args.data, rank, world)
        if folder is not None and folder.skipped and rank == 0:
            print(f"warning: --data {args.data}: {format_skipped(folder.skipped)}", file=sys.stderr)
        cfg = make_config(args.preset, args.steps, args.seed, args.backend, image_size=args.image_size,
                          batch_size=args.batch_size, data=folder.describe() if folder is not None else None)
        if args.overwrite and rank == 0:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
        geo = model_geometry_of_config(cfg)
        size = geo["image_size"]
        say(("data: " + (f"{len(folder.train)} training and {len(folder.heldout)} held-out images under {folder.root}"
                         if folder is not None else "the images bundled with scikit-image and scikit-learn"))
            + f"; random square crops resized to {size} x {size} ("
            + ("--image-size" if args.image_size else f"the {args.preset} preset's size") + ")")
        say(f"model: {len(geo['patch_nums'])} scales {tuple(geo['patch_nums'])} = {geo['num_tokens']} tokens per "
            f"image, vocabulary {geo['vocab_size']}; {device} {dtype}, "
            f"global batch {cfg['batch_size']}" + (f" over {world} processes" if world > 1 else ""))
        if args.preset == "var" and device.type == "cpu":
            say("note: the var preset is VAR's full tokenizer, sized for GPUs: on a CPU a step takes seconds "
                "to minutes (try --preset demo)")
        t0 = time.perf_counter()
        result = train(cfg, out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                       progress=not args.no_progress, folder=folder, device=device, dtype=dtype, workers=workers)
        m = result["metrics"]
        if m is not None:
            say(f"held-out PSNR {m['heldout_psnr_db']:.2f} dB (mean-colour baseline "
                f"{m['mean_colour_baseline_psnr_db']:.2f} dB), codebook usage {m['codebook_used']}/{m['vocab_size']} "
                f"(per scale: {', '.join(map(str, m['codebook_used_per_scale']))}), "
                f"perplexity {m['perplexity']:.1f}, wall {time.perf_counter() - t0:.0f} s")
            say(f"wrote {out / 'reconstructions.png'}, {out / 'metrics.json'}, {out / 'loss_curve.png'}, "
                f"{out / 'checkpoint.pt'}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0
