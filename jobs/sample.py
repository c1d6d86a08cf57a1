"""Sample images from a trained prior: `vqtok sample` / `python -m vqtok.jobs.sample` /
`vqtok.sample(...)`.

    result = sample(SampleConfig(prior="runs/prior", n=64, classes="3", cfg_scale=2.0, out="grid.png"))

KV-cache sampling in batches on the prior's device, then decoding through the tokenizer the prior
records (its id is checked; --tokenizer gives a new location). Writes the grid PNG (one row per
class when sampling several classes), each sample as its own PNG with --save-images DIR, and the
token grids with --save-tokens FILE (.npy: an (n, h, w) array; .parquet: rows in the token
dataset schema with the class in `label`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import save_json
from ..models.prior import Prior, Samples
from ..pipeline.errors import ConfigError
from ..pipeline.viz import save_sample_grid
from ._entry import job_main
from ._trainer import resolve_device


@dataclass(kw_only=True)
class SampleConfig:
    prior: str
    out: str = "samples.png"
    n: int = 64
    classes: str | int | None = None  # None: every class in turn (conditional priors); "none": unconditional; "C" or "C1,C2"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0
    batch_size: int = 256
    tokenizer: str = ""  # default: the location the prior records
    save_images: str = ""
    save_tokens: str = ""
    device: str = "auto"

    def validate(self) -> None:
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
        if self.cfg_scale < 0:
            raise ConfigError(f"--cfg-scale {self.cfg_scale}: must be >= 0 (1: no guidance)")
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
    cfg.validate()
    t0 = time.time()
    try:
        prior = Prior.load(cfg.prior, device=resolve_device(cfg.device))
    except ValueError as e:
        raise ConfigError(f"--prior {cfg.prior}: {e}") from None
    labels = _labels(cfg, prior)
    try:
        tokenizer = prior.load_tokenizer(cfg.tokenizer or None)
    except ValueError as e:
        raise ConfigError(f"--tokenizer {cfg.tokenizer or prior.tokenizer_path}: {e}") from None
    tokenizer.to(next(prior.parameters()).device)
    what = ("unconditional" if labels is None else
            f"class {labels[0].item()}" if len(set(labels.tolist())) == 1 else f"{len(set(labels.tolist()))} classes")
    print(f"vqtok sample: {cfg.n} samples ({what}) from {cfg.prior} (temperature {cfg.temperature:g}, top-k "
          f"{cfg.top_k or 'off'}, top-p {cfg.top_p:g}, cfg-scale {cfg.cfg_scale:g}, seed {cfg.seed})", flush=True)
    s = prior.sample(cfg.n, classes=labels, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                     cfg_scale=cfg.cfg_scale, seed=cfg.seed, batch_size=cfg.batch_size, tokenizer=tokenizer)
    grid = save_sample_grid(s.images.numpy(), s.labels.numpy(), cfg.out)
    images_dir = _save_images(s, cfg.save_images) if cfg.save_images else None
    tokens_file = _save_tokens(s, cfg.save_tokens, prior) if cfg.save_tokens else None
    save_json(dataclasses.asdict(cfg) | {"prior_tokenizer_id": prior.cfg.tokenizer_id},
              Path(grid).with_suffix(".json"))  # how these samples were drawn, beside the grid
    seconds = time.time() - t0
    print(f"vqtok sample: wrote {grid}" + (f", {cfg.n} PNGs in {images_dir}" if images_dir else "")
          + (f", token grids in {tokens_file}" if tokens_file else "")
          + f" ({seconds:.1f}s, {cfg.n / seconds:.1f} samples/s)", flush=True)
    return SampleResult(grid, s, images_dir, tokens_file, seconds)


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

    from .. import __version__
    from ..pipeline.tokens import dataset_metadata, part_table

    c = prior.cfg
    meta = dataset_metadata(codebook_size=c.codebook_size, tokenizer_id=c.tokenizer_id, grid=(c.grid_h, c.grid_w),
                            preprocess={}, vqtok_version=__version__)
    labels = [lab if lab >= 0 else None for lab in s.labels.tolist()]
    table = part_table(meta, [f"sample-{i:05d}" for i in range(len(labels))], s.tokens.numpy(), labels, "vqtok sample")
    pq.write_table(table, p, compression="zstd")
    return str(p)


# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prior", required=True, help="the prior's run directory (the --out of vqtok train-prior)")
    p.add_argument("--n", type=int, default=64, help="samples (default 64)")
    p.add_argument("--class", dest="classes", default=None,
                   help="class C, a list C1,C2, 'all' (default for class-conditional priors: every class, one grid "
                        "row each) or 'none' (unconditional)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely codes (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="samples generated together (default 256)")
    p.add_argument("--tokenizer", default="", help="the tokenizer bundle, when it moved from where the prior records")
    p.add_argument("--out", default="samples.png", help="the grid PNG (default samples.png)")
    p.add_argument("--save-images", default="", metavar="DIR", help="also write each sample as DIR/sample-NNNNN.png")
    p.add_argument("--save-tokens", default="", metavar="FILE", help="also write the token grids (.npy or .parquet)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")


def run_from_args(args: argparse.Namespace) -> int:
    keys = ("prior", "n", "classes", "temperature", "top_k", "top_p", "cfg_scale", "seed", "batch_size", "tokenizer",
            "out", "save_images", "save_tokens", "device")
    sample(SampleConfig(**{k: getattr(args, k) for k in keys}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("sample", "Sample images from a trained prior.", add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
