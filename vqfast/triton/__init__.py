"""The Triton backend: ``vqfast::nearest_codeword_triton``.

Registered with torch.library.triton_op (kernels launched through wrap_triton), so
torch.compile(fullgraph=True) traces into it; it shares the fake shapes and the backward of the
other backends (vqfast._opdef.register_nearest_codeword_op).

Few rows (VAR's first scales, single queries): when the row programs cannot fill the GPU's SMs, the
codebook is split over a second grid axis (split_codes) and a merge kernel folds each row's per-split
top-2 on the device, as the CUDA kernel does; every distance is computed as in the unsplit search.

Precision:
  exact  the search kernel computes IEEE fp32 dot products (fp16/bf16 inputs are widened to fp32),
         so the rigorous bound of vqfast/reference.py (reference.ranking_tolerance) holds for every
         computed value. Rows whose second-best value lies within that tolerance of the best are
         re-ranked exactly (vqfast::rerank_rows, fp64 direct distances); all others are provably
         exact already. tf32x3 would run on tensor cores, but its error is not covered by that bound
         without a separate analysis; it is the candidate to measure on a GPU.
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
from vqfast._opdef import register_nearest_codeword_op
from vqfast.triton import kernels

Tensor = torch.Tensor

# (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages). Large-N configurations tile 64-128 rows; the
# small-N ones (N <= 64, e.g. VAR's 1 x 1 and 2 x 2 scales) use 16-row tiles so that more programs
# stream the codebook in parallel instead of one program per 128 mostly idle rows.
# Every configuration compiles without spills for sm_80 and sm_90 in all SEARCH_VARIANTS
# (benchmarks/results/gpu_resources.md, checked by tests/test_resources.py). The earlier 128x128x32 /
# 128x64x64 w4 / 64x128x32 / 64x64x64 tiles spilled 100 B to 3.3 KB a thread on both (ptxas, fp32
# exact and fast): the BLOCK_N x BLOCK_K distance tile, its three reductions and the operand slices
# did not fit 255 registers; 64-row tiles on 4 warps still spill 8-48 B in exact fp32. With 8 warps
# and 16-32-wide feature slices none spills. Their speeds are not measured: no GPU has run them yet.
LARGE_N_CONFIGS = [
    (128, 64, 16, 8, 2),
    (64, 128, 16, 8, 3),
    (64, 64, 32, 8, 3),
    (64, 64, 16, 8, 2),
]
SMALL_N_CONFIGS = [
    (16, 128, 64, 4, 2),
    (16, 64, 32, 2, 2),
]
SMALL_N = 64
# Under the interpreter (CPU tensors, TRITON_INTERPRET=1) one small configuration, no tuning.
INTERPRET_CONFIG = (16, 32, 16, 1, 1)
GATHER_BLOCK_N, GATHER_BLOCK_D = 32, 64
MERGE_BLOCK_N = 128

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
# tensor cores. scripts/resources.py and tests/test_triton.py compile every configuration in each.
SEARCH_VARIANTS = [
    ("*fp32", "ieee", False),
    ("*fp16", "ieee", True),
    ("*bf16", "ieee", True),
    ("*fp32", "tf32", False),
    ("*fp16", "tf32", False),
    ("*bf16", "tf32", False),
]


def search_signature(ptr: str) -> dict[str, str]:
    """_search_kernel's argument types for triton.compile, with z and the codebook of type `ptr`."""
    return {
        "z_ptr": ptr, "cb_ptr": ptr, "cbn_ptr": "*fp32", "idx_ptr": "*i64", "best_ptr": "*fp32", "second_ptr": "*fp32",
        "N": "i32", "K": "i32", "D": "i32",
        "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32", "K_BUCKET": "i32",
        "SPLIT_CODES": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr",
        "INPUT_PRECISION": "constexpr", "CAST_FP32": "constexpr",
    }


MERGE_SIGNATURE = {
    "ws_idx_ptr": "*i64", "ws_best_ptr": "*fp32", "ws_second_ptr": "*fp32", "idx_ptr": "*i64", "best_ptr": "*fp32",
    "second_ptr": "*fp32", "N": "i32", "SPLITS": "i32", "BLOCK_N": "constexpr",
}


def gather_signature(ptr: str) -> dict[str, str]:
    """_gather_kernel's argument types for triton.compile, with z, the codebook and codewords of type `ptr`."""
    return {
        "z_ptr": ptr, "cb_ptr": ptr, "idx_ptr": "*i64", "cw_ptr": ptr, "dist_ptr": "*fp32", "N": "i32", "D": "i32",
        "stride_zn": "i32", "stride_zd": "i32", "stride_cn": "i32", "stride_cd": "i32",
        "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
    }


def _as_triton_configs(configs):
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bk, bd, w, s in configs
    ]


def _autotuned(configs):
    # Tuned once per (D, K bucket, input dtypes, precision): Triton's autotuner keys on these arguments
    # and on the tensor dtypes.
    return triton.autotune(configs=_as_triton_configs(configs), key=["D", "K_BUCKET", "INPUT_PRECISION", "CAST_FP32"])(
        kernels._search_kernel
    )


