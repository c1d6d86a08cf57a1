"""The pictures show what they were given, read back from the PNG's pixels; no Ray.

- Image grids (PIL): every cell holds the given image, pixel for pixel, in the promised order.
- Codebook usage: the blue bars' tops and bases, measured per pixel column, fit one log scale to
  the sorted counts they were given (and the base at half the smallest count), the red dashed line
  sits at total / K on that same scale, used codes have bars and unused codes the grey span.
- Training curves: each series' markers (or, without markers, its line) sit where its values put
  them on one shared scale (log when asked), missing / None / non-finite / non-positive-on-log
  points are left out, and charts with nothing to draw show the "no data" text and no series.

The data-to-pixel scale is fitted from the picture itself (least squares over the measured bars or
markers), never read from the chart's axes, so a chart that drew other values, unsorted counts or a
linear axis where a log one was asked does not fit. From matplotlib only the axes and legend boxes
are taken (to know where the plotting area is and to leave the legend's own samples out)."""
import math
import sys

import numpy as np
import pytest
from PIL import Image

from vqtok.pipeline import viz
from vqtok.pipeline.viz import (save_image_grid, save_reconstruction_grid, save_sample_grid, save_training_curves,
                                save_usage_histogram)

TAB = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44), "red": (214, 39, 40)}
TOL = 1.5  # pixels: antialiased edges and 1-px lines


def png(path) -> Image.Image:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.copy()


def pixels(path) -> np.ndarray:
    """(H, W, 3) int RGB of a PNG that is not blank."""
    px = np.asarray(png(path).convert("RGB")).astype(np.int64)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 1, "blank image"
    return px


@pytest.fixture
def drawn(monkeypatch):
    """The (figure, axes) pairs the charts draw on, in order: only to find the axes and legend boxes."""
    made = []
    real = viz._figure

    def spy(*a, **kw):
        fig, ax = real(*a, **kw)
        made.append((fig, ax))
        return fig, ax

    monkeypatch.setattr(viz, "_figure", spy)
    return made


def box(artist, height: int) -> tuple[float, float, float, float]:
    """(left, right, top, bottom) of an artist in the PNG's pixel coordinates (rows grow downwards)."""
    bb = artist.get_window_extent()
    return bb.x0, bb.x1, height - bb.y1, height - bb.y0


def near(px: np.ndarray, color, tol: int = 60) -> np.ndarray:
    return np.abs(px - np.array(color)).sum(-1) <= tol


def legend_mask(px, ax) -> np.ndarray:
    """True inside the legend's box (its own colour samples are not data)."""
    out = np.zeros(px.shape[:2], bool)
    if ax.get_legend() is not None:
        left, right, top, bottom = box(ax.get_legend(), px.shape[0])
        out[max(0, math.floor(top) - 1):math.ceil(bottom) + 1, max(0, math.floor(left) - 1):math.ceil(right) + 1] = True
    return out


def fit(xs, ys) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return a, b


def shows_no_data(px, ax):
    """The "no data" text (grey 0.4) in the middle of the axes and no series colour anywhere."""
    for name, color in TAB.items():
        assert not near(px, color, 40).any(), f"{name} drawn on a chart with nothing to draw"
    left, right, top, bottom = box(ax, px.shape[0])
    cx, cy = (left + right) / 2, (top + bottom) / 2
    middle = px[int(cy) - 15:int(cy) + 15, int(cx) - 60:int(cx) + 60]
    text = (np.abs(middle - 102) <= 12).all(-1)
    assert text.sum() >= 30, "no text in the middle of the axes"


