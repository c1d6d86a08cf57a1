"""Train the autoregressive prior on a token dataset: `vqtok train-prior` /
`python -m vqtok.jobs.train_prior` / `vqtok.train_prior(...)`.

    result = train_prior(PriorTrainConfig(tokens=["out/tokens"], out="runs/prior", steps=5000,
                                           model=PriorShape(n_layer=8)))
    result.metrics["held_out"]["bits_per_token"], result.prior_dir

The model's options nest as the tokenizer's do (`model: {n_layer: 8}` in a config file or a
pipeline's `prior:` section; flags --n-layer, --n-head, --n-embd, --dropout, --class-dropout); the
flat form of older files and keyword calls (`n_layer: 8`) is still read (PriorTrainConfig.from_dict).

The driver opens the token datasets (refusing parts made by different tokenizers), reads the
codebook size and grid from their schema metadata, counts the codes once for the unigram entropy
(the scale for bits per token) and the labels for the number of classes, and finds the tokenizer
(--tokenizer, else where the dataset says `vqtok tokenize` read it). Then the loop runs in this
process, or with --workers N / --address on N Ray Train workers (DDP): each worker streams its own
disjoint share of the Parquet parts through a shuffle buffer (pipeline.sharded_stream), never the
whole dataset. Checkpoints every --checkpoint-every steps; re-running the same command resumes.

PRIOR_DIR ends up with prior/ (the bundle: config.json with the tokenizer's id and location,
model.safetensors), config.json (this run's options), metrics.json (held-out bits per token beside
the unigram entropy, the loss curve, tokens/s) and samples.png (a grid of samples, one row per
class, when the tokenizer can be loaded).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..models.bundle import bundle_id, vqtok_version
from ..models.config import ConfigError, option
from ..models.prior import Prior, PriorConfig, PriorShape, bits
from ..models.text_prior import IMAGE_FIRST, TEXT_FIRST, TextPrior, TextPriorConfig
from ..models.text_tokenizer import TextTokenizer
from ..models.vocabulary import Vocabulary
from ..pipeline.errors import DataError
from ..pipeline.sources import split_patterns
from ..pipeline.token_format import Part
from ..pipeline.sharded_stream import TokenStream
from ..pipeline.token_dataset import TokenCorpus
from ..pipeline.viz import save_prompt_grid, save_sample_grid, save_training_curves
from .options import Command, job_main
from .progress import fmt_duration
from .trainer import Built, Task, TrainingOptions, TrainSummary, launch


@dataclass(kw_only=True)
class PriorTrainConfig(TrainingOptions):
    WHAT = "train-prior config"
    tokens: list[str] = option(help="token dataset(s): the --out of vqtok tokenize (repeat or comma-separate)", factory=list)
    val_tokens: list[str] = option(help="held-out token dataset(s) for bits per token", factory=list)
    tokenizer: str = option("", "tokenizer bundle (default: where the token dataset says it was read from)")
    num_classes: int | None = option(None, "classes (default: max label + 1 from the data; 0: unconditional)")
    text_tokenizer: str = option("", "train a text prior on the captions: \"bytes\" or a Hugging Face tokenizer.json "
                                     "(e.g. from vqtok train-text-tokenizer); labels are then ignored")
    order: str = option("text-first", "text prior: text-first, or both (each image also image-first, so the prior "
                                      "captions too)")
    max_text_tokens: int = option(64, "text prior: captions are cut to their first N text ids (counted)")
    caption_dropout: float = option(0.1, "text prior: probability a text-first caption is replaced by the empty one (guidance)")
    text_loss_weight: float = option(0.0, "text prior: weight of the caption's own loss in text-first sequences")
    model: PriorShape = option(factory=PriorShape, cli=False)  # its fields are flags of their own: --n-layer, ...
    batch_size: int = option(64, "token grids per step, over all workers")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices")
    shuffle_buffer: int = option(20_000, "rows in each worker's shuffle buffer")
    eval_every: int = option(1000, "steps between held-out evaluations")
    eval_rows: int = option(5000, "rows per periodic evaluation (each of W workers reads the first N/W of its "
                                  "share); the final one reads every held-out row")
    train_eval_rows: int = option(100_000, "without --val-tokens: training rows the final evaluation reads (each of "
                                           "W workers the first N/W of its share; a held-out set is read whole)")
    stats_rows: int = option(2_000_000, "rows counted (in part order) for the unigram entropy and the labels")
    sample_grid: bool = option(True, "write samples.png at the end (needs the tokenizer)")

    POSITIVE = TrainingOptions.POSITIVE + ("eval_every", "eval_rows", "train_eval_rows", "stats_rows")
    LR_EXAMPLE = "1e-3"

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> "PriorTrainConfig":
        """As Config.from_dict, and the flat form that files and keyword calls used before the
        model's options nested: `n_layer: 2` beside `steps:` is read as `model: {n_layer: 2}` (a
        key given both ways: the nested value wins, so a flag overrides an old file's value)."""
        if isinstance(d, dict) and set(d) & set(PriorShape.known_keys()):
            d = dict(d)
            nested = d.get("model") or {}
            if isinstance(nested, PriorShape):
                nested = nested.to_dict()
            flat = {k: d.pop(k) for k in PriorShape.known_keys() if k in d}
            d["model"] = flat | nested if isinstance(nested, dict) else nested
        return super().from_dict(d, where)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = PriorShape.from_dict(self.model, where="model")
        self.tokens = split_patterns(self.tokens) if self.tokens else []
        self.val_tokens = split_patterns(self.val_tokens) if self.val_tokens else []
        if not self.tokens:
            raise ConfigError("--tokens is required: a token dataset written by `vqtok tokenize` (its --out)")
        if not self.out:
            raise ConfigError("--out is required: the prior's run directory (e.g. runs/prior)")
        super().__post_init__()
        m = self.model
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(m, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(m, name)}: must be at least 1")
        if m.n_embd % m.n_head:
            raise ConfigError(f"--n-embd {m.n_embd} must be divisible by --n-head {m.n_head} (e.g. --n-embd "
                              f"{m.n_embd // m.n_head * m.n_head or m.n_head})")
        if not 0 <= m.dropout < 1 or not 0 <= m.class_dropout < 1:
            raise ConfigError(f"--dropout {m.dropout} and --class-dropout {m.class_dropout} must be in [0, 1)")
        if self.num_classes is not None and self.num_classes < 0:
            raise ConfigError(f"--num-classes {self.num_classes}: 0 (unconditional) or more")
        if self.order not in (TEXT_FIRST, "both"):
            raise ConfigError(f"--order {self.order!r}: expected text-first or both")
        if not self.text_tokenizer and self.order != TEXT_FIRST:
            raise ConfigError(f"--order {self.order}: only for a text prior (give --text-tokenizer bytes or a "
                              f"tokenizer.json)")
        if self.max_text_tokens < 1:
            raise ConfigError(f"--max-text-tokens {self.max_text_tokens}: must be at least 1")
        if not 0 <= self.caption_dropout < 1 or self.text_loss_weight < 0:
            raise ConfigError(f"--caption-dropout {self.caption_dropout} must be in [0, 1) and --text-loss-weight "
                              f"{self.text_loss_weight} >= 0")


