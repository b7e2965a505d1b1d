"""The Triton backend: ``vqfast::nearest_codeword_triton`` and ``vqfast::nearest_codeword_triton_flagged``.

Registered with torch.library.triton_op (kernels launched through wrap_triton), so
torch.compile(fullgraph=True) traces into them; they share the fake shapes and the backward of the
other backends (vqfast._opdef). The flagged op adds ``extremes`` float64 [2] = (max |z|, max |codebook|),
NaN where a NaN was read, +inf where an Inf was: folded by the kernels from their own loads (the
codebook's row-norm pass, the search's z tile, the cosine normalisation) into device slots, never
read back here; the caller (vqfast/ops.py) reads it once for check_finite.

No host synchronisation: every step below is a kernel on the device, and no result is read back.
  1. _rows_kernel: ||c||^2 per codeword, max ||c||^2 and max |c| (cosine: normalises z and the codebook).
  2. _search_kernel: the top-2 of ||c||^2 - 2 z.c per row; exact mode marks the rows it cannot prove
     and appends them to a device list of at most N rows through an atomic counter. Up to D = 256
     (MAX_RESIDENT_D) each program loads its z tile once, BLOCK_D the least power of two >= D
     (block_d); a wider D loops over 32-wide chunks of z per code tile. Exact mode with fp16 / bf16
     inputs at D > 32 searches an fp32 copy of the codebook (one device cast, K x D x 4 bytes).
  3. few rows: the codebook is split over a second grid axis (split_codes) when the row programs cannot
     fill the GPU's SMs, and _merge_splits_kernel folds each row's per-split top-2 (and marks).
  4. exact mode: the re-rank kernel, on a fixed grid, walks the list up to the counter.
  5. _gather_kernel: codewords and distances.

Precision:
  exact  the search kernel computes IEEE fp32 dot products (fp16/bf16 inputs are widened to fp32),
         so the rigorous bound of vqfast/reference.py holds for every computed value. A row whose
         second-best value is not beyond the best by reference.ranking_tolerance (its terms from
         reference.ranking_tolerance_terms; max ||c|| from the codebook pass, ||z|| from the search's
         z tile) is re-ranked by direct distances sum((z - c)^2) over the whole codebook: in float64
         on GPUs with a full-rate float64 unit (sm_60, 70, 80, 90, 100), elsewhere (1/32 - 1/64 rate)
         in compensated float32 (rerank_variant; VQFAST_TRITON_RERANK=float64 / float32x2 forces one):
         pairs of floats within (3 D + 8) 2^-48 of each distance, a row decided that way only when
         that bound (with room) separates its best two, every other one (exact ties, copies,
         NaN / inf) scanned again in float64 (kernels.py). Every other row is provably exact
         already. The list holds every row, so a codebook of duplicates (every row ambiguous)
         stays exact, only slower. tf32x3 would run on tensor cores, but its error is not
         covered by that bound without a separate analysis; it is the candidate to measure on a GPU.
  fast   tf32 tensor cores for fp32 inputs, native fp16/bf16 tensor cores for half inputs, fp32
         accumulation, no re-rank.
"""
from __future__ import annotations

import math
import os

import torch
import triton
from torch.library import triton_op, wrap_triton

from vqfast import reference
from vqfast._opdef import register_nearest_codeword_flagged_op, register_nearest_codeword_op
from vqfast.triton import kernels

Tensor = torch.Tensor

