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

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import VQVAE, Preprocess, Tokenizer, VQVAEConfig
from ..models.config import ConfigError, option
from ..pipeline.errors import DataError
from ..pipeline.evaluate import evaluate, save_eval_pictures
from ..pipeline.sharded_stream import ImageStream
from ..models.tokenizer import DEFAULT_MAX_PIXELS
from ..pipeline.sources import FailureLog, Unit, list_units, split_patterns
from ..pipeline.viz import save_training_curves
from .options import Command, job_main
from .progress import fmt_duration
from .trainer import Built, Task, TrainingOptions, TrainSummary, launch


@dataclass(kw_only=True)
class TrainConfig(TrainingOptions):
    WHAT = "train config"
    data: list[str] = option(help="training images: paths or URL patterns (repeat or comma-separate)", factory=list)
    val_data: list[str] = option(help="held-out images for the final metrics", factory=list)
    model: VQVAEConfig = option(factory=VQVAEConfig, cli=False)  # its fields are flags of their own
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse larger images as decompression bombs")
    max_failure_fraction: float = option(0.1, "fail when more of the inputs than this are bad")

    POSITIVE = TrainingOptions.POSITIVE + ("max_image_pixels",)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = VQVAEConfig.from_dict(self.model)
        self.data = split_patterns(self.data) if self.data else []
        self.val_data = split_patterns(self.val_data) if self.val_data else []
        if not self.data:
            raise ConfigError("--data is required: a path or URL pattern of training images "
                              "(e.g. examples/fashion-mnist or /data/train-{000000..000099}.tar)")
        if not self.out:
            raise ConfigError("--out is required: the run directory (e.g. runs/tokenizer)")
        super().__post_init__()
        if not 0 <= self.max_failure_fraction <= 1:
            raise ConfigError(f"--max-failure-fraction {self.max_failure_fraction}: must be in [0, 1]")


@dataclass
class TrainResult:
    run_dir: str
    tokenizer_dir: str
    tokenizer_id: str
    metrics: dict
    reconstructions: str
    usage_histogram: str
    resumed_from: int | None


@dataclass(frozen=True)
class VQVAEPayload:
    """What the driver prepares once for every worker: the input units, listed and sorted there (a
    pattern that matches nothing fails before any model is built; every worker reads one list)."""

    units: list[Unit]
    val_units: list[Unit] | None  # --val-data's, for the final metrics (None: the training data)


def train_vqvae(cfg: TrainConfig) -> TrainResult:
    """Validate everything, then train: in this process, or on Ray Train with --workers/--address."""
    def prepare() -> VQVAEPayload:
        return VQVAEPayload(list_units(cfg.data), list_units(cfg.val_data) if cfg.val_data else None)

    return launch(cfg, VQVAETask, prepare, what="training the tokenizer")


