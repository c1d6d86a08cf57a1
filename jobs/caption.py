"""Caption images with a text prior trained with `--order both`: `vqtok caption` /
`python -m vqtok.jobs.caption` / `vqtok.caption(...)`.

    result = caption(prior="runs/text-prior", data=["photos/"], out="captions.jsonl")

The images (any source tokenize reads) are decoded and tokenized with the prior's image tokenizer,
exactly as `vqtok tokenize` would (Preprocess.decode), then captioned from image-first sequences
(`<bos> <boi> image <eoi>` -> caption ids until `<eot>`; only text ids and <eot> can be drawn):
greedy by default, or sampled (--no-greedy, with temperature/top-k/top-p). Writes one row per image:
key, caption, and the source's own caption when it has one (for comparison), as JSONL or Parquet.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..models.config import Config, ConfigError, option
from ..models.prior import Prior
from ..models.text_prior import TextPrior
from ..models.tokenizer import DEFAULT_MAX_PIXELS, DecodeError
from ..pipeline.captions import clean_caption
from ..pipeline.sources import FailureLog, Failure, iter_unit, list_units, split_patterns
from .options import Command, job_main
from .progress import fmt_duration
from .sample import image_tokenizer
from .trainer import resolve_device


@dataclass(kw_only=True)
class CaptionConfig(Config):
    WHAT = "caption config"
    prior: str = option("", "a text prior trained with --order both (the --out of vqtok train-prior)")
    data: list[str] = option(help="images: paths or URL patterns, any source vqtok tokenize reads", factory=list)
    out: str = option("captions.jsonl", "where the captions go: FILE.jsonl or FILE.parquet")
    greedy: bool = option(True, "the most likely caption (--no-greedy samples with temperature/top-k/top-p)")
    temperature: float = option(1.0, "softmax temperature when sampling")
    top_k: int = option(0, "keep the k most likely ids when sampling (0: off)")
    top_p: float = option(1.0, "nucleus mass when sampling (1: off)")
    seed: int = option(0, "sampling seed")
    batch_size: int = option(256, "images captioned together")
    tokenizer: str = option("", "the image tokenizer bundle, when it moved from where the prior records")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")

    def __post_init__(self):
        self.data = split_patterns(self.data) if self.data else []
        if not self.prior:
            raise ConfigError("--prior is required: a text prior trained with --order both")
        if not self.data:
            raise ConfigError("--data is required: the images to caption")
        if not self.out.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"--out {self.out}: name a .jsonl or .parquet file")
        if self.batch_size < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError(f"--batch-size {self.batch_size} >= 1, --temperature {self.temperature} > 0, --top-p "
                              f"{self.top_p} in (0, 1], --top-k {self.top_k} >= 0")


@dataclass
class CaptionResult:
    out: str
    images: int
    failures: int
    seconds: float


def caption(cfg: CaptionConfig | None = None, **options) -> CaptionResult:
    cfg = cfg or CaptionConfig(**options)
    t0 = time.time()
    try:
        prior = Prior.load(cfg.prior, device=resolve_device(cfg.device))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--prior {cfg.prior}: {e}") from None
    if not isinstance(prior, TextPrior) or prior.cfg.orders != "both":
        raise ConfigError(f"--prior {cfg.prior}: captioning needs a text prior trained with --order both (image-first "
                          f"sequences); train one with `vqtok train-prior --text-tokenizer T --order both`")
    tok = image_tokenizer(prior, cfg.tokenizer)
    failures = FailureLog()
    rows: list[dict] = []
    pending: list[tuple[str, object, np.ndarray]] = []

    def flush():
        tokens = tok.encode(np.stack([p for _, _, p in pending]), batch_size=cfg.batch_size)
        texts = prior.captions(tokens.cpu(), greedy=cfg.greedy, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, seed=cfg.seed + len(rows), batch_size=cfg.batch_size)
        for (key, source, _), text in zip(pending, texts):
            rows.append({"key": key, "caption": text, "source_caption": clean_caption(source)[0]})
        pending.clear()
        print(f"vqtok caption: {len(rows):,} images captioned", flush=True)

    for unit in list_units(cfg.data):
        for raw in iter_unit(unit, failures.add):
            try:
                pending.append((raw.key, raw.caption, tok.preprocess.decode(raw.data, DEFAULT_MAX_PIXELS)))
            except DecodeError as e:
                failures.add(Failure(raw.key, raw.unit, str(e)))
                continue
            if len(pending) == cfg.batch_size:
                flush()
    if pending:
        flush()
    _write(rows, cfg.out)
    seconds = time.time() - t0
    print(f"vqtok caption: wrote {len(rows):,} captions to {cfg.out} ({failures.count} images skipped) in "
          f"{fmt_duration(seconds)}", flush=True)
    return CaptionResult(cfg.out, len(rows), failures.count, seconds)


def _write(rows: list[dict], out: str) -> None:
    import fsspec

    if out.endswith(".jsonl"):
        with fsspec.open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array([r[k] for r in rows], pa.string()) for k in ("key", "caption", "source_caption")})
    with fsspec.open(out, "wb") as f:
        pq.write_table(table, f)


COMMAND = Command("caption", "caption images with a text prior trained with --order both", CaptionConfig, caption)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
