"""What the training jobs (train-vqvae, train-prior) share: where a copy of the training loop runs
(one process, or a Ray Train worker), checkpoints through it, the run directory checks, the
learning-rate schedule, and launching the loop on Ray Train.

A job writes one function `worker(ctx, run_dir, **kwargs)` holding its loop. `fit_on_ray` runs it
as N TorchTrainer workers (DDP process group set up by Ray Train), each with a RayWorkerContext;
without Ray the job calls it directly with a WorkerContext. With an object-store --out the
workers stage outputs in a temporary directory and rank 0 uploads them; Ray Train keeps the
checkpoints at the URL itself.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pipeline.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..pipeline.errors import ConfigError
from ._ray import check_resources, init_ray

RAY_TRAIN_NAME = "ray_train"  # Ray Train's checkpoints live in RUN_DIR/ray_train


@dataclass
class WorkerContext:
    """Where this copy of the loop runs. Ray Train fills it from its own context."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # checkpoints: RUN_DIR/checkpoints in one process; RayWorkerContext goes through Ray Train
    def latest_state(self, run_dir: Path) -> tuple[dict | None, str]:
        ckpt = latest_checkpoint(run_dir)
        return (load_checkpoint(ckpt), str(ckpt)) if ckpt is not None else (None, "")

    def save_state(self, run_dir: Path, step: int, state: dict, keep: int, metrics: dict) -> None:
        if self.is_main:
            save_checkpoint(run_dir, step, state, keep=keep)

    def gather_ints(self, value: int) -> list[int]:
        """value from every rank, in rank order."""
        if self.world_size == 1:
            return [int(value)]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, int(value))
        return [int(v) for v in out]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over ranks in place (through the device: NCCL reduces GPU tensors only)."""
        if self.world_size > 1:
            import torch.distributed as dist

            d = t.to(self.device)
            dist.all_reduce(d)
            t.copy_(d.cpu())
        return t


class RayWorkerContext(WorkerContext):
    """A Ray Train worker: checkpoints are reported to Ray Train (every rank reports; rank 0 attaches
    the state) and come back from it after a worker failure or a re-run of the same command."""

    def latest_state(self, run_dir: Path) -> tuple[dict | None, str]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:  # nothing in RUN_DIR/ray_train: maybe a one-process run to continue
            return super().latest_state(run_dir)
        with ckpt.as_directory() as d:
            return load_checkpoint(Path(d) / "state.pt"), ckpt.path

    def save_state(self, run_dir: Path, step: int, state: dict, keep: int, metrics: dict) -> None:
        import ray.train

        if not self.is_main:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def resume_position(state: dict, ctx: WorkerContext) -> int:
    """Samples this rank had read at the checkpoint. Resuming with another worker count cannot
    place every rank exactly: it restarts each rank at its share of the total read."""
    by_rank = state.get("consumed_by_rank") or [int(state["consumed"])]
    if len(by_rank) == ctx.world_size:
        return int(by_rank[ctx.rank])
    if ctx.is_main:
        print(f"vqtok: the checkpoint was written by {len(by_rank)} worker(s), this run has {ctx.world_size}: "
              f"data order restarts from each rank's share of the {sum(by_rank)} samples read", flush=True)
    return sum(by_rank) // ctx.world_size


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    return device


def cosine_lr(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def check_run_options(cfg, *, positive: tuple[str, ...], lr_example: str) -> None:
    """The options every training job has (schedule, workers, device), validated one way."""
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr {cfg.lr}: must be a positive number (e.g. {lr_example})")
    if cfg.warmup_steps < 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.threads < 0:
        raise ConfigError("--warmup-steps, --weight-decay, --grad-clip and --threads must not be negative")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio {cfg.min_lr_ratio}: must be in [0, 1]")
    if cfg.workers < 1 or cfg.max_failures < 0 or cfg.gpus_per_worker < 0 or cfg.cpus_per_worker <= 0:
        raise ConfigError("--workers must be at least 1, --max-failures and --gpus-per-worker not negative, "
                          "--cpus-per-worker positive")
    if cfg.batch_size % cfg.workers:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
                          f"--workers {cfg.workers} (e.g. {cfg.batch_size // cfg.workers * cfg.workers or cfg.workers})")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N")


# Command-line flags every training job takes: flag -> (type, help)
RUN_FLAGS = {
    "device": (str, "auto (default: CUDA when present), cpu, cuda, cuda:N"),
    "threads": (int, "torch CPU threads (default: torch's choice; on Ray, the worker's CPUs)"),
    "workers": (int, "Ray Train workers (default 1: train in this process); --batch-size is split over them"),
    "gpus_per_worker": (float, "GPUs per Ray Train worker (default 0: CPU workers with gloo)"),
    "cpus_per_worker": (float, "CPUs per Ray Train worker (default 1)"),
    "address": (str, "Ray cluster HOST:PORT or auto (default: RAY_ADDRESS, else an embedded local Ray)"),
    "max_failures": (int, "worker-group restarts from the last checkpoint before failing (default 3)"),
}


def is_url(out: str) -> bool:
    return "://" in out and not out.startswith("file://")


def check_output_url(out: str) -> None:
    """An object-store RUN_DIR (s3://bucket/run): fail now, naming it, if it cannot be written."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(out)
        probe = f"{root.rstrip('/')}/.write-test"
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as e:
        raise ConfigError(f"--out {out}: cannot write there ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"check the bucket, credentials and endpoint, or give a local directory") from None


def check_output_dir(out: str) -> Path:
    """Create RUN_DIR (or fail now, naming it) before any work starts."""
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror}); choose a writable directory") from None
    return p


