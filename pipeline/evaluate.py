"""Held-out metrics for a VQ-VAE: reconstruction MSE and PSNR (pixels in [0, 1]), codebook usage
and perplexity over the whole evaluation set (not one batch)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.tokenizer import Preprocess
from ..models.vqvae import perplexity
from ..models.vqvae import VQVAE
from .sharded_stream import ImageStream
from .viz import save_reconstruction_grid, save_usage_histogram


@dataclass
class EvalResult:
    metrics: dict  # mse, psnr, usage, perplexity, images, skipped
    counts: np.ndarray  # (K,) how often each code was used
    originals: np.ndarray  # uint8 (n, S, S, C): the first images, for a reconstruction grid
    reconstructions: np.ndarray


@torch.no_grad()
def evaluate(model: VQVAE, stream: ImageStream, *, batch_size: int = 256, device="cpu",
             max_images: int | None = None, keep: int = 64) -> EvalResult:
    was_training = model.training
    model.eval()
    k = model.cfg.codebook_size
    counts = torch.zeros(k, dtype=torch.float64)
    se, n, px = 0.0, 0, 0
    originals, recons = [], []
    try:
        for batch in stream.batches(batch_size, epochs=1, drop_last=False):
            pixels = batch.pixels
            if max_images is not None:
                pixels = pixels[: max_images - n]
            x = Preprocess.to_model(pixels.to(device))
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                enabled=torch.device(device).type == "cuda"):
                recon, q = model(x)
            recon = recon.float().clamp(-1, 1)
            se += float(((recon - x) / 2).pow(2).sum())  # /2: [-1, 1] -> [0, 1] scale
            px += x.numel()
            counts += torch.bincount(q.indices.flatten().cpu(), minlength=k).double()
            if sum(len(o) for o in originals) < keep:
                originals.append(pixels.cpu().numpy())
                recons.append(Preprocess.from_model(recon).cpu().numpy())
            n += len(pixels)
            if max_images is not None and n >= max_images:
                break
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluation data produced no images")
    mse = se / px
    metrics = {
        "mse": mse,
        "psnr": psnr(mse),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(perplexity(counts)),
        "images": n,
        "skipped": stream.failures.count,
    }
    return EvalResult(metrics, counts.numpy(), np.concatenate(originals)[:keep], np.concatenate(recons)[:keep])


def save_eval_pictures(result: EvalResult, out_dir, usage_title: str) -> tuple[str, str]:
    """reconstructions.png and codebook_usage.png in out_dir; returns their paths."""
    recon = save_reconstruction_grid(result.originals, result.reconstructions, Path(out_dir) / "reconstructions.png")
    usage = save_usage_histogram(result.counts, Path(out_dir) / "codebook_usage.png", title=usage_title)
    return recon, usage


def psnr(mse: float) -> float:
    """PSNR in dB for pixels in [0, 1]."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)
