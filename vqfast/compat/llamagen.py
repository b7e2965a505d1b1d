"""LlamaGen's image-tokenizer quantizer (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py)
with the fused search and the fused entropy loss.

    VectorQuantizer(n_e, e_dim, beta, entropy_loss_ratio, l2_norm, show_usage, *, backend="auto", precision="exact")
        forward(z [B, C, H, W]) -> (z_q [B, C, H, W],
                                    (vq_loss, commit_loss, entropy_loss, codebook_usage),
                                    (None, None, min_encoding_indices [B*H*W]))
        get_codebook_entry(indices, shape=None, channel_first=True)

LlamaGen's ``VQ_8`` / ``VQ_16`` build ``VQModel(ModelArgs(...))`` with K = 16384, D = 8, l2-normalised
codes, ``show_usage`` on, beta 0.25 and entropy_loss_ratio 0; the model's ``quantize`` is this class.
The original's constructor, attributes (n_e, e_dim, beta, entropy_loss_ratio, l2_norm, show_usage,
embedding, codebook_used), state_dict keys (``codebook_used`` [65536] with show_usage, then
``embedding.weight``), initialisation (uniform [-1/n_e, 1/n_e], then rows l2-normalised with l2_norm)
and outputs are kept:

    z, e          z in channels-last; with l2_norm z, its flattened rows and the codebook are
                  l2-normalised (F.normalize), each step, with gradients through the normalisation
    indices       the nearest codeword of each flattened row (argmin of the squared distance)
    z_q           e[indices]; returned straight-through, z + (z_q - z).detach(), channels-first
    training:     codebook_used: shifted left by N, the new indices written at its end (show_usage);
                  codebook_usage = (distinct values in codebook_used) / n_e, a Python float
                  vq_loss = mean((z_q - z.detach())^2)      commit_loss = beta * mean((z_q.detach() - z)^2)
                  entropy_loss = entropy_loss_ratio * (LlamaGen's entropy loss of -d; vqfast.entropy)
    eval:         the three losses None, codebook_usage 0, codebook_used untouched

What changes:
- The search: LlamaGen builds d = sum z^2 + sum e^2 - 2 z e^T (N x K, fp32) and takes its argmin; here
  ``vqfast.nearest_codeword`` with metric "l2" on the same normalised vectors picks the truly nearest
  codeword (the lowest index on exact ties, as argmin) without the matrix. Indices differ only on rows
  where LlamaGen's expanded formula misses the nearest one; everything else, gradients included, is the
  original's computation on the same indices.
- The entropy loss: LlamaGen computes it every training step, even at entropy_loss_ratio = 0, from an
  N x K softmax and log-softmax. At a ratio of 0 it is multiplied by 0, so its value is 0 whenever it is
  finite (always with l2_norm: the affinities lie in [-400, 0]) and its gradient adds zeros; here a
  ratio of 0 gives a 0.0 tensor without computing it. (LlamaGen's 0 * loss is -0.0 when the loss is
  negative, the usual case; the sign of the zero is the only difference. Without l2_norm LlamaGen's
  loss, and so 0 * loss, is NaN only once its fp32 distances overflow, at values beyond ~1e18;
  vqfast still returns 0.0 there.) A ratio > 0 runs
  ``vqfast.entropy.entropy_loss``, chunked over rows: no N x K tensor, the same value and gradients
  (to z and to the codebook) within fp32 rounding.
- ``codebook_used`` is a plain buffer here (LlamaGen registers an nn.Parameter, whose in-place update
  raises on the CPU); a converted LlamaGen instance keeps its own buffer and is updated without
  recording gradients, so it trains on the CPU too. More than 65536 rows in one call keep the last
  65536 indices (LlamaGen raises on the shape mismatch).
- Bad input raises a ValueError / TypeError naming the argument (LlamaGen's view(-1, e_dim) reshapes
  z with the wrong channel count silently); NaN / Inf in z or the codebook raise (``nearest_codeword``).

Extra keyword-only constructor options ``backend`` and ``precision`` choose the search (see
``vqfast.nearest_codeword``); ``vqfast.accelerate`` sets them on a converted instance.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast.backends import check_search_options
from vqfast.compat._checks import embedding_problem
from vqfast.entropy import TEMPERATURE, entropy_loss
from vqfast.ops import nearest_codeword

__all__ = ["VectorQuantizer", "USAGE_WINDOW"]

USAGE_WINDOW = 65536  # LlamaGen's codebook_used length: the last 65536 indices
_ATTRIBUTES = ("n_e", "e_dim", "beta", "entropy_loss_ratio", "l2_norm", "show_usage", "embedding")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class VectorQuantizer(nn.Module):
    """LlamaGen's VectorQuantizer, codebook ``embedding`` [n_e, e_dim]; see the module docstring."""

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        entropy_loss_ratio: float,
        l2_norm: bool,
        show_usage: bool,
        *,
        backend: str = "auto",
        precision: str = "exact",
    ):
        super().__init__()
        for name, value in (("n_e", n_e), ("e_dim", e_dim)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("beta", beta), ("entropy_loss_ratio", entropy_loss_ratio)):
            if not _is_number(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        for name, value in (("l2_norm", l2_norm), ("show_usage", show_usage)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self._vqfast_adopt(backend, precision)
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))

    # ---- vqfast.accelerate hooks ------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        """Why ``module`` (an instance of LlamaGen's class) cannot run on this class's code, or None."""
        for name in _ATTRIBUTES:
            if not hasattr(module, name):
                return f"it has no attribute {name!r} (a modified copy of the class?)"
        problem = embedding_problem(module, "n_e", "e_dim")
        if problem is not None:
            return problem
        if module.show_usage:
            used = getattr(module, "codebook_used", None)
            if not isinstance(used, torch.Tensor) or used.dim() != 1 or used.numel() == 0:
                return "show_usage is set but its codebook_used is not a 1-D tensor"
        if not _is_number(module.entropy_loss_ratio) or not _is_number(module.beta):
            return "its beta / entropy_loss_ratio are not numbers"
        return None

    def _vqfast_adopt(self, backend: str = "auto", precision: str = "exact") -> None:
        check_search_options(backend, precision)
        self.vqfast_backend = backend
        self.vqfast_precision = precision

    def extra_repr(self) -> str:
        return (f"n_e={self.n_e}, e_dim={self.e_dim}, beta={self.beta}, entropy_loss_ratio={self.entropy_loss_ratio}, "
                f"l2_norm={self.l2_norm}, show_usage={self.show_usage}, backend={self.vqfast_backend!r}, "
                f"precision={self.vqfast_precision!r}")

    # ---- forward ------------------------------------------------------------------------------------
    def _codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def _record_usage(self, indices: torch.Tensor) -> float:
        """Shift the last indices into codebook_used; the fraction of codes among its distinct values."""
        used = self.codebook_used
        n = indices.shape[0]
        with torch.no_grad():  # LlamaGen's buffer may be an nn.Parameter (a leaf that requires grad)
            if n >= used.shape[0]:
                used.copy_(indices[n - used.shape[0]:])
            elif n > 0:
                used[:-n] = used[n:].clone()
                used[-n:] = indices
        return len(torch.unique(used)) / self.n_e

    def forward(self, z: torch.Tensor):
        """z [B, C, H, W] -> (z_q, (vq_loss, commit_loss, entropy_loss, codebook_usage), (None, None, indices [N]))."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"z must be [B, C, H, W] with C = e_dim = {self.e_dim}, got shape {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1).contiguous()
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        z_flat = z.view(-1, self.e_dim)
        codebook = self._codebook()
        with torch.no_grad():  # z_q is gathered (and differentiated) through the codebook below
            indices, _, _ = nearest_codeword(z_flat.detach(), codebook.detach(), precision=self.vqfast_precision,
                                             backend=self.vqfast_backend)
        z_q = codebook[indices].view(z.shape)
        vq_loss = commit_loss = entropy = None
        usage = 0
        if self.training:
            if self.show_usage:
                usage = self._record_usage(indices)
            vq_loss = torch.mean((z_q - z.detach()) ** 2)
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
            entropy = self._entropy_loss(z_flat, codebook)
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2)
        return z_q, (vq_loss, commit_loss, entropy, usage), (None, None, indices)

    def _entropy_loss(self, z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        if self.entropy_loss_ratio == 0:
            # 0 * (a finite loss): skip the N x K work (see the module docstring on the sign of the zero).
            dtype = torch.promote_types(torch.promote_types(z_flat.dtype, codebook.dtype), torch.float32)
            return torch.zeros((), dtype=dtype, device=z_flat.device)
        return self.entropy_loss_ratio * entropy_loss(z_flat, codebook, TEMPERATURE)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """indices -> codewords (normalised with l2_norm): [*indices.shape, e_dim], or reshaped to ``shape``:
        (B, C, H, W) channels-first by default, or with channel_first=False the shape as given."""
        z_q = self._codebook()[indices]
        if shape is not None:
            if len(shape) != 4 and channel_first:
                raise ValueError(f"shape must be (B, C, H, W) with channel_first, got {tuple(shape)}")
            if channel_first:
                z_q = z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
            else:
                z_q = z_q.view(shape)
        return z_q
