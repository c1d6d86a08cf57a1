"""The one training loop, shared by `vqtok train-vqvae` and `vqtok train-prior`.

    result = launch(cfg, VQVAETask, prepare, what="training the tokenizer")
    # in this process, or on Ray Train with --workers/--address/a URL --out; the same result either
    # way: VQVAETask.result(where the outputs are, their metrics.json)

Written once, here (torchtitan's Trainer, without its registries): the run directory checks, the
device and threads, seeding, resume from the newest checkpoint (refusing a run directory that holds
another model), the DDP wrap, the step (learning-rate schedule, bf16 autocast on GPU, backward,
gradient clipping, optimizer), progress lines, the periodic evaluation hook, checkpoints, the
replica check, and the end (rank 0 writes the outputs and metrics.json). A model brings a Task: its
model and optimizer, its data stream, its loss and progress metrics, its evaluation, its outputs
and how its result reads them back (jobs/train_vqvae.py: VQVAETask, jobs/train_prior.py: PriorTask),
and a payload dataclass the driver fills once for every worker.

Where the loop runs: one process (a WorkerContext, checkpoints in RUN_DIR/checkpoints), or N Ray
Train workers under TorchTrainer (a RayWorkerContext each: Ray Train sets up the process group,
checkpoints are reported to it under RUN_DIR/ray_train, and a failed worker group restarts from
the last one). With an object-store --out the workers stage outputs in a temporary directory and
rank 0 uploads them; Ray Train keeps the checkpoints at the URL itself. Collectives go through one
Collectives object (models/distributed.py), which the trainer builds and hands to the task. The
run directory and object-store helpers are in jobs/rundir.py.
"""
from __future__ import annotations

import hashlib
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from ..models.config import Config, ConfigError, option
from ..models.distributed import Collectives
from ..pipeline.sharded_stream import STREAM_VERSION
from .progress import Progress
from ._ray import check_address, check_resources, init_ray
from .rundir import (is_url, latest_checkpoint, load_checkpoint, location, prepare_output, read_json, save_checkpoint,
                     save_json, upload_outputs)

RAY_TRAIN_NAME = "ray_train"  # Ray Train's checkpoints live in RUN_DIR/ray_train


