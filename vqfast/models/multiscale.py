"""VAR's multi-scale residual tokenizer (Tian et al. 2024), searched with vqfast.nearest_codeword.

An encoder maps an image [B, 3, H, W] to f [B, Cvae, h, w] (h = H / 2^(len(ch_mult) - 1)). f is
tokenised into one index map per scale p in patch_nums, coarse to fine, over one shared codebook:

    rest = f, f_hat = 0
    for each scale s (side p):
        idx_s = nearest_codeword(area_down(rest, p))            [B, p * p]
        h = phi_s(bicubic_up(embed(idx_s), h, w))
        f_hat += h; rest -= h

phi(x) = (1 - r) x + r conv3x3(x); ``num_phi`` convolutions are shared across the scales, scale s
using the one whose tick in linspace(1/(3 n), 1 - 1/(3 n), n) is nearest to s / (S - 1) (for ten
scales and four convs: 0,0,1,1,1,2,2,3,3,3). The loss is the mean over scales of
mse(f_hat, f.detach()) + beta * mse(f_hat.detach(), f); the decoder sees the straight-through
f_hat.detach() - f.detach() + f.

Default: 256 x 256 input, 16x downsampling, patch_nums (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) = 680
tokens, vocabulary 4096, Cvae 32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast.ops import nearest_codeword

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _groups(channels: int) -> int:
    # GroupNorm with up to 32 groups (VAR's choice) that divide the channel count.
    return math.gcd(32, channels)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(c_in), c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(_groups(c_out), c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class _Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], Cvae: int, in_channels: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        c = ch
        for i, m in enumerate(ch_mult):
            layers.append(_ResBlock(c, ch * m))
            c = ch * m
            if i < len(ch_mult) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))
        layers += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, Cvae, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], Cvae: int, out_channels: int):
        super().__init__()
        c = ch * ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(Cvae, c, 3, padding=1)]
        for i, m in reversed(list(enumerate(ch_mult))):
            layers.append(_ResBlock(c, ch * m))
            c = ch * m
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Phi(nn.Conv2d):
    """phi(x) = (1 - r) x + r conv3x3(x), Cvae -> Cvae; r = 0 makes it the identity."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = float(resi_ratio)

    def forward(self, x):
        if self.resi_ratio == 0.0:
            return x
        return x * (1 - self.resi_ratio) + super().forward(x) * self.resi_ratio


def phi_index_per_scale(num_scales: int, num_phi: int) -> list[int]:
    """Which of ``num_phi`` shared convolutions each scale uses (nearest tick to s / (S - 1))."""
    if num_phi == 1 or num_scales == 1:
        return [0] * num_scales
    ticks = torch.linspace(1 / (3 * num_phi), 1 - 1 / (3 * num_phi), num_phi, dtype=torch.float64)
    return [int((ticks - s / (num_scales - 1)).abs().argmin()) for s in range(num_scales)]


