"""Train the autoregressive prior on a token dataset: `vqtok train-prior` /
`python -m vqtok.jobs.train_prior` / `vqtok.train_prior(...)`.

    result = train_prior(PriorTrainConfig(tokens=["out/tokens"], out="runs/prior", steps=5000))
    result.metrics["held_out"]["bits_per_token"], result.prior_dir

The driver opens the token datasets (refusing parts made by different tokenizers), reads the
codebook size and grid from their schema metadata, counts the codes once for the unigram entropy
(the scale for bits per token) and the labels for the number of classes, and finds the tokenizer
(--tokenizer, else where the dataset says `vqtok tokenize` read it). Then the loop runs in this
process, or with --workers N / --address on N Ray Train workers (DDP): each worker streams its own
disjoint share of the Parquet parts through a shuffle buffer (pipeline.token_stream), never the
whole dataset. Checkpoints every --checkpoint-every steps; re-running the same command resumes.

PRIOR_DIR ends up with prior/ (the bundle: config.json with the tokenizer's id and location,
model.safetensors), config.json (this run's options), metrics.json (held-out bits per token beside
the unigram entropy, the loss curve, tokens/s) and samples.png (a grid of samples, one row per
class, when the tokenizer can be loaded).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import check_keys, load_config_file, save_json
from ..models.prior import Prior, PriorConfig
from ..pipeline.errors import ConfigError, DataError
from ..pipeline.progress import Progress, fmt_duration
from ..pipeline.sources import split_patterns
from ..pipeline.stream import prefetch
from ..pipeline.token_stream import TokenCorpus, TokenPart, TokenStream, bits
from ._ray import check_address
from ._entry import job_main
from ._trainer import (RUN_FLAGS, WorkerContext, check_run_options, cosine_lr, fit_on_ray, is_url, prepare_output, read_json, resolve_device,
                       resume_position)


@dataclass(kw_only=True)
class PriorTrainConfig:
    tokens: list[str]
    out: str
    val_tokens: list[str] = field(default_factory=list)
    tokenizer: str = ""  # the tokenizer bundle (default: where the token dataset says it was read from)
    num_classes: int | None = None  # None: max label + 1 from the data (0 when unlabeled); 0: unconditional
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    class_dropout: float = 0.1
    steps: int = 5000
    batch_size: int = 64  # global: token grids per optimizer step, split over workers
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    eval_every: int = 1000
    eval_rows: int = 5000  # held-out rows per periodic evaluation (the final one reads them all)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    shuffle_buffer: int = 20_000
    stats_rows: int = 2_000_000  # rows counted for the unigram entropy and the labels (in part order)
    sample_grid: bool = True  # samples.png at the end (needs the tokenizer)
    device: str = "auto"
    threads: int = 0
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    address: str | None = None
    max_failures: int = 3

    def __post_init__(self):
        self.tokens = split_patterns(self.tokens) if self.tokens else []
        self.val_tokens = split_patterns(self.val_tokens) if self.val_tokens else []
        if not self.tokens:
            raise ConfigError("--tokens is required: a token dataset written by `vqtok tokenize` (its --out)")
        if not self.out:
            raise ConfigError("--out is required: the prior's run directory (e.g. runs/prior)")
        check_run_options(self, positive=("steps", "batch_size", "log_every", "eval_every", "eval_rows",
                                          "checkpoint_every", "shuffle_buffer", "stats_rows", "n_layer", "n_head",
                                          "n_embd"), lr_example="1e-3")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-embd {self.n_embd} must be divisible by --n-head {self.n_head} (e.g. --n-embd "
                              f"{self.n_embd // self.n_head * self.n_head or self.n_head})")
        if not 0 <= self.dropout < 1 or not 0 <= self.class_dropout < 1:
            raise ConfigError(f"--dropout {self.dropout} and --class-dropout {self.class_dropout} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 0:
            raise ConfigError(f"--num-classes {self.num_classes}: 0 (unconditional) or more")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorTrainConfig":
        check_keys(d, cls, "train-prior config")
        return cls(**d)


@dataclass
class PriorResult:
    run_dir: str
    prior_dir: str
    metrics: dict
    samples: str | None  # samples.png, when the tokenizer could be loaded
    resumed_from: int | None


def train_prior(cfg: PriorTrainConfig | None = None, **options) -> PriorResult:
    """Train a prior: pass a PriorTrainConfig, or its fields as keywords
    (train_prior(tokens=["out/tokens"], out="runs/prior", steps=2000))."""
    cfg = cfg or PriorTrainConfig(**options)
    on_ray = cfg.workers > 1 or cfg.address is not None or is_url(cfg.out)
    if on_ray:
        check_address(cfg.address)
    run_dir = prepare_output(cfg.out)
    corpus = TokenCorpus(cfg.tokens, what="--tokens")
    val = TokenCorpus(cfg.val_tokens, what="--val-tokens") if cfg.val_tokens else None
    if val is not None and val.tokenizer_id != corpus.tokenizer_id:
        raise DataError(f"--val-tokens {', '.join(val.paths)} was made by tokenizer {val.tokenizer_id[:16]} but --tokens "
                        f"by {corpus.tokenizer_id[:16]}: held-out tokens must come from the same tokenizer")
    print(f"vqtok train-prior: {corpus.describe()}", flush=True)
    t0 = time.time()
    stats = corpus.stats(cfg.stats_rows)
    num_classes = cfg.num_classes if cfg.num_classes is not None else (stats.max_label + 1 if stats.labeled_rows else 0)
    if num_classes and stats.max_label >= num_classes:
        raise ConfigError(f"--num-classes {num_classes}: the data has labels up to {stats.max_label}; "
                          f"use --num-classes {stats.max_label + 1} or leave it out")
    print(f"vqtok train-prior: unigram entropy {stats.unigram_entropy_bits:.3f} bits/token over {stats.tokens:,} tokens"
          f"{' (a sample: the first ' + format(stats.rows, ',') + ' rows)' if stats.sampled else ''}; "
          f"{stats.codes_used}/{corpus.codebook_size} codes used; "
          + (f"{num_classes} classes ({stats.labeled_rows:,} labeled rows)" if num_classes else "unconditional")
          + f" [{time.time() - t0:.1f}s]", flush=True)
    tokenizer_path = _tokenizer_location(cfg, corpus)
    h, w = corpus.grid
    pc = PriorConfig(codebook_size=corpus.codebook_size, grid_h=h, grid_w=w, num_classes=num_classes,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                     class_dropout=cfg.class_dropout, tokenizer_id=corpus.tokenizer_id)
    data = {
        "parts": corpus.parts, "val_parts": val.parts if val else None,
        "stats": {"unigram_entropy_bits": stats.unigram_entropy_bits, "codes_used": stats.codes_used,
                  "rows": corpus.num_rows, "counted_rows": stats.rows, "labeled_rows": stats.labeled_rows,
                  "datasets": corpus.paths, "val_datasets": val.paths if val else []},
        "tokenizer_path": tokenizer_path,
    }
    if not on_ray:
        return prior_worker(WorkerContext(device=resolve_device(cfg.device)), run_dir, cfg.to_dict(), pc.to_dict(), **data)
    per = cfg.batch_size // cfg.workers
    storage = fit_on_ray(
        prior_worker, {"cfg": cfg.to_dict(), "prior_cfg": pc.to_dict(), **data}, out=cfg.out, run_dir=run_dir,
        address=cfg.address, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker,
        cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures, keep_checkpoints=cfg.keep_checkpoints,
        what=f"training the prior ({per} token grids per worker per step)")
    metrics = read_json(storage, "metrics.json")  # rank 0 wrote (or uploaded) it with the rest
    samples = f"{storage}/samples.png" if metrics.get("samples") else None
    return PriorResult(storage, f"{storage}/prior", metrics, samples, metrics.get("resumed_from"))


def _tokenizer_location(cfg: PriorTrainConfig, corpus: TokenCorpus) -> str:
    """--tokenizer (checked against the dataset's tokenizer id), else the dataset's record of it."""
    from ..models.tokenizer import bundle_id

    where = cfg.tokenizer or next((ds.tokenizer_location for ds in corpus.datasets if ds.tokenizer_location), "")
    if not where:
        print("vqtok train-prior: the token dataset does not say where its tokenizer is; the prior will be "
              "trained, but sampling will need --tokenizer PATH (pass --tokenizer here to record it)", flush=True)
        return ""
    try:
        got = bundle_id(where)
    except FileNotFoundError as e:
        if cfg.tokenizer:
            raise ConfigError(f"--tokenizer {cfg.tokenizer}: {e}") from None
        print(f"vqtok train-prior: the tokenizer recorded by the token dataset ({where}) is not there now; sampling "
              f"will need --tokenizer PATH", flush=True)
        return where
    if got != corpus.tokenizer_id:
        raise ConfigError(f"--tokenizer {where} is tokenizer {got[:16]}, but the token dataset was made by "
                          f"{corpus.tokenizer_id[:16]}: pass the tokenizer that wrote --tokens")
    return where if "://" in where else str(Path(where).resolve())


class _LossOf(nn.Module):
    """DDP wraps forward(): this module's forward is the prior's training loss."""

    def __init__(self, prior: Prior):
        super().__init__()
        self.prior = prior

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.prior.loss(tokens, labels)


def _optimizer(model: Prior, cfg: PriorTrainConfig) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices only (not biases, norms, embeddings of positions)."""
    decay, other = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith(("_emb", "prefix_pos")) else other).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95))


