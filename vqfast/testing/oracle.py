"""The independent oracle of every exactness check: a plain float64 brute force.

It shares no code with any backend (vqfast/reference.py, the C++ and CUDA kernels, Triton):
every distance is the direct sum over features of (z_j - c_j)^2 in float64, the features added in
order, with no expansion ||z||^2 + ||c||^2 - 2 z.c, no candidate bound and no re-rank. The values
are those the caller gave (float32, float16 and bfloat16 convert to float64 exactly); for
metric="cosine" both sides are first divided by max(||x||, 1e-12), also in float64.

The contract it checks (docs/exactness.md, "How the kernels stay exact"):

  exact  the chosen codeword's float64 distance equals the float64 minimum of its row, and among
         codewords at exactly that distance the lowest index wins. No float32 slack. Two roundings
         are all the room there is. (1) The oracle's own float64 sums are within gamma_{D+2} d of
         the truth (gamma_n = n u / (1 - n u), u = 2^-53), as are the kernels' float64 re-ranks,
         summed in another order: on a row where another codeword (not a bitwise copy of the pick)
         lies that close to the minimum, equal included, float64 cannot decide ("ambiguous"), and
         any codeword within that rounding is accepted (z = -1.4e15 (1, ..., 1) against 0 and -e_1:
         1.4e-16 apart relative, equal in float64, and the kernels rightly pick -e_1). Unless every
         sum is exact: inputs on a fine enough grid (integer lattices, common offsets 1e3 +- 1e-2 in
         float32; sums_are_exact) leave no row ambiguous, ties included. Random data has
         essentially no ambiguous row. (2) Cosine normalises in the search dtype: each normalised
         vector is off by at most (D + 4) u_s (u_s = 2^-24 for a float32 search), each distance by
         8 times that, the pick by twice that (cosine_room).

  fast   the ranked value ||c||^2 - 2 z.c is computed from operands rounded to a unit u_op
         (0: fp32 FMA or native fp16/bf16 products; 2^-10: tf32, round-to-nearest 2^-11 or
         truncation; 2^-8: fp32 values multiplied in bf16) and accumulated with unit u_acc (2^-24 for
         IEEE fp32, 2^-23 for tensor-core accumulation, which may truncate). Each value is then off by
         at most  e = ((1 + u_op)^2 (1 + gamma_{D+3}(u_acc)) - 1) max||c|| (2 ||z|| + max||c||)
         (product rounding, then the summation bound of reference.py's exact mode), so the chosen
         codeword's true distance exceeds the row minimum by at most 2 e (plus the cosine
         normalisation term above). fast_rounding() lists (u_op, u_acc) per backend and dtype.

    distances(z, codebook, metric)                 [N, K] float64 direct distances
    nearest(z, codebook, metric) -> Answer          the oracle's answer and its ambiguous rows
    exact_violations(answer, indices, ...)          rows that break the exact contract
    fast_bound(z, codebook, metric, u_op, u_acc)    per-row room of fast mode
    distance_violations(answer, indices, reported)  rows whose reported float32 distance is off
"""
from __future__ import annotations

import dataclasses
import math

import torch

# Rows x codewords of one float64 block: 2^22 elements (32 MiB) plus one temporary of the same size.
BLOCK_ELEMENTS = 1 << 22
NORMALIZE_EPS = 1e-12
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Smallest subnormal: an underflowing product or square loses at most half of it.
SUBNORMAL = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}
F32_MAX = float(torch.finfo(torch.float32).max)
_FP64_U = 2.0**-53


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    return n * u / (1.0 - n * u)


