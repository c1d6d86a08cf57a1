"""Sample images from a trained prior: `vqtok sample` / `python -m vqtok.jobs.sample` /
`vqtok.sample(...)`.

    result = sample(SampleConfig(prior="runs/prior", n=64, classes="3", cfg_scale=2.0, out="grid.png"))
    result = sample(prior="runs/text-prior", prompts=["a dark ankle boot", "a light bag"], n=8, cfg_scale=3.0)

A text prior (trained with --text-tokenizer) samples --n images for each --prompt (repeatable; or
--prompts-file, one per line), guided against the empty caption, or against --negative-prompt; its
grid has one row per prompt with the prompt written beside it.

KV-cache sampling in batches on the prior's device, then decoding through the tokenizer the prior
records (its id is checked; --tokenizer gives a new location). Writes the grid PNG (one row per
class when sampling several classes), each sample as its own PNG with --save-images DIR, and the
token grids with --save-tokens FILE (.npy: an (n, h, w) array; .parquet: rows in the token
dataset schema with the class in `label`).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.bundle import vqtok_version
from ..models.config import Config, ConfigError, option
from ..models.prior import Prior, Samples
from ..models.text_prior import TextPrior
from ..pipeline.viz import save_prompt_grid, save_sample_grid
from .options import Command, job_main
from .rundir import save_json
from .trainer import resolve_device


@dataclass(kw_only=True)
class SampleConfig(Config):
    WHAT = "sample config"
    prior: str = option("", "the prior's run directory (the --out of vqtok train-prior)")
    out: str = option("samples.png", "the grid PNG")
    n: int = option(64, "samples (a text prior: samples per prompt)")
    prompts: list[str] = option(help="text prior: a prompt (repeat for several; one grid row each)", factory=list,
                                flag="--prompt")
    prompts_file: str = option("", "text prior: a file of prompts, one per line")
    negative_prompt: str = option("", "text prior: guide away from this text instead of the empty caption")
    classes: str | int | None = option(None, "class C, a list C1,C2, 'all' (default for class-conditional priors: every "
                                             "class, one grid row each) or 'none' (unconditional)", flag="--class")
    temperature: float = option(1.0, "softmax temperature")
    top_k: int = option(0, "keep the k most likely codes (0: off)")
    top_p: float = option(1.0, "nucleus sampling mass (1: off)")
    cfg_scale: float | None = option(None, "classifier-free guidance scale (1: no guidance; default 1, a text prior 3)")
    seed: int = option(0, "sampling seed")
    batch_size: int = option(256, "samples generated together")
    tokenizer: str = option("", "the tokenizer bundle, when it moved from where the prior records")
    save_images: str = option("", "also write each sample as DIR/sample-NNNNN.png", metavar="DIR")
    save_tokens: str = option("", "also write the token grids (.npy or .parquet)", metavar="FILE")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")

    def __post_init__(self):
        if not self.prior:
            raise ConfigError("--prior is required: the --out of `vqtok train-prior` (PRIOR_DIR)")
        if self.n < 1 or self.batch_size < 1:
            raise ConfigError(f"--n {self.n} and --batch-size {self.batch_size}: must be at least 1")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature}: must be > 0 (1 samples the model as trained)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1] (1: off)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be 0 (off) or more")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale {self.cfg_scale}: must be >= 0 (1: no guidance)")
        if self.prompts_file:
            try:
                with open(self.prompts_file, encoding="utf-8") as f:
                    self.prompts = list(self.prompts) + [line.rstrip("\n") for line in f if line.strip()]
            except OSError as e:
                raise ConfigError(f"--prompts-file {self.prompts_file}: {e.strerror}") from None
        if self.save_tokens and not self.save_tokens.endswith((".npy", ".parquet")):
            raise ConfigError(f"--save-tokens {self.save_tokens}: name a .npy or .parquet file")


@dataclass
class SampleResult:
    grid: str
    samples: Samples
    images_dir: str | None
    tokens_file: str | None
    seconds: float


def sample(cfg: SampleConfig | None = None, **options) -> SampleResult:
    cfg = cfg or SampleConfig(**options)
    t0 = time.time()
    try:
        prior = Prior.load(cfg.prior, device=resolve_device(cfg.device))
    except ValueError as e:
        raise ConfigError(f"--prior {cfg.prior}: {e}") from None
    if isinstance(prior, TextPrior):
        return _sample_text(cfg, prior, t0)
    if cfg.prompts or cfg.negative_prompt:
        raise ConfigError(f"--prompt: {cfg.prior} is a class prior (trained without --text-tokenizer); use --class")
    labels = _labels(cfg, prior)
    tokenizer = image_tokenizer(prior, cfg.tokenizer)
    scale = 1.0 if cfg.cfg_scale is None else cfg.cfg_scale
    what = ("unconditional" if labels is None else
            f"class {labels[0].item()}" if len(set(labels.tolist())) == 1 else f"{len(set(labels.tolist()))} classes")
    print(f"vqtok sample: {cfg.n} samples ({what}) from {cfg.prior} (temperature {cfg.temperature:g}, top-k "
          f"{cfg.top_k or 'off'}, top-p {cfg.top_p:g}, cfg-scale {scale:g}, seed {cfg.seed})", flush=True)
    s = prior.sample(cfg.n, classes=labels, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                     cfg_scale=scale, seed=cfg.seed, batch_size=cfg.batch_size,
                     tokenizer=tokenizer)
    grid = save_sample_grid(s.images.numpy(), s.labels.numpy(), cfg.out)
    return _write(cfg, s, prior, grid, t0)


def _sample_text(cfg: SampleConfig, prior: TextPrior, t0: float) -> SampleResult:
    if cfg.classes is not None:
        raise ConfigError(f"--class {cfg.classes}: {cfg.prior} is a text prior: give --prompt TEXT instead")
    if not cfg.prompts:
        raise ConfigError(f"--prompt is required: {cfg.prior} is a text prior (give --prompt TEXT, repeatable, or "
                          f"--prompts-file FILE; --prompt '' samples unconditionally)")
    tokenizer = image_tokenizer(prior, cfg.tokenizer)
    scale = 3.0 if cfg.cfg_scale is None else cfg.cfg_scale
    print(f"vqtok sample: {cfg.n} samples for each of {len(cfg.prompts)} prompts from {cfg.prior} (cfg-scale {scale:g} "
          f"against {'the negative prompt' if cfg.negative_prompt else 'the empty caption'}, temperature "
          f"{cfg.temperature:g}, top-k {cfg.top_k or 'off'}, top-p {cfg.top_p:g}, seed {cfg.seed})", flush=True)
    s = prior.sample(cfg.prompts, n=cfg.n, cfg_scale=scale, negative_prompt=cfg.negative_prompt or None,
                     temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed,
                     batch_size=cfg.batch_size, tokenizer=tokenizer)
    grid = save_prompt_grid(s.images.numpy(), s.prompts, cfg.out)
    return _write(cfg, s, prior, grid, t0)


def _write(cfg: SampleConfig, s: Samples, prior, grid: str, t0: float) -> SampleResult:
    """The per-sample PNGs and tokens asked for, how they were drawn (beside the grid), a summary."""
    n = len(s.tokens)
    images_dir = _save_images(s, cfg.save_images) if cfg.save_images else None
    tokens_file = _save_tokens(s, cfg.save_tokens, prior) if cfg.save_tokens else None
    save_json(cfg.to_dict() | {"prior_tokenizer_id": prior.cfg.tokenizer_id},
              Path(grid).with_suffix(".json"))  # how these samples were drawn, beside the grid
    seconds = time.time() - t0
    print(f"vqtok sample: wrote {grid}" + (f", {n} PNGs in {images_dir}" if images_dir else "")
          + (f", token grids in {tokens_file}" if tokens_file else "")
          + f" ({seconds:.1f}s, {n / seconds:.1f} samples/s)", flush=True)
    return SampleResult(grid, s, images_dir, tokens_file, seconds)


def image_tokenizer(prior, where: str = ""):
    """The image tokenizer a prior (class or text) was trained for, on the prior's device: `where`
    (--tokenizer) or where the prior records it; a wrong one is a ConfigError naming it."""
    try:
        tokenizer = prior.load_tokenizer(where or None)
    except ValueError as e:
        raise ConfigError(f"--tokenizer {where or prior.tokenizer_path}: {e}") from None
    return tokenizer.to(next(prior.parameters()).device)


def _labels(cfg: SampleConfig, prior: Prior) -> torch.Tensor | None:
    k = prior.cfg.num_classes
    spec = None if cfg.classes is None else str(cfg.classes).strip().lower()
    if spec in (None, "all"):
        if not k:
            return None
        # every class in turn, grouped by class so the grid has one row per class
        return torch.arange(cfg.n) * k // cfg.n
    if spec in ("none", "-1"):
        return torch.full((cfg.n,), -1, dtype=torch.long) if k else None
    if not k:
        raise ConfigError(f"--class {cfg.classes}: this prior is unconditional (trained without labels); leave --class out")
    try:
        chosen = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--class {cfg.classes}: expected a class number in [0, {k}), a comma list, 'all' or 'none'") from None
    bad = [c for c in chosen if not 0 <= c < k]
    if bad:
        raise ConfigError(f"--class {bad[0]}: this prior has classes 0..{k - 1}")
    return torch.tensor(chosen)[torch.arange(cfg.n) * len(chosen) // cfg.n]


def _save_images(s: Samples, directory: str) -> str:
    from PIL import Image

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(s.images.numpy(), s.labels.tolist())):
        name = f"sample-{i:05d}" + (f"-class{lab}" if lab >= 0 else "") + ".png"
        Image.fromarray(img).save(d / name)
    return str(d)


def _save_tokens(s: Samples, path: str, prior: Prior) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".npy":
        np.save(p, s.tokens.numpy().astype(np.int32))
        return str(p)
    import pyarrow.parquet as pq

    from ..pipeline.token_format import dataset_metadata, part_table

    c = prior.cfg
    h, w = s.tokens.shape[1:]
    k = prior.vocab.codebook_size if isinstance(prior, TextPrior) else c.codebook_size
    meta = dataset_metadata(codebook_size=k, tokenizer_id=c.tokenizer_id, grid=(h, w), preprocess={},
                            vqtok_version=vqtok_version())
    labels = [lab if lab >= 0 else None for lab in s.labels.tolist()]
    table = part_table(meta, [f"sample-{i:05d}" for i in range(len(labels))], s.tokens.numpy(), labels, "vqtok sample",
                       captions=s.prompts)  # a text prior's samples: the prompt as the caption
    pq.write_table(table, p, compression="zstd")
    return str(p)


COMMAND = Command("sample", "sample images from a trained prior", SampleConfig, sample)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