# ----------------------------------------------------------------------------------------------
# Codebook usage
# ----------------------------------------------------------------------------------------------
def check_usage_plot(path, counts, ax) -> None:
    """The bars are the counts, sorted from most to least used, on one log scale; the base at half
    the smallest nonzero count; the uniform share line at total / K; unused codes greyed."""
    px = pixels(path)
    c = np.sort(np.nan_to_num(np.asarray(counts, float).ravel()).clip(min=0))[::-1]
    k, used, total = len(c), int((c > 0).sum()), float(c.sum())
    if k == 0 or used == 0:
        return shows_no_data(px, ax)
    left, right, top, bottom = box(ax, px.shape[0])
    width = right - left
    legend = legend_mask(px, ax)
    bar = (px[..., 2] - px[..., 0] > 80) & (px[..., 2] - px[..., 1] > 30) & ~legend  # tab:blue, under a grid line too
    background = (px.min(-1) >= 190) | legend  # white, the unused span's grey, grid lines on them
    red = (px[..., 0] - px[..., 2] > 100) & (px[..., 0] - px[..., 1] > 100) & ~legend
    rows = slice(math.ceil(top) + 1, math.floor(bottom) - 1)
    floor = c[used - 1] / 2

    singles, spans, bases = [], [], []
    for col in range(math.ceil(left) + 2, math.floor(right) - 2):
        lo, hi = (col - left) / width * k, (col + 1 - left) / width * k  # the ranks this column covers
        if hi <= used - 0.02 * (hi - lo + 1):
            ys = np.flatnonzero(bar[rows.start:math.floor(bottom) + 1, col]) + rows.start  # to the bottom spine
            assert len(ys), f"column {col} (ranks {lo:.1f}-{hi:.1f}, used {used}) has no bar"
            r = ys[-1]  # the bar's lowest blue pixel; its run goes up to the first background pixel
            while r > rows.start and not background[r - 1, col]:
                r -= 1
            bases.append(ys[-1] + 1)
            if legend[r - 1, col]:
                continue  # the bar goes on under the legend: its top is hidden
            # the top is the top blue pixel, or hidden under the share line where that lies on it: between
            r_blue = r + int(np.argmax(bar[r:ys[-1] + 1, col]))
            # the codes this column may show (pixel snapping moves a bar's edges by up to half a pixel)
            cover = c[max(0, int(lo - 0.5 * k / width)):min(used, max(int(lo) + 1, math.ceil(hi + 0.5 * k / width)))]
            (singles if cover.max() == cover.min() else spans).append((col, r, r_blue, cover.max(), cover.min()))
        elif lo >= used + 0.02:
            lower = slice(int((top + bottom) / 2), math.floor(bottom) - 2)
            assert not bar[lower, col].any(), f"column {col} (ranks {lo:.1f}-{hi:.1f}) is unused but has a bar"
            grey = (np.abs(px[lower, col] - 224) <= 6).all(-1)
            assert grey.mean() > 0.7, f"column {col} (unused codes) is not greyed"
    assert (singles or spans) and bases, "no bar measured"
    # one log scale for every bar top and the common base: row = a + b log10(value)
    # (columns over several codes of nearly one count count too: the ramp's bars are narrower than a pixel)
    near_singles = singles + [(col, r, rb, math.sqrt(hi * lo), lo) for col, r, rb, hi, lo in spans if hi <= lo * 1.01]
    clear = [(r, v) for _, r, rb, v, _ in near_singles if r == rb]  # no share line on the top
    assert clear, "no bar top measured clear of the legend and the share line"
    a, b = fit([math.log10(v) for _, v in clear] + [math.log10(floor)],
               [r for r, _ in clear] + [float(np.median(bases))])
    assert b < 0, "larger counts are not drawn higher"
    row = lambda v: a + b * math.log10(v)  # noqa: E731
    for col, r, rb, vmax, vmin in singles + spans:  # a column over several codes: between the tallest and the shortest
        assert r - TOL <= row(vmin) and row(vmax) <= rb + TOL, \
            f"bar at column {col}: top at row {r}-{rb}, counts {vmin}-{vmax} belong at {row(vmax):.1f}-{row(vmin):.1f}"
    for base in bases:
        assert abs(base - row(floor)) <= TOL, f"bar base at row {base}, not at half the smallest count"
    # the bars span the used codes: the bar ends where rank `used` is
    line = int(np.median(bases)) - 2  # just above the bars' base
    first, last = np.flatnonzero(bar[line])[[0, -1]]
    assert abs(first - left) <= 2 and abs(last + 1 - (left + used / k * width)) <= 2, (first, last, left, width)
    # the uniform share: a red dashed line across the axes, at total / K on the bars' scale
    per_row = red[rows].sum(1)
    assert per_row.max() > width / 4, "no red dashed line across the axes"
    lines = np.flatnonzero(per_row >= per_row.max() / 2)
    centre = rows.start + np.average(lines, weights=per_row[lines]) + 0.5
    assert abs(centre - row(total / k)) <= TOL, f"share line at row {centre:.1f}, total / K at {row(total / k):.1f}"


