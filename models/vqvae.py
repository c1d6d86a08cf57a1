"""The VQ-VAE: encoder -> vector quantizer -> decoder.

Read top to bottom: the config (and the presets), the small CNN's residual block, encoder and
decoder (`arch="conv"`), the quantizer (with its losses and stop-gradients), the model. The
VQGAN-class encoder and decoder (`arch="vqgan"`) live in models/vqgan.py; the quantizer is the same.

conv: channel widths grow as resolution falls: `width` channels at the token grid, half that one
resolution up, and so on (never below 16), so compute stays where the grid is small.

The vector quantizer: nearest code, straight-through gradients, codebook + commitment losses.

    z_e  = proj_in(encoder output)                      # (N, d) continuous vectors
    k*   = argmin_k ||z_e - e_k||^2                     # nearest code (kernels.nearest_code)
    q    = e_{k*}
    codebook_loss   = ||sg[z_e] - q||^2                 # gradient reaches the codebook only
    commitment_loss = ||z_e - sg[q]||^2                 # gradient reaches the encoder only
    loss = codebook_loss + beta * commitment_loss       # (EMA mode: the codebook term is replaced
                                                        #  by the EMA update below)
    z_q  = z_e + sg[q - z_e]                            # straight-through estimator

EMA codebook (default): N_k <- decay N_k + (1 - decay) n_k,  m_k <- decay m_k + (1 - decay) sum z_e,
e_k = m_k / N~_k with Laplace-smoothed counts N~_k. Codebook statistics (n_k, sums, the k-means
initialisation and the dead-code replacements) are made global through the Collectives the trainer
passes in (models/distributed.py): counts and sums are all-reduced, random draws are taken on
rank 0 and broadcast, so every replica holds the same codebook.

All quantizer arithmetic runs in fp32, even under autocast.
"""
from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import nearest_code
from .config import Config, ConfigError, option
from .distributed import SINGLE_PROCESS, Collectives
from .vqgan import NORM_GROUPS, VQGANDecoder, VQGANEncoder

# Published shapes, as VQVAEConfig values; options given with a preset override them.
_LLAMAGEN = dict(arch="vqgan", image_size=256, channels=3, width=128, res_blocks=2, code_dim=256,
                 codebook_size=16384, codebook_dim=8, l2_normalize=True)
PRESETS: dict[str, dict] = {
    "llamagen-vq16": _LLAMAGEN | {"channel_mult": [1, 1, 2, 2, 4]},  # 16x16 tokens at 256px
    "llamagen-vq8": _LLAMAGEN | {"channel_mult": [1, 2, 2, 4]},  # 32x32 tokens at 256px
}
# k-means initialisation waits until the first batches hold this many encoder vectors per code
KMEANS_POINTS_PER_CODE = 4
# k-means++ seeding: one D^2 draw at a time up to this many codes, in SEEDING_ROUNDS rounds above
SEQUENTIAL_SEEDING_MAX = 4096
SEEDING_ROUNDS = 256


ARCHS = ("conv", "vqgan")
# vqgan's default per-level channel multipliers for a given downsampling (LlamaGen's VQ-16 and VQ-8)
VQGAN_CHANNEL_MULT = {4: [1, 2, 4], 8: [1, 2, 2, 4], 16: [1, 1, 2, 2, 4]}
DEFAULT_WIDTH = {"conv": 80, "vqgan": 128}
_PRESET_BUILD = contextvars.ContextVar("vqtok_preset_build", default=False)