@dataclass
class PriorResult:
    run_dir: str
    prior_dir: str
    metrics: dict
    samples: str | None  # samples.png, when the tokenizer could be loaded
    resumed_from: int | None


def train_prior(cfg: PriorTrainConfig | None = None, **options) -> PriorResult:
    """Train a prior: pass a PriorTrainConfig, or its fields as keywords (the model's too, nested or
    flat: train_prior(tokens=["out/tokens"], out="runs/prior", steps=2000, model={"n_layer": 8}) or
    n_layer=8)."""
    cfg = cfg or PriorTrainConfig.from_dict(options)
    return launch(cfg, PriorTask, lambda: _prepare(cfg), what="training the prior")


@dataclass(frozen=True)
class DataSummary:
    """The token data as the driver counted it (metrics.json's "data")."""

    unigram_entropy_bits: float  # of the counted rows' codes: the scale for bits per token
    codes_used: int
    rows: int  # in the training datasets
    counted_rows: int  # counted for the entropy and the labels (--stats-rows)
    labeled_rows: int
    datasets: list[str]
    val_datasets: list[str]


@dataclass(frozen=True)
class PriorPayload:
    """What the driver prepares once for every worker."""

    prior: PriorConfig | TextPriorConfig  # the model: its shape from the options, K, grid, classes/vocabulary
    # and tokenizer from the data
    parts: list[Part]  # the training parts
    val_parts: list[Part] | None  # --val-tokens' parts (None: evaluate on the training parts)
    data: DataSummary
    tokenizer_path: str  # where the tokenizer is ("" when unknown): recorded in the bundle, used for samples.png
    text_tokenizer: bytes | None = None  # a text prior's tokenizer.json bytes (None: none, or "bytes")

    @property
    def is_text(self) -> bool:
        return isinstance(self.prior, TextPriorConfig)

    def text(self) -> TextTokenizer | None:
        if not self.is_text:
            return None
        return TextTokenizer.from_json(self.text_tokenizer) if self.text_tokenizer else TextTokenizer.load("bytes")