# BLOCK_D: the feature width of a tile, a constexpr power of two, the least one >= D and at least 16
# (tl.dot's least), up to MAX_RESIDENT_D. For every D <= MAX_RESIDENT_D (VAR's 32, diffusers' 4,
# taming's and vector-quantize's 256, 64, 100, 128) the z tile [BLOCK_N, BLOCK_D] is loaded from
# global memory once per program and serves every code tile of its split (the compiler keeps it in
# shared memory, read from there by each tile's multiply). A wider D (e.g. 1024) takes
# CHUNK_BLOCK_D-wide tiles that loop over D in chunks, reading z's chunks again for every code tile.
NARROW_BLOCK_DS = (16, 32)
WIDE_BLOCK_DS = (64, 128, 256)
BLOCK_DS = NARROW_BLOCK_DS + WIDE_BLOCK_DS
MAX_RESIDENT_D = WIDE_BLOCK_DS[-1]
CHUNK_BLOCK_D = NARROW_BLOCK_DS[-1]
# (BLOCK_N, BLOCK_K, num_warps, num_stages) at BLOCK_D 16 and 32. Large-N tiles hold 32-64 rows, the
# small-N ones (N <= 64, e.g. VAR's 1 x 1 and 2 x 2 scales) 16, so that more programs stream the
# codebook. A program keeps three [BLOCK_N, BLOCK_K] accumulators (best, second, index per column)
# besides the dot-product tile: 4 x 64 x 64 / 256 threads = 64 registers at 64 x 64 w8.
# Fast mode's tensor-core operands are spread over the warps. Exact mode multiplies with FMAs, each
# thread holding its rows of the z tile over all BLOCK_D features: it needs twice the warps for the
# same tile (64x64x32 on 8 warps spilled 1.2 KB a thread, on 16 warps none; 16x128x32 on 4 warps
# 280 B). Every configuration compiles without spills for sm_80 and sm_90 in its SEARCH_VARIANTS
# (tests/test_triton.py, benchmarks/results/gpu_resources.md); 128-row tiles spilled. Their speeds
# are not measured: no GPU has run them yet.
FAST_LARGE_N_SHAPES = [(64, 64, 8, 3), (64, 32, 4, 3)]
FAST_SMALL_N_SHAPES = [(16, 128, 4, 2), (16, 64, 2, 2)]
EXACT_LARGE_N_SHAPES = [(64, 64, 16, 2), (32, 64, 8, 2)]
EXACT_SMALL_N_SHAPES = [(16, 128, 8, 2), (16, 64, 4, 2)]
# The wide tiles (BLOCK_D 64 - 256), per BLOCK_D: (fast large N, fast small N, exact large N, exact
# small N) shapes. Fewer rows and codes per tile (16-64 x 16-64) and more warps as BLOCK_D grows, so
# that the z tile and the code tile stay within the registers and shared memory of sm_80 / sm_90
# without spills (ptxas -v): 64x16x256 on 8 warps (fast) spilled 0.9 KB a thread, 32x32x128 on 16
# warps (exact, before the wide tiles had a path of their own) 8 B, 32x64x64 and 16x64x128 on 16
# warps (exact, sm_80) 4 B. Exact mode's half-precision variants read an fp32 copy of the codebook
# (widened on the device before the search) at these widths: widening each code tile in registers
# kept it out of the compiler's asynchronous copies and spilled 0.15 - 1.1 KB a thread.
WIDE_SHAPES = {
    64: ([(64, 64, 8, 2), (64, 32, 8, 3)], [(16, 64, 4, 2), (16, 32, 8, 2)],
         [(64, 32, 16, 2), (32, 32, 8, 2)], [(16, 64, 8, 2), (16, 32, 4, 2)]),
    128: ([(32, 32, 8, 2), (16, 64, 8, 2)], [(16, 32, 8, 2), (16, 32, 4, 2)],
          [(32, 32, 16, 2), (16, 64, 8, 2)], [(16, 32, 8, 2), (16, 16, 4, 2)]),
    256: ([(32, 32, 8, 2), (16, 64, 8, 2)], [(16, 32, 8, 2), (16, 32, 4, 2)],
          [(32, 32, 16, 2), (16, 64, 16, 2)], [(16, 32, 16, 2), (16, 16, 8, 2)]),
}


def _configs(narrow_shapes, which):
    narrow = [(bn, bk, bd, w, s) for bd in NARROW_BLOCK_DS for bn, bk, w, s in narrow_shapes]
    return narrow + [(bn, bk, bd, w, s) for bd in WIDE_BLOCK_DS for bn, bk, w, s in WIDE_SHAPES[bd][which]]


# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages). LARGE_N_CONFIGS / SMALL_N_CONFIGS: fast mode.
LARGE_N_CONFIGS = _configs(FAST_LARGE_N_SHAPES, 0)
SMALL_N_CONFIGS = _configs(FAST_SMALL_N_SHAPES, 1)
EXACT_LARGE_N_CONFIGS = _configs(EXACT_LARGE_N_SHAPES, 2)
EXACT_SMALL_N_CONFIGS = _configs(EXACT_SMALL_N_SHAPES, 3)


def search_configs(exact: bool, small: bool) -> list[tuple[int, int, int, int, int]]:
    """The configurations the autotuner chooses among for a mode and a row-count class."""
    if exact:
        return EXACT_SMALL_N_CONFIGS if small else EXACT_LARGE_N_CONFIGS
    return SMALL_N_CONFIGS if small else LARGE_N_CONFIGS


SMALL_N = 64
# Under the interpreter (CPU tensors, TRITON_INTERPRET=1) one small tile and no tuning, at the BLOCK_D
# a GPU takes (block_d): the resident z tile up to MAX_RESIDENT_D, the chunked loop beyond.
INTERPRET_CONFIG = (16, 32, 1, 1)  # BLOCK_N, BLOCK_K, num_warps, num_stages
GATHER_BLOCK_N, GATHER_BLOCK_D = 32, 64
MERGE_BLOCK_N = 128
ROWS_BLOCK_M, ROWS_BLOCK_D = 32, 64
# The re-rank: one row at a time per program, the codebook in RERANK_BLOCK_K x RERANK_BLOCK_D tiles;
# RERANK_PROGRAMS_PER_SM programs per SM (at most one per row), whatever the list's length.
RERANK_BLOCK_K, RERANK_BLOCK_D = 64, 32
RERANK_PROGRAMS_PER_SM = 4
# Compute capabilities whose float64 rate is half the float32 rate (P100, V100, A100, H100, B200);
# the others (consumer and L40-class cards: 1/32 - 1/64) re-rank in compensated float32.
FULL_RATE_FLOAT64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
RERANK_VARIANTS = ("float64", "float32x2")

# Small N: when the row programs cannot fill the GPU, the codebook is split over program_id(1) (as the
# CUDA kernel splits it over blockIdx.y), up to SPLIT_PROGRAMS_PER_SM programs per SM in all and at most
# ceil(K / SPLIT_MIN_CODES) splits; _merge_splits_kernel then folds the per-split top-2.
# A split's width is a multiple of SPLIT_ALIGN, which every configuration's BLOCK_K divides.
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_CODES = 512
SPLIT_ALIGN = 128
# The interpreter has no SMs: it splits as an H100 (132 SMs) would, so the split path runs on CPUs.
INTERPRET_SMS = 132
# The (element pointer type, INPUT_PRECISION, CAST_FP32) variants nearest_codeword_triton launches
# _search_kernel with: exact mode in IEEE fp32 (fp16 / bf16 widened), fast mode on tf32 / fp16 / bf16
# tensor cores. kernel_builds() lists every configuration in each. At a wide BLOCK_D (> CHUNK_BLOCK_D)
# exact mode's fp16 / bf16 z meets an fp32 codebook (codebook_widened).
SEARCH_VARIANTS = [
    ("*fp32", "ieee", False),
    ("*fp16", "ieee", True),
    ("*bf16", "ieee", True),
    ("*fp32", "tf32", False),
    ("*fp16", "tf32", False),
    ("*bf16", "tf32", False),
]


def codebook_widened(exact: bool, widen: bool, bd: int) -> bool:
    """Whether the search reads an fp32 copy of a half-precision codebook: exact mode at a wide BLOCK_D."""
    return exact and widen and bd > CHUNK_BLOCK_D


