"""Evaluate a tokenizer on held-out images: `vqtok eval-vqvae --tokenizer DIR --data URLS`.

Prints MSE, PSNR, codebook usage and perplexity over the whole set, and writes them with a
reconstruction grid and a usage histogram to --out (default: next to the tokenizer, in eval/).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..models import Tokenizer
from ..models.config import Config, ConfigError, option
from ..pipeline.evaluate import evaluate, save_eval_pictures
from ..pipeline.sharded_stream import ImageStream
from ..models.tokenizer import DEFAULT_MAX_PIXELS
from ..pipeline.sources import FailureLog, list_units, split_patterns
from .options import Command, job_main
from .rundir import save_json


@dataclass(kw_only=True)
class EvalConfig(Config):
    WHAT = "eval-vqvae config"
    tokenizer: str = option("", "tokenizer bundle directory (RUN_DIR/tokenizer)")
    data: list[str] = option(help="held-out images: paths or URL patterns (repeat or comma-separate)", factory=list)
    out: str | None = option(None, "where to write eval_metrics.json and pictures (default: TOKENIZER/../eval)")
    batch_size: int = option(256, "images per batch")
    max_images: int | None = option(None, "evaluate only the first N images")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse larger images as decompression bombs")

    def __post_init__(self):
        self.data = split_patterns(self.data) if self.data else []
        if not self.tokenizer:
            raise ConfigError("--tokenizer is required: a bundle directory (RUN_DIR/tokenizer)")
        if not self.data:
            raise ConfigError("--data is required: held-out images (paths or URL patterns)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")


def eval_vqvae(tokenizer: str | EvalConfig, data=None, **options) -> dict:
    """Held-out metrics of a tokenizer: eval_vqvae(EvalConfig(...)) or eval_vqvae(TOKENIZER, DATA, out=...)."""
    cfg = tokenizer if isinstance(tokenizer, EvalConfig) else EvalConfig(tokenizer=str(tokenizer), data=data, **options)
    try:
        tok = Tokenizer.load(cfg.tokenizer, device=cfg.device)
    except ValueError as e:
        raise ConfigError(f"--tokenizer {cfg.tokenizer}: {e}") from None
    units = list_units(cfg.data)
    out_dir = Path(cfg.out) if cfg.out else Path(cfg.tokenizer).resolve().parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = ImageStream(units, tok.preprocess, shuffle=False, max_pixels=cfg.max_image_pixels, failures=FailureLog())
    t0 = time.time()
    result = evaluate(tok.model, stream, batch_size=cfg.batch_size, device=cfg.device, max_images=cfg.max_images)
    m = result.metrics | {"tokenizer_id": tok.id, "data": cfg.data, "seconds": time.time() - t0}
    save_json(m, out_dir / "eval_metrics.json")
    recon, usage = save_eval_pictures(result, out_dir, "held-out codebook usage")
    print(f"vqtok eval: {m['images']} images ({m['skipped']} skipped) | mse {m['mse']:.5f} | psnr {m['psnr']:.2f} dB "
          f"| usage {100 * m['usage']:.1f}% | perplexity {m['perplexity']:.1f}", flush=True)
    print(f"vqtok eval: wrote {out_dir / 'eval_metrics.json'}, {recon}, {usage}", flush=True)
    return m


COMMAND = Command("eval-vqvae", "held-out metrics and reconstructions for a tokenizer", EvalConfig, eval_vqvae)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
