"""The training loop: ``train(cfg, out)`` trains to cfg["steps"], checkpointing on the way, and
writes the reports of a finished run; checkpoints are read back exactly for ``resume``.

A checkpoint (vqfast.tokenizer.CHECKPOINT_FORMAT, written atomically by vqfast.checkpoint.save_atomic)
holds the config, the step, the model, the optimizer, every process's RNG states, the training
history and the names of files that failed to decode: everything ``resume`` needs to continue as if
the run had never stopped (the data order is a function of (seed, step), see vqfast.data).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from vqfast.checkpoint import load_safely, save_atomic
from vqfast.data import FolderCrops, ImageFolder, RealImageCrops, psnr
from vqfast.errors import InputError
from vqfast.tokenizer import CHECKPOINT_FORMAT, amp_context, build_model, model_geometry
from vqfast.train.config import batch_indices, config_geometry, learning_rate, run_identity
from vqfast.train.distributed import check_replicas, gather, rank_and_world, restore_rng, rng_states
from vqfast.train.evaluation import evaluate, save_curve, save_grid

OUTPUT_FILES = ("checkpoint.pt", "checkpoint.pt.tmp", "metrics.json", "reconstructions.png", "loss_curve.png")


# ---- checkpoints -----------------------------------------------------------------------------------

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
    want, have = run_identity(cfg), run_identity(state["config"])
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


def is_finished(out: Path, step: int, cfg: dict) -> bool:
    """Whether the run in ``out`` whose checkpoint is at ``step`` has nothing left to do: trained to
    cfg["steps"] and its held-out evaluation written (metrics.json)."""
    return step >= cfg["steps"] and (Path(out) / "metrics.json").is_file()


# ---- data ------------------------------------------------------------------------------------------

def make_datasets(cfg: dict, folder: ImageFolder | None):
    """(train items, held-out items) of the bundled images or of ``folder``."""
    size, seed = config_geometry(cfg)["image_size"], cfg["seed"]
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


class StepBatches(torch.utils.data.Dataset):
    """Step t -> (this rank's share of global batch t, names of files that failed to decode): the
    data loader's unit, so workers build whole batches and any number of them gives the same ones."""

    def __init__(self, data, cfg: dict, rank: int = 0, world: int = 1):
        self.data, self.cfg, self.rank, self.world = data, cfg, rank, world

    def __len__(self) -> int:
        return self.cfg["steps"]

    def __getitem__(self, step: int):
        return self.data.load_batch(batch_indices(self.cfg, step, self.rank, self.world))


def _loader_worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the loader's workers leave it to the training process,
    # which finishes its step and checkpoints while they keep serving batches.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- the loop --------------------------------------------------------------------------------------

def model_forward(model: nn.Module, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Training forward (model may be DDP-wrapped) -> (reconstruction, vq_loss, recent code use in %:
    VAR's per-scale share of codes hit in recent training batches, averaged over the scales)."""
    recon, usages, vq_loss = model(img, ret_usages=True)
    return recon, vq_loss, float(np.mean(usages))


def train(cfg: dict, out: str | Path, resume: bool = False, checkpoint_every: int = 250, progress: bool = True,
          stop_after: int | None = None, finish: bool = True, *, folder: ImageFolder | None = None,
          device: str | torch.device = "cpu", dtype: str = "fp32", workers: int = 0, stop=None) -> dict:
    """Train to cfg["steps"] (or stop early after ``stop_after`` total steps, checkpointing there).

    Runs in one process, or in every process of an initialised torch.distributed group (the caller
    initialises it; ``device`` is this process's device). ``stop``: None, or an object whose
    ``requested`` turns true to end the run at the next step's end with a checkpoint there (any
    process's request stops them all at the same step), and whose ``deferring()`` context covers the
    loop (vqfast.train.cli's Ctrl-C handling). ``resume`` of a run that finished (its checkpoint at
    cfg["steps"] and metrics.json written) does nothing.

    Returns {"model" (unwrapped), "step", "history", "metrics" (None unless this call finished the
    run on rank 0), "status": "finished" / "stopped" (stop_after or finish=False) / "interrupted"
    (stop) / "already finished", "decode_failures": "name (reason)" of every file that failed to decode
    and was replaced by the next of its epoch, in training since the run began and in the evaluation}.
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
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(device)
    step, history, failures = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        step, history, failures = state["step"], state["history"], list(state.get("decode_failures", []))
        # VAR keeps the schedule counter of ema_vocab_hit_SV outside its state_dict.
        model.quantize.record_hit = int(state["record_hit"])
        # Rank 0's view decides (it writes metrics.json), so that every process returns alike.
        if gather(is_finished(out, step, cfg), world)[0]:
            return {"model": model, "step": step, "history": history, "metrics": None,
                    "status": "already finished", "decode_failures": failures}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data, held = make_datasets(cfg, folder)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], rank, device)
    net = model
    if world > 1:
        # Buffers (EMA statistics, usage counts) are synchronised by the quantizers themselves;
        # check_replicas verifies it at every checkpoint instead of masking a divergence.
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers")  # torch >= 2.13 renamed it
        net = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})

    def checkpoint() -> None:
        check_replicas(model, world)
        rng = rng_states(device, world)
        all_failures = sorted(set(sum(gather(failures, world), [])))
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
        worker_init_fn=_loader_worker_init if workers else None,
        generator=torch.Generator().manual_seed(cfg["seed"]))  # its own: creating it draws no global random numbers
    geo = model_geometry(model)
    model.train()
    train_time, trained, interrupted = 0.0, 0, False
    bar = tqdm(total=end, initial=min(step, end), disable=not progress or rank != 0, desc=f"train {cfg['preset']}",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    with stop.deferring() if stop is not None else contextlib.nullcontext():
        for img, failed in loader:
            failures += failed
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            img = img.to(device, non_blocking=True)
            with amp_context(device, dtype):
                recon, vq_loss, recent_use = model_forward(net, img)
            rec_loss = F.mse_loss(recon.float(), img)
            loss = rec_loss + vq_loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.get("grad_clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            step += 1
            # Logged values are global means, and a stop request of any process stops them all at this
            # step: one small all-reduce, so every process logs and decides the same.
            # (The request is scaled by world so that the division below leaves the number of requests.)
            asked = torch.tensor(float(stop is not None and stop.requested) * world, device=device)
            stats = torch.stack([loss.detach(), rec_loss.detach(), psnr(recon.detach(), img).mean(), asked]).float()
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            loss_v, rec_v, psnr_v, stop_v = stats.tolist()
            interrupted = stop_v > 0
            trained += cfg["batch_size"]
            history.append({"step": step, "loss": loss_v, "rec_loss": rec_v, "psnr": psnr_v,
                            "recent_code_use": recent_use / 100})
            bar.set_postfix(loss=f"{loss_v:.4f}", psnr=f"{psnr_v:.2f}", recent_use=f"{recent_use:.0f}%")
            bar.update(1)
            if step % checkpoint_every == 0 or step == end or interrupted:
                train_time += time.perf_counter() - t0
                checkpoint()
                t0 = time.perf_counter()
            if interrupted:
                break
    bar.close()
    if state is None and not trained:
        checkpoint()  # stop_after=0: still a checkpoint to resume from
    all_failures = sorted(set(sum(gather(failures, world), [])))
    result = {"model": model, "step": step, "history": history, "metrics": None, "decode_failures": all_failures,
              "status": "interrupted" if interrupted else "stopped"}
    if interrupted or not finish or step < cfg["steps"]:
        return result
    result["status"] = "finished"
    if rank != 0:
        return result
    metrics, originals, recon, held_failures = evaluate(model, held, cfg["eval_images"], device, dtype)
    all_failures = result["decode_failures"] = sorted(set(all_failures + held_failures))
    metrics.update(
        preset=cfg["preset"], steps=step, tokens_per_image=geo["num_tokens"], image_size=geo["image_size"],
        patch_nums=list(geo["patch_nums"]), world_size=world, device=str(device), dtype=dtype,
        global_batch_size=cfg["batch_size"],
        train_tokens_per_s=trained * geo["num_tokens"] / train_time if train_time else None,
        final_train_loss=history[-1]["loss"] if history else None,
        train_recent_code_use=history[-1].get("recent_code_use") if history else None,
        data={**(folder.describe() if folder is not None else held.describe()), "decode_failures": len(all_failures)},
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_grid(out / "reconstructions.png", originals, recon)
    save_curve(out / "loss_curve.png", history)
    result["metrics"] = metrics
    return result