def search_signature(ptr: str, codebook_ptr: str | None = None) -> dict[str, str]:
    """_search_kernel's argument types for triton.compile, with z of type `ptr` and the codebook of type
    `codebook_ptr` (default: `ptr`)."""
    return {
        "z_ptr": ptr, "cb_ptr": codebook_ptr or ptr, "cbn_ptr": "*fp32", "cmax_sq_ptr": "*i32", "zmax_ptr": "*i32",
        "znorm_ptr": "*fp32", "idx_ptr": "*i64", "best_ptr": "*fp32", "second_ptr": "*fp32", "list_ptr": "*i32",
        "count_ptr": "*i32", "N": "i32", "K": "i32", "D": "i32",
        "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32", "K_BUCKET": "i32",
        "SPLIT_CODES": "i32", "coef": "fp64", "floor": "fp64",
        "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
        "INPUT_PRECISION": "constexpr", "CAST_FP32": "constexpr",
    }


MERGE_SIGNATURE = {
    "ws_idx_ptr": "*i64", "ws_best_ptr": "*fp32", "ws_second_ptr": "*fp32", "idx_ptr": "*i64", "best_ptr": "*fp32",
    "second_ptr": "*fp32", "znorm_ptr": "*fp32", "cmax_sq_ptr": "*i32", "list_ptr": "*i32", "count_ptr": "*i32",
    "N": "i32", "SPLITS": "i32", "EXACT": "i32", "coef": "fp64", "floor": "fp64", "BLOCK_N": "constexpr",
}


def gather_signature(ptr: str) -> dict[str, str]:
    """_gather_kernel's argument types for triton.compile, with z, the codebook and codewords of type `ptr`."""
    return {
        "z_ptr": ptr, "cb_ptr": ptr, "idx_ptr": "*i64", "cw_ptr": ptr, "dist_ptr": "*fp32", "N": "i32", "D": "i32",
        "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32",
        "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
    }


def rows_signature(ptr: str) -> dict[str, str]:
    """_rows_kernel's argument types for triton.compile, with the input of type `ptr`."""
    return {
        "x_ptr": ptr, "out_ptr": "*fp32", "sqnorm_ptr": "*fp32", "absmax_ptr": "*i32", "sqmax_ptr": "*i32",
        "M": "i32", "D": "i32", "stride_m": "i32", "stride_d": "i32",
        "NORMALIZE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
    }


def rerank_signature(ptr: str) -> dict[str, str]:
    """The re-rank kernels' argument types for triton.compile, with z and the codebook of type `ptr`."""
    return {
        "z_ptr": ptr, "cb_ptr": ptr, "idx_ptr": "*i64", "list_ptr": "*i32", "count_ptr": "*i32", "K": "i32",
        "D": "i32", "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32",
        "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
    }


def kernel_builds():
    """Every kernel configuration the launcher can run on a GPU, as
    (kernel name, configuration label, kernel, signature, constexprs, options) for
    triton.compile(ASTSource(kernel, signature, constexprs), target=..., options=options)."""
    for ptr, precision, widen in SEARCH_VARIANTS:
        exact = precision == "ieee"
        for bn, bk, bd, warps, stages in search_configs(exact, False) + search_configs(exact, True):
            mode = "exact" if exact else "fast"
            wide_cb = codebook_widened(exact, widen, bd)
            label = f"{bn}x{bk}x{bd} w{warps} s{stages}, {mode} {ptr[1:]}{' (fp32 codebook)' if wide_cb else ''}"
            yield ("_search_kernel", label, kernels._search_kernel, search_signature(ptr, "*fp32" if wide_cb else None),
                   {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd, "INPUT_PRECISION": precision, "CAST_FP32": widen},
                   {"num_warps": warps, "num_stages": stages})
    yield ("_merge_splits_kernel", f"{MERGE_BLOCK_N} w4", kernels._merge_splits_kernel, MERGE_SIGNATURE,
           {"BLOCK_N": MERGE_BLOCK_N}, {})
    for ptr in ("*fp32", "*fp16", "*bf16"):
        yield ("_gather_kernel", f"{GATHER_BLOCK_N}x{GATHER_BLOCK_D} w4, {ptr[1:]}", kernels._gather_kernel,
               gather_signature(ptr), {"BLOCK_N": GATHER_BLOCK_N, "BLOCK_D": GATHER_BLOCK_D}, {})
        for normalize in (False, True):
            yield ("_rows_kernel", f"{ROWS_BLOCK_M}x{ROWS_BLOCK_D} w4{' normalize' if normalize else ''}, {ptr[1:]}",
                   kernels._rows_kernel, rows_signature(ptr),
                   {"NORMALIZE": normalize, "BLOCK_M": ROWS_BLOCK_M, "BLOCK_D": ROWS_BLOCK_D}, {})
        for name, fn in (("_rerank_f64_kernel", kernels._rerank_f64_kernel),
                         ("_rerank_f32x2_kernel", kernels._rerank_f32x2_kernel)):
            yield (name, f"{RERANK_BLOCK_K}x{RERANK_BLOCK_D} w4, {ptr[1:]}", fn, rerank_signature(ptr),
                   {"BLOCK_K": RERANK_BLOCK_K, "BLOCK_D": RERANK_BLOCK_D}, {})


