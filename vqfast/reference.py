"""Pure-PyTorch twins of vqfast's ops: the fallback backend ("torch").

Not the test oracle: the torch backend and nearest_codeword_reference run ``search`` below, so the tests and the benchmark judge every backend, this one included, by
vqfast.testing.oracle, a float64 brute force that shares no code with any of them.

Contract of ``nearest_codeword`` (every backend honours it):

    z        [N, D] floating point     codebook [K, D] floating point, K >= 1
    indices  [N]    int64              argmin_k dist(z_i, codebook_k), the lowest k on ties
    codewords[N, D] z.dtype            codebook[indices]
    distances[N]    float32            dist(z_i, codebook[indices_i])

with dist the squared L2 distance, or for metric="cosine" the squared L2 distance between the
L2-normalised vectors (2 - 2 cos). Memory beyond inputs and outputs is O(chunk x K), never N x K.

Cosine and zero vectors. Each vector x is normalised as x / max(||x||, 1e-12)
(torch.nn.functional.normalize), so a zero vector (every component 0) has no direction and stays
the zero vector. Then:
    a zero row of z is at distance 1 from every nonzero codeword (a unit vector's length) and 0
        from a zero codeword: it takes the first zero codeword (distance 0) when the codebook has
        one, else codeword 0 by the tie rule, with distance exactly 1. The normalised codewords'
        lengths round to 1 +- a few ulps; that rounding does not break the tie (cosine_zero_rows).
    a zero codeword is at distance ||n(z)||^2 = 1 (to rounding) from every nonzero row: it is
        nearer than any codeword more than 60 degrees from the row (cos < 1/2), as the formula says.
    gradients: none flow through a zero vector's normalisation (it has no direction to vary).

Exactness. The ranking value v_k = ||c_k||^2 - 2 z.c_k (the distance less the row constant ||z||^2),
computed in floating point, loses digits to cancellation, so a plain `argmin` can pick a codeword
whose true distance is not the minimum. For any summation order its error is at most
gamma_{D+3} * max||c|| * (2 ||z|| + max||c||) with gamma_n = n u / (1 - n u) and u the unit
roundoff (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1). "exact" precision
therefore keeps, per row, every codeword whose computed value lies within twice that bound of the
row minimum, and re-ranks those candidates by the directly computed sum((z - c)^2) in float64; ties
in that ranking go to the lowest index.
"fast" precision takes the argmin of the matrix-unit product as it is (tf32/bf16 on CUDA).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Rows x codewords held at once by one chunk of the distance block: 2^22 elements (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def chunk_rows(num_codes: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk so that a [rows, K] block stays under ``chunk_elements``."""
    return max(1, chunk_elements // max(1, num_codes))


def normalize_for_metric(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Cosine works on L2-normalised vectors (a zero vector stays zero); L2 uses x as it is."""
    return F.normalize(x, dim=-1, eps=1e-12) if metric == "cosine" else x


def cosine_zero_rows(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """metric="cosine"'s rule for zero rows of z (module docstring): z [N, D], codebook [K, D] ->
    (rows [N] bool: the all-zero rows, index [] int64: the first zero codeword or 0, distance [] fp32: 0 or 1).
    Every backend applies it to its result; no host sync."""
    zero_codes = (codebook == 0).all(1)
    index = zero_codes.int().argmax()  # the first True; 0 when there is none
    # index_select, not zero_codes[index]: indexing with a 0-d CPU tensor reads it back as an int.
    return (z == 0).all(1), index, (~zero_codes.index_select(0, index.reshape(1))).float().reshape(())


def _expansion_error_bound(dim: int, dtype: torch.dtype) -> float:
    n = dim + 3
    u = _UNIT_ROUNDOFF[dtype]
    return n * u / (1.0 - n * u)


def ranking_tolerance_terms(dim: int, dtype: torch.dtype) -> tuple[float, float]:
    """(coef, floor) of the exact mode's tolerance: the one definition, which every backend uses.

    Two computed values of ||c||^2 - 2 z.c over ``dim`` features in ``dtype`` are ordered with certainty
    when they differ by more than coef max||c|| (2 ||z|| + max||c||) + floor: coef = 2 gamma_{D+3}
    (twice the bound of the module docstring), floor = 8 (D + 3) smallest_normal eps for products
    below the smallest normal number (float32: |z_j|, |c_j| < 1e-19), which each lose up to half a
    subnormal spacing that the relative bound does not cover. The C++ kernels take these terms from
    csrc/tolerance.h, which tests/test_reference.py checks against this function.
    """
    coef = 2.0 * _expansion_error_bound(dim, dtype)
    floor = 8.0 * (dim + 3) * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return coef, floor


def ranking_tolerance(z_norm: torch.Tensor, cb_maxnorm: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """How far apart two computed values of ||c||^2 - 2 z.c must be to be ordered with certainty
    (ranking_tolerance_terms): z_norm [M] or [M, 1], cb_maxnorm [] -> a tensor shaped like z_norm."""
    coef, floor = ranking_tolerance_terms(dim, dtype)
    return coef * cb_maxnorm * (2.0 * z_norm + cb_maxnorm) + floor


@torch.no_grad()
def _search_chunk(
    zc: torch.Tensor,
    cb: torch.Tensor,
    cb_sqnorm: torch.Tensor,
    cb_maxnorm: torch.Tensor,
    exact: bool,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Indices of the nearest codewords for one chunk of rows.

    zc [M, D] and cb [K, D] in the compute dtype (fp32 or fp64), cb_sqnorm [K], cb_maxnorm [] -> [M] int64.
    """
    if matmul_dtype is not None and matmul_dtype != zc.dtype:
        dots = (zc.to(matmul_dtype) @ cb.to(matmul_dtype).T).to(zc.dtype)
    else:
        dots = zc @ cb.T
    # ||z||^2 is the same for every codeword of a row: rank by ||c||^2 - 2 z.c, which also keeps the
    # rounding of a large ||z||^2 out of the comparison.
    dist = cb_sqnorm - 2.0 * dots  # [M, K], one chunk only
    best = dist.argmin(1)
    if not exact:
        return best
    # Candidates: computed distance within 2 * error bound of the row minimum.
    tol = ranking_tolerance((zc * zc).sum(1, keepdim=True).sqrt(), cb_maxnorm, zc.shape[1], zc.dtype)  # [M, 1]
    dmin = dist.gather(1, best[:, None])
    limit = dmin + tol
    # A non-finite bound (overflowing magnitudes) makes every codeword a candidate for that row.
    cand = (dist <= limit) | ~torch.isfinite(limit)
    del dist, dots
    rows, cols = cand.nonzero(as_tuple=True)  # row-major: columns ascend within each row
    if rows.numel() == zc.shape[0]:  # exactly one candidate per row: the argmin is provably exact
        return best
    z64 = zc[rows].double()
    c64 = cb[cols].double()
    # NaN (a NaN in the inputs, reached only with check_finite=False) ranks last, as +inf would, so a
    # poisoned codeword does not capture every row.
    exact_d = ((z64 - c64) ** 2).sum(1).nan_to_num(nan=float("inf"))
    m = zc.shape[0]
    row_min = torch.full((m,), float("inf"), dtype=torch.float64, device=zc.device)
    row_min.scatter_reduce_(0, rows, exact_d, reduce="amin")
    at_min = exact_d == row_min[rows]
    sentinel = torch.full_like(cols, cb.shape[0])
    first = torch.full((m,), cb.shape[0], dtype=torch.int64, device=zc.device)
    first.scatter_reduce_(0, rows, torch.where(at_min, cols, sentinel), reduce="amin")
    # A row whose exact distances are all NaN (NaN in z, reached only with check_finite=False) has no
    # minimum: keep its argmin, which is always a valid index, rather than the out-of-range sentinel.
    return torch.where(first == cb.shape[0], best, first)


@torch.no_grad()
def search(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    precision: str = "exact",
    compute_dtype: torch.dtype | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Indices only: z [N, D], codebook [K, D] -> [N] int64, walking z in chunks of rows."""
    if compute_dtype is None:
        compute_dtype = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    cb = normalize_for_metric(codebook.to(compute_dtype), metric).contiguous()
    cb_sqnorm = (cb * cb).sum(1)
    cb_maxnorm = cb_sqnorm.max().sqrt()
    exact = precision == "exact"
    matmul_dtype = torch.bfloat16 if (not exact and z.is_cuda and compute_dtype == torch.float32) else None
    n = z.shape[0]
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    step = chunk_rows(cb.shape[0], chunk_elements)
    # A caller's autocast region would run the chunk's matmul in bf16 / fp16, outside the exactness bound
    # (taming's quantizer under CPU bf16 autocast: 7 of 1024 rows off their nearest codeword).
    device = z.device.type
    off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext()
    with off:
        for start in range(0, n, step):
            zc = normalize_for_metric(z[start : start + step].to(compute_dtype), metric)
            out[start : start + step] = _search_chunk(zc, cb, cb_sqnorm, cb_maxnorm, exact, matmul_dtype)
    if metric == "cosine":
        rows, index, _ = cosine_zero_rows(z, codebook)
        out = torch.where(rows, index, out)
    return out


def codeword_distances(z: torch.Tensor, codewords: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Row-wise dist(z_i, codewords_i) in fp32 (fp64 for fp64 inputs): [N, D], [N, D] -> [N]. Differentiable."""
    dtype = torch.float64 if torch.float64 in (z.dtype, codewords.dtype) else torch.float32
    a = normalize_for_metric(z.to(dtype), metric)
    b = normalize_for_metric(codewords.to(dtype), metric)
    d = ((a - b) ** 2).sum(-1)
    if metric == "cosine":  # a zero row is exactly 1 from a nonzero codeword (module docstring)
        d = torch.where((z == 0).all(-1) & (codewords != 0).any(-1), torch.ones_like(d), d)
    return d


def nearest_codeword_torch(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", precision: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "torch" backend: chunked fp32 search (re-ranked in fp64 when exact) -> (indices, codewords, distances)."""
    indices = search(z, codebook, metric, precision)
    codewords = codebook.index_select(0, indices).to(z.dtype)
    distances = codeword_distances(z, codebook.index_select(0, indices), metric).float()
    return indices, codewords, distances


def nearest_codeword_reference(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch backend's algorithm in float64 throughout (expansion, then exact re-rank); the test
    oracle is vqfast.testing.oracle, which shares no code with this."""
    indices = search(z, codebook, metric, "exact", compute_dtype=torch.float64)
    codewords = codebook.index_select(0, indices).to(z.dtype)
    distances = codeword_distances(z.double(), codebook.index_select(0, indices).double(), metric).float()
    return indices, codewords, distances


def nearest_codeword_backward(
    grad_codewords: torch.Tensor | None,
    grad_distances: torch.Tensor | None,
    z: torch.Tensor,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    metric: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of (codewords, distances) w.r.t. (z, codebook), O(N D): a segment sum, never a one-hot.

    codewords = codebook[indices]   -> d codebook += index_add(grad_codewords)
    distances = |a - b|^2, a = n(z), b = n(codebook[indices]), n = identity (l2) or x/|x| (cosine)
    """
    grad_z = None
    grad_cb = torch.zeros(codebook.shape, dtype=torch.float32 if codebook.dtype != torch.float64 else torch.float64,
                          device=codebook.device)
    if grad_codewords is not None:
        grad_cb.index_add_(0, indices, grad_codewords.to(grad_cb.dtype))
    if grad_distances is not None:
        dtype = grad_cb.dtype
        zf = z.to(dtype)
        cf = codebook.index_select(0, indices).to(dtype)
        g = grad_distances.to(dtype)[:, None]
        if metric == "cosine":
            zn = zf.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cn = cf.norm(dim=1, keepdim=True).clamp_min(1e-12)
            a, b = zf / zn, cf / cn
            ga = 2.0 * (a - b) * g
            gb = -ga
            # d(x/|x|)/dx = (I - x^ x^T) / |x|; a zero vector has no direction to vary: no gradient.
            gz = ((ga - a * (a * ga).sum(1, keepdim=True)) / zn).masked_fill((zf == 0).all(1, keepdim=True), 0.0)
            gc = ((gb - b * (b * gb).sum(1, keepdim=True)) / cn).masked_fill((cf == 0).all(1, keepdim=True), 0.0)
        else:
            gz = 2.0 * (zf - cf) * g
            gc = -gz
        grad_z = gz.to(z.dtype)
        grad_cb.index_add_(0, indices, gc)
    return grad_z, grad_cb.to(codebook.dtype)
