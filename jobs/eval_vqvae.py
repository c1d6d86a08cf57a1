"""Evaluate a tokenizer on held-out images: `vqtok eval-vqvae --tokenizer DIR --data URLS`.

Prints MSE, PSNR, codebook usage and perplexity over the whole set, and writes them with a
reconstruction grid and a usage histogram to --out (default: next to the tokenizer, in eval/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import save_json
from ..models import Tokenizer
from ..pipeline.decode import DEFAULT_MAX_PIXELS
from ..pipeline.errors import ConfigError, DataError
from ..pipeline.evaluate import evaluate, save_eval_pictures
from ..pipeline.sources import FailureLog, list_units
from ..pipeline.stream import ImageStream


def eval_vqvae(tokenizer: str, data, *, out: str | None = None, batch_size: int = 256,
               max_images: int | None = None, device: str = "cpu",
               max_image_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    tok = Tokenizer.load(tokenizer, device=device)
    units = list_units(data)
    out_dir = Path(out) if out else Path(tokenizer).resolve().parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = FailureLog()
    stream = ImageStream(units, tok.preprocess, shuffle=False, max_pixels=max_image_pixels, failures=failures)
    t0 = time.time()
    result = evaluate(tok.model, stream, batch_size=batch_size, device=device, max_images=max_images)
    m = result.metrics | {"tokenizer_id": tok.id, "data": list(data) if not isinstance(data, str) else [data],
                          "seconds": time.time() - t0}
    save_json(m, out_dir / "eval_metrics.json")
    recon, usage = save_eval_pictures(result, out_dir, "held-out codebook usage")
    print(f"vqtok eval: {m['images']} images ({m['skipped']} skipped) | mse {m['mse']:.5f} | psnr {m['psnr']:.2f} dB "
          f"| usage {100 * m['usage']:.1f}% | perplexity {m['perplexity']:.1f}", flush=True)
    print(f"vqtok eval: wrote {out_dir / 'eval_metrics.json'}, {recon}, {usage}", flush=True)
    return m


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer bundle directory (RUN_DIR/tokenizer)")
    p.add_argument("--data", action="append", required=True, help="held-out images: paths or URL patterns")
    p.add_argument("--out", help="where to write eval_metrics.json and pictures")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", default="cpu")


def run_from_args(args) -> int:
    try:
        eval_vqvae(args.tokenizer, args.data, out=args.out, batch_size=args.batch_size,
                   max_images=args.max_images, device=args.device)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"vqtok eval-vqvae: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqtok.jobs.eval_vqvae", description="Evaluate a tokenizer.")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