def _as_triton_configs(configs):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bk, bd, w, s in configs
    ]


def _autotuned(configs):
    # Tuned once per (D, K bucket, input dtypes, precision): Triton's autotuner keys on these arguments
    # and on the tensor dtypes. Its trial runs append to the re-rank list: the counter is restored
    # after each, so the list holds each unproven row once.
    return triton.autotune(configs=_as_triton_configs(configs), key=["D", "K_BUCKET", "INPUT_PRECISION", "CAST_FP32"],
                           restore_value=["count_ptr"])(kernels._search_kernel)


# One autotuner per (mode, row-count class, BLOCK_D): the BLOCK_D of a call follows from D (block_d).
_SEARCH = {
    (exact, small, bd): _autotuned([c for c in search_configs(exact, small) if c[2] == bd])
    for exact in (False, True) for small in (False, True) for bd in BLOCK_DS
}


def block_d(d: int) -> int:
    """The least power of two >= d, at least 16 (tl.dot's least), for d <= MAX_RESIDENT_D (the z tile
    resident); CHUNK_BLOCK_D beyond (the chunked loop)."""
    if d > MAX_RESIDENT_D:
        return CHUNK_BLOCK_D
    return max(16, triton.next_power_of_2(d))


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _wrap(kernel):
    """wrap_triton(kernel). Under the interpreter, torch releases before 2.13 reject interpreted kernels
    (wrap_triton accepts only JITFunction / Autotuner there); they are then launched directly, which
    eager execution, the only use of the interpreter, allows."""
    if _interpret():
        try:
            return wrap_triton(kernel)
        except RuntimeError:
            return kernel
    return wrap_triton(kernel)


def split_codes(n: int, k: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, codes per split) of a K-codeword search over n rows in programs of block_n rows on a GPU
    with `sms` SMs: one split (the whole codebook) when the row programs fill the GPU."""
    row_programs = -(-n // block_n)
    wanted = -(-SPLIT_PROGRAMS_PER_SM * sms // row_programs) if n > 0 else 1
    splits = max(1, min(wanted, -(-k // SPLIT_MIN_CODES)))
    if splits == 1:
        return 1, max(k, 1)
    codes = triton.cdiv(triton.cdiv(k, splits), SPLIT_ALIGN) * SPLIT_ALIGN  # the widths rounded up to SPLIT_ALIGN
    return triton.cdiv(k, codes), codes


def _sm_count(device: torch.device) -> int:
    if _interpret():
        return INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def k_bucket(k: int) -> int:
    """Codebook sizes tune together within a power of two."""
    return 1 << max(0, math.ceil(math.log2(max(1, k))))


def inputs_reason(z: Tensor, codebook: Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs (float64), or None."""
    if torch.float64 in (z.dtype, codebook.dtype):
        return "the Triton kernel has no float64 path (use backend='torch' or 'cpu' for float64 inputs)"
    return None


