"""Pictures: image grids (reconstructions, samples) and the codebook-usage histogram, as PNG."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def save_image_grid(rows: list[np.ndarray], path: str | os.PathLike, scale: int = 1, pad: int = 2) -> str:
    """rows: arrays of uint8 images (N, S, S) or (N, S, S, C); one row of the grid each."""
    rows = [r[..., None] if r.ndim == 3 else r for r in rows]
    s, c = rows[0].shape[1], rows[0].shape[3]
    ncols = max(len(r) for r in rows)
    cell = s + pad
    canvas = np.full((len(rows) * cell + pad, ncols * cell + pad, c), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * cell, pad + j * cell
            canvas[y : y + s, x : x + s] = img
    im = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    im.save(path)
    return str(path)


def save_sample_grid(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> str:
    """Samples as a grid: one row per class when they hold several classes (in the order the
    classes first appear), else as square as possible."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    groups = [np.flatnonzero(labels == c) for c in dict.fromkeys(np.asarray(labels).tolist())]
    if len(groups) > 1:
        rows = [images[g] for g in groups]
    else:
        per_row = math.ceil(math.sqrt(len(images)))
        rows = [images[i:i + per_row] for i in range(0, len(images), per_row)]
    return save_image_grid(rows, path, scale=2 if images.shape[1] <= 64 else 1)


def save_reconstruction_grid(originals: np.ndarray, recons: np.ndarray, path, per_row: int = 16) -> str:
    """Alternating rows: originals, then their reconstructions."""
    n = min(len(originals), 4 * per_row)
    rows = []
    for i in range(0, n, per_row):
        rows += [originals[i : i + per_row], recons[i : i + per_row]]
    return save_image_grid(rows, path, scale=2 if originals.shape[1] <= 64 else 1)


def save_usage_histogram(counts: np.ndarray, path, title: str = "codebook usage") -> str:
    """Bar chart of how often each code is used, codes sorted from most to least used."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    k = len(counts)
    w, h, margin = 900, 360, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    top = counts.max() if counts.size and counts.max() > 0 else 1.0
    plot_w, plot_h = w - 2 * margin, h - 2 * margin
    for i, v in enumerate(counts):
        x0 = margin + i * plot_w / k
        x1 = margin + (i + 1) * plot_w / k
        y = h - margin - v / top * plot_h
        d.rectangle([x0, y, max(x0, x1 - (1 if k < 200 else 0)), h - margin], fill=(60, 110, 200))
    d.line([margin, h - margin, w - margin, h - margin], fill="black")
    d.line([margin, margin, margin, h - margin], fill="black")
    used = int((counts > 0).sum())
    p = counts / max(counts.sum(), 1)
    ppl = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())) if used else 0.0
    d.text((margin, 12), f"{title}: {used}/{k} codes used ({100 * used / k:.1f}%), perplexity {ppl:.1f}", fill="black")
    d.text((margin, h - margin + 8), "codes, most used first", fill="black")
    d.text((4, margin - 14), f"max {int(top)}", fill="black")
    im.save(path)
    return str(path)
