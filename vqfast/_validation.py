"""Input checks shared by every public entry point: errors name the argument and the fix.

Three layers, cheapest first:

    check_nearest_codeword_inputs   types, ranks, shapes, devices, option strings (no data read)
    scan_values                     one min/max pass over z and the codebook: NaN/Inf, and whether
                                    squared distances could overflow the compute dtype
    value_rules                     the same verdict from the two maxima a flagged GPU op reports
    int32_offsets_reason            for backends whose kernels index with 32-bit offsets
"""
from __future__ import annotations

import math

import torch

METRICS = ("l2", "cosine")
PRECISIONS = ("exact", "fast")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# A kernel that computes flat offsets (row * D + col) in int32 can address at most 2^31 - 1.
INT32_MAX = 2**31 - 1


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_nearest_codeword_inputs(z: object, codebook: object, metric: object, precision: object) -> None:
    """Validate the arguments of nearest_codeword (z [N, D], codebook [K, D]) without reading their values."""
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; wrap it with torch.as_tensor({name})")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with {name}.to_dense()")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}; "
                            f"convert it with {name}.float()")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [N, D], got shape {tuple(z.shape)}; flatten leading dims with z.reshape(-1, D)")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0): it needs at least one codeword")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z has D={z.shape[1]} features but codebook has D={codebook.shape[1]}: they must match")
    if z.shape[1] == 0:
        raise ValueError("z and codebook have D = 0 features: there is nothing to compare; give them at least one column")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}: move both to one device, "
                         f"e.g. codebook.to(z.device)")
    check_choice("metric", metric, METRICS)
    check_choice("precision", precision, PRECISIONS)


def search_dtype(z: torch.Tensor, codebook: torch.Tensor) -> torch.dtype:
    """The dtype every backend searches in: float64 if either input is float64, else float32."""
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def magnitude_limit(dim: int, dtype: torch.dtype) -> float:
    """Largest |value| for which every squared distance over ``dim`` features stays finite in ``dtype``.

    |z_j - c_j| <= 2m, so a distance (direct sum, or |z|^2 + |c|^2 - 2 z.c) is at most 4 D m^2;
    a further factor 2 covers rounding. float32: 6.5e18 at D = 1, 2.0e17 at D = 1024.
    float64: 4.7e153 at D = 1, 1.5e152 at D = 1024.
    """
    return math.sqrt(torch.finfo(dtype).max / (8.0 * dim))


def _non_finite_message(name: str, t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    first_row = int(bad.any(1).nonzero()[0, 0])
    kinds = " and ".join(k for k, present in (("NaN", bool(t.isnan().any())), ("Inf", bool(t.isinf().any()))) if present)
    return (f"{name} contains {count} non-finite value(s) ({kinds}), the first in row {first_row}: the nearest codeword "
            f"is undefined there. Remove or replace them (e.g. torch.nan_to_num({name})), or pass check_finite=False "
            f"to skip this check (NaN/Inf then give unspecified, in-range indices)")


def scan_values(z: torch.Tensor, codebook: torch.Tensor) -> bool:
    """One min/max pass over both inputs (a single device sync). Returns True when the search must
    run in float64 because float32 squared distances could overflow.

    Raises ValueError naming the argument when it holds NaN/Inf, or when even float64 distances
    could overflow (float64 inputs beyond magnitude_limit(D, float64)): the rules of value_rules.
    """
    extremes = []
    for t in (z, codebook):
        if t.numel() == 0:
            extremes.append(t.new_zeros((), dtype=torch.float64))
            continue
        lo, hi = torch.aminmax(t)  # min/max propagate NaN, so one pass also finds NaN and Inf
        extremes.append(torch.maximum(lo.abs(), hi.abs()).double())
    z_max, cb_max = torch.stack(extremes).tolist()
    return value_rules(z, codebook, z_max, cb_max)


def value_rules(z: torch.Tensor, codebook: torch.Tensor, z_max: float, cb_max: float) -> bool:
    """check_finite's verdict from max |z| and max |codebook| (NaN when a NaN was read, +inf when an
    Inf was), however they were found: scan_values' min/max pass, or a GPU kernel that reports them
    from its own pass over the inputs (the flagged ops, vqfast/_opdef.py). Reads no values of z or
    codebook unless it raises.

    Returns True when the search must run in float64 because float32 squared distances could
    overflow. Raises ValueError naming the argument when it holds NaN/Inf, and when even float64
    distances could overflow (inputs searched in float64 beyond magnitude_limit(D, float64)).
    """
    for name, t, m in (("z", z, z_max), ("codebook", codebook, cb_max)):
        if not math.isfinite(m):
            raise ValueError(_non_finite_message(name, t))
    name = "z" if z_max >= cb_max else "codebook"
    return needs_float64(max(z_max, cb_max), z.shape[1], search_dtype(z, codebook), name)


def needs_float64(m: float, dim: int, dtype: torch.dtype, name: str = "z") -> bool:
    """For finite inputs whose largest |value| is ``m``, searched over ``dim`` features in ``dtype``:
    True when float32 squared distances could overflow (search again in float64); raises ValueError
    naming ``name`` when the search is already float64 and its distances could overflow."""
    if m <= magnitude_limit(dim, dtype):
        return False
    if dtype == torch.float32:
        return True  # every float32 value squares to far below float64's limit (3.4e38^2 ~ 1e77)
    raise ValueError(
        f"{name} holds values up to {m:.3g}: squared distances over D={dim} features would overflow float64 "
        f"(limit {magnitude_limit(dim, dtype):.3g}). Rescale z and codebook by one common factor, e.g. "
        f"s = 2.0 ** -math.ceil(math.log2({m:.3g})): the nearest codeword does not change"
    )


def int32_offsets_reason(z: torch.Tensor, codebook: torch.Tensor) -> str | None:
    """Why a kernel with 32-bit flat offsets cannot take these inputs, or None when it can.

    Backends whose kernels index z or the codebook with int32 offsets list this in their registry
    entry, so that backend="auto" falls back and a backend requested by name raises with this text.
    Reads only shapes: meta tensors and expand()ed views work without allocating anything.
    """
    for name, t, rows in (("z", z, "N"), ("codebook", codebook, "K")):
        elements = t.shape[0] * t.shape[1]
        if elements > INT32_MAX:
            max_rows = INT32_MAX // t.shape[1]
            fix = (f"split z into chunks of at most {max_rows} rows" if name == "z"
                   else "use backend='torch' or 'cpu', or a smaller codebook")
            return (f"{name} has {rows} * D = {t.shape[0]} * {t.shape[1]} = {elements} elements, beyond the "
                    f"2^31 - 1 that its 32-bit offsets can address; {fix}")
    return None


def int32_indices_reason(z: torch.Tensor, codebook: torch.Tensor) -> str | None:
    """Why a kernel that keeps codeword indices in int32 (64-bit offsets otherwise) cannot take these inputs."""
    if codebook.shape[0] > INT32_MAX:
        return (f"codebook has K = {codebook.shape[0]} codewords, beyond the 2^31 - 1 its int32 indices can hold; "
                f"use backend='torch' or 'cpu'")
    return None


def check_int32_offsets(z: torch.Tensor, codebook: torch.Tensor, backend: str) -> None:
    """Raise ValueError when a backend with 32-bit offsets cannot index these inputs (see int32_offsets_reason)."""
    reason = int32_offsets_reason(z, codebook)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {reason}")
