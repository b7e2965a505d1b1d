"""LlamaGen's codebook entropy loss without the N x K matrices: a fused, chunked forward and backward.

    entropy_loss(z [N, D], codebook [K, D], temperature=0.01, chunk_rows=None) -> [] loss

The value is LlamaGen's ``compute_entropy_loss(-d, temperature)`` (tokenizer/tokenizer_image/vq_model.py)
with d the squared distances as LlamaGen expands them,

    d[i, j] = sum(z_i^2) + sum(e_j^2) - 2 z_i . e_j
    a = (-d) / temperature
    p = softmax(a, rows)               log_p = log_softmax(a + 1e-5, rows)
    sample_entropy = -mean_i sum_j p[i, j] log_p[i, j]
    q = mean_i p[i, :]                 avg_entropy = -sum_j q_j log(q_j + 1e-5)
    loss = sample_entropy - avg_entropy

and its gradient reaches both z and the codebook, as LlamaGen's autograd graph does. LlamaGen builds d,
a, p and log_p whole: at K = 16384 and 2048 rows (batch 8 at 256 px) that is four 128 MiB fp32 tensors
per training step, kept for backward. Here the rows are taken ``chunk_rows`` at a time: every row's
softmax is complete within its chunk (no online rescaling needed), the per-row entropies and the column
sums of p are accumulated, and backward recomputes each chunk's p from z, the codebook and each row's
max and log-sum (one exponential per element). Extra memory: O(chunk_rows x K) for one chunk's
temporaries, plus O(N + K) saved for backward. log p is taken as (a - max) - log sum exp(a - max),
which is LlamaGen's log_softmax(a + 1e-5) up to rounding (the shift cancels).

The gradient, with G the upstream gradient, H_i = -sum_j p_ij log_p_ij and
g_j = log(q_j + 1e-5) + q_j / (q_j + 1e-5) (the derivative of -avg_entropy in q_j):

    dL/da_ij = (G / N) p_ij [(g_j - sum_k p_ik g_k) - (log_p_ij + H_i)]
    dL/dd_ij = -dL/da_ij / temperature
    dL/dz_i  = 2 z_i sum_j dL/dd_ij - 2 sum_j dL/dd_ij e_j
    dL/de_j  = 2 e_j sum_i dL/dd_ij - 2 sum_i dL/dd_ij z_i

The sums run in the inputs' dtype, at least fp32 (fp16 / bf16 inputs are computed in fp32, as LlamaGen's
softmax under autocast is; autocast is off inside, so the distances are fp32 too, where LlamaGen's
einsum would run in the autocast dtype), except q, whose chunk sums are added in float64. The value and gradient
equal the materialised ones within fp32 rounding (tests/test_compat_llamagen.py checks both against an
fp64 oracle, with the materialised fp32 computation's own error as the yardstick).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy_loss", "TEMPERATURE"]

TEMPERATURE = 0.01
# One chunk's row count: chunk_rows x K elements ~ 2^20 (4 MiB in fp32). The forward holds about four
# such temporaries at once (the logits turned into log p, a - max, p, p log p), so ~16 MiB
# against LlamaGen's 4 x 128 MiB at N = 2048, K = 16384; the 64-row matrix products (D = 8) are still
# long enough for the BLAS call not to dominate.
CHUNK_ELEMENTS = 1 << 20
_LOG_SHIFT = 1e-5  # LlamaGen's log_softmax(a + 1e-5) and log(q + 1e-5)


def _rows_per_chunk(n: int, k: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    return max(1, min(chunk_rows, max(n, 1)))


def _logits(z: Tensor, e: Tensor, z_sq: Tensor, e_sq: Tensor, temperature: float) -> Tensor:
    """a = -(sum z^2 + sum e^2 - 2 z e^T) / temperature for one chunk of rows, in LlamaGen's order of
    operations ([R, K]; two [R, K] buffers, the second reused in place)."""
    d = z_sq[:, None] + e_sq[None, :]
    d.sub_(z @ e.T, alpha=2.0)  # (sum z^2 + sum e^2) - 2 (z e^T): 2x is exact, so the same rounding
    return d.neg_().div_(temperature)


class _EntropyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, e: Tensor, temperature: float, chunk_rows: int) -> Tensor:
        n, k = z.shape[0], e.shape[0]
        z_sq, e_sq = (z * z).sum(1), (e * e).sum(1)
        row_sums = torch.empty(n, dtype=z.dtype, device=z.device)  # sum_j p log_p per row
        q_sum = torch.zeros(k, dtype=torch.float64, device=z.device)
        # Each row's max and log of the sum of exp(a - max): log p = (a - max) - log_total, as
        # log_softmax forms it (a - max is exact near the max; a - logsumexp would round at |max|).
        top = torch.empty(n, dtype=z.dtype, device=z.device)
        log_total = torch.empty(n, dtype=z.dtype, device=z.device)
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            a = _logits(z[r0:r1], e, z_sq[r0:r1], e_sq, temperature)
            top[r0:r1] = a.amax(1)
            shifted = a.sub_(top[r0:r1, None])
            p = shifted.exp()
            total = p.sum(1)
            p.div_(total[:, None])
            log_total[r0:r1] = total.log()
            log_p = shifted.sub_(log_total[r0:r1, None])  # LlamaGen's log_softmax(a + 1e-5) up to rounding
            row_sums[r0:r1] = (p * log_p).sum(1)
            q_sum += p.sum(0)
        q = (q_sum / n).to(z.dtype)  # n = 0: NaN, as LlamaGen's mean over no rows
        sample_entropy = -row_sums.mean()
        avg_entropy = -(q * torch.log(q + _LOG_SHIFT)).sum()
        ctx.save_for_backward(z, e, z_sq, e_sq, row_sums, top, log_total, q)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return sample_entropy - avg_entropy

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, e, z_sq, e_sq, row_sums, top, log_total, q = ctx.saved_tensors
        n, k = z.shape[0], e.shape[0]
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        g = torch.log(q + _LOG_SHIFT) + q / (q + _LOG_SHIFT)
        scale = grad_out.to(z.dtype) / (n * temperature)  # dL/dd = -(dL/da) / T; the minus is folded below
        grad_z = torch.empty_like(z)
        e_weight = torch.zeros(k, dtype=z.dtype, device=z.device)  # sum_i dL/dd_ij
        e_mix = torch.zeros_like(e)                                  # sum_i dL/dd_ij z_i
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            zc = z[r0:r1]
            log_p = _logits(zc, e, z_sq[r0:r1], e_sq, temperature).sub_(top[r0:r1, None]).sub_(log_total[r0:r1, None])
            p = log_p.exp()  # one exponential per element: the forward kept each row's max and log-sum
            # dL/dd = (G / (N T)) p [(log_p + H_i) - (g - sum_k p g_k)], H_i = -row_sums_i
            mixed_g = p @ g
            w = log_p.sub_(row_sums[r0:r1, None]).sub_(g[None, :]).add_(mixed_g[:, None])
            w.mul_(p).mul_(scale)
            grad_z[r0:r1] = 2.0 * zc * w.sum(1, keepdim=True) - 2.0 * (w @ e)
            e_weight += w.sum(0)
            e_mix += w.T @ zc
        grad_e = 2.0 * e * e_weight[:, None] - 2.0 * e_mix
        return grad_z, grad_e, None, None


def entropy_loss(z: Tensor, codebook: Tensor, temperature: float = TEMPERATURE, chunk_rows: int | None = None) -> Tensor:
    """LlamaGen's entropy loss of the affinity -d(z, codebook), fused: no N x K tensor.

    Args:
        z: [N, D] rows (LlamaGen passes the l2-normalised flattened latents when ``l2_norm``).
        codebook: [K, D] codewords (normalised when ``l2_norm``), on z's device.
        temperature: the softmax temperature (LlamaGen: 0.01), a positive float.
        chunk_rows: rows per chunk (default: about 2^20 / K); only memory and speed depend on it.

    Returns:
        [] the loss in z's dtype promoted with the codebook's (at least fp32), differentiable with
        respect to both z and codebook. N = 0 gives NaN, as LlamaGen's mean over no rows.
    """
    if not isinstance(z, Tensor) or not isinstance(codebook, Tensor):
        raise TypeError(f"z and codebook must be torch.Tensors, got {type(z).__name__} and {type(codebook).__name__}")
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z must be [N, D] and codebook [K, D] with the same D, got shapes {tuple(z.shape)} "
                         f"and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one codeword (K >= 1)")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise TypeError(f"z and codebook must be floating point, got {z.dtype} and {codebook.dtype}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    dtype = torch.promote_types(torch.promote_types(z.dtype, codebook.dtype), torch.float32)
    rows = _rows_per_chunk(z.shape[0], codebook.shape[0], chunk_rows)
    args = (z.to(dtype).contiguous(), codebook.to(dtype).contiguous(), float(temperature), rows)
    if z.device.type in ("cpu", "cuda"):
        # Autocast off: forward and backward (which autocast does not reach) in the same dtype.
        with torch.autocast(z.device.type, enabled=False):
            return _EntropyLoss.apply(*args)
    return _EntropyLoss.apply(*args)
