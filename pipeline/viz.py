"""Pictures, as PNG: image grids of reconstructions and samples (PIL), and charts of codebook usage
and training curves (matplotlib).

The charts draw on a bare matplotlib Figure with the Agg canvas, so they need no display, never
select or change matplotlib's global backend (a user's notebook or script keeps its own), and
are safe in worker processes. matplotlib is imported on first use, not with this module."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


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


def save_prompt_grid(images: np.ndarray, prompts: list[str], path: str | os.PathLike, label_width: int = 220) -> str:
    """Samples of a text prior: one row per prompt (in the order prompts first appear), the prompt
    written to the left of its row."""
    from PIL import ImageDraw, ImageFont

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(prompts))
    rows = [images[[i for i, p in enumerate(prompts) if p == q]] for q in order]
    scale = 2 if images.shape[1] <= 64 else 1
    save_image_grid(rows, path, scale=scale)
    grid = Image.open(path).convert("RGB")
    cell = grid.height / len(rows)
    out = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    out.paste(grid, (label_width, 0))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, prompt in enumerate(order):
        text = prompt if len(prompt) <= 34 else prompt[:33] + "…"
        draw.text((4, int(i * cell + cell / 2 - 6)), text, fill="black", font=font)
    out.save(path)
    return str(path)


def save_reconstruction_grid(originals: np.ndarray, recons: np.ndarray, path, per_row: int = 16) -> str:
    """Alternating rows: originals, then their reconstructions."""
    n = min(len(originals), 4 * per_row)
    rows = []
    for i in range(0, n, per_row):
        rows += [originals[i : i + per_row], recons[i : i + per_row]]
    return save_image_grid(rows, path, scale=2 if originals.shape[1] <= 64 else 1)


def _figure(width: float = 9.0, height: float = 3.8):
    """(figure, axes) on a private Agg canvas: no pyplot, no global backend, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return str(path)


def _no_data(ax, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=14, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def save_usage_histogram(counts: np.ndarray, path, title: str = "codebook usage") -> str:
    """How often each code is used, codes sorted from most to least used (log y), with the share
    every code would get under uniform use; the title gives codes used / K and the perplexity."""
    from matplotlib.ticker import MaxNLocator

    counts = np.sort(np.nan_to_num(np.asarray(counts, dtype=np.float64).ravel()).clip(min=0))[::-1]
    k = len(counts)
    total = float(counts.sum())
    used = int((counts > 0).sum())
    p = counts[counts > 0] / total if used else counts[:0]
    ppl = float(np.exp(-(p * np.log(p)).sum())) if used else 0.0
    fig, ax = _figure()
    if k == 0:
        ax.set_title(f"{title}: empty codebook")
        _no_data(ax)
        return _save(fig, path)
    ax.set_title(f"{title}: {used}/{k} codes used ({100 * used / k:.1f}%), perplexity {ppl:.1f}")
    ax.set_xlabel("code rank (sorted by use)")
    ax.set_ylabel("uses")
    if not used:
        _no_data(ax, "no code used")
        return _save(fig, path)
    top = counts[:used]
    floor = float(top[-1]) / 2  # log scale: bars stand on half the smallest nonzero count
    ax.set_yscale("log")
    ax.stairs(top, np.arange(used + 1), baseline=floor, fill=True, color="tab:blue", label="uses per code")
    if used < k:
        ax.axvspan(used, k, color="0.88", lw=0, label=f"unused codes ({k - used})")
    share = total / k
    ax.axhline(share, color="tab:red", ls="--", lw=1.2, label=f"uniform share (total / K = {share:.4g})")
    ax.set_xlim(0, k)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=min(floor, share / 2), top=max(float(top[0]), share) * 2)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    return _save(fig, path)


def _number(v) -> float | None:
    """v as a finite float, or None (missing, None, NaN, inf, not a number)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def save_training_curves(history: list[dict], path, *, series: dict[str, str], title: str,
                         xlabel: str = "step", ylabel: str = "", log_y: bool = False, x_key: str = "step") -> str:
    """Line chart of training metrics over time. history: dicts such as {"step": 100, "loss": 0.1};
    series: legend label -> key in those dicts, one line each. Points whose x or value is missing,
    None or not finite are skipped (and, with log_y, those <= 0); a series with few points gets
    markers. An empty history gives a chart that says "no data"."""
    from matplotlib.ticker import MaxNLocator

    lines = {}
    for label, key in series.items():
        pts = [(x, y) for x, y in ((_number(h.get(x_key)), _number(h.get(key))) for h in history or ())
               if x is not None and y is not None and (y > 0 or not log_y)]
        if pts:
            lines[label] = pts
    fig, ax = _figure(8.0, 4.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if not lines:
        _no_data(ax)
        return _save(fig, path)
    for label, pts in lines.items():
        xs, ys = zip(*sorted(pts, key=lambda t: t[0]))
        ax.plot(xs, ys, label=label, lw=1.5, marker="o" if len(xs) <= 30 else None, ms=4)
    if all(x == int(x) for pts in lines.values() for x, _ in pts):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at step 2.5
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if log_y:
        ax.grid(True, which="minor", alpha=0.1)
    ax.legend(fontsize="small")
    return _save(fig, path)