def _prepare(cfg: PriorTrainConfig) -> PriorPayload:
    """On the driver: open the datasets, count the codes and labels, fix the prior's shape."""
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
          + ("labels ignored (a text prior)" if cfg.text_tokenizer else
             f"{num_classes} classes ({stats.labeled_rows:,} labeled rows)" if num_classes else "unconditional")
          + f" [{time.time() - t0:.1f}s]", flush=True)
    h, w = corpus.grid
    text_bytes = None
    if cfg.text_tokenizer:
        prior, text_bytes = _text_prior(cfg, corpus)
    else:
        prior = PriorConfig(codebook_size=corpus.codebook_size, grid_h=h, grid_w=w, num_classes=num_classes,
                            tokenizer_id=corpus.tokenizer_id, **cfg.model.to_dict())
    data = DataSummary(unigram_entropy_bits=stats.unigram_entropy_bits, codes_used=stats.codes_used,
                       rows=corpus.num_rows, counted_rows=stats.rows, labeled_rows=stats.labeled_rows,
                       datasets=corpus.paths, val_datasets=val.paths if val else [])
    return PriorPayload(prior, corpus.parts, val.parts if val else None, data, _tokenizer_location(cfg, corpus),
                        text_bytes)


def _text_prior(cfg: PriorTrainConfig, corpus: TokenCorpus) -> tuple[TextPriorConfig, bytes | None]:
    """A text prior's config over the one vocabulary (models/vocabulary.py), and its text tokenizer's bytes."""
    try:
        text = TextTokenizer.load(cfg.text_tokenizer)
    except (FileNotFoundError, ConfigError) as e:
        raise ConfigError(f"--text-tokenizer {cfg.text_tokenizer}: {e}") from None
    vocab = Vocabulary(text_vocab_size=text.vocab_size, text_tokenizer_id=text.id, codebook_size=corpus.codebook_size,
                       grid=corpus.grid, image_tokenizer_id=corpus.tokenizer_id, max_text_tokens=cfg.max_text_tokens)
    counts = [ds.caption_counts() for ds in corpus.datasets]
    captioned, rows = sum(c["captioned"] for c in counts), sum(c["rows"] for c in counts)
    print(f"vqtok train-prior: a text prior ({text.name}; vocabulary {vocab.size:,} ids: {text.vocab_size:,} text, "
          f"5 special, {vocab.codebook_size:,} image); captions: {captioned:,} of {rows:,} rows"
          + ("" if captioned == rows else f" (the other {rows - captioned:,} train as the empty caption)"), flush=True)
    if not captioned:
        print("vqtok train-prior: warning: no row has a caption: the prior will learn images only (tokenize a "
              "captioned corpus: .txt members, a caption column, NAME.txt sidecars)", flush=True)
    prior = TextPriorConfig(vocabulary=vocab.to_dict(), orders=cfg.order, caption_dropout=cfg.caption_dropout,
                            text_loss_weight=cfg.text_loss_weight, tokenizer_id=corpus.tokenizer_id,
                            text_tokenizer=cfg.text_tokenizer, **cfg.model.to_dict())
    return prior, text.raw