def search_dtype(z: torch.Tensor, codebook: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (the documented rule, restated here)."""
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def normalized(x: torch.Tensor, metric: str) -> torch.Tensor:
    """x [M, D] in float64; for cosine each row divided by max(||row||, 1e-12)."""
    x = x.to(torch.float64)
    if metric == "l2":
        return x
    if metric != "cosine":
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    norm = (x * x).sum(1, keepdim=True).sqrt()
    return x / torch.clamp(norm, min=NORMALIZE_EPS)


def _direct(a: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """sum_j (a[:, j] - b[:, j])^2 for a [M, D] and bt = b.T [D, K], float64, features in order -> [M, K]."""
    out = torch.zeros(a.shape[0], bt.shape[1], dtype=torch.float64, device=a.device)
    term = torch.empty_like(out)
    for j in range(a.shape[1]):
        torch.sub(a[:, j : j + 1], bt[j : j + 1], out=term)
        term.mul_(term)
        out.add_(term)
    return out


def distances(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """[N, K] float64 distances of z [N, D] to codebook [K, D], each a direct sum, in blocks of rows."""
    a = normalized(z.detach(), metric)  # values only: an oracle takes no part in autograd
    bt = normalized(codebook.detach(), metric).t().contiguous()
    rows = max(1, BLOCK_ELEMENTS // max(1, bt.shape[1]))
    out = torch.empty(a.shape[0], bt.shape[1], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[0], rows):
        out[s : s + rows] = _direct(a[s : s + rows], bt)
    return out


def first_copy(codebook: torch.Tensor) -> torch.Tensor:
    """[K]: the lowest index holding a bitwise-identical copy of each codeword (exact ties go there)."""
    _, inverse = torch.unique(codebook.to(torch.float64), dim=0, return_inverse=True)
    k = codebook.shape[0]
    first = torch.full((int(inverse.max()) + 1 if k else 0,), k, dtype=torch.int64, device=codebook.device)
    first.scatter_reduce_(0, inverse, torch.arange(k, device=codebook.device), reduce="amin")
    return first[inverse]


@dataclasses.dataclass
class Answer:
    """The oracle's answer for one (z, codebook, metric).

    dist [N, K] float64; best [N] its row minimum; indices [N] the lowest index at that minimum;
    exact_sums: every float64 sum was exact (inputs on a grid fine enough; module docstring);
    ambiguous [N] rows where a codeword that is not a copy of the pick lies within the float64
    rounding of the minimum (never when exact_sums), where any codeword within it is accepted.
    """

    dist: torch.Tensor
    best: torch.Tensor
    indices: torch.Tensor
    ambiguous: torch.Tensor
    exact_sums: bool
    metric: str
    dim: int

    def chosen(self, indices: torch.Tensor) -> torch.Tensor:
        """[N] float64 distances of the given picks."""
        return self.dist.gather(1, indices.to(self.dist.device, torch.int64)[:, None])[:, 0]

    def within_rounding(self, values: torch.Tensor) -> torch.Tensor:
        """[N] bool: values [N] no further above the row minimum than float64 sums can round."""
        if self.exact_sums:
            return values <= self.best
        return values <= self.best + gamma(self.dim + 2, _FP64_U) * (values + self.best) + _absolute_room(self.dim)


def _absolute_room(dim: int) -> float:
    # float64 squares below the smallest normal number lose up to half a subnormal each.
    return 2.0 * dim * SUBNORMAL[torch.float64]


def sums_are_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when float64 computes every distance of a [N, D] to b [K, D] exactly, in any order.

    Sufficient condition: every value is an integer multiple of one power of two 2^-q, and
    D (m 2^q)^2 < 2^53 with m the largest |a_j - b_j| over all pairs and features. Then each
    difference, square and partial sum is an integer below 2^53 times a power of two.
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.numel() == 0 or b.numel() == 0:
        return True
    values = torch.cat([a.flatten(), b.flatten()])
    values = values[values != 0]
    if values.numel() == 0:
        return True
    mantissa, exponent = torch.frexp(values)  # |mantissa| in [0.5, 1): value = mantissa * 2^exponent
    integer = (mantissa.abs() * 2.0**53).to(torch.int64)  # the 53-bit significand as an integer
    lowest = torch.log2((integer & -integer).double())  # its lowest set bit
    q = -float((exponent.double() - 53 + lowest).min())  # every value * 2^q is an integer
    spread = torch.maximum(a.max(0).values - b.min(0).values, b.max(0).values - a.min(0).values)
    m = float(spread.max())
    return m == 0.0 or math.log2(a.shape[1]) + 2 * (math.log2(m) + q) < 53


def nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> Answer:
    """The oracle's answer: lowest index at the float64 minimum of every row of z [N, D]."""
    n, d = z.shape
    dist = distances(z, codebook, metric)
    exact_sums = metric == "l2" and sums_are_exact(z, codebook)
    if n == 0:
        empty = torch.empty(0, dtype=torch.float64, device=dist.device)
        return Answer(dist, empty, empty.long(), empty.bool(), exact_sums, metric, d)
    best, _ = dist.min(1)
    indices = (dist == best[:, None]).to(torch.int8).argmax(1)  # argmax of a boolean row: its first True
    if exact_sums:
        ambiguous = torch.zeros(n, dtype=torch.bool, device=dist.device)
    else:
        # Each float64 direct sum is within gamma_{D+2} d (+ D subnormal halves) of the true distance:
        # another codeword that close to the minimum (equal included) may truly be nearer, or tie.
        copy = first_copy(codebook.to(dist.device))
        other = copy[None, :] != copy[indices][:, None]
        close = dist <= best[:, None] + gamma(d + 2, _FP64_U) * (dist + best[:, None]) + _absolute_room(d)
        ambiguous = (other & close).any(1)
    return Answer(dist, best, indices, ambiguous, exact_sums, metric, d)


def cosine_room(dim: int, dtype: torch.dtype) -> float:
    """How far a cosine pick may exceed the minimum because the search normalises in ``dtype``.

    Each normalised vector is off by at most (D + 4) u in the search (u of ``dtype``) and by
    (D + 4) 2^-53 in the oracle, each distance by 8 times that, the pick by twice the sum; one more u
    covers the second-order terms.
    """
    u = UNIT_ROUNDOFF[dtype]
    return 16.0 * (dim + 4) * (u + _FP64_U) + u


def exact_violations(answer: Answer, indices: torch.Tensor, codebook: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N] bool: rows whose pick breaks the exact contract (module docstring). ``dtype``: the search dtype."""
    idx = indices.to(answer.dist.device, torch.int64)
    got = answer.chosen(idx)
    copies = first_copy(codebook.to(answer.dist.device))
    not_first_copy = copies[idx] != idx  # a later copy of a bitwise-identical codeword
    if answer.metric == "cosine":
        return ~answer.within_rounding(got - cosine_room(answer.dim, dtype)) | not_first_copy
    decided = ~answer.ambiguous & (idx != answer.indices)
    undecided = answer.ambiguous & (~answer.within_rounding(got) | not_first_copy)
    return decided | undecided


def effective_search_dtype(z: torch.Tensor, codebook: torch.Tensor) -> torch.dtype:
    """The dtype a search with check_finite=True really runs in: float32 inputs whose squared
    distances could overflow float32 (|x| > sqrt(3.4e38 / (8 D))) are searched in float64."""
    dtype = search_dtype(z, codebook)
    if dtype == torch.float32 and z.numel() + codebook.numel() > 0:
        m = max(float(t.abs().max()) if t.numel() else 0.0 for t in (z, codebook))
        if m > math.sqrt(F32_MAX / (8.0 * z.shape[1])):
            return torch.float64
    return dtype


def fast_rounding(backend: str, device_type: str, z_dtype: torch.dtype, codebook_dtype: torch.dtype,
                  metric: str = "l2") -> tuple[float, float]:
    """(u_op, u_acc) of fast mode for a backend, from what each one documents (docs/exactness.md, "Backends")."""
    if torch.float64 in (z_dtype, codebook_dtype):
        return 0.0, _FP64_U  # float64 has no reduced-precision path anywhere
    if backend == "cpu" or device_type == "cpu":
        return 0.0, 2.0**-24  # fp32 products on the CPU: fast mode only skips the re-rank
    if backend == "torch":
        return 2.0**-8, 2.0**-23  # fp32 values (16-bit ones widened first) multiplied in bf16
    if backend in ("cuda", "triton"):
        # fp16 / bf16 operands of one dtype multiply natively (exact products); fp32, mixed dtypes and
        # cosine (normalised in fp32) go through tf32.
        native = metric == "l2" and z_dtype == codebook_dtype and z_dtype in (torch.float16, torch.bfloat16)
        return (0.0 if native else 2.0**-10), 2.0**-23
    raise ValueError(f"no fast-mode rounding documented for backend {backend!r}")


def fast_bound(z: torch.Tensor, codebook: torch.Tensor, metric: str, u_op: float, u_acc: float) -> torch.Tensor:
    """[N] float64: how far fast mode's pick may exceed each row's minimum (module docstring)."""
    a, b = normalized(z, metric), normalized(codebook, metric)
    zn = (a * a).sum(1).sqrt()
    cmax = (b * b).sum(1).max().sqrt()
    d = z.shape[1]
    dtype = torch.float64 if u_acc <= _FP64_U else torch.float32
    rel = (1.0 + u_op) ** 2 * (1.0 + gamma(d + 3, u_acc)) - 1.0
    # Products below the smallest normal number lose up to half a subnormal each (absolute).
    room = 2.0 * rel * cmax * (2.0 * zn + cmax) + 8.0 * (d + 3) * SUBNORMAL[dtype]
    if metric == "cosine":
        room = room + cosine_room(d, dtype)
    return room


def fast_violations(answer: Answer, indices: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows whose fast-mode pick lies further from the minimum than ``bound`` (plus the oracle's room)."""
    got = answer.chosen(indices)
    return ~answer.within_rounding(got - bound.to(got.device))


def distance_violations(answer: Answer, indices: torch.Tensor, reported: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N] bool: rows whose reported float32 distance is not the pick's distance.

    Allowed: the direct sum in the search dtype (gamma_{D+2}(u_s) d), the final rounding to float32
    (2^-24 d), underflow (D subnormals) and, for cosine, the normalisation (9 (D + 4) u_s); +inf exactly
    where the distance is beyond float32's range.
    """
    want = answer.chosen(indices)
    got = reported.to(want.device, torch.float64)
    d = answer.dim
    u = UNIT_ROUNDOFF[dtype]
    tol = (gamma(d + 2, u) + 2.0**-24) * want + 2.0 * d * SUBNORMAL[torch.float32]
    if answer.metric == "cosine":
        tol = tol + 9.0 * (d + 4) * u
    beyond = want * (1.0 - 2.0 * gamma(d + 2, u)) > F32_MAX  # surely beyond float32's range
    within = want * (1.0 + 2.0 * gamma(d + 2, u)) < F32_MAX  # surely within it
    wrong_inf = beyond & ~torch.isposinf(got)
    wrong_value = within & ~((got - want).abs() <= tol)
    return wrong_inf | wrong_value


def sample_rows(n: int, k: int, d: int, budget: int = 1 << 27, minimum: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows for an oracle check within ``budget`` row x codeword x feature steps (all rows when they fit).

    At least ``minimum`` rows (or all N), always the first and the last, the rest drawn at random.
    """
    take = min(n, max(minimum, budget // max(1, k * d)))
    if take >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    middle = torch.randperm(n - 2, generator=gen)[: take - 2] + 1
    return torch.cat([torch.tensor([0]), middle.sort().values, torch.tensor([n - 1])])


def mismatch_fraction(answer: Answer, indices: torch.Tensor) -> float:
    """Fraction of rows whose index differs from the oracle's (what "fast" gives up, measured)."""
    if answer.indices.numel() == 0:
        return 0.0
    return float((indices.to(answer.indices.device) != answer.indices).double().mean())


def quantisation_error_increase(answer: Answer, indices: torch.Tensor) -> float:
    """Relative increase of sum_i d(z_i, chosen_i) over the oracle's minimum sum (0 when exact)."""
    best = float(answer.best.sum())
    got = float(answer.chosen(indices).sum())
    return (got - best) / best if best > 0 else (0.0 if got == best else math.inf)
