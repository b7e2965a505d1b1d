"""Triton kernels for the nearest-codeword search.

_search_kernel: one program per BLOCK_N rows of z and split of the codebook (program_id(1): codes
[split * SPLIT_CODES, (split + 1) * SPLIT_CODES), SPLIT_CODES a multiple of BLOCK_K; one split is the
whole codebook). Its share of the codebook streams through BLOCK_K-wide tiles;
each tile's dot products come from tl.dot over BLOCK_D-wide slices of D (any D up to 1024), are
turned into e = ||c||^2 - 2 z.c (||z||^2 is constant per row), and fold into a running
(best, index, second-best) per row held in registers. Nothing of size N x K is ever stored. Ties
go to the lowest index: tl.argmin breaks ties to the left and a later tile replaces the running best
only when strictly smaller. Each split writes its rows' (index, best, second) at row split * N + row.

_merge_splits_kernel: folds the per-split top-2 of every row, splits in ascending code order (so equal
values keep the lowest index and leave a zero top-2 gap for the exact re-rank).

_gather_kernel: codewords = codebook[indices] in z's dtype and the directly computed distance
sum((z - c)^2) in fp32, one program per BLOCK_N rows.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _search_kernel(
    z_ptr, cb_ptr, cbn_ptr, idx_ptr, best_ptr, second_ptr,
    N, K, D,
    stride_zn, stride_zd, stride_cn, stride_cd,
    K_BUCKET,  # autotuning key only (codebook sizes within a power of two share a configuration)
    SPLIT_CODES,  # codes per split, a multiple of BLOCK_K
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)  # 64-bit offsets: N * D may exceed 2^31
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    second = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    k_start = split * SPLIT_CODES
    k_end = tl.minimum(K, k_start + SPLIT_CODES)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        codes = offs_k.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            zt = tl.load(z_ptr + rows[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            ct = tl.load(cb_ptr + codes[None, :] * stride_cn + offs_d[:, None] * stride_cd,
                         mask=mask_k[None, :] & mask_d[:, None], other=0.0)
            if CAST_FP32:
                zt = zt.to(tl.float32)
                ct = ct.to(tl.float32)
            acc = tl.dot(zt, ct, acc, input_precision=INPUT_PRECISION)
        cbn = tl.load(cbn_ptr + offs_k, mask=mask_k, other=float("inf"))
        e = cbn[None, :] - 2.0 * acc
        e = tl.where(mask_k[None, :], e, float("inf"))
        tile_best = tl.min(e, axis=1)
        tile_arg = tl.argmin(e, axis=1, tie_break_left=True)
        cols = tl.arange(0, BLOCK_K)
        tile_second = tl.min(tl.where(cols[None, :] == tile_arg[:, None], float("inf"), e), axis=1)
        improved = tile_best < best
        second = tl.where(improved, tl.minimum(best, tile_second), tl.minimum(second, tile_best))
        best_idx = tl.where(improved, tile_arg + k0, best_idx)
        best = tl.where(improved, tile_best, best)
    out = split.to(tl.int64) * N + rows
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=mask_n)
    tl.store(best_ptr + out, best, mask=mask_n)
    tl.store(second_ptr + out, second, mask=mask_n)


@triton.jit
def _merge_splits_kernel(
    ws_idx_ptr, ws_best_ptr, ws_second_ptr, idx_ptr, best_ptr, second_ptr,
    N, SPLITS,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    second = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.full([BLOCK_N], 2**62, tl.int64)  # above every index: the first split's pick wins ties
    nan_seen = tl.zeros([BLOCK_N], tl.int1)
    for s in range(0, SPLITS):
        at = s * N + rows
        v = tl.load(ws_best_ptr + at, mask=mask_n, other=float("inf"))
        v2 = tl.load(ws_second_ptr + at, mask=mask_n, other=float("inf"))
        i = tl.load(ws_idx_ptr + at, mask=mask_n, other=0)
        nan_seen = nan_seen | (v != v) | (v2 != v2)
        take = (v < best) | ((v == best) & (i < best_idx))
        second = tl.where(take, tl.minimum(best, v2), tl.minimum(second, v))
        best_idx = tl.where(take, i, best_idx)
        best = tl.where(take, v, best)
    # A NaN anywhere leaves the row unproven (NaN second), as the unsplit search's comparisons do.
    second = tl.where(nan_seen, float("nan"), second)
    tl.store(idx_ptr + rows, best_idx, mask=mask_n)
    tl.store(best_ptr + rows, best, mask=mask_n)
    tl.store(second_ptr + rows, second, mask=mask_n)


@triton.jit
def _gather_kernel(
    z_ptr, cb_ptr, idx_ptr, cw_ptr, dist_ptr,
    N, D,
    stride_zn, stride_zd, stride_cn, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    idx = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_n[:, None] & (offs_d[None, :] < D)
        c = tl.load(cb_ptr + idx[:, None] * stride_cn + offs_d[None, :] * stride_cd, mask=m, other=0.0)
        zv = tl.load(z_ptr + rows[:, None] * stride_zn + offs_d[None, :] * stride_zd, mask=m, other=0.0)
        diff = zv.to(tl.float32) - c.to(tl.float32)
        acc += tl.sum(diff * diff, axis=1)
        tl.store(cw_ptr + rows[:, None] * D + offs_d[None, :], c.to(cw_ptr.dtype.element_ty), mask=m)
    tl.store(dist_ptr + offs_n, acc, mask=mask_n)
