"""The charts (matplotlib, Agg) and the image grids (PIL) write real, non-blank PNGs; no Ray."""
import sys

import numpy as np
import pytest
from PIL import Image

from vqtok.pipeline.viz import (save_image_grid, save_reconstruction_grid, save_sample_grid, save_training_curves,
                                save_usage_histogram)


def png_ok(path) -> Image.Image:
    """The file is a PNG with pixels, and not a blank one."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
        im.load()
        colors = im.convert("RGB").getcolors(maxcolors=1 << 24)
        assert colors is not None and len(colors) > 1, "blank image"
        return im


@pytest.mark.parametrize("counts", [
    np.r_[np.random.default_rng(0).zipf(1.5, 400) * 3, np.zeros(112)],  # a long tail and unused codes
    np.full(32, 7.0),                                                      # uniform use
    np.arange(1024, dtype=np.float64)[::-1],                               # unsorted input, one code unused
    np.zeros(64),                                                          # nothing used
    np.array([5]),                                                         # K = 1
    np.array([], dtype=np.int64),                                          # empty codebook
], ids=["tail", "uniform", "ramp", "unused", "one-code", "empty"])
def test_usage_histogram_writes_a_png(tmp_path, counts):
    path = tmp_path / "sub" / "usage.png"
    out = save_usage_histogram(counts, path, title="held-out codebook usage")
    assert out == str(path)
    png_ok(path)


def test_usage_histogram_accepts_torch_counts_and_str_path(tmp_path):
    torch = pytest.importorskip("torch")
    counts = torch.bincount(torch.randint(0, 50, (5000,)), minlength=64).double().numpy()
    out = save_usage_histogram(counts, str(tmp_path / "u.png"))
    assert out == str(tmp_path / "u.png")
    png_ok(out)


def test_charts_leave_pyplot_and_the_global_backend_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    save_usage_histogram(np.arange(10), tmp_path / "u.png")
    save_training_curves([{"step": 1, "loss": 1.0}], tmp_path / "c.png", series={"loss": "loss"}, title="t")
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


HISTORY = [{"step": s, "loss": 1 / (1 + s) ** 0.5, "mse": 0.1 / (1 + s) ** 0.5} for s in range(0, 5000, 50)]


def test_training_curves_many_points(tmp_path):
    path = tmp_path / "curve.png"
    out = save_training_curves(HISTORY, path, series={"loss": "loss", "MSE": "mse"}, title="tokenizer training",
                               ylabel="loss", log_y=True)
    assert out == str(path)
    png_ok(path)


def test_training_curves_empty_history_says_no_data(tmp_path):
    png_ok(save_training_curves([], tmp_path / "empty.png", series={"loss": "loss"}, title="nothing yet"))
    # a history with no value for any series is "no data" too
    png_ok(save_training_curves([{"step": 1}, {"step": 2, "loss": None}], tmp_path / "none.png",
                                series={"loss": "loss"}, title="nothing yet"))


def test_training_curves_single_point(tmp_path):
    png_ok(save_training_curves([{"step": 1000, "train_bits": 5.1, "eval_bits": 5.3}], tmp_path / "one.png",
                                series={"train": "train_bits", "held-out": "eval_bits"}, title="prior training",
                                ylabel="bits per token"))


def test_training_curves_skip_missing_none_and_nonfinite_values(tmp_path):
    history = [
        {"step": 100, "train_bits": 7.0},                           # eval missing
        {"step": 200, "train_bits": 6.0, "eval_bits": None},        # eval None
        {"step": 300, "train_bits": float("nan"), "eval_bits": 6.2},
        {"step": None, "train_bits": 5.5},                          # no x
        {"train_bits": 5.4},                                        # no x key at all
        {"step": 400, "train_bits": 5.0, "eval_bits": 5.6, "note": "text"},
    ]
    png_ok(save_training_curves(history, tmp_path / "gaps.png",
                                series={"train": "train_bits", "held-out": "eval_bits", "absent": "nope"},
                                title="prior training", ylabel="bits per token"))


def test_training_curves_log_scale_with_zero_and_negative_values(tmp_path):
    history = [{"step": i, "loss": v, "delta": -v} for i, v in enumerate([1.0, 0.0, 0.5, -0.1, 0.25])]
    png_ok(save_training_curves(history, tmp_path / "log.png", series={"loss": "loss", "delta": "delta"},
                                title="log", log_y=True))
    # every value <= 0: nothing to draw on a log scale, still a picture
    png_ok(save_training_curves([{"step": 1, "loss": 0.0}, {"step": 2, "loss": -1.0}], tmp_path / "log0.png",
                                series={"loss": "loss"}, title="log", log_y=True))


def test_training_curves_custom_x_key(tmp_path):
    history = [{"epoch": e, "acc": 0.5 + e / 20} for e in range(5)]
    png_ok(save_training_curves(history, tmp_path / "epochs.png", series={"accuracy": "acc"}, title="t",
                                xlabel="epoch", x_key="epoch"))


def test_image_grids_stay_pil(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    png_ok(save_image_grid([imgs[:10], imgs[10:]], tmp_path / "grid.png"))
    png_ok(save_sample_grid(imgs, np.repeat(np.arange(4), 5), tmp_path / "s" / "samples.png"))
    png_ok(save_reconstruction_grid(imgs, imgs[::-1], tmp_path / "recon.png", per_row=8))
