"""torch.distributed helpers for codebook learning: every rank runs the same collectives in the same
order, so ranks that see different batch sizes never hang, and all ranks keep one codebook.

    all_reduce_sum_(t)        in place; sums of (counts, sums) make EMA statistics batch-size agnostic
    gather_rows(x)            [n_r, D] on every rank -> [sum n_r, D] (rank order), padded all_gather
    broadcast_(t, src=0)      in place; rank 0's k-means / re-seeding result goes to every rank

Without an initialised process group each helper is the identity, so single-process code pays nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: [n_r, D] -> [sum_r n_r, D] on every rank.

    all_gather needs equal shapes, so the row counts are gathered first and each rank pads to the
    largest; the padding is dropped after the gather.
    """
    if not is_distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_list = [int(s.item()) for s in sizes]
    max_n = max(sizes_list)
    padded = x.new_zeros((max_n,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes_list)], dim=0)
