"""Triton kernels for the nearest-codeword search. None of them returns anything to the host: the
launcher (vqfast/triton/__init__.py) chains them on the device, and the exact mode's re-rank reads
how many rows it has from a device counter.

_rows_kernel: one pass over the rows of a matrix (the codebook; z for cosine): squared row norms in
fp32 (||c||^2 of the ranking value), the largest |value| and the largest squared norm, both folded
into int32 slots with atomic_max on the IEEE bits of non-negative floats (their order is the
numbers' order, and a NaN's bits lie above +inf's, so a NaN read anywhere wins); with NORMALIZE it
writes x / max(||x||, 1e-12) (metric="cosine") and reports the normalised rows' norms instead.

_search_kernel: one program per BLOCK_N rows of z and split of the codebook (program_id(1): codes
[split * SPLIT_CODES, (split + 1) * SPLIT_CODES), SPLIT_CODES a multiple of BLOCK_K; one split is
the whole codebook). BLOCK_D is a constexpr power of two, the least one >= D (at least 16) up to 256
(vqfast.triton.block_d): the z tile [BLOCK_N, BLOCK_D] is loaded once per program and every code
tile multiplies against it (the wide tiles, BLOCK_D 64 - 256, compile only that path:
_resident_z_tiles). A D above 256 runs on 32-wide tiles that loop over D in chunks, reading z's
chunks again for every code tile (the narrow tiles, BLOCK_D 16 / 32, keep both paths and choose by D).
Each code tile's e = ||c||^2 - 2 z.c (||z||^2 is constant per row) is folded elementwise into
running (best, index, second) per column, [BLOCK_N, BLOCK_K] register accumulators, reduced over
the columns once at the end. Ties go to the lowest index: a column replaces its best only when
strictly smaller (tiles ascend in code order), and the final reduction takes the lowest index among
the columns at the row minimum (any other column at that value leaves a zero top-2 gap). Nothing of
size N x K is ever stored. The same pass over z gives ||z|| (the exact mode's tolerance) and max|z|
(the value test). Exact mode with one split marks here the rows whose top-2 gap is not beyond
reference.ranking_tolerance and appends them to the re-rank list (_append_rows); with splits,
each split writes its rows' (index, best, second) at row split * N + row and the merge marks.

_merge_splits_kernel: folds the per-split top-2 of every row, splits in ascending code order (so
equal values keep the lowest index and leave a zero top-2 gap), then marks as the search does.

_rerank_f64_kernel / _rerank_f32x2_kernel: a fixed grid of programs that walk the re-rank list up to
the device counter, each entry a row whose nearest codeword is found again by direct distances
sum((z - c)^2) over the whole codebook, lowest index on exact ties; a NaN distance ranks last, so a
row that is NaN throughout takes codeword 0, as reference.search does. _rerank_f64_kernel sums in
float64. _rerank_f32x2_kernel (GPUs with 1/32 - 1/64 rate float64) sums in compensated float32:
each distance a pair hi + lo, z_j - c_j and its square split exactly (TwoSum, FMA), the features
added in order in double-float arithmetic, within (3 D + 8) 2^-48 of the distance, relative (each
term's split exact but for its small part, about 7 u^2; each of the D additions of same-sign pairs
at most 3 u^2 of the sum; u = 2^-24). A row is decided there only when (4 D + 16) 2^-48 of the two
(plus an underflow room) separates its best two pairs, which makes the pick the true
minimum; every other row (exact ties, copies, NaN / inf, the closest calls) is scanned again in
float64, so both kernels honour the same contract.

_gather_kernel: codewords = codebook[indices] in z's dtype and the directly computed distance
sum((z - c)^2) in fp32, one program per BLOCK_N rows.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _abs_bits(x):
    """|x| as int32 IEEE bits: ordered as the numbers are, +inf above every finite value, NaN above +inf."""
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _append_rows(rows, flagged, list_ptr, count_ptr):
    """Append the flagged rows of a tile to the re-rank list: one atomic per program reserves the slots."""
    flags = flagged.to(tl.int32)
    base = tl.atomic_add(count_ptr, tl.sum(flags, axis=0))
    slot = base + tl.cumsum(flags, axis=0) - 1
    tl.store(list_ptr + slot, rows.to(tl.int32), mask=flagged)


@triton.jit
def _mark_unproven(rows, mask, best, second, z_norm, cmax_sq_ptr, coef, floor, list_ptr, count_ptr):
    """The exact mode's test on the device: a row is proven when second > best + tol in
    float64, tol = coef max||c|| (2 ||z|| + max||c||) + floor (reference.ranking_tolerance_terms);
    near ties, exact duplicates and NaN / inf rows are not, and go to the re-rank list."""
    cmax_sq = tl.load(cmax_sq_ptr).to(tl.float32, bitcast=True)
    cmax = tl.sqrt(cmax_sq.to(tl.float64))
    tol = coef * cmax * (2.0 * z_norm.to(tl.float64) + cmax) + floor
    proven = second.to(tl.float64) > best.to(tl.float64) + tol
    _append_rows(rows, mask & ~proven, list_ptr, count_ptr)


@triton.jit
def _rows_kernel(
    x_ptr, out_ptr, sqnorm_ptr, absmax_ptr, sqmax_ptr,
    M, D,
    stride_m, stride_d,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    ss = tl.zeros([BLOCK_M], tl.float32)
    bits = tl.zeros([BLOCK_M], tl.int32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = mask_m[:, None] & (offs_d[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_m + offs_d[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        bits = tl.maximum(bits, tl.max(_abs_bits(x), axis=1))
    tl.atomic_max(absmax_ptr, tl.max(bits, axis=0))
    if NORMALIZE:  # torch.nn.functional.normalize: x / max(||x||, 1e-12); a zero row stays zero
        denom = tl.maximum(tl.sqrt(ss), 1e-12)
        ss = tl.zeros([BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m = mask_m[:, None] & (offs_d[None, :] < D)
            x = tl.load(x_ptr + rows[:, None] * stride_m + offs_d[None, :] * stride_d, mask=m, other=0.0)
            y = x.to(tl.float32) / denom[:, None]
            ss += tl.sum(y * y, axis=1)
            tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], y, mask=m)
    tl.store(sqnorm_ptr + rows, ss, mask=mask_m)
    tl.atomic_max(sqmax_ptr, tl.max(tl.where(mask_m, _abs_bits(ss), 0), axis=0))


@triton.jit
def _fold_tile(acc, cbn, k0, colbest, colsecond, colidx, BLOCK_K: tl.constexpr):
    """Fold one code tile's dot products into the per-column running (best, second, index)."""
    e = cbn[None, :] - 2.0 * acc  # masked codes: cbn = inf, acc = 0
    improved = e < colbest
    colsecond = tl.where(improved, colbest, tl.minimum(colsecond, e))
    colidx = tl.where(improved, k0 + tl.arange(0, BLOCK_K)[None, :], colidx)
    colbest = tl.where(improved, e, colbest)
    return colbest, colsecond, colidx


