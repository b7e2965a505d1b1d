"""Shared test utilities: an independent fp64 brute force and index comparison with tie tolerance."""
from __future__ import annotations

import torch


def brute_force_fp64(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """All N x K distances by direct differences in float64: [N, D], [K, D] -> [N, K]. Small shapes only."""
    a, b = z.double(), codebook.double()
    if metric == "cosine":
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def assert_indices_optimal(indices, z, codebook, metric="l2", rtol=0.0, atol=0.0):
    """Each chosen codeword's fp64 distance is the row minimum (within rtol/atol), and exact ties go to the lowest index."""
    d = brute_force_fp64(z, codebook, metric)
    best = d.min(1).values
    chosen = d.gather(1, indices[:, None].long()).squeeze(1)
    slack = atol + rtol * best.abs()
    bad = chosen > best + slack
    assert not bad.any(), f"{int(bad.sum())} rows chose a codeword that is not the nearest: first at row {int(bad.nonzero()[0])}"
    if rtol == 0.0 and atol == 0.0:
        first_min = (d == best[:, None]).double().argmax(1)
        assert torch.equal(indices.long(), first_min), "exact ties must resolve to the lowest index"