@pytest.mark.parametrize("counts", [
    np.r_[np.random.default_rng(0).zipf(1.5, 400) * 3, np.zeros(112)],  # a long tail and unused codes
    np.full(32, 7.0),                                                      # uniform use
    np.arange(1024, dtype=np.float64)[::-1],                               # unsorted input, one code unused
    np.random.default_rng(1).permutation(np.r_[np.arange(1, 41) * 5.0, np.zeros(24)]),  # shuffled, wide bars
    np.zeros(64),                                                          # nothing used
    np.array([5]),                                                         # K = 1
    np.array([], dtype=np.int64),                                          # empty codebook
], ids=["tail", "uniform", "ramp", "shuffled", "unused", "one-code", "empty"])
def test_usage_histogram_bars_are_the_sorted_counts(tmp_path, drawn, counts):
    path = tmp_path / "sub" / "usage.png"
    out = save_usage_histogram(counts, path, title="held-out codebook usage")
    assert out == str(path)
    check_usage_plot(path, counts, drawn[-1][1])


def test_usage_histogram_accepts_torch_counts_and_str_path(tmp_path, drawn):
    torch = pytest.importorskip("torch")
    counts = torch.bincount(torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(0)), minlength=64)
    out = save_usage_histogram(counts.double().numpy(), str(tmp_path / "u.png"))
    assert out == str(tmp_path / "u.png")
    check_usage_plot(out, counts.numpy(), drawn[-1][1])


def test_charts_leave_pyplot_and_the_global_backend_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    save_usage_histogram(np.arange(10), tmp_path / "u.png")
    save_training_curves([{"step": 1, "loss": 1.0}], tmp_path / "c.png", series={"loss": "loss"}, title="t")
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------
def markers(px, color, legend) -> list[tuple[float, float]]:
    """(column, row) centres of the round markers of one colour, left to right: the blobs where a
    4x4 block is all that colour (a 1.5 pt line never is)."""
    m = near(px, color) & ~legend
    solid = np.ones((m.shape[0] - 3, m.shape[1] - 3), bool)
    for dy in range(4):
        for dx in range(4):
            solid &= m[dy:dy + m.shape[0] - 3, dx:dx + m.shape[1] - 3]
    todo, blobs = set(zip(*np.nonzero(solid))), []
    while todo:
        stack, blob = [todo.pop()], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for n in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if n in todo:
                    todo.remove(n)
                    stack.append(n)
        ys, xs = zip(*blob)
        blobs.append((np.mean(xs) + 2, np.mean(ys) + 2))  # the 4x4 block's centre, in pixel-edge coordinates
    return sorted(blobs)