@dataclass(kw_only=True)
class VQVAEConfig(Config):
    WHAT = "model"
    preset: str | None = option(None, "start from a published shape: " + ", ".join(PRESETS) +
                                      " (options given with it override its values)")
    arch: str = option("conv", "conv (small CNN, for 28-64px images) or vqgan (ResNet+GroupNorm+attention, "
                               "taming/LlamaGen family, for photographs)")
    image_size: int = option(28, "images are resized and center-cropped to this square")
    channels: int = option(1, "1 grayscale or 3 RGB")
    downsample: int | None = option(None, "token grid = image-size / downsample per side; conv: 4, 8 or 16 "
                                          "(default 4); vqgan: 2^(levels-1) of --channel-mult (default 16)")
    channel_mult: list[int] | None = option(None, "vqgan: channel multiplier per resolution level, e.g. 1,1,2,2,4 "
                                                  "(default from --downsample: 4 -> 1,2,4; 8 -> 1,2,2,4; 16 -> 1,1,2,2,4)")
    width: int | None = option(None, "conv: channels at the token grid (default 80); vqgan: channels at full "
                                     "resolution, times --channel-mult per level (default 128)")
    res_blocks: int = option(2, "residual blocks per resolution level (conv: at the token grid), in the encoder "
                                "(the vqgan decoder has one more per level)")
    codebook_size: int = option(512, "K, the number of codes")
    code_dim: int = option(64, "encoder output channels (vqgan: z-channels)", aliases=("--z-channels",))
    codebook_dim: int | None = option(16, "dimension of the codes behind a projection (0 or none: code-dim; "
                                          "vqgan always has the 1x1 projections)")
    l2_normalize: bool = option(True, "l2-normalised codes (with a small codebook-dim, lifts codebook perplexity)")
    beta: float = option(0.25, "commitment loss weight")
    codebook: str = option("ema", "ema (codebook = moving average of its vectors) or gradient (codebook loss)")
    ema_decay: float = option(0.99, "EMA decay of the codebook statistics")
    ema_eps: float = option(1e-5, "Laplace smoothing of the EMA counts")
    kmeans_init: bool = option(True, "k-means++ as the starting codebook (on the first batches: at least "
                                     f"{KMEANS_POINTS_PER_CODE} vectors per code are gathered first)")
    random_init: str = option("normal", "starting codebook without k-means init: normal N(0,1) or uniform "
                                        "U(-1/K,1/K) (the original VQ-VAE's)")
    restart_window: int = option(100, "restart codes unused for this many steps (0: never)")

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> "VQVAEConfig":
        """A mapping of options; with "preset", the preset's values first, the mapping's on top."""
        if isinstance(d, dict) and d.get("preset") is not None:
            name = d["preset"]
            if name not in PRESETS:
                raise ConfigError(f"{where or cls.WHAT}: preset {name!r} is unknown; known: {sorted(PRESETS)}")
            d = PRESETS[name] | d
            token = _PRESET_BUILD.set(True)
            try:
                return super().from_dict(d, where)
            finally:
                _PRESET_BUILD.reset(token)
        return super().from_dict(d, where)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQVAEConfig":
        """VQVAEConfig.from_preset("llamagen-vq8", image_size=64): the preset with these values on top."""
        return cls.from_dict({"preset": name, **overrides})

    def __post_init__(self):
        if self.preset is not None and not _PRESET_BUILD.get():
            raise ConfigError(f"VQVAEConfig(preset={self.preset!r}, ...) cannot tell the values you gave from "
                              f"defaults: use VQVAEConfig.from_preset({self.preset!r}, image_size=..., ...)")
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.codebook_dim == 0:
            self.codebook_dim = None
        if self.width is None:
            self.width = DEFAULT_WIDTH[self.arch]
        if self.arch == "conv":
            self._resolve_conv()
        else:
            self._resolve_vqgan()
        if self.image_size % self.downsample:
            s, d = self.image_size, self.downsample
            raise ConfigError(
                f"image_size={s} is not divisible by downsample={d}: pick an image size that is a "
                f"multiple of {d} (e.g. {max(d, s // d * d)} or {(s // d + 1) * d})"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels}: use 1 (grayscale) or 3 (RGB)")
        if self.codebook_size < 2:
            raise ConfigError(f"codebook_size={self.codebook_size}: a codebook needs at least 2 codes (e.g. 512)")
        if self.random_init not in ("normal", "uniform"):
            raise ConfigError(f"random_init={self.random_init!r}: use 'normal' or 'uniform'")
        if self.codebook not in ("ema", "gradient"):
            raise ConfigError(f"codebook={self.codebook!r}: use 'ema' or 'gradient'")
        for name in ("width", "code_dim", "res_blocks"):
            if getattr(self, name) < (0 if name == "res_blocks" else 1):
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    def _resolve_conv(self) -> None:
        if self.channel_mult is not None:
            raise ConfigError(f"channel_mult={self.channel_mult}: only --arch vqgan has per-level channel "
                              f"multipliers (conv's widths follow --width); drop it or use --arch vqgan")
        self.downsample = 4 if self.downsample is None else self.downsample
        if self.downsample not in (4, 8, 16):
            raise ConfigError(f"downsample={self.downsample}: use 4, 8 or 16")

    def _resolve_vqgan(self) -> None:
        if self.channel_mult is None:
            ds = 16 if self.downsample is None else self.downsample
            if ds not in VQGAN_CHANNEL_MULT:
                raise ConfigError(f"downsample={ds}: give --channel-mult (its levels set the downsampling, "
                                  f"2^(levels-1)) or use one of {sorted(VQGAN_CHANNEL_MULT)}")
            self.channel_mult = list(VQGAN_CHANNEL_MULT[ds])
        self.channel_mult = parse_int_list(self.channel_mult, "channel_mult")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult={self.channel_mult}: give one positive multiplier per level, e.g. 1,1,2,2,4")
        ds = 2 ** (len(self.channel_mult) - 1)
        if self.downsample is not None and self.downsample != ds:
            raise ConfigError(f"downsample={self.downsample} but channel_mult={self.channel_mult} has "
                              f"{len(self.channel_mult)} levels, which downsample by {ds}: drop --downsample "
                              f"or give {int(math.log2(self.downsample)) + 1} multipliers")
        self.downsample = ds
        bad = [self.width * m for m in self.channel_mult if (self.width * m) % NORM_GROUPS]
        if bad:
            raise ConfigError(f"width={self.width} with channel_mult={self.channel_mult} gives {bad} channels, "
                              f"not a multiple of GroupNorm's {NORM_GROUPS} groups: use a width that is a "
                              f"multiple of {NORM_GROUPS} (e.g. {max(NORM_GROUPS, self.width // NORM_GROUPS * NORM_GROUPS)})")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