def prepare_output(out: str) -> Path | None:
    """The local run directory, created; None for an object-store URL (checked writable)."""
    if is_url(out):
        check_output_url(out)
        return None
    return check_output_dir(out)


def fit_on_ray(worker: Callable, kwargs: dict, *, out: str, run_dir: Path | None, address: str | None,
               workers: int, gpus_per_worker: float, cpus_per_worker: float, max_failures: int,
               keep_checkpoints: int, what: str) -> str:
    """Run worker(ctx, run_dir, **kwargs) on `workers` Ray Train workers; returns the storage
    location (RUN_DIR or the --out URL) where rank 0 left the outputs. Raises when the run fails
    for good (after max_failures restarts of the worker group)."""
    ray = init_ray(address)
    check_resources(ray, workers=workers, gpus_per_worker=gpus_per_worker)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    storage = str(run_dir.resolve()) if run_dir is not None else out.rstrip("/")
    print(f"vqtok: {what} on Ray Train with {workers} workers ({'GPU' if gpus_per_worker else 'CPU'}); "
          f"checkpoints in {storage}/{RAY_TRAIN_NAME}", flush=True)
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config={"worker": worker, "kwargs": kwargs, "out": out,
                           "run_dir": None if run_dir is None else str(run_dir.resolve())},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_TRAIN_NAME, storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    trainer.fit()
    return storage


def _ray_entry(config: dict) -> None:
    """Every Ray Train worker starts here."""
    import logging
    import warnings

    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # vqtok prints its own progress
    try:  # Ray Train V2 logs every report at INFO under a logger named after its file
        from ray.train.v2._internal.execution import context as _train_context

        logging.getLogger(_train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated")
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    tc = ray.train.get_context()
    ctx = RayWorkerContext(rank=tc.get_world_rank(), world_size=tc.get_world_size(),
                           device=str(ray.train.torch.get_device()))
    worker, kwargs = config["worker"], config["kwargs"]
    if config["run_dir"] is not None:
        worker(ctx, Path(config["run_dir"]), **kwargs)
        return
    with tempfile.TemporaryDirectory(prefix="vqtok-run-") as local:  # outputs staged here, then uploaded
        result = worker(ctx, Path(local), **kwargs)
        if ctx.is_main and result is not None:
            upload_outputs(Path(local), config["out"])


def upload_outputs(local: Path, out: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    for path in sorted(local.rglob("*")):
        if path.is_file() and "checkpoints" not in path.parts:
            fs.put_file(str(path), f"{root}/{path.relative_to(local)}")
    print(f"vqtok: uploaded the outputs to {out}", flush=True)


def read_json(storage: str, name: str) -> dict:
    import json

    import fsspec

    with fsspec.open(f"{storage}/{name}", "r") as f:
        return json.load(f)
