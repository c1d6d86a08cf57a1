"""The VQ-VAE: CNN encoder -> vector quantizer -> CNN decoder.

Read top to bottom: the config, the residual block, the encoder, the decoder, the model.
Channel widths grow as resolution falls: `width` channels at the token grid, half that one
resolution up, and so on (never below 16), so compute stays where the grid is small.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import QuantizerOutput, VectorQuantizer


@dataclass(kw_only=True)
class VQVAEConfig:
    image_size: int = 28
    channels: int = 1  # 1 grayscale, 3 RGB
    downsample: int = 4  # token grid = image_size / downsample per side; 4, 8 or 16
    width: int = 80  # channels at the token grid
    res_blocks: int = 2  # residual blocks at the token grid, in the encoder and in the decoder
    codebook_size: int = 512  # K
    code_dim: int = 64  # encoder output dimension
    codebook_dim: int | None = 16  # low-dimensional codes behind a projection (None: code_dim)
    l2_normalize: bool = True  # l2-normalised codes: with codebook_dim, lifts codebook perplexity
    beta: float = 0.25  # commitment weight
    codebook: str = "ema"  # "ema" or "gradient"
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    kmeans_init: bool = True
    random_init: str = "normal"  # without kmeans_init: "normal" N(0, 1) or "uniform" U(-1/K, 1/K) (the original VQ-VAE)
    restart_window: int = 100  # steps; codes unused that long are restarted (0: never)

    def __post_init__(self):
        if self.downsample not in (4, 8, 16):
            raise ValueError(f"downsample={self.downsample}: use 4, 8 or 16")
        if self.image_size % self.downsample:
            s, d = self.image_size, self.downsample
            raise ValueError(
                f"image_size={s} is not divisible by downsample={d}: pick an image size that is a "
                f"multiple of {d} (e.g. {max(d, s // d * d)} or {(s // d + 1) * d})"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}: use 1 (grayscale) or 3 (RGB)")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size}: a codebook needs at least 2 codes (e.g. 512)")
        if self.random_init not in ("normal", "uniform"):
            raise ValueError(f"random_init={self.random_init!r}: use 'normal' or 'uniform'")
        if self.codebook not in ("ema", "gradient"):
            raise ValueError(f"codebook={self.codebook!r}: use 'ema' or 'gradient'")
        for name in ("width", "code_dim", "res_blocks"):
            if getattr(self, name) < (0 if name == "res_blocks" else 1):
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), the VQ-VAE paper's block."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _stage_widths(cfg: VQVAEConfig) -> list[int]:
    n = int(math.log2(cfg.downsample))
    return [max(16, cfg.width >> (n - i)) for i in range(n + 1)]  # full res ... token grid


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        w = _stage_widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, w[0], 3, padding=1)]  # (B, w0, S, S)
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.ReLU(), nn.Conv2d(a, b, 4, stride=2, padding=1)]  # halve the resolution
        layers += [ResBlock(w[-1]) for _ in range(cfg.res_blocks)]  # (B, width, g, g)
        layers += [nn.ReLU(), nn.Conv2d(w[-1], cfg.code_dim, 1)]  # (B, code_dim, g, g)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        w = _stage_widths(cfg)[::-1]  # token grid ... full res
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, w[0], 3, padding=1)]  # (B, width, g, g)
        layers += [ResBlock(w[0]) for _ in range(cfg.res_blocks)]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.ReLU(), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]  # double it
        layers += [nn.ReLU(), nn.Conv2d(w[-1], cfg.channels, 3, padding=1)]  # (B, C, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(
            codebook_size=cfg.codebook_size,
            dim=cfg.code_dim,
            codebook_dim=cfg.codebook_dim,
            l2_normalize=cfg.l2_normalize,
            beta=cfg.beta,
            ema=cfg.codebook == "ema",
            decay=cfg.ema_decay,
            eps=cfg.ema_eps,
            kmeans_init=cfg.kmeans_init,
            random_init=cfg.random_init,
            restart_window=cfg.restart_window,
        )
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """x (B, C, S, S) in [-1, 1] -> reconstruction (B, C, S, S), quantizer output."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> token grid (B, g, g) int64."""
        return self.quantizer(self.encoder(x)).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """token grid (B, g, g) -> (B, C, S, S) in [-1, 1] (not clamped)."""
        return self.decoder(self.quantizer.lookup(indices))

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights a tokenizer needs (codebook included), without the training statistics."""
        skip = tuple(f"quantizer.{b}" for b in VectorQuantizer.TRAINING_BUFFERS)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}
