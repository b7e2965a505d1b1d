"""Input checks shared by every public entry point: errors name the argument and the fix."""
from __future__ import annotations

import torch

METRICS = ("l2", "cosine")
PRECISIONS = ("exact", "fast")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_nearest_codeword_inputs(z: object, codebook: object, metric: object, precision: object) -> None:
    """Validate the arguments of nearest_codeword (z [N, D], codebook [K, D])."""
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
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
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}: move both to one device")
    check_choice("metric", metric, METRICS)
    check_choice("precision", precision, PRECISIONS)
