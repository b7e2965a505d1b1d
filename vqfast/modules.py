"""Drop-in vector quantizers: the constructors, parameter names, initialisation, outputs and
gradients of the classic VectorQuantizer / VectorQuantizer2 / ResidualVectorQuantizer, with the
nearest-codeword search done by vqfast's fused op.

Inputs are channels-first: [B, C, T], [B, C, H, W] or [B, C, D, H, W] with C = embedding_dim.
forward returns (quantized [same shape as z], loss, indices [B * spatial]). quantized carries the
straight-through gradient (z + (q - z).detach()). The losses are computed in one consistent
channels-last layout from the chosen codewords: no one-hot and no N x K tensor, forward or backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast._validation import METRICS, PRECISIONS, check_choice
from vqfast.backends import BACKEND_NAMES
from vqfast.ops import nearest_codeword


class VectorQuantizer(nn.Module):
    """Codebook of ``num_embeddings`` vectors of size ``embedding_dim``.

    loss = mse(q, z.detach()) + beta * mse(q.detach(), z)   (codebook term + commitment term)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        *,
        backend: str = "auto",
        precision: str = "exact",
        metric: str = "l2",
    ):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_choice("precision", precision, PRECISIONS)
        check_choice("metric", metric, METRICS)
        if not isinstance(backend, str) or backend not in ("auto",) + BACKEND_NAMES:
            raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.backend = backend
        self.precision = precision
        self.metric = metric
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1 / num_embeddings, 1 / num_embeddings)

    def get_codebook(self) -> torch.Tensor:
        return self.embedding.weight.data

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, beta={self.beta}, "
            f"backend={self.backend!r}, precision={self.precision!r}, metric={self.metric!r}"
        )

    def _channels_last(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() not in (3, 4, 5):
            raise ValueError(
                f"z must be [B, C, T], [B, C, H, W] or [B, C, D, H, W] with C = embedding_dim = {self.embedding_dim}, "
                f"got shape {tuple(z.shape)}"
            )
        if z.shape[1] != self.embedding_dim:
            raise ValueError(
                f"z has {z.shape[1]} channels (dim 1) but embedding_dim = {self.embedding_dim}; inputs are channels-first"
            )
        return z.movedim(1, -1).contiguous()

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, C, *S] -> (z channels-last [B, *S, C], codewords [B, *S, C], indices [B * prod(S)])."""
        z_cl = self._channels_last(z)
        indices, q, _ = nearest_codeword(
            z_cl.view(-1, self.embedding_dim),
            self.embedding.weight,
            metric=self.metric,
            precision=self.precision,
            backend=self.backend,
        )
        return z_cl, q.view(z_cl.shape), indices

    def _loss(self, q: torch.Tensor, z_cl: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(q, z_cl.detach()) + self.beta * F.mse_loss(q.detach(), z_cl)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_cl, q, indices = self.quantize(z)
        loss = self._loss(q, z_cl)
        quantized = z_cl + (q - z_cl).detach()  # straight-through estimator
        return quantized.movedim(-1, 1).contiguous(), loss, indices


class VectorQuantizer2(VectorQuantizer):
    """VectorQuantizer with the commitment term unweighted: loss = mse(q, z.detach()) + mse(q.detach(), z)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        backend: str = "auto",
        precision: str = "exact",
        metric: str = "l2",
    ):
        super().__init__(num_embeddings, embedding_dim, 1.0, backend=backend, precision=precision, metric=metric)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"backend={self.backend!r}, precision={self.precision!r}, metric={self.metric!r}"
        )


class ResidualVectorQuantizer(nn.Module):
    """``num_quantizers`` VectorQuantizers in sequence, each quantising what the previous ones left.

    forward returns (sum of the stages' quantized outputs, sum of their losses, [indices per stage]).
    """

    def __init__(
        self,
        num_quantizers: int,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        *,
        backend: str = "auto",
        precision: str = "exact",
        metric: str = "l2",
    ):
        super().__init__()
        if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        self.num_quantizers = num_quantizers
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.quantizers = nn.ModuleList(
            [
                VectorQuantizer(num_embeddings, embedding_dim, beta, backend=backend, precision=precision, metric=metric)
                for _ in range(num_quantizers)
            ]
        )

    def get_codebook(self) -> torch.Tensor:
        """[num_quantizers, num_embeddings, embedding_dim]: every stage's codebook."""
        return torch.stack([q.get_codebook() for q in self.quantizers])

    def forward(self, x: torch.Tensor):
        quantized = torch.zeros_like(x)
        total_loss = 0
        all_indices = []
        for quantizer in self.quantizers:
            quantized_stage, loss, indices = quantizer(x - quantized)
            quantized = quantized + quantized_stage
            total_loss = total_loss + loss
            all_indices.append(indices)
        return quantized, total_loss, all_indices
