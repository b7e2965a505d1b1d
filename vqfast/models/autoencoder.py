"""The convolutional encoder and decoder of VAR's VQVAE (the latent-diffusion vq-f16 network).

With the defaults they are VAR's, module for module (so state_dict keys and shapes match VAR's
checkpoints): ``ch_mult=(1, 1, 2, 2, 4)`` (16x downsampling), two residual blocks per level in the
encoder and three in the decoder, single-head self-attention after every block of the lowest level
and in the middle, GroupNorm with 32 groups (eps 1e-6), SiLU.

    Encoder: [B, 3, H, W] -> [B, z_channels, H / 2^(L-1), W / 2^(L-1)]     (L = len(ch_mult))
    Decoder: [B, z_channels, h, w] -> [B, 3, h * 2^(L-1), w * 2^(L-1)]

The keyword arguments after ``*`` (fewer levels, residual blocks or norm groups, attention off)
build a smaller network of the same design for CPUs; attention off leaves no parameters behind.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VAR_CH_MULT = (1, 1, 2, 2, 4)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))); a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        # VAR keeps no Dropout module at p <= 1e-6 (it has no parameters either way).
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h * w positions, one fused 1x1 ``qkv`` conv, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.scale = channels ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each [B, C, HW]
        # The same products in the same order as VAR (q^T k, then v w^T on contiguous operands), so a
        # VAR checkpoint gives the same features to the last bit on the same machine.
        w = torch.bmm(q.transpose(1, 2).contiguous(), k.contiguous()).mul_(self.scale)  # [B, HW_q, HW_k]
        w = F.softmax(w, dim=2)
        h = torch.bmm(v.contiguous(), w.transpose(1, 2).contiguous())  # [B, C, HW_q]
        return x + self.proj_out(h.view(B, C, H, W))


class Downsample2x(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv: [B, C, H, W] -> [B, C, H / 2, W / 2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    """Nearest 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` (ResnetBlocks), ``attn`` (one per block at the lowest level, else
    empty) and, except at the last level visited, ``downsample`` or ``upsample``."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool, dropout: float, groups: int):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(blocks):
            self.block.append(ResnetBlock(c_in, c_out, dropout, groups))
            c_in = c_out
            if attention:
                self.attn.append(AttnBlock(c_out, groups))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int, attention: bool, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, z_channels, H / 2^(L-1), W / 2^(L-1)], L = len(ch_mult)."""

    def __init__(self, *, ch: int = 128, ch_mult: tuple[int, ...] = VAR_CH_MULT, num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int = 32, using_sa: bool = True,
                 using_mid_sa: bool = True, norm_groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            level = _Level(c, ch * m, num_res_blocks, using_sa and last, dropout, norm_groups)
            c = ch * m
            if not last:
                level.downsample = Downsample2x(c)
            self.down.append(level)
        self.mid = _Middle(c, using_mid_sa, dropout, norm_groups)
        self.norm_out = _norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, out_channels, h * 2^(L-1), w * 2^(L-1)]; ``up[i]`` is the level
    at the resolution of the encoder's ``down[i]`` (VAR's order), run from the last to the first."""

    def __init__(self, *, ch: int = 128, ch_mult: tuple[int, ...] = VAR_CH_MULT, num_res_blocks: int = 2,
                 dropout: float = 0.0, out_channels: int = 3, z_channels: int = 32, using_sa: bool = True,
                 using_mid_sa: bool = True, norm_groups: int = 32):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Middle(c, using_mid_sa, dropout, norm_groups)
        levels = []
        for i in reversed(range(len(ch_mult))):
            level = _Level(c, ch * ch_mult[i], num_res_blocks + 1, using_sa and i == len(ch_mult) - 1, dropout,
                           norm_groups)
            c = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample2x(c)
            levels.append(level)
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
