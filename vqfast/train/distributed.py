"""The trainer's state across torchrun's processes: who this process is, every process's RNG
streams (saved in checkpoints, restored on resume), and the check that the replicas agree.

One process (no initialised torch.distributed group) is rank 0 of a world of 1: every function here
then works without touching torch.distributed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the initialised group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj, world: int) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def rng_states(device: torch.device, world: int) -> dict:
    """Every process's RNG states (rank order), as uint8 tensors: {"cpu": [...], "cuda": [...]}."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    states = gather((torch.get_rng_state(), cuda), world)
    return {"cpu": [s[0] for s in states], "cuda": [s[1] for s in states if s[1] is not None]}


def restore_rng(rng: dict, rank: int, device: torch.device) -> None:
    """Set this process's RNG streams from ``rng_states``' record."""
    saved = len(rng["cpu"])
    # Another process count: the new ranks take rank 0's streams (only rank 0's draws decide
    # anything: the quantizers broadcast its k-means and restart choices).
    i = rank if rank < saved else 0
    torch.set_rng_state(rng["cpu"][i])
    if device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state(rng["cuda"][min(i, len(rng["cuda"]) - 1)], device)


def check_replicas(model: nn.Module, world: int) -> None:
    """All processes must hold the same parameters and buffers: compare per-tensor float64 sums;
    RuntimeError naming the process and the first tensors that differ."""
    if world == 1:
        return
    items = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    sums = torch.stack([v.detach().double().sum() for _, v in items]).cpu()
    every = gather(sums, world)
    for r, other in enumerate(every[1:], start=1):
        bad = [k for (k, _), a, b in zip(items, every[0], other) if not torch.equal(a, b)]
        if bad:
            raise RuntimeError(f"process {r} diverged from process 0 in {bad[:5]}: the codebook or model "
                               f"state is not synchronised")