def prior_worker(ctx: WorkerContext, run_dir: Path, cfg: dict, prior_cfg: dict, parts: list[TokenPart],
                 val_parts: list[TokenPart] | None, stats: dict, tokenizer_path: str) -> PriorResult | None:
    """The training loop, on one rank."""
    cfg = PriorTrainConfig.from_dict(cfg)
    pc = PriorConfig.from_dict(prior_cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = Prior(pc).to(ctx.device)
    opt = _optimizer(model, cfg)
    per_rank = cfg.batch_size // ctx.world_size

    step, consumed, resumed_from = 0, 0, None
    state, where = ctx.latest_state(run_dir)
    if state is not None:
        _check_same_prior(state["prior_config"], pc, run_dir)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, resumed_from = int(state["step"]), int(state["step"])
        consumed = resume_position(state, ctx)
        if ctx.is_main:
            print(f"vqtok: resumed from step {step} ({where})", flush=True)
    net = _LossOf(model) if ctx.world_size == 1 else torch.nn.parallel.DistributedDataParallel(_LossOf(model))
    if ctx.is_main:
        save_json(cfg.to_dict(), run_dir / "config.json")
        n = sum(p.numel() for p in model.parameters())
        print(f"vqtok: training a prior ({n / 1e6:.2f}M params, {pc.n_layer} layers x {pc.n_embd}, "
              f"{pc.grid_h}x{pc.grid_w} tokens, K={pc.codebook_size}, "
              f"{f'{pc.num_classes} classes' if pc.num_classes else 'unconditional'}) on {ctx.device} for {cfg.steps} "
              f"steps (batch {cfg.batch_size} grids = {cfg.batch_size * pc.n_tokens:,} tokens); run directory {run_dir}",
              flush=True)
    grid = (pc.grid_h, pc.grid_w)
    stream = TokenStream(parts, grid, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                         shuffle_buffer=cfg.shuffle_buffer)
    batches = prefetch(stream.batches(per_rank, skip=consumed))
    use_bf16 = torch.device(ctx.device).type == "cuda"
    progress = Progress(cfg.steps, start_step=step, every=cfg.log_every, unit="tok")
    history: list[dict] = []
    eval_parts = val_parts or parts
    t0 = time.time()
    model.train()
    while step < cfg.steps:
        batch = next(batches)
        tokens = batch.tokens.to(ctx.device, non_blocking=True)
        labels = batch.labels.to(ctx.device) if pc.num_classes else None
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        with torch.autocast(device_type=torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = net(tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        consumed = batch.consumed
        if ctx.is_main:
            progress.update(step, tokens.numel() * ctx.world_size, bits=bits(loss.item()),
                            epochs=batch.consumed * ctx.world_size / max(stats["rows"], 1))
        if step % cfg.eval_every == 0 and step < cfg.steps:
            val_bits = evaluate_bits(model, eval_parts, grid, ctx, max_rows=cfg.eval_rows, batch_size=per_rank * 4)
            if ctx.is_main:
                history.append({"step": step, "train_bits": progress.last.get("bits"), "eval_bits": val_bits})
                print(f"vqtok: step {step}: {'held-out' if val_parts else 'train-data'} {val_bits:.4f} bits/token "
                      f"(unigram entropy {stats['unigram_entropy_bits']:.3f})", flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            by_rank = ctx.gather_ints(consumed)
            ctx.save_state(run_dir, step, {
                "step": step, "consumed": consumed, "consumed_by_rank": by_rank, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "prior_config": pc.to_dict(),
                "config": cfg.to_dict(),
            }, keep=cfg.keep_checkpoints, metrics={"step": step, "loss": float(loss.item())})
    batches.close()
    train_seconds = time.time() - t0
    final_bits = evaluate_bits(model, eval_parts, grid, ctx, max_rows=None, batch_size=per_rank * 4)
    if not ctx.is_main:
        return None
    history.append({"step": step, "train_bits": progress.last.get("bits"), "eval_bits": final_bits})
    return _finish(cfg, model, run_dir, stats, tokenizer_path, final_bits, bool(val_parts), history,
                   dict(progress.last), train_seconds, resumed_from, ctx)


@torch.no_grad()
def evaluate_bits(model: Prior, parts: list[TokenPart], grid: tuple[int, int], ctx: WorkerContext, *,
                  max_rows: int | None, batch_size: int) -> float:
    """Mean bits per token over the parts (the first max_rows rows of each rank's share), all
    ranks together. Class conditioning as in training, without class dropout."""
    was = model.training
    model.eval()
    stream = TokenStream(parts, grid, rank=ctx.rank, world_size=ctx.world_size, shuffle=False)
    limit = None if max_rows is None else max(1, max_rows // ctx.world_size)
    nats = torch.zeros(2, dtype=torch.float64)  # summed nats, tokens
    for batch in stream.one_pass(batch_size, max_rows=limit):
        t = batch.tokens.to(ctx.device)
        lab = batch.labels.to(ctx.device) if model.cfg.num_classes else None
        nats[0] += model.loss(t, lab, reduction="sum").double().item()
        nats[1] += t.numel()
    ctx.all_reduce_sum(nats)
    model.train(was)
    return bits(float(nats[0] / max(nats[1], 1)))


def _finish(cfg: PriorTrainConfig, model: Prior, run_dir: Path, stats: dict, tokenizer_path: str, final_bits: float,
            held_out: bool, history: list[dict], train_metrics: dict, train_seconds: float, resumed_from, ctx) -> PriorResult:
    from .. import __version__

    prior_dir = run_dir / "prior"
    model.eval()
    prior_id = model.cpu().save(prior_dir, tokenizer_path=tokenizer_path,
                                extra={"vqtok_version": __version__, "trained_on": stats["datasets"]})
    samples_png = _sample_grid(model, run_dir, tokenizer_path, cfg) if cfg.sample_grid else None
    unigram = stats["unigram_entropy_bits"]
    metrics = {
        "steps": cfg.steps,
        "held_out" if held_out else "train_eval": {"bits_per_token": final_bits, "datasets": stats["val_datasets"]
                                                   if held_out else stats["datasets"]},
        "unigram_entropy_bits": unigram,
        "bits_over_unigram": final_bits / unigram if unigram else None,
        "train": train_metrics,
        "history": history,
        "train_seconds_this_run": train_seconds,
        "tokens_per_s": train_metrics.get("tok_per_s"),
        "data": stats,
        "prior_id": prior_id,
        "tokenizer_id": model.cfg.tokenizer_id,
        "tokenizer_path": tokenizer_path,
        "num_classes": model.cfg.num_classes,
        "workers": ctx.world_size,
        "resumed_from": resumed_from,
        "samples": samples_png,
    }
    save_json(metrics, run_dir / "metrics.json")
    where = "held-out" if held_out else "training data (no --val-tokens given)"
    print(f"vqtok: done. {where}: {final_bits:.4f} bits/token vs unigram entropy {unigram:.4f} "
          f"({final_bits / unigram:.2f}x)" if unigram else f"vqtok: done. {where}: {final_bits:.4f} bits/token", flush=True)
    print(f"vqtok: prior    {prior_dir}  (for tokenizer {model.cfg.tokenizer_id[:16]})", flush=True)
    if samples_png:
        print(f"vqtok: samples  {samples_png}", flush=True)
    print(f"vqtok: metrics  {run_dir / 'metrics.json'}  (trained {fmt_duration(train_seconds)} this run, "
          f"{train_metrics.get('tok_per_s', 0):,.0f} tokens/s at the end)", flush=True)
    return PriorResult(str(run_dir), str(prior_dir), metrics, samples_png, resumed_from)


def _sample_grid(model: Prior, run_dir: Path, tokenizer_path: str, cfg: PriorTrainConfig) -> str | None:
    """samples.png: 8 samples per class (one row each), or 8x8 unconditional ones."""
    from ..pipeline.viz import save_sample_grid

    try:
        tok = model.load_tokenizer(tokenizer_path or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"vqtok: no samples.png ({e})", flush=True)
        return None
    k = model.cfg.num_classes
    classes = np.repeat(np.arange(k), 8) if k else None
    s = model.sample(8 * k if k else 64, classes=classes, seed=cfg.seed, tokenizer=tok, cfg_scale=1.5 if k else 1.0)
    return save_sample_grid(s.images.numpy(), s.labels.numpy(), run_dir / "samples.png")


def _check_same_prior(saved: dict, current: PriorConfig, run_dir: Path) -> None:
    now = current.to_dict()
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: {str(a)[:16]!r} in the checkpoint vs {str(b)[:16]!r} now" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"{run_dir} holds a prior run with a different model or tokenizer ({desc}); use a new --out "
                          f"directory, or delete {run_dir / 'checkpoints'} (and {run_dir / 'ray_train'}) to start over")


# ----------------------------------------------------------------------------------------------
# Command line (shared by `vqtok train-prior` and `python -m vqtok.jobs.train_prior`)
# ----------------------------------------------------------------------------------------------
FLAGS = {  # flag -> (type, help)
    "tokenizer": (str, "tokenizer bundle (default: where the token dataset says it was read from)"),
    "num_classes": (int, "classes (default: max label + 1 from the data; 0: unconditional)"),
    "n_layer": (int, "transformer blocks (default 4)"),
    "n_head": (int, "attention heads (default 4)"),
    "n_embd": (int, "width (default 256)"),
    "dropout": (float, "dropout (default 0)"),
    "class_dropout": (float, "probability a label is dropped in training, for guidance (default 0.1)"),
    "steps": (int, "optimizer steps (default 5000)"),
    "batch_size": (int, "token grids per step, over all workers (default 64)"),
    "lr": (float, "peak AdamW learning rate (default 1e-3)"),
    "weight_decay": (float, "AdamW weight decay on matrices (default 0.1)"),
    "warmup_steps": (int, "linear warmup steps before cosine decay (default 200)"),
    "grad_clip": (float, "gradient-norm clip (default 1.0; 0: off)"),
    "seed": (int, "seed for init, data order and class dropout (default 0)"),
    "log_every": (int, "steps between progress lines (default 100)"),
    "eval_every": (int, "steps between held-out evaluations (default 1000)"),
    "eval_rows": (int, "held-out rows per periodic evaluation; the final one reads all (default 5000)"),
    "checkpoint_every": (int, "steps between checkpoints (default 500)"),
    "keep_checkpoints": (int, "checkpoints kept (default 3)"),
    "shuffle_buffer": (int, "rows in each worker's shuffle buffer (default 20000)"),
    "stats_rows": (int, "rows counted for the unigram entropy and labels (default 2000000)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", action="append", help="token dataset(s): the --out of vqtok tokenize (repeat or comma-separate)")
    p.add_argument("--val-tokens", action="append", help="held-out token dataset(s) for bits per token")
    p.add_argument("--out", help="the prior's run directory: prior/, checkpoints, metrics.json, samples.png")
    p.add_argument("--config", help="a JSON or YAML file of options (flags given here override it)")
    for name, (typ, help_) in {**FLAGS, **RUN_FLAGS}.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_)
    p.add_argument("--no-sample-grid", dest="sample_grid", action="store_false", default=None,
                   help="do not write samples.png at the end")


def config_from_args(args: argparse.Namespace) -> PriorTrainConfig:
    base = dict(load_config_file(args.config)) if args.config else {}
    for name in [*FLAGS, *RUN_FLAGS, "tokens", "val_tokens", "out", "sample_grid"]:
        if getattr(args, name, None) is not None:
            base[name] = getattr(args, name)
    base.setdefault("tokens", [])
    base.setdefault("out", "")
    return PriorTrainConfig.from_dict(base)


def run_from_args(args: argparse.Namespace) -> int:
    train_prior(config_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("train-prior", "Train an autoregressive prior on a token dataset.", add_arguments, run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
