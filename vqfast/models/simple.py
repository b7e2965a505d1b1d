"""The seeds' single-scale VQ-VAEs, with real token maps.

Both downsample by 4 (two stride-2 convolutions), so a [B, 3, H, W] image gives an index map of
h * w = (H / 4) * (W / 4) tokens.

Token semantics (the seeds returned two quadrants of the map, or random numbers):
- SimpleVQVAE.img_to_idxBl(img) -> [idx [B, h*w]]: one entry, the full row-major index map.
- ImprovedVQVAE.img_to_idxBl(img) -> one [B, h*w] entry per residual stage, coarse to fine.
- idxBl_to_var_input(idx_list) -> [B, h*w, C] codebook embeddings: for ImprovedVQVAE the sum of
  the stages' codewords (the quantized feature map, channels-last), so decoding it reproduces
  the forward pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vqfast.modules import ResidualVectorQuantizer, VectorQuantizer, VectorQuantizer2


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_image(img) -> None:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
    if not img.is_floating_point():
        raise TypeError(f"img must be a floating-point tensor, got {img.dtype}; convert it with img.float() / 255")
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"img must be [B, 3, H, W], got shape {tuple(img.shape)}")
    if img.shape[2] % 4 or img.shape[3] % 4:
        raise ValueError(f"img height and width must be multiples of 4 (two stride-2 layers), got {tuple(img.shape[2:])}")


def _encoder(hidden_dim: int, embedding_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, hidden_dim, kernel_size=4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden_dim, embedding_dim, kernel_size=4, stride=2, padding=1),
        nn.ReLU(),
    )


def _decoder(hidden_dim: int, embedding_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(embedding_dim, hidden_dim, kernel_size=4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(hidden_dim, 3, kernel_size=4, stride=2, padding=1),
    )


class SimpleVQVAE(nn.Module):
    """Accepts both seed constructors.

    - ``SimpleVQVAE(vocab_size, embedding_dim)`` (seeds 000/001): hidden width = embedding_dim and
      ``VectorQuantizer2`` (unweighted commitment term), as those seeds built it.
    - ``SimpleVQVAE(vocab_size, embedding_dim, hidden_dim)`` (seeds 003/004): hidden width =
      hidden_dim and ``VectorQuantizer`` (beta = 0.25).

    forward(img [B, 3, H, W]) -> (decoded [B, 3, H, W], vq_loss, indices [B * h * w]).
    """

    def __init__(self, vocab_size: int = 16, embedding_dim: int = 64, hidden_dim: int | None = None):
        super().__init__()
        _check_positive_int("vocab_size", vocab_size)
        _check_positive_int("embedding_dim", embedding_dim)
        if hidden_dim is not None:
            _check_positive_int("hidden_dim", hidden_dim)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_dim = embedding_dim if hidden_dim is None else hidden_dim
        self.encoder = _encoder(self.hidden_dim, embedding_dim)
        if hidden_dim is None:
            self.quantize = VectorQuantizer2(vocab_size, embedding_dim)
        else:
            self.quantize = VectorQuantizer(vocab_size, embedding_dim)
        self.decoder = _decoder(self.hidden_dim, embedding_dim)

    def forward(self, img: torch.Tensor):
        _check_image(img)
        quantized, loss, indices = self.quantize(self.encoder(img))
        return self.decoder(quantized), loss, indices

    @torch.no_grad()
    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> [indices [B, (H/4) * (W/4)]], row-major."""
        _check_image(img)
        _, _, indices = self.quantize.quantize(self.encoder(img))
        return [indices.view(img.shape[0], -1)]

    def idxBl_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """[indices [B, L]] -> codebook embeddings [B, L, embedding_dim]."""
        if not isinstance(idx_list, (list, tuple)) or len(idx_list) != 1:
            raise ValueError(f"idx_list must be a list with one [B, L] index tensor, got {type(idx_list).__name__}")
        return self.quantize.embedding(idx_list[0])

    @torch.no_grad()
    def idxBl_to_img(self, idx_list: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Decode an index map of h x w tokens to images [B, 3, 4h, 4w]."""
        emb = self.idxBl_to_var_input(idx_list)
        return self.decoder(emb.view(emb.shape[0], h, w, -1).permute(0, 3, 1, 2))


class ImprovedVQVAE(nn.Module):
    """Seed 002: ``ResidualVectorQuantizer(num_quantizers, vocab_size, embedding_dim)``.

    forward(img) -> (decoded, total vq_loss, [indices [B * h * w] per stage]).
    """

    def __init__(self, num_quantizers: int = 2, vocab_size: int = 16, embedding_dim: int = 64, hidden_dim: int = 128):
        super().__init__()
        _check_positive_int("num_quantizers", num_quantizers)
        _check_positive_int("vocab_size", vocab_size)
        _check_positive_int("embedding_dim", embedding_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.num_quantizers = num_quantizers
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.hidden_dim = hidden_dim
        self.encoder = _encoder(hidden_dim, embedding_dim)
        self.quantize = ResidualVectorQuantizer(num_quantizers, vocab_size, embedding_dim)
        self.decoder = _decoder(hidden_dim, embedding_dim)

    def forward(self, img: torch.Tensor):
        _check_image(img)
        quantized, loss, indices = self.quantize(self.encoder(img))
        return self.decoder(quantized), loss, indices

    @torch.no_grad()
    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> one [B, (H/4) * (W/4)] index map per residual stage."""
        _check_image(img)
        _, _, indices = self.quantize(self.encoder(img))
        return [idx.view(img.shape[0], -1) for idx in indices]

    def idxBl_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """One [B, L] index map per stage -> summed stage codewords [B, L, embedding_dim]."""
        if not isinstance(idx_list, (list, tuple)) or len(idx_list) != self.num_quantizers:
            raise ValueError(f"idx_list must be a list of {self.num_quantizers} [B, L] index tensors (one per stage)")
        return sum(q.embedding(idx) for q, idx in zip(self.quantize.quantizers, idx_list))

    @torch.no_grad()
    def idxBl_to_img(self, idx_list: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
        emb = self.idxBl_to_var_input(idx_list)
        return self.decoder(emb.view(emb.shape[0], h, w, -1).permute(0, 3, 1, 2))