def check_markers(px, ax, expected: dict[str, list[tuple[float, float]]], log_y: bool):
    """expected: colour -> that series' (x, y) points. Every series has exactly one marker per
    point, and all markers fit one scale x -> column, y (log10 y) -> row."""
    legend = legend_mask(px, ax)
    xs, ys, cols, rows = [], [], [], []
    for color, pts in expected.items():
        found = markers(px, TAB[color], legend)
        assert len(found) == len(pts), f"{color}: {len(found)} markers for {len(pts)} points {pts}"
        for (x, y), (col, row) in zip(sorted(pts), found):
            xs.append(x)
            ys.append(math.log10(y) if log_y else y)
            cols.append(col)
            rows.append(row)
    ax_, bx = fit(xs, cols)
    ay, by = fit(ys, rows)
    assert bx > 0 and by < 0, "x does not grow to the right or y upwards"
    for x, y, col, row in zip(xs, ys, cols, rows):
        assert abs(ax_ + bx * x - col) <= TOL and abs(ay + by * y - row) <= TOL, (x, y, col, row)
    return lambda x, y: (ax_ + bx * x, ay + by * (math.log10(y) if log_y else y))


def joined(px, color, a, b, ax) -> bool:
    """The series' line runs from marker a to marker b (checked at the points between them)."""
    m = near(px, TAB[color], 90) & ~legend_mask(px, ax)
    for t in np.linspace(0.25, 0.75, 5):
        x, y = a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])
        if not m[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3].any():
            return False
    return True


HISTORY = [{"step": s, "loss": 1 / (1 + s) ** 0.5, "mse": 0.1 / (1 + s) ** 0.5} for s in range(0, 5000, 50)]


def test_training_curves_many_points(tmp_path, drawn):
    path = tmp_path / "curve.png"
    out = save_training_curves(HISTORY, path, series={"loss": "loss", "MSE": "mse"}, title="tokenizer training",
                               ylabel="loss", log_y=True)
    assert out == str(path)
    px, ax = pixels(path), drawn[-1][1]
    legend = legend_mask(px, ax)
    assert not markers(px, TAB["blue"], legend) and not markers(px, TAB["orange"], legend)  # 100 points: no markers
    # x: both lines run from step 0 to step 4950 (the line ends project half a line width)
    span = {}
    for color in ("blue", "orange"):
        cols = np.flatnonzero((near(px, TAB[color]) & ~legend).any(0))
        span[color] = (cols[0], cols[-1] + 1)
    assert abs(span["blue"][0] - span["orange"][0]) <= 1 and abs(span["blue"][1] - span["orange"][1]) <= 1
    lw = 1.5 * 100 / 72
    c0, c1 = span["blue"][0] + lw / 2, span["blue"][1] - lw / 2
    col_of = lambda s: c0 + s / 4950 * (c1 - c0)  # noqa: E731
    # y: where the curves are flat (step >= 500), each column's line centre, on one log scale for both series
    pts = []
    for color, key in (("blue", "loss"), ("orange", "mse")):
        m = near(px, TAB[color]) & ~legend
        for s in range(500, 4951, 50):
            col = int(col_of(s))
            ys = np.flatnonzero(m[:, col])
            assert len(ys), f"{color} line missing at step {s}"
            value = np.interp(col + 0.5, [col_of(h["step"]) for h in HISTORY], [h[key] for h in HISTORY])
            pts.append((math.log10(value), ys.mean() + 0.5, color, s))
    a, b = fit([p[0] for p in pts], [p[1] for p in pts])
    assert b < 0
    for v, r, color, s in pts:
        assert abs(a + b * v - r) <= TOL, f"{color} at step {s}: row {r:.1f}, expected {a + b * v:.1f}"


def test_training_curves_empty_history_says_no_data(tmp_path, drawn):
    shows_no_data(pixels(save_training_curves([], tmp_path / "empty.png", series={"loss": "loss"},
                                              title="nothing yet")), drawn[-1][1])
    # a history with no value for any series is "no data" too
    shows_no_data(pixels(save_training_curves([{"step": 1}, {"step": 2, "loss": None}], tmp_path / "none.png",
                                              series={"loss": "loss"}, title="nothing yet")), drawn[-1][1])