class MultiScaleVQVAE(nn.Module):
    """VAR-style tokenizer: ``patch_nums`` scales over one codebook of ``vocab_size`` x ``Cvae``.

    img_to_idxBl(img)            -> [idx_s [B, p_s^2] for each scale]
    idxBl_to_var_input(idx_list) -> [B, L - 1, Cvae], teacher-forcing input (L = sum p_s^2)
    idxBl_to_fhat(idx_list)      -> f_hat [B, Cvae, h, w]
    idxBl_to_img(idx_list)       -> decoded images [B, 3, H, W] in [-1, 1]
    img_to_reconstruction(img)   -> decode(encode(img))
    forward(img)                 -> (reconstruction [B, 3, H, W], vq_loss, idx_list)
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        Cvae: int = 32,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        patch_nums: tuple[int, ...] = VAR_PATCH_NUMS,
        image_size: int = 256,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        num_phi: int = 4,
        *,
        backend: str = "auto",
        precision: str = "exact",
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("Cvae", Cvae), ("ch", ch), ("image_size", image_size),
                            ("num_phi", num_phi)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        ch_mult = tuple(ch_mult)
        patch_nums = tuple(patch_nums)
        if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        down = 2 ** (len(ch_mult) - 1)
        if image_size % down:
            raise ValueError(f"image_size={image_size} must be a multiple of the downsampling factor {down}")
        side = image_size // down
        if (not patch_nums or any(not isinstance(p, int) or p < 1 for p in patch_nums)
                or list(patch_nums) != sorted(set(patch_nums)) or patch_nums[-1] != side):
            raise ValueError(
                f"patch_nums must be strictly increasing positive ints ending at the latent side "
                f"image_size / {down} = {side}, got {patch_nums!r}"
            )
        if not 0.0 <= quant_resi <= 1.0:
            raise ValueError(f"quant_resi must be in [0, 1], got {quant_resi!r}")
        self.vocab_size, self.Cvae, self.ch, self.ch_mult = vocab_size, Cvae, ch, ch_mult
        self.patch_nums, self.image_size, self.beta = patch_nums, image_size, float(beta)
        self.quant_resi, self.num_phi = float(quant_resi), min(num_phi, len(patch_nums))
        self.backend, self.precision = backend, precision
        self.latent_side = side
        self.encoder = _Encoder(ch, ch_mult, Cvae, 3)
        self.decoder = _Decoder(ch, ch_mult, Cvae, 3)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.embedding.weight.data.uniform_(-1 / vocab_size, 1 / vocab_size)
        self.phis = nn.ModuleList([Phi(Cvae, quant_resi) for _ in range(self.num_phi)])
        self.phi_of_scale = phi_index_per_scale(len(patch_nums), self.num_phi)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, Cvae={self.Cvae}, patch_nums={self.patch_nums}, "
                f"image_size={self.image_size}, tokens={self.num_tokens}, num_phi={self.num_phi}")

    # ---- helpers -----------------------------------------------------------------------------
    def _check_img(self, img) -> None:
        if not isinstance(img, torch.Tensor):
            raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
        if not img.is_floating_point():
            raise TypeError(f"img must be a floating-point tensor, got {img.dtype}; convert it with img.float() / 255")
        if img.dim() != 4 or img.shape[1] != 3 or tuple(img.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"img must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(img.shape)}")

    def _check_idx_list(self, idx_list, count: int) -> int:
        if not isinstance(idx_list, (list, tuple)) or len(idx_list) < count:
            raise ValueError(f"idx_list must be a list of at least {count} index tensors, one per scale")
        batch = idx_list[0].shape[0]
        for s in range(count):
            p = self.patch_nums[s]
            if not isinstance(idx_list[s], torch.Tensor) or tuple(idx_list[s].shape) != (batch, p * p):
                raise ValueError(f"idx_list[{s}] must be a [B={batch}, {p * p}] tensor (scale {p}x{p})")
        return batch

    def _up(self, h: torch.Tensor) -> torch.Tensor:
        side = self.latent_side
        return h if h.shape[-1] == side else F.interpolate(h, size=(side, side), mode="bicubic")

    @staticmethod
    def _down(x: torch.Tensor, p: int) -> torch.Tensor:
        return x if x.shape[-1] == p else F.interpolate(x, size=(p, p), mode="area")

    def _scale_embedding(self, idx: torch.Tensor, s: int) -> torch.Tensor:
        """idx [B, p*p] at scale s -> phi_s(bicubic_up(embed(idx))) [B, Cvae, h, w]."""
        p = self.patch_nums[s]
        h = self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.Cvae, p, p)
        return self.phis[self.phi_of_scale[s]](self._up(h))

    # ---- quantisation ------------------------------------------------------------------------
    def quantize(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """f [B, Cvae, h, w] -> (straight-through f_hat, vq_loss, idx_list)."""
        B = f.shape[0]
        f_no_grad = f.detach()
        rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_no_grad)
        loss = f.new_zeros(())
        idx_list = []
        for s, p in enumerate(self.patch_nums):
            z = self._down(rest, p).permute(0, 2, 3, 1).reshape(-1, self.Cvae)
            idx, _, _ = nearest_codeword(z, self.embedding.weight.detach(), precision=self.precision,
                                         backend=self.backend)
            idx = idx.view(B, p * p)
            h = self._scale_embedding(idx, s)
            f_hat = f_hat + h
            rest = rest - h.detach()
            loss = loss + F.mse_loss(f_hat, f_no_grad) + self.beta * F.mse_loss(f_hat.detach(), f)
            idx_list.append(idx)
        loss = loss / len(self.patch_nums)
        return f_hat.detach() - f_no_grad + f, loss, idx_list

    def forward(self, img: torch.Tensor):
        self._check_img(img)
        f_hat, loss, idx_list = self.quantize(self.encoder(img))
        return self.decoder(f_hat), loss, idx_list

    # ---- tokens ------------------------------------------------------------------------------
    @torch.no_grad()
    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        self._check_img(img)
        return self.quantize(self.encoder(img))[2]

    def idxBl_to_fhat(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """All S index maps -> f_hat [B, Cvae, h, w] (the encoder's final f_hat)."""
        batch = self._check_idx_list(idx_list, len(self.patch_nums))
        side = self.latent_side
        f_hat = self.embedding.weight.new_zeros(batch, self.Cvae, side, side)
        for s in range(len(self.patch_nums)):
            f_hat = f_hat + self._scale_embedding(idx_list[s], s)
        return f_hat

    def idxBl_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Index maps of scales 0..S-2 -> [B, L - 1, Cvae]: after each scale s, f_hat area-downsampled
        to patch_nums[s + 1] and flattened row-major (the next scale's teacher-forcing input)."""
        S = len(self.patch_nums)
        batch = self._check_idx_list(idx_list, S - 1)
        side = self.latent_side
        f_hat = self.embedding.weight.new_zeros(batch, self.Cvae, side, side)
        out = []
        for s in range(S - 1):
            f_hat = f_hat + self._scale_embedding(idx_list[s], s)
            out.append(self._down(f_hat, self.patch_nums[s + 1]).flatten(2).transpose(1, 2))
        if not out:
            return f_hat.new_zeros(batch, 0, self.Cvae)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def idxBl_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.idxBl_to_fhat(idx_list)).clamp(-1, 1)

    @torch.no_grad()
    def img_to_reconstruction(self, img: torch.Tensor) -> torch.Tensor:
        return self.idxBl_to_img(self.img_to_idxBl(img))