def rerank_variant(device: torch.device) -> str:
    """"float64" or "float32x2" (compensated float32): the exact mode's re-rank kernel on `device`.
    VQFAST_TRITON_RERANK names one; otherwise float64 where the GPU's float64 rate is full
    (FULL_RATE_FLOAT64) and on CPU tensors (the interpreter)."""
    forced = os.environ.get("VQFAST_TRITON_RERANK", "")
    if forced:
        if forced not in RERANK_VARIANTS:
            raise ValueError(f"VQFAST_TRITON_RERANK must be one of {', '.join(RERANK_VARIANTS)}, got {forced!r}")
        return forced
    if device.type != "cuda":
        return "float64"
    return "float64" if torch.cuda.get_device_capability(device) in FULL_RATE_FLOAT64 else "float32x2"


def _int32_slot(device: torch.device) -> Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _row_pass(x: Tensor, normalize: bool, absmax: Tensor, sqmax: Tensor) -> tuple[Tensor, Tensor]:
    """_rows_kernel over x [M, D]: (x as searched: normalised fp32 copy or x itself, squared row norms [M] fp32)."""
    m, d = x.shape
    sqnorm = torch.empty(m, dtype=torch.float32, device=x.device)
    out = torch.empty((m, d), dtype=torch.float32, device=x.device) if normalize else sqnorm
    if m:
        _wrap(kernels._rows_kernel)[(triton.cdiv(m, ROWS_BLOCK_M),)](
            x, out, sqnorm, absmax, sqmax, m, d, x.stride(0), x.stride(1),
            NORMALIZE=normalize, BLOCK_M=ROWS_BLOCK_M, BLOCK_D=ROWS_BLOCK_D,
        )
    return (out if normalize else x), sqnorm


