"""The VQGAN-class encoder and decoder (`--arch vqgan`): the family of taming-transformers' VQGAN and
LlamaGen's VQ-8/VQ-16 tokenizers, for real photographs at 256px.

    encoder: conv_in -> levels (res blocks [+ attention at the lowest level], downsample between
             levels) -> mid (res block, attention, res block) -> GroupNorm, SiLU, conv_out
    decoder: conv_in -> mid -> levels from the lowest resolution up (res_blocks + 1 res blocks
             [+ attention at the lowest level], upsample between levels) -> GroupNorm, SiLU, conv_out

Level i has `width * channel_mult[i]` channels; the resolution halves between levels, so the
downsampling is 2^(levels - 1) (channel_mult 1,1,2,2,4 -> 16). Every norm is GroupNorm(32 groups,
eps 1e-6) and every nonlinearity SiLU. The quantizer (models/vqvae.py) sits between them, behind 1x1
projections into and out of the code space (the quantizer's proj_in / proj_out).

The layer arithmetic is exactly that of the published models, so their weights import
(models/checkpoint_import.py): Downsample pads right and bottom by one then applies a stride-2 3x3
convolution; Upsample is nearest-neighbour x2 then a 3x3 convolution; attention is single-head over
the h*w positions with scale C^-1/2 (torch's scaled_dot_product_attention), q, k, v from one 1x1
convolution; a residual block whose channels change has a 1x1 shortcut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_GROUPS = 32


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """x + proj(softmax(q k^T / sqrt(C)) v) over the h*w positions, one head."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2)  # (B, 3, hw, C)
        out = F.scaled_dot_product_attention(qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3])  # (B, 1, hw, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention when `attention`."""

    def __init__(self, c_in: int, c_out: int, blocks: int, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(blocks))
        self.attn = nn.ModuleList(Attention(c_out) for _ in range(blocks)) if attention else nn.ModuleList()

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block1, self.attn, self.block2 = ResnetBlock(ch, ch), Attention(ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block2(self.attn(self.block1(x)))


def level_widths(width: int, channel_mult: list[int]) -> list[int]:
    return [width * m for m in channel_mult]


class VQGANEncoder(nn.Module):
    """(B, C, S, S) -> (B, z_channels, S / 2^(L-1), S / 2^(L-1))."""

    def __init__(self, *, channels: int, width: int, channel_mult: list[int], res_blocks: int, z_channels: int):
        super().__init__()
        w = level_widths(width, channel_mult)
        last = len(w) - 1
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.levels = nn.ModuleList(
            Level(width if i == 0 else w[i - 1], w[i], res_blocks, attention=i == last) for i in range(len(w)))
        self.down = nn.ModuleList(Downsample(c) for c in w[:-1])
        self.mid = Mid(w[-1])
        self.norm_out = norm(w[-1])
        self.conv_out = nn.Conv2d(w[-1], z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.down):
                h = self.down[i](h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQGANDecoder(nn.Module):
    """(B, z_channels, g, g) -> (B, C, g * 2^(L-1), ...). levels[0] is the lowest resolution."""

    def __init__(self, *, channels: int, width: int, channel_mult: list[int], res_blocks: int, z_channels: int):
        super().__init__()
        w = level_widths(width, channel_mult)[::-1]  # lowest resolution first
        self.conv_in = nn.Conv2d(z_channels, w[0], 3, padding=1)
        self.mid = Mid(w[0])
        self.levels = nn.ModuleList(
            Level(w[0] if i == 0 else w[i - 1], w[i], res_blocks + 1, attention=i == 0) for i in range(len(w)))
        self.up = nn.ModuleList(Upsample(c) for c in w[:-1])
        self.norm_out = norm(w[-1])
        self.conv_out = nn.Conv2d(w[-1], channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.up):
                h = self.up[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))