def parse_int_list(value, name: str) -> list[int]:
    """[1, 1, 2], "1,1,2" or ["1,1", "2"] (repeated/comma-separated flags) -> [1, 1, 2]."""
    out = []
    for item in [value] if isinstance(value, str) else value:
        parts = item.split(",") if isinstance(item, str) else [item]
        for part in parts:
            try:
                out.append(int(part))
            except (TypeError, ValueError):
                raise ConfigError(f"{name}={value!r}: expected integers, e.g. 1,1,2,2,4") from None
    return out


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


# ---------------------------------------------------------------------------------------------
# The vector quantizer
# ---------------------------------------------------------------------------------------------
def stop_gradient(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def straight_through(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Forward value of tgt, gradient of src (identity)."""
    return src + stop_gradient(tgt - src)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, h, w) straight-through output, to the decoder
    indices: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # scalar: what the quantizer adds to the training loss
    codebook_loss: torch.Tensor  # scalar ||sg[z_e] - q||^2
    commitment_loss: torch.Tensor  # scalar ||z_e - sg[q]||^2
    perplexity: torch.Tensor  # scalar, this batch


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        *,
        codebook_size: int,
        dim: int,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        random_init: str = "normal",
        kmeans_iters: int = 10,
        restart_window: int = 100,
        project: bool = False,
        comm: Collectives = SINGLE_PROCESS,
    ):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size}: a codebook needs at least 2 codes")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay}: must be in (0, 1), e.g. 0.99")
        if restart_window < 0:
            raise ValueError(f"restart_window={restart_window}: use 0 to disable dead-code restarts")
        d = codebook_dim or dim
        self.codebook_size, self.dim, self.code_dim = codebook_size, dim, d
        self.l2_normalize, self.beta, self.ema = l2_normalize, beta, ema
        self.decay, self.eps = decay, eps
        self.kmeans_iters, self.restart_window = kmeans_iters, restart_window
        # Under data parallelism the codebook statistics are summed over ranks and random draws
        # come from rank 0 (both through `comm`), so every replica holds the same codebook.
        self.comm = comm
        # Low-dimensional codes live behind a projection (in and out of the code space): a linear
        # map per vector, i.e. a 1x1 convolution (VQGAN's quant_conv / post_quant_conv).
        project = project or d != dim
        self.proj_in = nn.Linear(dim, d) if project else nn.Identity()
        self.proj_out = nn.Linear(d, dim) if project else nn.Identity()

        # the starting codebook, replaced by k-means on the first batch when kmeans_init;
        # "uniform" is the original VQ-VAE's U(-1/K, 1/K)
        if random_init == "uniform":
            embed = torch.empty(codebook_size, d).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        else:
            embed = torch.randn(codebook_size, d)
        if l2_normalize:
            embed = F.normalize(embed, dim=-1)
        if ema:
            self.register_buffer("codebook", embed)
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", embed.clone())
        else:
            self.codebook = nn.Parameter(embed)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        # k-means waits for KMEANS_POINTS_PER_CODE * K encoder vectors: batches before that are kept
        # here (a buffer, so a checkpoint taken while gathering resumes exactly); emptied after.
        self.kmeans_target = KMEANS_POINTS_PER_CODE * codebook_size if kmeans_init else 0
        self.register_buffer("kmeans_points", torch.zeros(self.kmeans_target, d))
        self.register_buffer("kmeans_filled", torch.tensor(0, dtype=torch.int64))
        # Per-step code counts over the last `restart_window` steps (a ring), for usage and restarts.
        self.register_buffer("usage_ring", torch.zeros(max(restart_window, 1), codebook_size))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    TRAINING_BUFFERS = ("ema_count", "ema_sum", "initialized", "usage_ring", "steps", "kmeans_points", "kmeans_filled")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the k-means buffer is emptied once the codebook is initialised, and checkpoints written
        # before it existed lack it: take the saved shape, or start empty
        key = prefix + "kmeans_points"
        state_dict.setdefault(key, self.kmeans_points.new_zeros(0, self.code_dim))
        state_dict.setdefault(prefix + "kmeans_filled", torch.tensor(0, dtype=torch.int64))
        self.kmeans_points = self.kmeans_points.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            b, c, h, w = z.shape
            z_e = self._code_space(z)  # (N, d), N = B*h*w
            initialized = bool(self.initialized)  # one host sync per step (CUDA)
            if self.training and not initialized:
                self._gather_and_init(stop_gradient(z_e))
                initialized = bool(self.initialized)

            idx = nearest_code(stop_gradient(z_e), self.codebook)  # (N,)
            q = F.embedding(idx, self.codebook)  # (N, d)

            codebook_loss = F.mse_loss(q, stop_gradient(z_e))
            commitment_loss = F.mse_loss(z_e, stop_gradient(q))
            loss = self.beta * commitment_loss
            if not self.ema:
                loss = loss + codebook_loss

            counts = torch.bincount(idx, minlength=self.codebook_size).float()
            if self.training and initialized:
                self._update_codebook(stop_gradient(z_e), idx, counts)

            z_q = self.proj_out(straight_through(z_e, q))  # (N, C)
            quantized = z_q.reshape(b, h, w, c).permute(0, 3, 1, 2)
            return QuantizerOutput(
                quantized=quantized,
                indices=idx.reshape(b, h, w),
                loss=loss,
                codebook_loss=codebook_loss,
                commitment_loss=commitment_loss,
                perplexity=perplexity(counts),
            )

    def _code_space(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, C, h, w) -> the vectors compared with the codes, (B*h*w, d) fp32."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N, C)
        z_e = self.proj_in(flat)  # (N, d)
        return F.normalize(z_e, dim=-1) if self.l2_normalize else z_e

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, C, h, w) -> nearest-code indices (B, h, w) int64: what tokens need and
        nothing else (no losses, code counts or projection back out; no host sync)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            b, _, h, w = z.shape
            return nearest_code(self._code_space(z), self.codebook).reshape(b, h, w)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_codebook(self, z_e: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.clone()
        if self.ema:
            sums = torch.zeros_like(self.codebook).index_add_(0, idx, z_e)  # (K, d)
            self.comm.all_reduce_sum(counts, sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            self._codebook_from_ema()
        else:
            self.comm.all_reduce_sum(counts)
        if self.restart_window:
            self.usage_ring[int(self.steps) % self.restart_window] = counts
            self.steps += 1
            if int(self.steps) % self.restart_window == 0:
                self.restart_dead_codes(z_e)
        else:
            self.usage_ring[0] = counts
            self.steps += 1

    def _codebook_from_ema(self) -> None:
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n  # Laplace
        codebook = self.ema_sum / smoothed[:, None]
        if self.l2_normalize:
            codebook = F.normalize(codebook, dim=-1)
        self.codebook.copy_(codebook)

    @torch.no_grad()
    def restart_dead_codes(self, z_e: torch.Tensor) -> int:
        """Codes unused over the whole window are re-seeded from recent encoder outputs (drawn on
        rank 0, broadcast) and their EMA statistics reset. Returns how many were restarted."""
        dead = self.usage_ring.sum(0) == 0  # identical on every rank: counts were all-reduced
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        new = z_e[torch.randint(0, z_e.shape[0], (n_dead,), device=z_e.device)].clone()
        self.comm.broadcast(new)
        self.codebook.data[dead] = new
        if self.ema:
            self.ema_sum[dead] = new
            self.ema_count[dead] = 1.0
        return n_dead

    @torch.no_grad()
    def _gather_and_init(self, z_e: torch.Tensor) -> None:
        """Keep this batch's vectors until every rank holds KMEANS_POINTS_PER_CODE * K of them (a
        first batch that large initialises at once), then k-means them into the codebook."""
        filled = int(self.kmeans_filled)
        points = torch.cat([self.kmeans_points[:filled], z_e]) if filled else z_e
        pending = torch.tensor([float(points.shape[0] < self.kmeans_target)], device=z_e.device)
        self.comm.all_reduce_sum(pending)  # ranks not ready yet (all must agree to initialise)
        if float(pending) == 0:
            self._kmeans_init(points)
            self.kmeans_points = self.kmeans_points.new_zeros(0, self.code_dim)
            self.kmeans_filled.fill_(0)
            return
        take = min(z_e.shape[0], self.kmeans_points.shape[0] - filled)
        self.kmeans_points[filled : filled + take] = z_e[:take]
        self.kmeans_filled.fill_(filled + take)

    @torch.no_grad()
    def _kmeans_init(self, z_e: torch.Tensor) -> None:
        """k-means on the first training batch (drawn on rank 0, broadcast to all ranks)."""
        centroids, sizes = kmeans(z_e, self.codebook_size, self.kmeans_iters, self.l2_normalize)
        self.comm.broadcast(centroids, sizes)
        self.codebook.data.copy_(centroids)
        if self.ema:
            self.ema_count.copy_(sizes.clamp_min(1.0))
            self.ema_sum.copy_(centroids * self.ema_count[:, None])
        self.initialized.fill_(True)

    # ------------------------------------------------------------------------------------------
    def usage(self) -> float:
        """Fraction of codes used at least once over the recent window of training steps."""
        filled = min(int(self.steps), self.usage_ring.shape[0])
        if filled == 0:
            return 0.0
        return float((self.usage_ring.sum(0) > 0).float().mean())

    @torch.no_grad()
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices (B, h, w) -> decoder input (B, C, h, w)."""
        b, h, w = indices.shape
        q = F.embedding(indices.reshape(-1), self.codebook)
        return self.proj_out(q).reshape(b, h, w, self.dim).permute(0, 3, 1, 2)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: K when codes are used uniformly, 1 when one code is."""
    p = counts / counts.sum().clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, l2_normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means seeded with k-means++ (D^2 sampling); empty clusters are re-seeded with
    random points. Returns (centroids (k, d), cluster sizes (k,) float)."""
    n = x.shape[0]
    if n <= k:  # fewer points than codes: every point is a code, the rest repeat points at random
        extra = torch.randint(0, n, (k - n,), device=x.device)
        pick = torch.cat([torch.arange(n, device=x.device), extra])  # (k,) the point each code copies
        # a code's cluster size: how many codes copy the same point (bincount over points, then
        # looked up per code), so a point repeated by three codes gives each of them size 3
        return x[pick].clone(), torch.bincount(pick, minlength=n)[pick].float()
    centroids = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    centroids[0] = x[torch.randint(0, n, (1,), device=x.device)]
    d2 = (x - centroids[0]).pow(2).sum(1)
    if k <= SEQUENTIAL_SEEDING_MAX:
        for i in range(1, k):
            total = d2.sum()
            j = torch.multinomial(d2 / total, 1) if total > 0 else torch.randint(0, n, (1,), device=x.device)
            centroids[i] = x[j]
            d2 = torch.minimum(d2, (x - centroids[i]).pow(2).sum(1))
    else:
        # large K: the D^2 draws come in SEEDING_ROUNDS rounds of K / SEEDING_ROUNDS seeds each (the
        # distribution updated between rounds), not K sequential draws. At K=16384 over 65,536
        # vectors on 2 cores the whole initialisation took 57 s sequentially, 11 s in rounds, with
        # the same usage and perplexity after (tests/test_vqgan.py, slow); Lloyd's iterations below
        # refine what the coarser seeding leaves
        per = -(-(k - 1) // SEEDING_ROUNDS)
        filled = 1
        while filled < k:
            m = min(per, k - filled)
            if int((d2 > 0).sum()) >= m:
                j = torch.multinomial(d2 / d2.sum(), m, replacement=False)
            else:
                j = torch.randint(0, n, (m,), device=x.device)
            centroids[filled : filled + m] = x[j]
            d2 = torch.minimum(d2, torch.cdist(x, x[j]).pow(2).min(1).values)
            filled += m
    sizes = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        idx = nearest_code(x, centroids)
        sizes = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, idx, x)
        empty = sizes == 0
        centroids = torch.where(empty[:, None], centroids, sums / sizes.clamp_min(1.0)[:, None])
        if empty.any():
            centroids[empty] = x[torch.randint(0, n, (int(empty.sum()),), device=x.device)]
        if l2_normalize:
            centroids = F.normalize(centroids, dim=-1)
    return centroids, sizes


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig, comm: Collectives = SINGLE_PROCESS):
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "vqgan":
            shape = dict(channels=cfg.channels, width=cfg.width, channel_mult=cfg.channel_mult,
                         res_blocks=cfg.res_blocks, z_channels=cfg.code_dim)
            self.encoder, self.decoder = VQGANEncoder(**shape), VQGANDecoder(**shape)
        else:
            self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
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
            project=cfg.arch == "vqgan",
            comm=comm,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """x (B, C, S, S) in [-1, 1] -> reconstruction (B, C, S, S), quantizer output."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> token grid (B, g, g) int64."""
        return self.quantizer.indices(self.encoder(x))

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """token grid (B, g, g) -> (B, C, S, S) in [-1, 1] (not clamped)."""
        return self.decoder(self.quantizer.lookup(indices))

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights a tokenizer needs (codebook included), without the training statistics."""
        skip = tuple(f"quantizer.{b}" for b in VectorQuantizer.TRAINING_BUFFERS)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}