def test_training_curves_single_point(tmp_path, drawn):
    path = save_training_curves([{"step": 1000, "train_bits": 5.1, "eval_bits": 5.3}], tmp_path / "one.png",
                                series={"train": "train_bits", "held-out": "eval_bits"}, title="prior training",
                                ylabel="bits per token")
    px, ax = pixels(path), drawn[-1][1]
    legend = legend_mask(px, ax)
    (bx, by), = markers(px, TAB["blue"], legend)
    (ox, oy), = markers(px, TAB["orange"], legend)
    left, right, top, bottom = box(ax, px.shape[0])
    assert abs(bx - ox) <= 1 and abs(bx - (left + right) / 2) <= 2  # one step, in the middle
    assert oy < by - (bottom - top) / 2  # held-out 5.3 well above train 5.1


def test_training_curves_skip_missing_none_and_nonfinite_values(tmp_path, drawn):
    history = [
        {"step": 100, "train_bits": 7.0},                           # eval missing
        {"step": 200, "train_bits": 6.0, "eval_bits": None},        # eval None
        {"step": 300, "train_bits": float("nan"), "eval_bits": 6.2},
        {"step": None, "train_bits": 5.5},                          # no x
        {"train_bits": 5.4},                                        # no x key at all
        {"step": 400, "train_bits": 5.0, "eval_bits": 5.6, "note": "text"},
    ]
    path = save_training_curves(history, tmp_path / "gaps.png",
                                series={"train": "train_bits", "held-out": "eval_bits", "absent": "nope"},
                                title="prior training", ylabel="bits per token")
    px, ax = pixels(path), drawn[-1][1]
    train, held = [(100, 7.0), (200, 6.0), (400, 5.0)], [(300, 6.2), (400, 5.6)]
    at = check_markers(px, ax, {"blue": train, "orange": held}, log_y=False)
    # the NaN at step 300 is left out, not a break: the train line runs on from 200 to 400
    assert joined(px, "blue", at(*train[1]), at(*train[2]), ax)
    assert joined(px, "orange", at(*held[0]), at(*held[1]), ax)
    assert not near(px, TAB["green"], 90).any(), "a series with no values is drawn"


def test_training_curves_log_scale_with_zero_and_negative_values(tmp_path, drawn):
    history = [{"step": i, "loss": v, "delta": -v} for i, v in enumerate([1.0, 0.0, 0.5, -0.1, 0.25])]
    path = save_training_curves(history, tmp_path / "log.png", series={"loss": "loss", "delta": "delta"},
                                title="log", log_y=True)
    px, ax = pixels(path), drawn[-1][1]
    loss = [(0, 1.0), (2, 0.5), (4, 0.25)]  # 0.0 and -0.1 are left out on a log scale
    at = check_markers(px, ax, {"blue": loss, "orange": [(3, 0.1)]}, log_y=True)
    assert joined(px, "blue", at(*loss[0]), at(*loss[1]), ax) and joined(px, "blue", at(*loss[1]), at(*loss[2]), ax)
    # every value <= 0: nothing to draw on a log scale, still a picture
    path = save_training_curves([{"step": 1, "loss": 0.0}, {"step": 2, "loss": -1.0}], tmp_path / "log0.png",
                                series={"loss": "loss"}, title="log", log_y=True)
    shows_no_data(pixels(path), drawn[-1][1])


def test_training_curves_custom_x_key(tmp_path, drawn):
    history = [{"epoch": e, "acc": 0.5 + e / 20, "step": 10 - e} for e in range(5)]  # a "step" key to ignore
    path = save_training_curves(history, tmp_path / "epochs.png", series={"accuracy": "acc"}, title="t",
                                xlabel="epoch", x_key="epoch")
    px, ax = pixels(path), drawn[-1][1]
    found = markers(px, TAB["blue"], legend_mask(px, ax))
    assert len(found) == 5
    # by epoch, accuracy rises: left to right, each marker higher, evenly spaced (by step it would fall)
    cols, rows = np.array(found).T
    assert (np.diff(rows) < -5).all() and np.ptp(np.diff(cols)) <= 2 and np.ptp(np.diff(rows)) <= 2
    check_markers(px, ax, {"blue": [(h["epoch"], h["acc"]) for h in history]}, log_y=False)