@triton.jit
def _resident_z_tiles(z_ptr, cb_ptr, cbn_ptr, rows, mask_n, k_start, k_end, D, stride_zn, stride_zd, stride_cn,
                      stride_cd, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr):
    """The search of one split with the z tile resident (D <= BLOCK_D, every width): the z tile
    [BLOCK_N, BLOCK_D], loaded once, serves every code tile -> the per-column (best, second, index),
    and ||z||^2 and max |z| bits per row from that one load."""
    offs_dd = tl.arange(0, BLOCK_D)
    mask_d = offs_dd < D
    colbest = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    colsecond = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    colidx = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    zt = tl.load(z_ptr + rows[:, None] * stride_zn + offs_dd[None, :] * stride_zd,
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    zf = zt.to(tl.float32)
    zsq = tl.sum(zf * zf, axis=1)
    zbits = tl.max(_abs_bits(zf), axis=1)
    if CAST_FP32:
        zt = zf
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        codes = offs_k.to(tl.int64)
        ct = tl.load(cb_ptr + codes[None, :] * stride_cn + offs_dd[:, None] * stride_cd,
                     mask=mask_k[None, :] & mask_d[:, None], other=0.0)
        if CAST_FP32:
            ct = ct.to(tl.float32)  # an fp32 codebook (the launcher's copy at these widths): no conversion
        acc = tl.dot(zt, ct, input_precision=INPUT_PRECISION)
        cbn = tl.load(cbn_ptr + offs_k, mask=mask_k, other=float("inf"))
        colbest, colsecond, colidx = _fold_tile(acc, cbn, k0, colbest, colsecond, colidx, BLOCK_K)
    return colbest, colsecond, colidx, zsq, zbits


@triton.jit
def _search_kernel(
    z_ptr, cb_ptr, cbn_ptr, cmax_sq_ptr, zmax_ptr, znorm_ptr, idx_ptr, best_ptr, second_ptr, list_ptr, count_ptr,
    N, K, D,
    stride_zn, stride_zd, stride_cn, stride_cd,
    K_BUCKET,  # autotuning key only (codebook sizes within a power of two share a configuration)
    SPLIT_CODES,  # codes per split, a multiple of BLOCK_K
    coef: tl.float64, floor: tl.float64,  # reference.ranking_tolerance_terms(D, float32)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)  # 64-bit offsets: N * D may exceed 2^31
    if BLOCK_D > 32:  # a wide tile (constexpr): the launcher gives it only D <= BLOCK_D, one resident z tile
        colbest, colsecond, colidx, zsq, zbits = _resident_z_tiles(
            z_ptr, cb_ptr, cbn_ptr, rows, mask_n, split * SPLIT_CODES, tl.minimum(K, split * SPLIT_CODES + SPLIT_CODES),
            D, stride_zn, stride_zd, stride_cn, stride_cd, BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, CAST_FP32)
    else:  # 16 or 32 features: the z tile resident when D <= BLOCK_D, chunks of z per code tile beyond
        offs_dd = tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_K)
        colbest = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        colsecond = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        colidx = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        zsq = tl.zeros([BLOCK_N], tl.float32)
        zbits = tl.zeros([BLOCK_N], tl.int32)
        k_start = split * SPLIT_CODES
        k_end = tl.minimum(K, k_start + SPLIT_CODES)
        if D <= BLOCK_D:  # the z tile, loaded once, serves every code tile
            colbest, colsecond, colidx, zsq, zbits = _resident_z_tiles(
                z_ptr, cb_ptr, cbn_ptr, rows, mask_n, k_start, k_end, D, stride_zn, stride_zd, stride_cn, stride_cd,
                BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, CAST_FP32)
        else:  # D above the largest BLOCK_D: BLOCK_D-wide chunks of z and the codebook per code tile
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_dd
                zf = tl.load(z_ptr + rows[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                             mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
                zsq += tl.sum(zf * zf, axis=1)
                zbits = tl.maximum(zbits, tl.max(_abs_bits(zf), axis=1))
            for k0 in range(k_start, k_end, BLOCK_K):
                offs_k = k0 + cols
                mask_k = offs_k < k_end
                codes = offs_k.to(tl.int64)
                acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + offs_dd
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
                colbest, colsecond, colidx = _fold_tile(acc, cbn, k0, colbest, colsecond, colidx, BLOCK_K)
    tl.atomic_max(zmax_ptr, tl.max(zbits, axis=0))
    # The columns' reduction: the row minimum, the lowest code index at it, and the second value
    # (the chosen column's second, or another column's best).
    best = tl.min(colbest, axis=1)
    at_best = colbest == best[:, None]
    best_idx = tl.min(tl.where(at_best, colidx, K), axis=1)
    chosen = at_best & (colidx == best_idx[:, None])
    second = tl.min(tl.where(chosen, colsecond, colbest), axis=1)
    out = split.to(tl.int64) * N + rows
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=mask_n)
    tl.store(best_ptr + out, best, mask=mask_n)
    tl.store(second_ptr + out, second, mask=mask_n)
    if INPUT_PRECISION == "ieee":  # exact mode
        z_norm = tl.sqrt(zsq)
        if tl.num_programs(1) == 1:
            _mark_unproven(rows, mask_n, best, second, z_norm, cmax_sq_ptr, coef, floor, list_ptr, count_ptr)
        elif split == 0:  # for the merge's test
            tl.store(znorm_ptr + rows, z_norm, mask=mask_n)


@triton.jit
def _merge_splits_kernel(
    ws_idx_ptr, ws_best_ptr, ws_second_ptr, idx_ptr, best_ptr, second_ptr,
    znorm_ptr, cmax_sq_ptr, list_ptr, count_ptr,
    N, SPLITS, EXACT,
    coef: tl.float64, floor: tl.float64,
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
    best_idx = tl.where(best_idx == 2**62, 0, best_idx)  # every split NaN / inf throughout: codeword 0
    tl.store(idx_ptr + rows, best_idx, mask=mask_n)
    tl.store(best_ptr + rows, best, mask=mask_n)
    tl.store(second_ptr + rows, second, mask=mask_n)
    if EXACT:
        z_norm = tl.load(znorm_ptr + rows, mask=mask_n, other=0.0)
        _mark_unproven(rows, mask_n, best, second, z_norm, cmax_sq_ptr, coef, floor, list_ptr, count_ptr)


@triton.jit
def _pick_lowest(colbest, colidx, K):
    """The lowest code index at the minimum of per-column bests (codeword 0 when all are +inf)."""
    best = tl.min(colbest, axis=0)
    idx = tl.min(tl.where(colbest == best, colidx, K), axis=0)
    return tl.where(best == float("inf"), 0, idx)


@triton.jit
def _scan_f64(z_ptr, cb_ptr, row, K, D, stride_zn, stride_zd, stride_cn, stride_cd,
              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The nearest codeword of row `row` by float64 direct distances (lowest index on ties)."""
    cols = tl.arange(0, BLOCK_K)
    offs_dd = tl.arange(0, BLOCK_D)
    colbest = tl.full([BLOCK_K], float("inf"), tl.float64)
    colidx = tl.zeros([BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + cols
        mask_k = offs_k < K
        codes = offs_k.to(tl.int64)
        dist = tl.zeros([BLOCK_K], tl.float64)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            mask_d = offs_d < D
            zr = tl.load(z_ptr + row * stride_zn + offs_d * stride_zd, mask=mask_d, other=0.0).to(tl.float64)
            ct = tl.load(cb_ptr + codes[:, None] * stride_cn + offs_d[None, :] * stride_cd,
                         mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float64)
            diff = zr[None, :] - ct
            dist += tl.sum(diff * diff, axis=1)
        dist = tl.where(dist != dist, float("inf"), dist)  # NaN ranks last
        better = (dist < colbest) & mask_k
        colidx = tl.where(better, offs_k, colidx)
        colbest = tl.where(better, dist, colbest)
    return _pick_lowest(colbest, colidx, K)


@triton.jit
def _rerank_f64_kernel(
    z_ptr, cb_ptr, idx_ptr, list_ptr, count_ptr,
    K, D,
    stride_zn, stride_zd, stride_cn, stride_cd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    count = tl.load(count_ptr)
    for entry in range(tl.program_id(0), count, tl.num_programs(0)):
        row = tl.load(list_ptr + entry).to(tl.int64)
        idx = _scan_f64(z_ptr, cb_ptr, row, K, D, stride_zn, stride_zd, stride_cn, stride_cd, BLOCK_K, BLOCK_D)
        tl.store(idx_ptr + row, idx.to(tl.int64))


@triton.jit
def _two_sum(a, b):
    """s + t == a + b exactly (Knuth's TwoSum, no branch, no ordering assumption)."""
    s = a + b
    bb = s - a
    t = (a - (s - bb)) + (b - bb)
    return s, t


@triton.jit
def _df_add(a_hi, a_lo, b_hi, b_lo):
    """(a_hi + a_lo) + (b_hi + b_lo) as a normalised pair (hi = fl(hi + lo))."""
    s, t = _two_sum(a_hi, b_hi)
    t = t + (a_lo + b_lo)
    hi = s + t
    lo = t - (hi - s)
    return hi, lo


@triton.jit
def _df_less(a_hi, a_lo, b_hi, b_lo):
    return (a_hi < b_hi) | ((a_hi == b_hi) & (a_lo < b_lo))


@triton.jit
def _df_min(hi, lo):
    """The least pair of the vectors (hi, lo), and where it is."""
    m_hi = tl.min(hi, axis=0)
    m_lo = tl.min(tl.where(hi == m_hi, lo, float("inf")), axis=0)
    return m_hi, m_lo, (hi == m_hi) & (lo == m_lo)


@triton.jit
def _rerank_f32x2_kernel(
    z_ptr, cb_ptr, idx_ptr, list_ptr, count_ptr,
    K, D,
    stride_zn, stride_zd, stride_cn, stride_cd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    count = tl.load(count_ptr)
    cols = tl.arange(0, BLOCK_K)
    # Each pair is within (3 D + 8) u^2 (u = 2^-24) of its distance, relative (module docstring), plus
    # up to 2^-126 a feature where squares flush or underflow: a row is decided here only when
    # (4 D + 16) u^2 of the two values, and that absolute room, separate its best two.
    rel = (4.0 * D + 16.0) * 3.552713678800501e-15  # 2^-48
    absolute = (D + 1.0) * 2.350988701644575e-38  # 2^-125
    for entry in range(tl.program_id(0), count, tl.num_programs(0)):
        row = tl.load(list_ptr + entry).to(tl.int64)
        b_hi = tl.full([BLOCK_K], float("inf"), tl.float32)  # per column: best and second pair, best's index
        b_lo = tl.zeros([BLOCK_K], tl.float32)
        s_hi = tl.full([BLOCK_K], float("inf"), tl.float32)
        s_lo = tl.zeros([BLOCK_K], tl.float32)
        colidx = tl.zeros([BLOCK_K], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + cols
            mask_k = offs_k < K
            codes = offs_k.to(tl.int64)
            hi = tl.zeros([BLOCK_K], tl.float32)
            lo = tl.zeros([BLOCK_K], tl.float32)
            for j in range(0, D):  # in feature order, as a plain float64 sum would add them
                zj = tl.load(z_ptr + row * stride_zn + j * stride_zd).to(tl.float32)
                cj = tl.load(cb_ptr + codes * stride_cn + j * stride_cd, mask=mask_k, other=0.0).to(tl.float32)
                s, e = _two_sum(zj, -cj)  # z_j - c_j == s + e exactly
                p = s * s
                p_err = tl.fma(s, s, -p)  # s^2 == p + p_err exactly
                small = p_err + e * (2.0 * s + e)  # (s + e)^2 - p, to within float32 rounding of itself
                hi, lo = _df_add(hi, lo, p, small)
            bad = (hi != hi) | (hi == float("inf"))  # NaN, or beyond float32: left to the float64 scan
            hi = tl.where(bad | ~mask_k, float("inf"), hi)
            lo = tl.where(bad | ~mask_k, 0.0, lo)
            better = _df_less(hi, lo, b_hi, b_lo)
            s_hi, s_lo = tl.where(better, b_hi, s_hi), tl.where(better, b_lo, s_lo)
            second = ~better & _df_less(hi, lo, s_hi, s_lo)
            s_hi, s_lo = tl.where(second, hi, s_hi), tl.where(second, lo, s_lo)
            colidx = tl.where(better, offs_k, colidx)
            b_hi, b_lo = tl.where(better, hi, b_hi), tl.where(better, lo, b_lo)
        best_hi, best_lo, at_best = _df_min(b_hi, b_lo)
        idx = tl.min(tl.where(at_best, colidx, K), axis=0)
        chosen = at_best & (colidx == idx)
        sec_hi, sec_lo, _ = _df_min(tl.where(chosen, s_hi, b_hi), tl.where(chosen, s_lo, b_lo))
        gap = (sec_hi - best_hi) + (sec_lo - best_lo)
        # Decided only when the bound separates the best two: exact ties, copies, NaN / inf and the
        # closest rows go to the float64 scan.
        undecided = ~(gap > rel * (best_hi + sec_hi) + absolute)
        if undecided:
            idx = _scan_f64(z_ptr, cb_ptr, row, K, D, stride_zn, stride_zd, stride_cn, stride_cd, BLOCK_K, BLOCK_D)
        tl.store(idx_ptr + row, idx.to(tl.int64))


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
