"""Vector quantizer: nearest code, straight-through gradients, codebook + commitment losses.

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
initialisation and the dead-code replacements) are made global under torch.distributed: counts and
sums are all-reduced, random draws are taken on rank 0 and broadcast, so every replica holds the
same codebook.

All quantizer arithmetic runs in fp32, even under autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..kernels import nearest_code


def stop_gradient(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def straight_through(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Forward value of tgt, gradient of src (identity)."""
    return src + stop_gradient(tgt - src)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors over all ranks, in place (no-op in a single process)."""
    if _distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    """Rank 0's values everywhere, in place (no-op in a single process)."""
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


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
        # Low-dimensional codes live behind a projection (in and out of the code space).
        self.proj_in = nn.Linear(dim, d) if d != dim else nn.Identity()
        self.proj_out = nn.Linear(d, dim) if d != dim else nn.Identity()

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
        # Per-step code counts over the last `restart_window` steps (a ring), for usage and restarts.
        self.register_buffer("usage_ring", torch.zeros(max(restart_window, 1), codebook_size))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    TRAINING_BUFFERS = ("ema_count", "ema_sum", "initialized", "usage_ring", "steps")

    # ------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with torch.autocast(device_type=z.device.type, enabled=False):
            b, c, h, w = z.shape
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)  # (N, C), N = B*h*w
            z_e = self.proj_in(flat)  # (N, d)
            if self.l2_normalize:
                z_e = F.normalize(z_e, dim=-1)
            if self.training and not bool(self.initialized):
                self._kmeans_init(stop_gradient(z_e))

            idx = nearest_code(stop_gradient(z_e), self.codebook)  # (N,)
            q = F.embedding(idx, self.codebook)  # (N, d)

            codebook_loss = F.mse_loss(q, stop_gradient(z_e))
            commitment_loss = F.mse_loss(z_e, stop_gradient(q))
            loss = self.beta * commitment_loss
            if not self.ema:
                loss = loss + codebook_loss

            counts = torch.bincount(idx, minlength=self.codebook_size).float()
            if self.training:
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

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_codebook(self, z_e: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.clone()
        if self.ema:
            sums = torch.zeros_like(self.codebook).index_add_(0, idx, z_e)  # (K, d)
            all_reduce_sum(counts, sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            self._codebook_from_ema()
        else:
            all_reduce_sum(counts)
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
        broadcast_from_rank0(new)
        self.codebook.data[dead] = new
        if self.ema:
            self.ema_sum[dead] = new
            self.ema_count[dead] = 1.0
        return n_dead

    @torch.no_grad()
    def _kmeans_init(self, z_e: torch.Tensor) -> None:
        """k-means on the first training batch (drawn on rank 0, broadcast to all ranks)."""
        centroids, sizes = kmeans(z_e, self.codebook_size, self.kmeans_iters, self.l2_normalize)
        broadcast_from_rank0(centroids, sizes)
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
        pick = torch.cat([torch.arange(n, device=x.device), extra])
        return x[pick].clone(), torch.bincount(pick, minlength=n)[pick].float()
    centroids = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    centroids[0] = x[torch.randint(0, n, (1,), device=x.device)]
    d2 = (x - centroids[0]).pow(2).sum(1)
    for i in range(1, k):
        total = d2.sum()
        j = torch.multinomial(d2 / total, 1) if total > 0 else torch.randint(0, n, (1,), device=x.device)
        centroids[i] = x[j]
        d2 = torch.minimum(d2, (x - centroids[i]).pow(2).sum(1))
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


def psnr(mse: float) -> float:
    """PSNR in dB for pixels in [0, 1]."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)