# ---------------------------------------------------------------------------------------------
# The options every training job has
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainingOptions(Config):
    out: str = option("", "run directory (local or an object-store URL): checkpoints, outputs, metrics.json")
    steps: int = option(5000, "optimizer steps")
    batch_size: int = option(128, "examples per step, over all workers")
    lr: float = option(2e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(200, "linear warmup steps before cosine decay")
    min_lr_ratio: float = option(0.1, "cosine decay from lr to lr * min-lr-ratio")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    seed: int = option(0, "seed for init, data order and random draws")
    log_every: int = option(100, "steps between progress lines")
    checkpoint_every: int = option(500, "steps between checkpoints")
    keep_checkpoints: int = option(3, "checkpoints kept")
    shuffle_buffer: int = option(10_000, "examples in each worker's shuffle buffer")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    threads: int = option(0, "torch CPU threads (0: torch's choice; on Ray, the worker's CPUs)")
    workers: int = option(1, "Ray Train workers (1 without --address: train in this process); the batch is split over them")
    gpus_per_worker: float = option(0.0, "GPUs per Ray Train worker (0: CPU workers with gloo)")
    cpus_per_worker: float = option(1.0, "CPUs per Ray Train worker")
    address: str | None = option(None, "Ray cluster HOST:PORT or auto (default: RAY_ADDRESS, else an embedded local Ray)")
    max_failures: int = option(3, "worker-group restarts from the last checkpoint before failing")

    POSITIVE = ("steps", "batch_size", "log_every", "checkpoint_every", "shuffle_buffer")
    LR_EXAMPLE = "2e-3"

    def __post_init__(self):
        for name in self.POSITIVE:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr {self.lr}: must be a positive number (e.g. {self.LR_EXAMPLE})")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.threads < 0:
            raise ConfigError("--warmup-steps, --weight-decay, --grad-clip and --threads must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        if self.workers < 1 or self.max_failures < 0 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("--workers must be at least 1, --max-failures and --gpus-per-worker not negative, "
                              "--cpus-per-worker positive")
        if self.batch_size % self.workers:
            raise ConfigError(f"--batch-size {self.batch_size} is the global batch and must split evenly over "
                              f"--workers {self.workers} (e.g. {self.batch_size // self.workers * self.workers or self.workers})")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")

    @property
    def on_ray(self) -> bool:
        # an object-store --out goes through Ray Train, whose checkpoints live at any pyarrow URL
        return self.workers > 1 or self.address is not None or is_url(self.out)


def cosine_lr(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu or auto")
    return device


# ---------------------------------------------------------------------------------------------
# What a model brings
# ---------------------------------------------------------------------------------------------
C = TypeVar("C", bound=TrainingOptions)  # the job's config
P = TypeVar("P")  # the job's payload: what the driver prepared for every worker (a dataclass)


@dataclass
class Built:
    """What Task.build returns."""

    model: nn.Module  # on the task's device; checkpointed, handed to evaluate and finish
    optimizer: torch.optim.Optimizer
    forward: nn.Module | None = None  # the module whose forward() is the training forward (DDP wraps
    # it; Task.loss calls it); None: the model itself


@dataclass
class TrainSummary:
    """What the loop hands to Task.finish on rank 0."""

    train: dict  # the last progress averages (and the rate)
    history: list[dict]  # the progress averages at every progress line: the training curve
    seconds: float  # training time in this run
    resumed_from: int | None
    workers: int
    replicas_in_sync: bool | None


class Task(Generic[C, P]):
    """A model's part of training. Every worker builds one from the job's config, the payload the
    driver prepared (a dataclass) and its WorkerContext. The trainer calls, in order:

        build()                        the model, its optimizer (and the module DDP wraps)
        describe(model)                for the start line
        batches(per_rank_batch, skip)  this rank's batches forever, `skip` samples in (resume)
        loss(net, batch)               every step, under autocast
        evaluate(model, step)          every `eval_every` steps, and with final=True after the last
        replica_state(model)           tensors that must be equal on every rank at the end
        finish(model, run_dir, summary)  rank 0: write the outputs, return the metrics

    The trainer writes finish's metrics to RUN_DIR/metrics.json; the caller's result is always
    `result(location, metrics.json)` (in this process and on Ray alike). model_config() is saved in
    checkpoints and compared on resume with saved_model_config(checkpoint)."""

    UNIT = "img"  # what progress counts per second
    LATEST: tuple[str, ...] = ()  # progress metrics that are positions (reported as their last value, not averaged)
    MISMATCH = "a run with a different model"  # the resume refusal's words
    eval_every = 0  # steps between evaluate() calls during training (0: only the final one)

    def __init__(self, cfg: C, payload: P, ctx: WorkerContext):
        self.cfg, self.payload, self.ctx = cfg, payload, ctx

    def build(self) -> Built: raise NotImplementedError
    def model_config(self) -> dict: raise NotImplementedError
    def describe(self, model: nn.Module) -> str: raise NotImplementedError
    def batches(self, per_rank_batch: int, skip: int) -> Iterator: raise NotImplementedError  # items have .consumed
    def loss(self, net: nn.Module, batch) -> tuple[torch.Tensor, int, dict]: raise NotImplementedError  # loss, items, metrics
    def finish(self, model: nn.Module, run_dir: Path, summary: TrainSummary) -> dict: raise NotImplementedError

    @classmethod
    def result(cls, location: str, metrics: dict) -> Any:
        """The job's result: its outputs at `location` (the run directory or --out URL) and the
        metrics finish returned (read back from metrics.json)."""
        raise NotImplementedError

    @classmethod
    def saved_model_config(cls, state: dict) -> dict:
        """The model config a checkpoint was written with, in today's form (options added since at
        their defaults, older checkpoints' other key), for the same-model check on resume."""
        return state.get("model_config") or {}

    def evaluate(self, model: nn.Module, step: int, *, final: bool = False) -> None:
        """Periodic evaluation on every rank (final: after the last step, before finish)."""

    def replica_state(self, model: nn.Module) -> list[torch.Tensor]:
        """Tensors that must be bitwise equal on every rank at the end (checked; a mismatch fails)."""
        return []


# ---------------------------------------------------------------------------------------------
# Where the loop runs
# ---------------------------------------------------------------------------------------------
@dataclass
class WorkerContext:
    """This copy of the loop: its collectives (rank, world size) and device. Checkpoints go to
    RUN_DIR/checkpoints; RayWorkerContext sends them through Ray Train."""

    comm: Collectives
    device: str = "cpu"

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def latest_state(self, run_dir: Path) -> tuple[dict | None, str]:
        ckpt = latest_checkpoint(run_dir)
        return (load_checkpoint(ckpt), str(ckpt)) if ckpt is not None else (None, "")

    def save_state(self, run_dir: Path, step: int, state: dict, keep: int, metrics: dict) -> None:
        if self.is_main:
            save_checkpoint(run_dir, step, state, keep=keep)


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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, task: Task, run_dir: Path):
        self.task, self.cfg, self.ctx, self.run_dir = task, task.cfg, task.ctx, run_dir

    def train(self) -> None:
        """Train to cfg.steps (resuming when RUN_DIR holds a checkpoint); then rank 0 writes the
        outputs and RUN_DIR/metrics.json."""
        cfg, task, ctx = self.cfg, self.task, self.ctx
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        built = task.build()
        model, opt = built.model, built.optimizer
        step, consumed, resumed_from = self._resume(model, opt)
        # DDP averages gradients over ranks. broadcast_buffers=False: buffers (the quantizer's EMA
        # statistics) are kept in sync by the model's own collectives, not overwritten by rank 0's.
        net = built.forward or model
        if ctx.world_size > 1:
            net = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
        if ctx.is_main:
            save_json(cfg.to_dict(), self.run_dir / "config.json")
            print(f"vqtok: training {task.describe(model)} on {ctx.device} for {cfg.steps} steps "
                  f"(batch {cfg.batch_size}); run directory {self.run_dir}", flush=True)
        batches = prefetch(task.batches(cfg.batch_size // ctx.world_size, skip=consumed))
        device_type = torch.device(ctx.device).type
        progress = Progress(cfg.steps, start_step=step, every=cfg.log_every, unit=task.UNIT, latest=task.LATEST)
        history: list[dict] = []
        t0 = time.time()
        model.train()
        while step < cfg.steps:
            batch = next(batches)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                loss, items, metrics = task.loss(net, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            consumed = batch.consumed
            if ctx.is_main:
                progress.update(step, items * ctx.world_size, **metrics)
                if step % progress.every == 0 or step == cfg.steps:
                    history.append({"step": step, **{k: v for k, v in progress.last.items() if not k.endswith("_per_s")}})
            if task.eval_every and step % task.eval_every == 0 and step < cfg.steps:
                task.evaluate(model, step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self._save(step, model, opt, ctx.comm.gather_ints(consumed), loss)
        batches.close()  # stops the prefetch thread
        seconds = time.time() - t0
        task.evaluate(model, cfg.steps, final=True)
        in_sync = replicas_in_sync(task.replica_state(model), ctx.comm)
        if ctx.is_main:
            summary = TrainSummary(dict(progress.last), history, seconds, resumed_from, ctx.world_size, in_sync)
            save_json(task.finish(model, self.run_dir, summary), self.run_dir / "metrics.json")

    def _resume(self, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int, int | None]:
        """(step, samples this rank had consumed, step resumed from) from the newest checkpoint."""
        state, where = self.ctx.latest_state(self.run_dir)
        if state is None:
            return 0, 0, None
        self._check_same_data_order(state, where)
        self._check_same_model(self.task.saved_model_config(state))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = int(state["step"])
        if self.ctx.is_main:
            print(f"vqtok: resumed from step {step} ({where})", flush=True)
        return step, self._resume_position(state), step

    def _resume_position(self, state: dict) -> int:
        """Samples this rank had read at the checkpoint. Resuming with another worker count cannot
        place every rank exactly: it restarts each rank at its share of the total read."""
        ctx = self.ctx
        by_rank = state.get("consumed_by_rank") or [int(state["consumed"])]
        if len(by_rank) == ctx.world_size:
            return int(by_rank[ctx.rank])
        if ctx.is_main:
            print(f"vqtok: the checkpoint was written by {len(by_rank)} worker(s), this run has {ctx.world_size}: "
                  f"data order restarts from each rank's share of the {sum(by_rank)} samples read", flush=True)
        return sum(by_rank) // ctx.world_size

    def _check_same_data_order(self, state: dict, where: str) -> None:
        """A checkpoint's data position means something only in the data order it was written in
        (pipeline/sharded_stream.py); checkpoints without stream_version were written before it."""
        version = state.get("stream_version", 1)
        if version != STREAM_VERSION:
            raise ConfigError(
                f"{where} was written by a vqtok that read the training data in another order (stream_version "
                f"{version}; this vqtok's is {STREAM_VERSION}), so this run cannot continue with the data it would "
                f"have seen. Finish it with the vqtok version that started it, or start over: use a new --out "
                f"directory, or delete {self.run_dir / 'checkpoints'} (and {self.run_dir / RAY_TRAIN_NAME})")

    def _check_same_model(self, saved: dict) -> None:
        now = self.task.model_config()
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            desc = ", ".join(f"{k}: {_short(a)} in the checkpoint vs {_short(b)} now" for k, (a, b) in sorted(diff.items()))
            raise ConfigError(f"{self.run_dir} holds {self.task.MISMATCH} ({desc}); use a new --out directory, or delete "
                              f"{self.run_dir / 'checkpoints'} (and {self.run_dir / RAY_TRAIN_NAME}) to start over")

    def _save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, by_rank: list[int], loss) -> None:
        state = {
            "step": step, "consumed": by_rank[self.ctx.rank], "consumed_by_rank": by_rank, "stream_version": STREAM_VERSION,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "model_config": self.task.model_config(),
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": self.cfg.to_dict(),
        }
        self.ctx.save_state(self.run_dir, step, state, keep=self.cfg.keep_checkpoints,
                            metrics={"step": step, "loss": float(loss.item())})


def replicas_in_sync(tensors: list[torch.Tensor], comm: Collectives) -> bool | None:
    """After training on several ranks: are these tensors (a task's replica state) bitwise identical
    on every rank? They must be; a mismatch is a bug and fails the run (RuntimeError on every rank).
    None when there is nothing to compare (one rank, or no replica state)."""
    if comm.world_size == 1 or not tensors:
        return None
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = comm.gather_objects(h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"model replicas diverged across ranks (digests {[d[:16] for d in digests]}); "
                           f"please report this")
    return True


def _short(v) -> str:
    return repr(v[:16]) if isinstance(v, str) and len(v) > 16 else repr(v)


def prefetch(it: Iterator, depth: int = 4) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead (data loading overlaps compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surface errors in the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="vqtok-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# Launching: this process or Ray Train
# ---------------------------------------------------------------------------------------------
def launch(cfg: TrainingOptions, task_cls: type[Task[Any, P]], prepare: Callable[[], P], *, what: str) -> Any:
    """Validate, then train. `prepare()` runs on the driver after the output checks (it lists the
    inputs, so a pattern that matches nothing fails before any model is built) and returns the
    payload every worker's task receives. Trains in this process, or on Ray Train (cfg.on_ray);
    either way the result is task_cls.result(location, the run's metrics.json)."""
    if cfg.on_ray:
        check_address(cfg.address)
    run_dir = prepare_output(cfg.out)
    payload = prepare()
    if cfg.on_ray:
        fit_on_ray(task_cls, cfg, payload, run_dir=run_dir,
                   what=f"{what} ({cfg.batch_size // cfg.workers} per worker per step)")
    else:
        device = resolve_device(cfg.device)
        Trainer(task_cls(cfg, payload, WorkerContext(Collectives(device=device), device)), run_dir).train()
    where = location(cfg.out, run_dir)
    return task_cls.result(where, read_json(where, "metrics.json"))


def fit_on_ray(task_cls: type[Task[Any, P]], cfg: TrainingOptions, payload: P, *, run_dir: Path | None,
               what: str) -> None:
    """Run the Trainer on cfg.workers Ray Train workers; rank 0 leaves the outputs in run_dir (a
    local --out) or uploads them to the --out URL. Raises when the run fails for good (after
    max_failures restarts of the worker group)."""
    ray = init_ray(cfg.address)
    check_resources(ray, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})
    run_dir = run_dir.resolve() if run_dir is not None else None  # Ray Train's storage path must be absolute
    storage = str(run_dir) if run_dir is not None else cfg.out.rstrip("/")
    print(f"vqtok: {what} on Ray Train with {cfg.workers} workers ({'GPU' if cfg.gpus_per_worker else 'CPU'}); "
          f"checkpoints in {storage}/{RAY_TRAIN_NAME}", flush=True)
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config={"task_cls": task_cls, "cfg": cfg, "payload": payload, "run_dir": run_dir},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_TRAIN_NAME, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    trainer.fit()


def _ray_entry(config: dict) -> None:
    """Every Ray Train worker starts here (config: fit_on_ray's train_loop_config)."""
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
    device = str(ray.train.torch.get_device())
    ctx = RayWorkerContext(Collectives(tc.get_world_rank(), tc.get_world_size(), device), device)
    cfg = config["cfg"]
    task = config["task_cls"](cfg, config["payload"], ctx)
    if config["run_dir"] is not None:
        Trainer(task, config["run_dir"]).train()
        return
    with tempfile.TemporaryDirectory(prefix="vqtok-run-") as local:  # outputs staged here, then uploaded
        Trainer(task, Path(local)).train()
        if ctx.is_main:
            upload_outputs(Path(local), cfg.out)
