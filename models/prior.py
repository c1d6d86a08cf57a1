"""The autoregressive prior: a decoder-only transformer over raster-order image tokens.

    cfg = PriorConfig(codebook_size=512, grid_h=7, grid_w=7, num_classes=10)
    prior = Prior(cfg)
    loss = prior.loss(tokens, labels)            # tokens (B, h, w) int64, labels (B,) or None
    grids = prior.generate(16, labels=..., temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0)

    prior.save("runs/prior/prior", tokenizer_path="runs/tok/tokenizer")   # the bundle
    samples = Prior.load("runs/prior").sample(64, classes=3, cfg_scale=2.0, seed=0)
    samples.tokens, samples.images                  # (64, h, w) codes, (64, S, S[, 3]) uint8 pictures

Vocabulary. Image tokens are the codebook indices [0, K), with their own embedding (not the
codebook's vectors). After them come the beginning-of-image token BOI = K, then one token per class
(K + 1 + c) and the null class (K + 1 + num_classes) that class dropout swaps in during training,
so one model is both conditional and unconditional (classifier-free guidance at sampling time).

Sequence. [class] BOI t_0 t_1 ... t_{n-1}: the model reads all but the last and predicts every t_i
from what precedes it. Positions: the prefix tokens have learned position embeddings, each image
token adds a row and a column embedding (2D position), so the raster order's line breaks are
visible to the model.

Blocks are pre-LayerNorm: x + attn(ln(x)), x + mlp(ln(x)); attention is causal. For sampling a KV
cache holds each layer's keys and values, so each new token costs one position, not the sequence.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bundle import load_weights, parse_config, read_bundle, write_bundle
from .config import ConfigError, option
from .gpt import (PRIOR_FORMAT, PRIOR_VERSION, TEXT_PRIOR_VERSION, Block, PriorShape, Samples, bits,  # noqa: F401
                  find_tokenizer, init_weights, sample_next)


@dataclass(kw_only=True)
class PriorConfig(PriorShape):
    """A prior: its shape, and what the token data fixes (codebook size, grid, classes, tokenizer)."""

    WHAT = "prior config"
    codebook_size: int = option(help="K: image tokens are [0, K)")
    grid_h: int = option(help="token grid rows")
    grid_w: int = option(help="token grid columns")
    num_classes: int = option(0, "classes (0: unconditional)")
    tokenizer_id: str = option("", "the tokenizer whose token datasets this prior models")

    def __post_init__(self):
        if self.codebook_size < 2 or self.grid_h < 1 or self.grid_w < 1:
            raise ConfigError(f"codebook_size {self.codebook_size} and grid {self.grid_h}x{self.grid_w}: need K >= 2 "
                              f"and a grid of at least 1x1")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.num_classes < 0 or not 0 <= self.class_dropout < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("num_classes must be >= 0, class_dropout and dropout in [0, 1)")

    @property
    def boi(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    @property
    def vocab_size(self) -> int:  # image tokens, BOI, classes, null class
        return self.codebook_size + 2 + self.num_classes

    @property
    def prefix_len(self) -> int:  # [class] BOI
        return 2 if self.num_classes else 1

    @property
    def n_tokens(self) -> int:
        return self.grid_h * self.grid_w


class Prior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer_path = ""  # where the tokenizer it models was, when the bundle was written
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.prefix_pos = nn.Parameter(torch.zeros(cfg.prefix_len, cfg.n_embd))
        self.row_emb = nn.Parameter(torch.zeros(cfg.grid_h, cfg.n_embd))
        self.col_emb = nn.Parameter(torch.zeros(cfg.grid_w, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.codebook_size, bias=False)  # predicts image tokens only
        init_weights(self, cfg.n_layer, (self.prefix_pos, self.row_emb, self.col_emb))

    # --- sequences ------------------------------------------------------------------------------
    def prefix(self, b: int, labels: torch.Tensor | None, device) -> torch.Tensor:
        """(B, prefix_len) tokens: [class] BOI. labels may hold -1 for "no class" (the null class)."""
        boi = torch.full((b, 1), self.cfg.boi, dtype=torch.long, device=device)
        if not self.cfg.num_classes:
            return boi
        if labels is None:
            cls = torch.full((b,), self.cfg.null_class, dtype=torch.long, device=device)
        else:
            labels = labels.to(device=device, dtype=torch.long)
            if ((labels >= self.cfg.num_classes) | (labels < -1)).any():
                raise ValueError(f"class labels must be in [0, {self.cfg.num_classes}) or -1 (none), "
                                 f"got {labels.min().item()}..{labels.max().item()}")
            cls = torch.where(labels < 0, self.cfg.null_class, self.cfg.codebook_size + 1 + labels)
        return torch.cat([cls[:, None], boi], 1)

    def _pos(self, start: int, length: int) -> torch.Tensor:
        """Position embeddings for sequence positions [start, start + length)."""
        img = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(-1, self.cfg.n_embd)
        return torch.cat([self.prefix_pos, img])[start:start + length]

    def forward(self, seq: torch.Tensor, start: int = 0, caches: list[dict] | None = None) -> torch.Tensor:
        """seq (B, T) tokens at positions [start, start + T) -> next-token logits (B, T, K)."""
        x = self.drop(self.tok_emb(seq) + self._pos(start, seq.shape[1]))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy (nats per token) of image tokens (B, h, w) given their class."""
        b = tokens.shape[0]
        tokens = tokens.reshape(b, -1).long()
        if self.training and labels is not None and self.cfg.num_classes and self.cfg.class_dropout > 0:
            drop = torch.rand(b, device=tokens.device) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels.to(tokens.device))
        seq = torch.cat([self.prefix(b, labels, tokens.device), tokens], 1)  # ([class] BOI t_0 ... t_{n-1})
        # Position i's output predicts the token at i + 1, so the model reads all but the last
        # token, and the output at the prefix's last position (BOI) predicts t_0: dropping the
        # first prefix_len - 1 outputs leaves exactly one prediction per image token, aligned with
        # `tokens` (the class token's own output, which would predict BOI, is not scored).
        logits = self(seq[:, :-1])[:, self.cfg.prefix_len - 1:]  # (B, n, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1), reduction=reduction)

    # --- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, labels: torch.Tensor | None = None, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """n token grids (n, h, w). labels (n,) classes or None; cfg_scale > 1 mixes in the null-class
        logits (classifier-free guidance: uncond + s * (cond - uncond))."""
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"temperature {temperature} must be > 0, top_p {top_p} in (0, 1], top_k {top_k} >= 0")
        device = next(self.parameters()).device
        guided = cfg_scale != 1.0 and self.cfg.num_classes > 0 and labels is not None
        prefix = self.prefix(n, labels, device)
        if guided:
            prefix = torch.cat([prefix, self.prefix(n, None, device)])
        seq = prefix
        caches = [{} for _ in self.blocks] if use_cache else None
        out = torch.empty(n, 0, dtype=torch.long, device=device)
        pos = 0
        for _ in range(self.cfg.n_tokens):
            if use_cache:
                logits = self(seq, start=pos, caches=caches)[:, -1]
                pos += seq.shape[1]
            else:
                logits = self(seq)[:, -1]
            logits = logits.float()
            if guided:
                cond, uncond = logits[:n], logits[n:]
                logits = uncond + cfg_scale * (cond - uncond)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt[:, None]], 1)
            step = torch.cat([nxt, nxt]) if guided else nxt
            seq = step[:, None] if use_cache else torch.cat([seq, step[:, None]], 1)
        return out.view(n, self.cfg.grid_h, self.cfg.grid_w)

    # --- the bundle, and sampling to pictures --------------------------------------------------
    def save(self, path: str | os.PathLike, *, tokenizer_path: str = "", extra: dict | None = None) -> str:
        """Write the bundle to the directory `path` (atomically); returns its id."""
        config = {"format": PRIOR_FORMAT, "format_version": PRIOR_VERSION, "model": self.cfg.to_dict(),
                  "tokenizer": {"id": self.cfg.tokenizer_id, "path": tokenizer_path}} | (extra or {})
        prior_id = write_bundle(path, config, self.state_dict())
        self.tokenizer_path = tokenizer_path
        return prior_id

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Prior":
        """A prior bundle from PRIOR_DIR (the --out of train-prior), its bundle directory, or a URL."""
        hint = f"train one with `vqtok train-prior --tokens DATASET --out {path}`"
        base = str(path).rstrip("/")
        try:
            where = f"{base}/prior"
            config_bytes, weights_bytes = read_bundle(where, what="prior", hint=hint)
        except FileNotFoundError:
            where = base
            config_bytes, weights_bytes = read_bundle(where, what="prior", hint=hint)
        config = parse_config(config_bytes, fmt=PRIOR_FORMAT, version=TEXT_PRIOR_VERSION, where=where)
        if config.get("kind") == "text":  # a text prior (models/text_prior.py)
            from .text_prior import TextPrior

            return TextPrior.from_bundle(config, weights_bytes, where).to(device).eval()
        if config.get("format_version", 0) > PRIOR_VERSION:
            raise ValueError(f"{where}/config.json: prior format_version {config['format_version']} is newer than "
                             f"this vqtok understands ({PRIOR_VERSION}); upgrade vqtok")
        prior = cls(PriorConfig.from_dict(config["model"], where=f"{where}/config.json model"))
        prior.load_state_dict(load_weights(weights_bytes))
        prior.tokenizer_path = config.get("tokenizer", {}).get("path", "")
        return prior.to(device).eval()

    def load_tokenizer(self, tokenizer=None):
        """The tokenizer this prior was trained for: the one given, else the recorded location; its id
        must match the one the prior records."""
        return find_tokenizer(self.cfg.tokenizer_id, self.tokenizer_path, tokenizer)

    @torch.no_grad()
    def sample(self, n: int, *, classes: int | Sequence[int] | torch.Tensor | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
               seed: int | None = None, batch_size: int = 256, tokenizer=None, decode: bool = True) -> Samples:
        """n samples: token grids, and (decode=True) the pictures the tokenizer decodes them to.
        classes: None (unconditional), one class for all, or one per sample (-1: unconditional)."""
        if n < 1 or batch_size < 1:
            raise ValueError(f"n {n} and batch_size {batch_size} must be at least 1")
        if classes is None:
            labels = None
        else:
            if not self.cfg.num_classes:
                raise ValueError("this prior is unconditional (trained without labels): sample without classes")
            labels = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
            labels = labels.expand(n).clone() if labels.numel() == 1 else labels
            if labels.numel() != n:
                raise ValueError(f"classes: {labels.numel()} given for n={n} samples (give one, or one per sample)")
        tok = self.load_tokenizer(tokenizer) if decode else None  # fail before sampling, not after
        device = next(self.parameters()).device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()  # a fresh non-deterministic seed for this call only
        else:
            gen.manual_seed(seed)
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            out.append(self.generate(m, None if labels is None else labels[i:i + m], temperature=temperature, top_k=top_k,
                                     top_p=top_p, cfg_scale=cfg_scale, generator=gen).cpu())
        self.train(was_training)
        tokens = torch.cat(out)
        images = tok.decode(tokens) if tok is not None else None
        return Samples(tokens, labels if labels is not None else torch.full((n,), -1, dtype=torch.long), images)