# ----------------------------------------------------------------------------------------------
# Image grids: exact pixels
# ----------------------------------------------------------------------------------------------
def grid_of(rows: list[np.ndarray], pad: int = 2, scale: int = 1) -> np.ndarray:
    """What a grid of these rows must look like: each image at (pad + i (S + pad), pad + j (S + pad)),
    white elsewhere, each pixel scale x scale."""
    s = rows[0].shape[1]
    shape = (len(rows) * (s + pad) + pad, max(map(len, rows)) * (s + pad) + pad) + rows[0].shape[3:]
    canvas = np.full(shape, 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[pad + i * (s + pad):pad + i * (s + pad) + s, pad + j * (s + pad):pad + j * (s + pad) + s] = img
    return canvas.repeat(scale, 0).repeat(scale, 1)


def read(path) -> np.ndarray:
    return np.asarray(png(path))


RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (40, 28, 28), dtype=np.uint8)
RGB = RNG.integers(0, 256, (12, 80, 80, 3), dtype=np.uint8)


def test_image_grid_puts_each_image_in_its_cell(tmp_path):
    got = read(save_image_grid([GRAY[:10], GRAY[10:13]], tmp_path / "g.png"))
    assert (got == grid_of([GRAY[:10], GRAY[10:13]])).all()
    got = read(save_image_grid([RGB[:3], RGB[3:5]], tmp_path / "c.png", scale=2, pad=4))
    assert got.shape == (2 * (2 * 84 + 4), 2 * (3 * 84 + 4), 3)
    assert (got == grid_of([RGB[:3], RGB[3:5]], pad=4, scale=2)).all()


def test_sample_grid_has_one_row_per_class_in_order_of_appearance(tmp_path):
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 1, 0, 2, 2, 0])
    got = read(save_sample_grid(GRAY[:12], labels, tmp_path / "s" / "samples.png"))
    rows = [GRAY[:12][labels == c] for c in (2, 0, 1)]  # 2 first: the order the classes first appear
    assert (got == grid_of(rows, scale=2)).all()  # small images are shown twice their size
    # one class: as square as possible (10 -> rows of 4, 4, 2); large images at their size
    got = read(save_sample_grid(GRAY[:10], np.full(10, 3), tmp_path / "one.png"))
    assert (got == grid_of([GRAY[0:4], GRAY[4:8], GRAY[8:10]], scale=2)).all()
    got = read(save_sample_grid(RGB[:5], np.zeros(5, int), tmp_path / "rgb.png"))
    assert (got == grid_of([RGB[0:3], RGB[3:5]])).all()


def test_reconstruction_grid_alternates_originals_and_their_reconstructions(tmp_path):
    originals, recons = GRAY, 255 - GRAY
    got = read(save_reconstruction_grid(originals[:20], recons[:20], tmp_path / "recon.png", per_row=8))
    rows = [originals[0:8], recons[0:8], originals[8:16], recons[8:16], originals[16:20], recons[16:20]]
    assert (got == grid_of(rows, scale=2)).all()
    # at most 4 rows of pairs: 40 images at 8 a row show the first 32
    got = read(save_reconstruction_grid(originals, recons, tmp_path / "cap.png", per_row=8))
    rows = [r for i in range(0, 32, 8) for r in (originals[i:i + 8], recons[i:i + 8])]
    assert (got == grid_of(rows, scale=2)).all()
    got = read(save_reconstruction_grid(RGB[:4], RGB[4:8], tmp_path / "rgb.png", per_row=2))
    assert (got == grid_of([RGB[0:2], RGB[4:6], RGB[2:4], RGB[6:8]])).all()