class VQVAETask(Task[TrainConfig, VQVAEPayload]):
    """The tokenizer's part of training: a VQ-VAE, images from an ImageStream, reconstruction MSE
    plus the quantizer's loss, and at the end the bundle, held-out metrics and pictures."""

    UNIT = "img"

    def __init__(self, cfg: TrainConfig, payload: VQVAEPayload, ctx):
        super().__init__(cfg, payload, ctx)
        self.failures = FailureLog(verbose=ctx.is_main)

    def build(self) -> Built:
        # the quantizer syncs its codebook statistics through the trainer's collectives
        model = VQVAE(self.cfg.model, comm=self.ctx.comm).to(self.ctx.device)
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=(0.9, 0.99), weight_decay=self.cfg.weight_decay)
        return Built(model, opt)

    def model_config(self) -> dict:
        return self.cfg.model.to_dict()

    @classmethod
    def saved_model_config(cls, state: dict) -> dict:
        # checkpoints from before `model_config` was a key of its own hold it in their config
        saved = state.get("model_config") or state.get("config", {}).get("model") or {}
        try:  # options added since at their defaults, so an older checkpoint of the same model resumes
            return VQVAEConfig.from_dict(saved).to_dict()
        except ConfigError:
            return saved  # reported as a mismatch, field by field

    def describe(self, model) -> str:
        mc, n = self.cfg.model, sum(p.numel() for p in model.parameters())
        return (f"VQ-VAE ({mc.arch}{f' {mc.preset}' if mc.preset else ''}, {n / 1e6:.2f}M params, "
                f"{mc.image_size}x{mc.image_size}x{mc.channels} -> "
                f"{mc.grid}x{mc.grid} tokens, K={mc.codebook_size}, {mc.codebook} codebook)")

    def batches(self, per_rank_batch: int, skip: int):
        """This rank's batches; fails once more than --max-failure-fraction of the samples read
        could not be used."""
        cfg, ctx = self.cfg, self.ctx
        preprocess = Preprocess(image_size=cfg.model.image_size, channels=cfg.model.channels)
        stream = ImageStream(self.payload.units, preprocess, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                             shuffle_buffer=cfg.shuffle_buffer, max_pixels=cfg.max_image_pixels, failures=self.failures)
        for batch in stream.batches(per_rank_batch, skip=skip):
            seen, count = max(batch.consumed, 1), self.failures.count  # raw samples read, the failed ones included
            if count > 20 and count / seen > cfg.max_failure_fraction:
                raise DataError(f"{count} of {seen} inputs could not be used (more than --max-failure-fraction "
                                f"{cfg.max_failure_fraction}); first: {self.failures.examples[0]}")
            yield batch

    def loss(self, net, batch):
        x = Preprocess.to_model(batch.pixels.to(self.ctx.device, non_blocking=True))  # (B, C, S, S) in [-1, 1]
        recon, q = net(x)
        recon_loss = F.mse_loss(recon.float(), x)
        # the model sees pixels in [-1, 1], twice the [0, 1] range, so its squared error is 4x the
        # error in [0, 1] units: / 4 reports the MSE on the scale of the held-out metrics and PSNR
        loss = recon_loss + q.loss
        return loss, len(x), {"loss": loss.item(), "mse": recon_loss.item() / 4, "commit": q.commitment_loss.item(),
                              "ppl": q.perplexity.item(), "usage": getattr(net, "module", net).quantizer.usage()}

    def replica_state(self, model) -> list[torch.Tensor]:
        # the codebook and its statistics are kept equal by the quantizer's own collectives
        # (DDP does not touch buffers): a mismatch would be a bug, so the trainer checks them
        q = model.quantizer
        return [t for t in (getattr(q, n, None) for n in ("codebook", "ema_count", "ema_sum", "usage_ring")) if t is not None]

    def finish(self, model, run_dir: Path, summary: TrainSummary) -> dict:
        """Export the bundle, evaluate, draw the pictures; the metrics (for metrics.json)."""
        cfg, device = self.cfg, self.ctx.device
        tokenizer = Tokenizer(model.cpu())
        tok_dir = run_dir / "tokenizer"
        tok_id = tokenizer.save(tok_dir)
        model.to(device)
        stream = ImageStream(self.payload.val_units or self.payload.units, tokenizer.preprocess, shuffle=False,
                             max_pixels=cfg.max_image_pixels, failures=FailureLog(verbose=False))
        result = evaluate(model, stream, device=device, max_images=None if cfg.val_data else 10_000)
        recon_png, usage_png = save_eval_pictures(
            result, run_dir, "held-out codebook usage" if cfg.val_data else "codebook usage (train data)")
        curve_png = save_training_curves(summary.history, run_dir / "loss_curve.png",
                                         series={"loss": "loss", "MSE (pixels in [0, 1])": "mse"},
                                         title="tokenizer training", ylabel="loss", log_y=True)
        metrics = {
            "steps": cfg.steps,
            "train": summary.train | {"history": summary.history},
            "train_eval": None if cfg.val_data else result.metrics,
            "held_out": result.metrics if cfg.val_data else None,
            "train_seconds_this_run": summary.seconds,
            "skipped_inputs": self.failures.count,
            "tokenizer_id": tok_id,
            "workers": summary.workers,
            "replicas_in_sync": summary.replicas_in_sync,
            "resumed_from": summary.resumed_from,
        }
        m = result.metrics
        where = "held-out" if cfg.val_data else "training data (no --val-data given)"
        print(f"vqtok: done. {where}: mse {m['mse']:.5f} | psnr {m['psnr']:.2f} dB | usage {100 * m['usage']:.1f}% "
              f"| perplexity {m['perplexity']:.1f} over {m['images']} images", flush=True)
        print(f"vqtok: tokenizer        {tok_dir}  (id {tok_id[:16]}...)", flush=True)
        print(f"vqtok: reconstructions  {recon_png}", flush=True)
        print(f"vqtok: codebook usage   {usage_png}", flush=True)
        print(f"vqtok: loss curve       {curve_png}", flush=True)
        print(f"vqtok: metrics          {run_dir / 'metrics.json'}"
              f"  (trained {fmt_duration(summary.seconds)} this run, {self.failures.count} inputs skipped)", flush=True)
        return metrics

    @classmethod
    def result(cls, location: str, metrics: dict) -> TrainResult:
        return TrainResult(location, f"{location}/tokenizer", metrics["tokenizer_id"], metrics,
                           f"{location}/reconstructions.png", f"{location}/codebook_usage.png", metrics["resumed_from"])


COMMAND = Command("train-vqvae", "train a VQ-VAE tokenizer", TrainConfig, train_vqvae)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