def _tokenizer_location(cfg: PriorTrainConfig, corpus: TokenCorpus) -> str:
    """--tokenizer (checked against the dataset's tokenizer id), else the dataset's record of it."""
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

    def forward(self, *args) -> torch.Tensor:
        return self.prior.loss(*args)


class PriorTask(Task[PriorTrainConfig, PriorPayload]):
    """The prior's part of training: a GPT over token grids streamed from Parquet parts, its
    cross-entropy in bits per token, held-out bits every eval_every steps and at the end, and the
    prior bundle with a grid of samples."""

    UNIT = "tok"
    LATEST = ("epochs",)  # epochs so far at the report's step, not the mean over the steps since the last one
    MISMATCH = "a prior run with a different model or tokenizer"

    def __init__(self, cfg: PriorTrainConfig, payload: PriorPayload, ctx):
        super().__init__(cfg, payload, ctx)
        self.text = payload.text()  # a text prior's text tokenizer (None for class priors)
        self.grid = tuple(payload.prior.vocab.grid) if payload.is_text else (payload.prior.grid_h, payload.prior.grid_w)
        self.n_tokens = self.grid[0] * self.grid[1]
        self.text_counts = {"rows": 0, "empty": 0, "truncated": 0}  # text prior: rows trained on this run (all ranks at the end)
        self.final_empty_bits = float("nan")  # text prior: held-out bits per image token, empty caption
        self.eval_every = cfg.eval_every
        self.eval_history: list[dict] = []  # held-out bits at every evaluation
        self.final_bits = float("nan")
        self.final_rows = 0  # rows the final evaluation read (all ranks)
        self.last_train_bits: float | None = None

    def build(self) -> Built:
        """The prior; AdamW with weight decay on matrices only (not biases, norms, position
        embeddings); DDP wraps the prior's loss."""
        model = (TextPrior(self.payload.prior, self.text) if self.text else Prior(self.payload.prior)).to(self.ctx.device)
        decay, other = [], []
        for name, p in model.named_parameters():
            (decay if p.dim() >= 2 and not name.endswith(("_emb", "prefix_pos")) else other).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                 {"params": other, "weight_decay": 0.0}], lr=self.cfg.lr, betas=(0.9, 0.95))
        return Built(model, opt, forward=_LossOf(model))

    def model_config(self) -> dict:
        return self.payload.prior.to_dict()

    @classmethod
    def saved_model_config(cls, state: dict) -> dict:
        # checkpoints from before `model_config` was a key of its own call it prior_config
        return state.get("model_config") or state.get("prior_config") or {}

    def describe(self, model: Prior) -> str:
        pc, n = self.payload.prior, sum(p.numel() for p in model.parameters())
        if self.text:
            v = pc.vocab
            return (f"a text prior ({n / 1e6:.2f}M params, {pc.n_layer} layers x {pc.n_embd}, {pc.orders} sequences of "
                    f"{pc.seq_len} ids: up to {v.max_text_tokens} text, {v.grid[0]}x{v.grid[1]} image; vocabulary "
                    f"{v.size:,}; caption dropout {pc.caption_dropout})")
        return (f"a prior ({n / 1e6:.2f}M params, {pc.n_layer} layers x {pc.n_embd}, {pc.grid_h}x{pc.grid_w} tokens, "
                f"K={pc.codebook_size}, {f'{pc.num_classes} classes' if pc.num_classes else 'unconditional'}; "
                f"{self.cfg.batch_size * pc.n_tokens:,} tokens per step)")

    def batches(self, per_rank_batch: int, skip: int):
        stream = TokenStream(self.payload.parts, self.grid, seed=self.cfg.seed, rank=self.ctx.rank,
                             world_size=self.ctx.world_size, shuffle_buffer=self.cfg.shuffle_buffer,
                             captions=self.text is not None)
        return stream.batches(per_rank_batch, skip=skip)

    def text_ids(self, captions: list[str | None]) -> list[list[int] | None]:
        """Captions -> text ids (None: the empty caption), counting empty and cut ones."""
        ids = self.text.encode_batch([c or "" for c in captions])
        limit = self.payload.prior.vocab.max_text_tokens
        self.text_counts["rows"] += len(captions)
        self.text_counts["empty"] += sum(not c for c in captions)
        self.text_counts["truncated"] += sum(len(i) > limit for i in ids)
        return [i if c else None for i, c in zip(ids, captions)]

    def loss(self, net, batch):
        if self.text:
            tokens = batch.tokens
            ids = self.text_ids(batch.captions)
            # --order both: every other row of the stream image-first (by its position in the
            # stream, so a resumed run continues the same alternation)
            first = batch.consumed - len(ids)
            orders = (TEXT_FIRST if self.payload.prior.orders == TEXT_FIRST or (first + i) % 2 == 0 else IMAGE_FIRST
                      for i in range(len(ids)))
            loss = net(ids, tokens, list(orders))
            self.last_train_bits = bits(loss.item())
            epochs = batch.consumed * self.ctx.world_size / max(self.payload.data.rows, 1)
            return loss, tokens.numel(), {"bits": self.last_train_bits, "epochs": epochs}
        tokens = batch.tokens.to(self.ctx.device, non_blocking=True)
        labels = batch.labels.to(self.ctx.device) if self.payload.prior.num_classes else None
        loss = net(tokens, labels)
        self.last_train_bits = bits(loss.item())
        epochs = batch.consumed * self.ctx.world_size / max(self.payload.data.rows, 1)
        return loss, tokens.numel(), {"bits": self.last_train_bits, "epochs": epochs}

    # --- evaluation: held-out bits per token, every rank its share, summed over ranks -----------
    def evaluate(self, model: Prior, step: int, *, final: bool = False) -> None:
        """Bits per token on the held-out parts (else the training parts): --eval-rows rows during
        training; at the end every held-out row, or --train-eval-rows rows of the training data (a
        full pass over a large corpus would cost as much as an epoch). Each of W ranks reads the
        first N/W rows of its own share (at most: a share can be shorter)."""
        held_out = bool(self.payload.val_parts)
        max_rows = self.cfg.eval_rows if not final else None if held_out else self.cfg.train_eval_rows
        val_bits, empty_bits, rows = self.bits_per_token(model, max_rows=max_rows)
        if final:
            self.final_bits, self.final_empty_bits, self.final_rows = val_bits, empty_bits, rows
            if self.text:  # every rank counted its own rows: the totals, for metrics.json
                keys = list(self.text_counts)
                counts = torch.tensor([self.text_counts[k] for k in keys], dtype=torch.float64)
                self.ctx.comm.all_reduce_sum(counts)
                self.text_counts = dict(zip(keys, (int(c) for c in counts.tolist())))
        if not self.ctx.is_main:
            return
        self.eval_history.append({"step": step, "train_bits": self.last_train_bits, "eval_bits": val_bits}
                                 | ({"eval_bits_empty_caption": empty_bits} if self.text else {}))
        if not final and self.text:
            print(f"vqtok: step {step}: {'held-out' if self.payload.val_parts else 'train-data'} {val_bits:.4f} bits "
                  f"per image token with the caption, {empty_bits:.4f} with the empty caption (unigram entropy "
                  f"{self.payload.data.unigram_entropy_bits:.3f})", flush=True)
        elif not final:
            print(f"vqtok: step {step}: {'held-out' if self.payload.val_parts else 'train-data'} {val_bits:.4f} "
                  f"bits/token (unigram entropy {self.payload.data.unigram_entropy_bits:.3f})", flush=True)

    @torch.no_grad()
    def bits_per_token(self, model: Prior | TextPrior, *, max_rows: int | None) -> tuple[float, float, int]:
        """Mean bits per image token over the evaluation parts (the first max_rows rows of each
        rank's share), all ranks together: (as conditioned in training, without dropout; a text
        prior's with the empty caption, else nan; the rows read). The difference of the first two is
        what the caption tells."""
        ctx = self.ctx
        was = model.training
        model.eval()
        stream = TokenStream(self.payload.val_parts or self.payload.parts, self.grid, rank=ctx.rank,
                             world_size=ctx.world_size, shuffle=False, captions=self.text is not None)
        limit = None if max_rows is None else max(1, max_rows // ctx.world_size)
        nats = torch.zeros(4, dtype=torch.float64)  # summed nats (conditioned, empty caption), tokens, rows
        for batch in stream.one_pass(self.cfg.batch_size // ctx.world_size * 4, max_rows=limit):
            t = batch.tokens.to(ctx.device)
            if self.text:
                ids = self.text.encode_batch([c or "" for c in batch.captions])
                ids = [i if c else None for i, c in zip(ids, batch.captions)]
                nats[0] += model.image_nats(ids, t).sum().double().item()
                nats[1] += model.image_nats([None] * len(ids), t).sum().double().item()
            else:
                lab = batch.labels.to(ctx.device) if model.cfg.num_classes else None
                nats[0] += model.loss(t, lab, reduction="sum").double().item()
            nats[2] += t.numel()
            nats[3] += t.shape[0]
        ctx.comm.all_reduce_sum(nats)
        model.train(was)
        n = max(float(nats[2]), 1.0)
        return bits(float(nats[0]) / n), (bits(float(nats[1]) / n) if self.text else float("nan")), int(nats[3])

    # --- the end ------------------------------------------------------------------------------
    def finish(self, model: Prior, run_dir: Path, summary: TrainSummary) -> dict:
        """Save the bundle, draw the samples and the curves; the metrics (for metrics.json)."""
        cfg, data, tokenizer_path = self.cfg, self.payload.data, self.payload.tokenizer_path
        held_out, final_bits = bool(self.payload.val_parts), self.final_bits
        prior_dir = run_dir / "prior"
        model.eval()
        prior_id = model.cpu().save(prior_dir, tokenizer_path=tokenizer_path,
                                    extra={"vqtok_version": vqtok_version(), "trained_on": data.datasets})
        samples_png = self._sample_grid(model, run_dir, tokenizer_path) if cfg.sample_grid else None
        curve_png = save_training_curves(sorted(summary.history + self.eval_history, key=lambda h: h["step"]),
                                         run_dir / "loss_curve.png",
                                         series={"train": "bits", "held-out" if held_out else "train data (eval)": "eval_bits"},
                                         title="prior training", ylabel="bits per token")
        unigram = data.unigram_entropy_bits
        metrics = {
            "steps": cfg.steps,
            "held_out" if held_out else "train_eval": {"bits_per_token": final_bits, "rows": self.final_rows,
                                                       "datasets": data.val_datasets if held_out else data.datasets},
            "unigram_entropy_bits": unigram,
            "bits_over_unigram": final_bits / unigram if unigram else None,
            "train": summary.train | {"history": summary.history},
            "history": self.eval_history,
            "train_seconds_this_run": summary.seconds,
            "tokens_per_s": summary.train.get("tok_per_s"),
            "data": dataclasses.asdict(data),
            "prior_id": prior_id,
            "tokenizer_id": model.cfg.tokenizer_id,
            "tokenizer_path": tokenizer_path,
            "num_classes": 0 if self.text else model.cfg.num_classes,
            **({"text": self._text_metrics(final_bits)} if self.text else {}),
            "workers": summary.workers,
            "resumed_from": summary.resumed_from,
            "samples": samples_png,
        }
        where = (f"held-out ({self.final_rows:,} rows)" if held_out else
                 f"training data (no --val-tokens given; {self.final_rows:,} rows)")
        print(f"vqtok: done. {where}: {final_bits:.4f} bits/token vs unigram entropy {unigram:.4f} "
              f"({final_bits / unigram:.2f}x)" if unigram else f"vqtok: done. {where}: {final_bits:.4f} bits/token", flush=True)
        if self.text:
            t = metrics["text"]
            print(f"vqtok: text prior: {final_bits:.4f} bits per image token with the caption, "
                  f"{self.final_empty_bits:.4f} with the empty caption: the caption tells {t['caption_bits_per_image']:.1f} "
                  f"bits per image; {t['rows_with_empty_caption']:,} of {t['rows_trained']:,} rows trained had no caption, "
                  f"{t['captions_truncated']:,} captions were cut to {t['max_text_tokens']} ids", flush=True)
        print(f"vqtok: prior       {prior_dir}  (for tokenizer {model.cfg.tokenizer_id[:16]})", flush=True)
        if samples_png:
            print(f"vqtok: samples     {samples_png}", flush=True)
        print(f"vqtok: loss curve  {curve_png}", flush=True)
        print(f"vqtok: metrics     {run_dir / 'metrics.json'}  (trained {fmt_duration(summary.seconds)} this run, "
              f"{summary.train.get('tok_per_s', 0):,.0f} tokens/s at the end)", flush=True)
        return metrics

    def _text_metrics(self, final_bits: float) -> dict:
        empty = self.final_empty_bits
        return {"bits_per_image_token_empty_caption": empty,
                "caption_bits_per_image": (empty - final_bits) * self.n_tokens,  # what the caption tells, in bits
                "text_tokenizer": self.cfg.text_tokenizer, "text_tokenizer_id": self.text.id,
                "order": self.payload.prior.orders, "max_text_tokens": self.payload.prior.vocab.max_text_tokens,
                "caption_dropout": self.payload.prior.caption_dropout,
                "rows_trained": self.text_counts["rows"], "rows_with_empty_caption": self.text_counts["empty"],
                "captions_truncated": self.text_counts["truncated"], "vocabulary": self.payload.prior.vocabulary}

    def _sample_grid(self, model: Prior | TextPrior, run_dir: Path, tokenizer_path: str) -> str | None:
        """samples.png: 8 samples per class (one row each), or 8x8 unconditional ones; a text prior:
        8 samples for each of the first 8 distinct captions of the evaluation data."""
        try:
            tok = model.load_tokenizer(tokenizer_path or None)
        except (FileNotFoundError, ValueError) as e:
            print(f"vqtok: no samples.png ({e})", flush=True)
            return None
        if self.text:
            prompts = self._some_captions(8)
            s = model.sample(prompts, n=8, seed=self.cfg.seed, tokenizer=tok, cfg_scale=3.0)
            return save_prompt_grid(s.images.numpy(), s.prompts, run_dir / "samples.png")
        k = model.cfg.num_classes
        classes = np.repeat(np.arange(k), 8) if k else None
        s = model.sample(8 * k if k else 64, classes=classes, seed=self.cfg.seed, tokenizer=tok, cfg_scale=1.5 if k else 1.0)
        return save_sample_grid(s.images.numpy(), s.labels.numpy(), run_dir / "samples.png")

    def _some_captions(self, n: int) -> list[str]:
        """The first n distinct captions of the evaluation data (else the empty caption)."""
        seen: dict[str, None] = {}
        stream = TokenStream(self.payload.val_parts or self.payload.parts, self.grid, shuffle=False, captions=True)
        for batch in stream.one_pass(256, max_rows=20_000):
            for c in batch.captions:
                if c and len(seen) < n:
                    seen[c] = None
            if len(seen) >= n:
                break
        return list(seen) or [""]

    @classmethod
    def result(cls, location: str, metrics: dict) -> PriorResult:
        samples = f"{location}/samples.png" if metrics["samples"] else None
        return PriorResult(location, f"{location}/prior", metrics, samples, metrics["resumed_from"])


COMMAND = Command("train-prior", "train an autoregressive prior (GPT) on a token dataset", PriorTrainConfig, train_prior)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