_search_large = _autotuned(LARGE_N_CONFIGS)
_search_small = _autotuned(SMALL_N_CONFIGS)


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


def _prepare(z: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    if z.dtype != codebook.dtype:  # mixed half/float inputs: search in fp32
        z, codebook = z.float(), codebook.float()
    if metric == "cosine":
        z = reference.normalize_for_metric(z.float(), metric)
        codebook = reference.normalize_for_metric(codebook.float(), metric)
    return z, codebook


@torch.library.custom_op("vqfast::rerank_rows", mutates_args=())
def rerank_rows(z: Tensor, codebook: Tensor, indices: Tensor, best: Tensor, second: Tensor) -> Tensor:
    """Exact re-rank of the rows whose top-2 gap lies within the rounding bound (reference.rerank_unproven).

    z [N, D], codebook [K, D] as searched (normalised for cosine), indices/best/second [N] -> indices [N].
    """
    # The kernel ranks ||c||^2 - 2 z.c in fp32, as the reference does.
    return reference.rerank_unproven(z, codebook, indices, best, second)


@rerank_rows.register_fake
def _(z, codebook, indices, best, second):
    return torch.empty_like(indices)


@triton_op("vqfast::nearest_codeword_triton", mutates_args=())
def nearest_codeword_triton(
    z: Tensor, codebook: Tensor, metric: str = "l2", precision: str = "exact"
) -> tuple[Tensor, Tensor, Tensor]:
    n, d = z.shape
    k = codebook.shape[0]
    zs, cbs = _prepare(z, codebook, metric)
    exact = precision == "exact"
    half = zs.dtype in (torch.float16, torch.bfloat16)
    cast_fp32 = exact and half
    input_precision = "ieee" if exact else "tf32"
    cbn = (cbs.float() ** 2).sum(1)
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    best = torch.empty(n, dtype=torch.float32, device=z.device)
    second = torch.empty(n, dtype=torch.float32, device=z.device)
    # The split is chosen for the configurations' smallest row tile (the autotuner may pick a larger one,
    # leaving fewer programs, never a wrong answer).
    configs = [INTERPRET_CONFIG] if _interpret() else SMALL_N_CONFIGS if n <= SMALL_N else LARGE_N_CONFIGS
    splits, codes = split_codes(n, k, min(c[0] for c in configs), _sm_count(z.device))
    if splits > 1:  # per-split top-2 [splits, N], merged below
        out = (torch.empty(splits * n, dtype=torch.int64, device=z.device),
               torch.empty(splits * n, dtype=torch.float32, device=z.device),
               torch.empty(splits * n, dtype=torch.float32, device=z.device))
    else:
        out = (indices, best, second)
    args = (zs, cbs, cbn, *out, n, k, d, zs.stride(0), zs.stride(1), cbs.stride(0), cbs.stride(1))
    if _interpret():
        bn, bk, bd, _, _ = INTERPRET_CONFIG
        grid = (triton.cdiv(n, bn), splits)
        _wrap(kernels._search_kernel)[grid](
            *args, k_bucket(k), codes, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, INPUT_PRECISION=input_precision,
            CAST_FP32=cast_fp32,
        )
    else:
        kernel = _search_small if n <= SMALL_N else _search_large
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        _wrap(kernel)[grid](*args, K_BUCKET=k_bucket(k), SPLIT_CODES=codes, INPUT_PRECISION=input_precision,
                            CAST_FP32=cast_fp32)
    if splits > 1:
        _wrap(kernels._merge_splits_kernel)[(triton.cdiv(n, MERGE_BLOCK_N),)](
            *out, indices, best, second, n, splits, BLOCK_N=MERGE_BLOCK_N,
        )
    if exact:
        indices = torch.ops.vqfast.rerank_rows(zs, cbs, indices, best, second)
    if metric == "cosine":  # zero rows: reference.cosine_zero_rows
        zero_rows, zero_index, zero_distance = reference.cosine_zero_rows(z, codebook)
        indices = torch.where(zero_rows, zero_index, indices)
    codewords = torch.empty((n, d), dtype=z.dtype, device=z.device)
    distances = torch.empty(n, dtype=torch.float32, device=z.device)
    gz, gcb = (zs, cbs) if metric == "cosine" else (z, codebook)
    _wrap(kernels._gather_kernel)[(triton.cdiv(n, GATHER_BLOCK_N),)](
        gz, gcb, indices, codewords, distances, n, d, gz.stride(0), gz.stride(1), gcb.stride(0), gcb.stride(1),
        BLOCK_N=GATHER_BLOCK_N, BLOCK_D=GATHER_BLOCK_D,
    )
    if metric == "cosine":  # the gather above read the normalised codebook: return the original rows
        codewords = codebook.index_select(0, indices).to(z.dtype)
        distances = torch.where(zero_rows, zero_distance, distances)
    return indices, codewords, distances


register_nearest_codeword_op("vqfast::nearest_codeword_triton")
