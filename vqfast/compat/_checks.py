"""Checks the compat classes' ``unsupported_reason`` hooks share."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def embedding_problem(module: nn.Module, rows: str, cols: str) -> Optional[str]:
    """Why ``module.embedding`` is not an nn.Embedding with a floating-point weight of shape
    (module.<rows>, module.<cols>), or None."""
    weight = getattr(module.embedding, "weight", None)
    if not isinstance(module.embedding, nn.Embedding) or not isinstance(weight, torch.Tensor):
        return f"its embedding is a {type(module.embedding).__name__}, not an nn.Embedding"
    expected = (getattr(module, rows), getattr(module, cols))
    if tuple(weight.shape) != expected or not weight.is_floating_point():
        return (f"embedding.weight is {tuple(weight.shape)} {weight.dtype}, not a floating-point "
                f"({rows}, {cols}) = {expected}")
    return None