def _search(z: Tensor, codebook: Tensor, metric: str, precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The device pipeline of the module docstring -> (indices, codewords, distances, extremes)."""
    n, d = z.shape
    k = codebook.shape[0]
    device = z.device
    zin, cbin = (z, codebook) if z.dtype == codebook.dtype else (z.float(), codebook.float())  # mixed: fp32
    exact = precision == "exact"
    cosine = metric == "cosine"
    zmax, cbmax, cmax_sq, count = (_int32_slot(device) for _ in range(4))
    scratch = _int32_slot(device) if cosine else None
    cbs, cbn = _row_pass(cbin, cosine, cbmax, cmax_sq)
    if cosine:  # max |z| of the raw rows here; the search then reads the normalised ones
        zs, _ = _row_pass(zin, True, zmax, scratch)
    else:
        zs = zin
    indices = torch.zeros(n, dtype=torch.int64, device=device)
    if n:
        _search_rows(zs, cbs, cbn, cmax_sq, scratch if cosine else zmax, count, indices, exact)
    if cosine:  # zero rows: reference.cosine_zero_rows (no host sync: where / argmax on the device)
        zero_rows, zero_index, zero_distance = reference.cosine_zero_rows(z, codebook)
        indices = torch.where(zero_rows, zero_index, indices)
    codewords = torch.empty((n, d), dtype=z.dtype, device=device)
    distances = torch.empty(n, dtype=torch.float32, device=device)
    gz, gcb = (zs, cbs) if cosine else (z, codebook)
    if n:
        _wrap(kernels._gather_kernel)[(triton.cdiv(n, GATHER_BLOCK_N),)](
            gz, gcb, indices, codewords, distances, n, d, gz.stride(0), gz.stride(1), gcb.stride(0), gcb.stride(1),
            BLOCK_N=GATHER_BLOCK_N, BLOCK_D=GATHER_BLOCK_D,
        )
    if cosine:  # the gather above read the normalised codebook: return the original rows
        codewords = codebook.index_select(0, indices).to(z.dtype)
        distances = torch.where(zero_rows, zero_distance, distances)
    extremes = torch.cat([zmax, cbmax]).view(torch.float32).double()
    return indices, codewords, distances, extremes


def _search_rows(zs: Tensor, cbs: Tensor, cbn: Tensor, cmax_sq: Tensor, zmax: Tensor, count: Tensor,
                 indices: Tensor, exact: bool) -> None:
    """Search, merge and re-rank: indices [N] of zs [N, D] in cbs [K, D] (as searched), on the device."""
    n, d = zs.shape
    k = cbs.shape[0]
    device = zs.device
    half = zs.dtype in (torch.float16, torch.bfloat16)
    cast_fp32 = exact and half
    input_precision = "ieee" if exact else "tf32"
    coef, floor = reference.ranking_tolerance_terms(d, torch.float32) if exact else (0.0, 0.0)
    best = torch.empty(n, dtype=torch.float32, device=device)
    second = torch.empty(n, dtype=torch.float32, device=device)
    unproven = torch.empty(n, dtype=torch.int32, device=device)  # the re-rank list: each row at most once
    # The split is chosen for the configurations' smallest row tile (the autotuner may pick a larger one,
    # leaving fewer programs, never a wrong answer).
    small = n <= SMALL_N
    bd = block_d(d)
    if codebook_widened(exact, half, bd):  # fp32 code tiles (SEARCH_VARIANTS); the re-rank reads cbs
        cb_search = cbs.float()
    else:
        cb_search = cbs
    configs = [c for c in search_configs(exact, small) if c[2] == bd]
    row_tile = INTERPRET_CONFIG[0] if _interpret() else min(c[0] for c in configs)
    sms = _sm_count(device)
    splits, codes = split_codes(n, k, row_tile, sms)
    if splits > 1:  # per-split top-2 [splits, N], merged below
        out = (torch.empty(splits * n, dtype=torch.int64, device=device),
               torch.empty(splits * n, dtype=torch.float32, device=device),
               torch.empty(splits * n, dtype=torch.float32, device=device))
        znorm = torch.empty(n, dtype=torch.float32, device=device)
    else:
        out = (indices, best, second)
        znorm = best  # not written with one split: the search marks its rows itself
    args = (zs, cb_search, cbn, cmax_sq, zmax, znorm, *out, unproven, count, n, k, d,
            zs.stride(0), zs.stride(1), cb_search.stride(0), cb_search.stride(1))
    if _interpret():
        bn, bk, _, _ = INTERPRET_CONFIG
        _wrap(kernels._search_kernel)[(triton.cdiv(n, bn), splits)](
            *args, k_bucket(k), codes, coef, floor, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd,
            INPUT_PRECISION=input_precision, CAST_FP32=cast_fp32,
        )
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        _wrap(_SEARCH[exact, small, bd])[grid](
            *args, K_BUCKET=k_bucket(k), SPLIT_CODES=codes, coef=coef, floor=floor, INPUT_PRECISION=input_precision,
            CAST_FP32=cast_fp32,
        )
    if splits > 1:
        _wrap(kernels._merge_splits_kernel)[(triton.cdiv(n, MERGE_BLOCK_N),)](
            *out, indices, best, second, znorm, cmax_sq, unproven, count, n, splits, int(exact), coef, floor,
            BLOCK_N=MERGE_BLOCK_N,
        )
    if exact:
        rerank = kernels._rerank_f64_kernel if rerank_variant(device) == "float64" else kernels._rerank_f32x2_kernel
        _wrap(rerank)[(min(n, RERANK_PROGRAMS_PER_SM * sms),)](
            zs, cbs, indices, unproven, count, k, d, zs.stride(0), zs.stride(1), cbs.stride(0), cbs.stride(1),
            BLOCK_K=RERANK_BLOCK_K, BLOCK_D=RERANK_BLOCK_D,
        )


@triton_op("vqfast::nearest_codeword_triton", mutates_args=())
def nearest_codeword_triton(
    z: Tensor, codebook: Tensor, metric: str = "l2", precision: str = "exact"
) -> tuple[Tensor, Tensor, Tensor]:
    indices, codewords, distances, _ = _search(z, codebook, metric, precision)
    return indices, codewords, distances


@triton_op("vqfast::nearest_codeword_triton_flagged", mutates_args=())
def nearest_codeword_triton_flagged(
    z: Tensor, codebook: Tensor, metric: str = "l2", precision: str = "exact"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _search(z, codebook, metric, precision)


register_nearest_codeword_op("vqfast::nearest_codeword_triton")
register_nearest_codeword_flagged_op("vqfast::nearest_codeword_triton_flagged")
