"""Train a VQ-VAE tokenizer: `vqtok train-vqvae` / `python -m vqtok.jobs.train_vqvae`.

    cfg = TrainConfig(data=["shards/*.tar"], out="runs/tok", steps=5000)
    result = train_vqvae(cfg)        # -> result.tokenizer_dir, result.metrics

One process by default; with `--workers N` (or `--address`) the same loop runs as N Ray Train
workers under TorchTrainer: DDP (gloo on CPU, NCCL on GPU), the global batch split across ranks,
data sharded by rank, codebook statistics all-reduced and random draws broadcast from rank 0 so the
replicas' codebooks stay identical (checked at the end), checkpoints reported to Ray Train under
RUN_DIR/ray_train, and a killed worker restarted from the last checkpoint (FailureConfig).

Re-running the same command resumes from the newest checkpoint (RUN_DIR/checkpoints in one process,
RUN_DIR/ray_train on Ray) and says so.
At the end RUN_DIR holds tokenizer/ (the bundle), config.json (the resolved config),
metrics.json, reconstructions.png and codebook_usage.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import check_keys, load_config_file, save_json
from ..models import VQVAE, Preprocess, Tokenizer, VQVAEConfig
from ..pipeline.decode import DEFAULT_MAX_PIXELS
from ..pipeline.errors import ConfigError, DataError
from ..pipeline.evaluate import evaluate, save_eval_pictures
from ..pipeline.progress import Progress, fmt_duration
from ..pipeline.sources import FailureLog, Unit, list_units, split_patterns
from ..pipeline.stream import ImageStream, prefetch
from ._ray import check_address
from ._entry import job_main
from ._trainer import (RUN_FLAGS, WorkerContext, check_run_options, cosine_lr, fit_on_ray, is_url, prepare_output, read_json,
                       resolve_device, resume_position)


@dataclass(kw_only=True)
class TrainConfig:
    data: list[str]
    out: str
    val_data: list[str] = field(default_factory=list)
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    steps: int = 5000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    shuffle_buffer: int = 10_000
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_failure_fraction: float = 0.1  # fail the run when more of the inputs than this are bad
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads (0: torch's default; on Ray, the worker's CPUs)
    workers: int = 1  # Ray Train workers; 1 without --address trains in this process
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS or an embedded local Ray
    max_failures: int = 3  # worker-group restarts Ray Train makes before giving up

    def __post_init__(self):
        if isinstance(self.model, dict):
            check_keys(self.model, VQVAEConfig, "model")
            self.model = VQVAEConfig(**self.model)
        self.data = split_patterns(self.data) if self.data else []
        self.val_data = split_patterns(self.val_data) if self.val_data else []
        if not self.data:
            raise ConfigError("--data is required: a path or URL pattern of training images "
                              "(e.g. examples/fashion-mnist or /data/train-{000000..000099}.tar)")
        if not self.out:
            raise ConfigError("--out is required: the run directory (e.g. runs/tokenizer)")
        check_run_options(self, positive=("steps", "batch_size", "log_every", "checkpoint_every", "shuffle_buffer",
                                          "max_image_pixels"), lr_example="2e-3")
        if not 0 <= self.max_failure_fraction <= 1:
            raise ConfigError(f"--max-failure-fraction {self.max_failure_fraction}: must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_keys(d, cls, "train config")
        return cls(**d)


@dataclass
class TrainResult:
    run_dir: str
    tokenizer_dir: str
    tokenizer_id: str
    metrics: dict
    reconstructions: str
    usage_histogram: str
    resumed_from: int | None


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cosine_lr(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)


# ----------------------------------------------------------------------------------------------
def train_vqvae(cfg: TrainConfig) -> TrainResult:
    """Validate everything, then train: in this process, or on Ray Train with --workers/--address."""
    # an object-store --out goes through Ray Train, whose checkpoints live at any pyarrow URL
    on_ray = cfg.workers > 1 or cfg.address is not None or is_url(cfg.out)
    if on_ray:
        check_address(cfg.address)
    run_dir = prepare_output(cfg.out)
    # Units are listed once, here on the driver: a pattern that matches nothing fails before any
    # model is built, and workers get the same sorted list.
    units = list_units(cfg.data)
    val_units = list_units(cfg.val_data) if cfg.val_data else None
    if not on_ray:
        return train_worker(WorkerContext(device=resolve_device(cfg.device)), run_dir, cfg, units, val_units)
    storage = fit_on_ray(
        _ray_worker, {"cfg": cfg.to_dict(), "units": units, "val_units": val_units}, out=cfg.out, run_dir=run_dir,
        address=cfg.address, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
        cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures, keep_checkpoints=cfg.keep_checkpoints,
        what=f"training the tokenizer ({cfg.batch_size // cfg.workers} images per worker per step)")
    # rank 0 wrote the bundle, metrics and pictures into RUN_DIR (shared storage on a multi-node cluster)
    metrics = read_json(storage, "metrics.json")
    return TrainResult(storage, f"{storage}/tokenizer", metrics["tokenizer_id"], metrics,
                       f"{storage}/reconstructions.png", f"{storage}/codebook_usage.png", metrics.get("resumed_from"))


def _ray_worker(ctx: WorkerContext, run_dir: Path, cfg: dict, units: list[Unit], val_units: list[Unit] | None):
    return train_worker(ctx, run_dir, TrainConfig.from_dict(cfg), units, val_units)


def train_worker(ctx: WorkerContext, run_dir: Path, cfg: TrainConfig, units: list[Unit],
                 val_units: list[Unit] | None) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mc = cfg.model
    preprocess = Preprocess(image_size=mc.image_size, channels=mc.channels)
    model = VQVAE(mc).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    per_rank_batch = cfg.batch_size // ctx.world_size

    step, consumed, resumed_from = 0, 0, None
    state, where = ctx.latest_state(run_dir)
    if state is not None:
        _check_same_model(state["config"]["model"], mc, run_dir)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, resumed_from = int(state["step"]), int(state["step"])
        consumed = resume_position(state, ctx)
        if ctx.is_main:
            print(f"vqtok: resumed from step {step} ({where})", flush=True)
    # DDP averages gradients over ranks; the quantizer keeps its own buffers in sync (all-reduced
    # statistics, rank-0 draws), so DDP must not overwrite them with rank 0's every step
    net = model if ctx.world_size == 1 else torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    if ctx.is_main:
        save_json(cfg.to_dict(), run_dir / "config.json")

    failures = FailureLog(verbose=ctx.is_main)
    stream = ImageStream(units, preprocess, seed=cfg.seed, rank=ctx.rank,
                         world_size=ctx.world_size, shuffle_buffer=cfg.shuffle_buffer,
                         max_pixels=cfg.max_image_pixels, failures=failures)
    batches = prefetch(stream.batches(per_rank_batch, skip=consumed))
    use_bf16 = torch.device(ctx.device).type == "cuda"
    progress = Progress(cfg.steps, start_step=step, every=cfg.log_every)
    if ctx.is_main:
        print(f"vqtok: training {_describe(model, mc)} on {ctx.device} for {cfg.steps} steps "
              f"(batch {cfg.batch_size}); run directory {run_dir}", flush=True)
    t0 = time.time()
    history: list[dict] = []  # rank 0's loss at every progress line: the curve, in metrics.json
    model.train()
    while step < cfg.steps:
        batch = next(batches)
        x = Preprocess.to_model(batch.pixels.to(ctx.device, non_blocking=True))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast(device_type=torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=use_bf16):
            recon, q = net(x)
        recon_loss = F.mse_loss(recon.float(), x)
        loss = recon_loss + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        consumed = batch.consumed
        _check_failures(failures, consumed, cfg)
        if ctx.is_main:
            if step % progress.every == 0 or step == cfg.steps:
                history.append({"step": step, "loss": loss.item(), "mse": recon_loss.item() / 4})
            progress.update(step, len(x) * ctx.world_size, loss=loss.item(), mse=recon_loss.item() / 4,
                            commit=q.commitment_loss.item(), ppl=q.perplexity.item(),
                            usage=model.quantizer.usage())
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            by_rank = ctx.gather_ints(consumed)
            ctx.save_state(run_dir, step, {
                "step": step, "consumed": consumed, "consumed_by_rank": by_rank, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "config": cfg.to_dict(),
            }, keep=cfg.keep_checkpoints, metrics={"step": step, "loss": float(loss.item())})
    batches.close()  # stops the prefetch thread
    train_seconds = time.time() - t0
    train_metrics = dict(progress.last)
    in_sync = _replicas_in_sync(model, ctx)
    if not ctx.is_main:
        return None  # type: ignore[return-value]
    train_metrics["history"] = history
    return _finish(cfg, model, run_dir, val_units or units, train_metrics, train_seconds, failures,
                   resumed_from, ctx, in_sync)


def _replicas_in_sync(model, ctx: WorkerContext) -> bool | None:
    """After training on several ranks: are the codebooks (and the rest of the quantizer's state)
    bitwise identical on every rank? They must be; a mismatch is a bug and fails the run."""
    if ctx.world_size == 1:
        return None
    import hashlib

    q = model.quantizer
    h = hashlib.sha256()
    for name in ("codebook", "ema_count", "ema_sum", "usage_ring"):
        t = getattr(q, name, None)
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * ctx.world_size
    import torch.distributed as dist

    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"codebook replicas diverged across ranks (digests {digests}); please report this")
    return True


def _finish(cfg, model, run_dir: Path, eval_units, train_metrics, train_seconds, failures, resumed_from,
            ctx, in_sync: bool | None = None) -> TrainResult:
    """Export the bundle, evaluate, draw the pictures, write metrics.json."""
    tokenizer = Tokenizer(model.cpu())
    tok_dir = run_dir / "tokenizer"
    tok_id = tokenizer.save(tok_dir)
    model.to(ctx.device)
    stream = ImageStream(eval_units, tokenizer.preprocess, shuffle=False,
                         max_pixels=cfg.max_image_pixels, failures=FailureLog(verbose=False))
    result = evaluate(model, stream, device=ctx.device, max_images=None if cfg.val_data else 10_000)
    recon_png, usage_png = save_eval_pictures(
        result, run_dir, "held-out codebook usage" if cfg.val_data else "codebook usage (train data)")
    metrics = {
        "steps": cfg.steps,
        "train": train_metrics,
        "train_eval": None if cfg.val_data else result.metrics,
        "held_out": result.metrics if cfg.val_data else None,
        "train_seconds_this_run": train_seconds,
        "skipped_inputs": failures.count,
        "tokenizer_id": tok_id,
        "workers": ctx.world_size,
        "replicas_in_sync": in_sync,
        "resumed_from": resumed_from,
    }
    save_json(metrics, run_dir / "metrics.json")
    m = result.metrics
    where = "held-out" if cfg.val_data else "training data (no --val-data given)"
    print(f"vqtok: done. {where}: mse {m['mse']:.5f} | psnr {m['psnr']:.2f} dB | usage {100 * m['usage']:.1f}% "
          f"| perplexity {m['perplexity']:.1f} over {m['images']} images", flush=True)
    print(f"vqtok: tokenizer  {tok_dir}  (id {tok_id[:16]}...)", flush=True)
    print(f"vqtok: reconstructions  {recon_png}", flush=True)
    print(f"vqtok: codebook usage   {usage_png}", flush=True)
    print(f"vqtok: metrics          {run_dir / 'metrics.json'}"
          f"  (trained {fmt_duration(train_seconds)} this run, {failures.count} inputs skipped)", flush=True)
    return TrainResult(str(run_dir), str(tok_dir), tok_id, metrics, recon_png, usage_png, resumed_from)


def _check_same_model(saved: dict, current: VQVAEConfig, run_dir: Path) -> None:
    now = current.to_dict()
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: {a!r} in the checkpoint vs {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"{run_dir} holds a run with a different model ({desc}); use a new --out "
                          f"directory, or delete {run_dir / 'checkpoints'} to start over")


def _check_failures(failures: FailureLog, consumed: int, cfg: TrainConfig) -> None:
    seen = max(consumed, 1)  # raw samples read so far, the failed ones included
    if failures.count > 20 and failures.count / seen > cfg.max_failure_fraction:
        raise DataError(f"{failures.count} of {seen} inputs could not be used (more than "
                        f"--max-failure-fraction {cfg.max_failure_fraction}); first: {failures.examples[0]}")


def _describe(model, mc: VQVAEConfig) -> str:
    n = sum(p.numel() for p in model.parameters())
    return (f"VQ-VAE ({n / 1e6:.2f}M params, {mc.image_size}x{mc.image_size}x{mc.channels} -> "
            f"{mc.grid}x{mc.grid} tokens, K={mc.codebook_size}, {mc.codebook} codebook)")


# ----------------------------------------------------------------------------------------------
# Command line (shared by `vqtok train-vqvae` and `python -m vqtok.jobs.train_vqvae`)
# ----------------------------------------------------------------------------------------------
MODEL_FLAGS = {  # flag -> (VQVAEConfig field type, help)
    "codebook_size": (int, "K, the number of codes (default 512)"),
    "code_dim": (int, "encoder output dimension (default 64)"),
    "codebook_dim": (int, "dimension of the codes behind a projection (default 16; 0: code-dim)"),
    "image_size": (int, "images are resized and center-cropped to this square (default 28)"),
    "channels": (int, "1 grayscale or 3 RGB (default 1)"),
    "downsample": (int, "4, 8 or 16: token grid = image-size / downsample (default 4)"),
    "width": (int, "channels at the token grid (default 80)"),
    "res_blocks": (int, "residual blocks at the token grid (default 2)"),
    "beta": (float, "commitment loss weight (default 0.25)"),
    "codebook": (str, "ema (default) or gradient"),
    "restart_window": (int, "restart codes unused for this many steps (default 100; 0: never)"),
    "random_init": (str, "codebook init with --no-kmeans-init: normal N(0,1) (default) or uniform U(-1/K,1/K)"),
}
TRAIN_FLAGS = {
    "steps": (int, "optimizer steps (default 5000)"),
    "batch_size": (int, "images per step (default 128)"),
    "lr": (float, "peak AdamW learning rate (default 2e-3)"),
    "weight_decay": (float, "AdamW weight decay (default 0)"),
    "warmup_steps": (int, "linear warmup steps before cosine decay (default 200)"),
    "grad_clip": (float, "gradient-norm clip (default 1.0; 0: off)"),
    "seed": (int, "seed for init, data order and codebook draws (default 0)"),
    "log_every": (int, "steps between progress lines (default 100)"),
    "checkpoint_every": (int, "steps between checkpoints (default 500)"),
    "keep_checkpoints": (int, "checkpoints kept in RUN_DIR/checkpoints (default 3)"),
    "max_failure_fraction": (float, "fail when more of the inputs than this are bad (default 0.1)"),
    "max_image_pixels": (int, "refuse larger images as decompression bombs (default 64 Mpx)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", help="training images: paths or URL patterns (repeat or comma-separate)")
    p.add_argument("--val-data", action="append", help="held-out images for the final metrics")
    p.add_argument("--out", help="run directory: checkpoints, tokenizer/, metrics.json, pictures")
    p.add_argument("--config", help="a JSON or YAML file of options (flags given here override it)")
    for name, (typ, help_) in {**TRAIN_FLAGS, **RUN_FLAGS, **MODEL_FLAGS}.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    p.add_argument("--no-kmeans-init", action="store_true", default=None, help="random codebook initialisation")
    p.add_argument("--l2-normalize", dest="l2_normalize", action="store_true", default=None,
                   help="l2-normalised codes (the default)")
    p.add_argument("--no-l2-normalize", dest="l2_normalize", action="store_false",
                   help="plain (not normalised) codes")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = load_config_file(args.config) if args.config else {}
    base = dict(base)
    model = dict(base.pop("model", {}) or {})
    for name in MODEL_FLAGS:
        if getattr(args, name, None) is not None:
            model[name] = getattr(args, name)
    if args.no_kmeans_init:
        model["kmeans_init"] = False
    if args.l2_normalize is not None:
        model["l2_normalize"] = args.l2_normalize
    if model.get("codebook_dim") == 0:
        model["codebook_dim"] = None
    for name in {**TRAIN_FLAGS, **RUN_FLAGS}:
        if getattr(args, name, None) is not None:
            base[name] = getattr(args, name)
    for name in ("data", "val_data", "out"):
        if getattr(args, name, None):
            base[name] = getattr(args, name)
    base.setdefault("data", [])
    base.setdefault("out", "")
    check_keys(model, VQVAEConfig, "model options")
    try:
        base["model"] = VQVAEConfig(**model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return TrainConfig.from_dict(base)


def run_from_args(args: argparse.Namespace) -> int:
    train_vqvae(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("train-vqvae", "Train a VQ-VAE tokenizer.", add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
