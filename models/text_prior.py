"""The text prior: a decoder-only transformer over the one vocabulary of text and image tokens
(models/vocabulary.py), so text-to-image is language modelling and the same model captions.

    vocab = Vocabulary(text_vocab_size=256, text_tokenizer_id="bytes-utf8-v1", codebook_size=K, grid=(7, 7), ...)
    cfg = TextPriorConfig(vocabulary=vocab.to_dict(), n_layer=4, ...)
    model = TextPrior(cfg)
    loss = model.loss(text_ids, tokens, orders)             # lists of caption ids, (B, h, w) codes, "text-first"/...
    grids = model.generate(text_ids, cfg_scale=3.0)          # (B, h, w) codes for these captions
    ids = model.caption(tokens)                              # caption ids for these grids (image-first training)

Sequences are the Vocabulary's, padded to one length L = max_text_tokens + h*w + 4 so every image
token sits at a fixed position (the same convention as DALL-E's fixed text slot and Show-o's
left-padded text):

    text-first   <pad>*(M - n + 1) <bos> caption(n) <boi> image(h*w) <eoi>
    image-first  <bos> <boi> image(h*w) <eoi> caption(n) <eot> <pad>*(M - n)

(M = max_text_tokens; captions are cut to M ids by Vocabulary.truncate, the rule the export
uses.) Padding is never scored and is what the empty caption leaves: the unconditional branch of
classifier-free guidance is `<pad>*(M+1) <bos> <boi>`, which caption dropout trains.

Loss: cross-entropy on the generated span, weight 1: the image ids and <eoi> of text-first
sequences, the caption ids and <eot> of image-first ones; `text_loss_weight` also scores the
caption of text-first sequences (modelling the conditioning text). Positions: a learned embedding
per position, plus a row and a column embedding on image tokens (as the class prior has), so the
raster order's line breaks are visible.

Decoding is constrained as Chameleon and Emu3 do: inside the image span only image ids can be
drawn and the span ends after exactly h*w of them; while captioning only text ids and <eot>.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bundle import load_weights, write_bundle
from .config import ConfigError, option
from .gpt import (PRIOR_FORMAT, TEXT_PRIOR_VERSION, Block, PriorShape, Samples, find_tokenizer, init_weights,
                  sample_next)
from .text_tokenizer import TextTokenizer
from .vocabulary import Vocabulary

TEXT_FIRST, IMAGE_FIRST = "text-first", "image-first"


@dataclass(kw_only=True)
class TextPriorConfig(PriorShape):
    """A text prior: its shape (PriorShape) and the one vocabulary's layout it models."""

    WHAT = "text prior config"
    vocabulary: dict = option(help="Vocabulary.to_dict(): the layout of text and image ids", factory=dict)
    orders: str = option("text-first", "the orders it was trained on: text-first, or both (it also captions)")
    caption_dropout: float = option(0.1, "probability a text-first caption is replaced by the empty one in training (for guidance)")
    text_loss_weight: float = option(0.0, "weight of the caption's own loss in text-first sequences")
    tokenizer_id: str = option("", "the image tokenizer whose token datasets this prior models")
    text_tokenizer: str = option("", "where the text tokenizer was (\"bytes\", or a tokenizer.json)")

    def __post_init__(self):
        if not self.vocabulary:
            raise ConfigError("a text prior needs its vocabulary (Vocabulary.to_dict())")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0 <= self.caption_dropout < 1 or self.text_loss_weight < 0:
            raise ConfigError(f"caption_dropout {self.caption_dropout} must be in [0, 1) and text_loss_weight "
                              f"{self.text_loss_weight} >= 0")
        self.tokenizer_id = self.tokenizer_id or self.vocab.image_tokenizer_id

    @property
    def vocab(self) -> Vocabulary:
        return Vocabulary.from_dict(self.vocabulary)

    @property
    def seq_len(self) -> int:
        return self.vocab.max_text_tokens + self.vocab.image_span + 4


@dataclass
class Batch:
    """Padded sequences (B, L) and the weight of each position's prediction of the next (B, L-1)."""

    seq: torch.Tensor
    weights: torch.Tensor
    image_at: torch.Tensor  # (B,) where each row's image span starts
    truncated: int = 0  # captions cut to max_text_tokens
    empty: int = 0  # rows with the empty caption (null, or dropped for guidance)


class TextPrior(nn.Module):
    def __init__(self, cfg: TextPriorConfig, text: TextTokenizer | None = None):
        """text: the text tokenizer whose ids the vocabulary starts with (needed for prompts and
        captions as strings; its id must be the vocabulary's)."""
        super().__init__()
        self.cfg = cfg
        self.vocab = v = cfg.vocab
        if text is not None and text.id != v.text_tokenizer_id:
            raise ValueError(f"text tokenizer {text.id[:20]} is not this prior's ({v.text_tokenizer_id[:20]})")
        self.text = text
        self.tokenizer_path = ""
        self.tok_emb = nn.Embedding(v.size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, cfg.n_embd))
        self.row_emb = nn.Parameter(torch.zeros(v.grid[0], cfg.n_embd))
        self.col_emb = nn.Parameter(torch.zeros(v.grid[1], cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, v.size, bias=False)
        init_weights(self, cfg.n_layer, (self.pos_emb, self.row_emb, self.col_emb))
        m, n = v.max_text_tokens, v.image_span
        self.image_start = {TEXT_FIRST: m + 3, IMAGE_FIRST: 2}  # where the image span starts, per order
        self.register_buffer("_image_mask", self._span_mask(v.image_offset, v.size), persistent=False)
        self.register_buffer("_text_mask", self._span_mask(0, v.text_vocab_size, extra=(v.eot,)), persistent=False)
        self._n = n

    def _span_mask(self, lo: int, hi: int, extra: tuple[int, ...] = ()) -> torch.Tensor:
        """(V,) additive logits mask: 0 on ids [lo, hi) and `extra`, -inf elsewhere."""
        mask = torch.full((self.vocab.size,), float("-inf"))
        mask[lo:hi] = 0.0
        for i in extra:
            mask[i] = 0.0
        return mask

    # --- sequences ------------------------------------------------------------------------------
    def batch(self, text_ids: Sequence[Sequence[int] | None], tokens: torch.Tensor | np.ndarray,
              orders: str | Sequence[str] = TEXT_FIRST, *, drop: Sequence[bool] | None = None) -> Batch:
        """Rows of the one vocabulary's sequences, padded (module docstring). text_ids: each row's
        caption ids (None: the empty caption), cut to max_text_tokens; tokens (B, h, w) or (B, h*w)
        codes; drop[i]: use the empty caption instead (caption dropout), in a text-first row only
        (an image-first row's caption is its target: emptied, it would only teach empty captions)."""
        v, cfg = self.vocab, self.cfg
        tokens = torch.as_tensor(np.asarray(tokens)).reshape(len(text_ids), -1).long()
        b, L, m = len(text_ids), cfg.seq_len, v.max_text_tokens
        orders = [orders] * b if isinstance(orders, str) else list(orders)
        seq = torch.full((b, L), v.pad, dtype=torch.long)
        weights = torch.zeros(b, L - 1)
        image_at = torch.zeros(b, dtype=torch.long)
        truncated = empty = 0
        for i, (ids, order) in enumerate(zip(text_ids, orders)):
            dropped = drop is not None and drop[i] and order == TEXT_FIRST
            ids, cut = v.truncate(list(ids) if ids is not None and not dropped else [])
            truncated += cut
            empty += not len(ids)
            row = torch.from_numpy(v.sequence(ids, tokens[i].numpy(), order).astype(np.int64))
            n = len(ids)
            if order == TEXT_FIRST:  # <pad>*(M-n+1) <bos> text <boi> image <eoi>
                start = m - n + 1
                seq[i, start:] = row
                img = start + 2 + n
                weights[i, img - 1: img + self._n] = 1.0  # the image ids and <eoi>, each predicted from before it
                if cfg.text_loss_weight and n:
                    weights[i, start: start + n] = cfg.text_loss_weight
            elif order == IMAGE_FIRST:  # <bos> <boi> image <eoi> text <eot> <pad>*(M-n)
                seq[i, : len(row)] = row
                img = 2
                text_at = img + self._n + 1
                weights[i, text_at - 1: text_at + n] = 1.0  # the caption ids and <eot>
            else:
                raise ValueError(f"order {order!r}: expected {TEXT_FIRST!r} or {IMAGE_FIRST!r}")
            image_at[i] = img
        return Batch(seq, weights, image_at, truncated, empty)

    def _pos(self, start: int, length: int, image_at: int) -> torch.Tensor:
        """Position embeddings for positions [start, start + length); image positions (from
        image_at, the same for every row of a call) add their row and column embeddings."""
        pos = self.pos_emb[start:start + length]
        img = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(-1, self.cfg.n_embd)
        extra = torch.zeros_like(pos)
        a, b = max(start, image_at), min(start + length, image_at + self._n)
        if a < b:
            extra[a - start: b - start] = img[a - image_at: b - image_at]
        return pos + extra

    def forward(self, seq: torch.Tensor, image_at: int, start: int = 0, caches: list[dict] | None = None) -> torch.Tensor:
        """seq (B, T) ids at positions [start, start + T) -> next-id logits (B, T, V)."""
        x = self.drop(self.tok_emb(seq) + self._pos(start, seq.shape[1], image_at))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def loss(self, text_ids, tokens, orders: str | Sequence[str] = TEXT_FIRST, *, reduction: str = "mean",
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Weighted cross-entropy (nats per scored id) of the rows' sequences. In training mode each
        text-first row's caption is dropped (made empty) with probability caption_dropout, so the
        model also learns the empty-caption branch guidance needs (batch: image-first rows keep theirs)."""
        b = len(text_ids)
        drop = None
        if self.training and self.cfg.caption_dropout > 0:
            drop = (torch.rand(b, generator=generator) < self.cfg.caption_dropout).tolist()
        return self.batch_loss(self.batch(text_ids, tokens, orders, drop=drop), reduction=reduction)

    def batch_loss(self, batch: Batch, reduction: str = "mean") -> torch.Tensor:
        device = self.pos_emb.device
        seq, weights = batch.seq.to(device), batch.weights.to(device)
        groups = batch.image_at.unique().tolist()  # one forward per order (image spans at one position)
        total = torch.zeros((), device=device)
        for at in groups:
            rows = (batch.image_at == at).nonzero()[:, 0].to(device)
            logits = self(seq[rows, :-1], image_at=at)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq[rows, 1:].reshape(-1),
                                  reduction="none")
            total = total + (nll * weights[rows].reshape(-1)).sum()
        if reduction == "sum":
            return total
        return total / weights.sum().clamp_min(1e-9)

    @torch.no_grad()
    def image_nats(self, text_ids, tokens) -> torch.Tensor:
        """(B,) summed nats of each row's h*w image ids (not <eoi>) given its caption, text-first:
        held-out bits per image token, with the caption and with the empty one."""
        batch = self.batch(text_ids, tokens, TEXT_FIRST)
        device = self.pos_emb.device
        seq = batch.seq.to(device)
        at = self.image_start[TEXT_FIRST]
        logits = self(seq[:, :-1], image_at=at)[:, at - 1: at - 1 + self._n]
        return F.cross_entropy(logits.transpose(1, 2).float(), seq[:, at: at + self._n], reduction="none").sum(1)

    # --- sampling -------------------------------------------------------------------------------
    def _text_first_prefix(self, text_ids: Sequence[Sequence[int] | None]) -> torch.Tensor:
        """(B, M + 3) prefixes `<pad>* <bos> caption <boi>` of text-first rows."""
        empty = torch.zeros(len(text_ids), self._n, dtype=torch.long)
        return self.batch(text_ids, empty, TEXT_FIRST).seq[:, : self.image_start[TEXT_FIRST]]

    @torch.no_grad()
    def generate(self, text_ids: Sequence[Sequence[int] | None], *, cfg_scale: float = 1.0,
                 negative_ids: Sequence[Sequence[int] | None] | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """One (h, w) grid of codes per caption. cfg_scale != 1 guides against the empty caption
        (or negative_ids, one per row: a negative prompt): uncond + s * (cond - uncond). Only image
        ids can be drawn, h*w of them (then <eoi>, which is not sampled)."""
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"temperature {temperature} must be > 0, top_p {top_p} in (0, 1], top_k {top_k} >= 0")
        device = self.pos_emb.device
        b = len(text_ids)
        guided = cfg_scale != 1.0
        prefix = self._text_first_prefix(text_ids)
        if guided:
            prefix = torch.cat([prefix, self._text_first_prefix(negative_ids or [None] * b)])
        codes = self._decode(prefix.to(device), self.image_start[TEXT_FIRST], self._n, self._image_mask, b, guided,
                             cfg_scale, temperature, top_k, top_p, generator, use_cache, stop=None)
        h, w = self.vocab.grid
        return (codes - self.vocab.image_offset).view(b, h, w)

    @torch.no_grad()
    def caption(self, tokens, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = True,
                generator: torch.Generator | None = None) -> list[list[int]]:
        """Caption ids for (B, h, w) grids, from image-first sequences: only text ids and <eot> can
        be drawn; a caption ends at <eot> or after max_text_tokens ids."""
        v = self.vocab
        tokens = torch.as_tensor(np.asarray(tokens)).reshape(-1, self._n).long()
        b = tokens.shape[0]
        prefix = self.batch([None] * b, tokens, IMAGE_FIRST).seq[:, : 2 + self._n + 1]  # <bos> <boi> image <eoi>
        ids = self._decode(prefix.to(self.pos_emb.device), 2, v.max_text_tokens + 1, self._text_mask, b, False, 1.0,
                           temperature, top_k, top_p, generator, True, stop=v.eot, greedy=greedy)
        out = []
        for row in ids.tolist():
            out.append(row[: row.index(v.eot)] if v.eot in row else row[: v.max_text_tokens])
        return out

    def _decode(self, prefix, image_at, steps, mask, b, guided, cfg_scale, temperature, top_k, top_p, generator,
                use_cache, stop, greedy=False) -> torch.Tensor:
        """Extend `prefix` by `steps` ids drawn from the logits + mask (guided: the second half of
        the rows is the unconditional branch); stops early when every row has drawn `stop`."""
        seq = prefix
        caches = [{} for _ in self.blocks] if use_cache else None
        out = torch.empty(b, 0, dtype=torch.long, device=prefix.device)
        done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
        pos = 0
        for _ in range(steps):
            if use_cache:
                logits = self(seq, image_at=image_at, start=pos, caches=caches)[:, -1]
                pos += seq.shape[1]
            else:
                logits = self(seq, image_at=image_at)[:, -1]
            logits = logits.float()
            if guided:
                cond, uncond = logits[:b], logits[b:]
                logits = uncond + cfg_scale * (cond - uncond)
            logits = logits + mask
            nxt = logits.argmax(-1) if greedy else sample_next(logits, temperature, top_k, top_p, generator)
            if stop is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop), nxt)
                done |= nxt == stop
            out = torch.cat([out, nxt[:, None]], 1)
            step = torch.cat([nxt, nxt]) if guided else nxt
            seq = step[:, None] if use_cache else torch.cat([seq, step[:, None]], 1)
            if stop is not None and bool(done.all()):
                break
        return out

    # --- strings in and out ---------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str | None]) -> list[list[int] | None]:
        """Prompts or captions -> text ids (None and "" stay the empty caption)."""
        if self.text is None:
            raise ValueError("this text prior has no text tokenizer attached: load it with TextPrior.load / Prior.load")
        ids = self.text.encode_batch([t or "" for t in texts])
        return [i if t else None for i, t in zip(ids, texts)]

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | str, *, n: int = 1, cfg_scale: float = 3.0,
               negative_prompt: str | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, batch_size: int = 256, tokenizer=None, decode: bool = True) -> Samples:
        """n samples for each prompt (prompt by prompt: all of the first, then the second, ...),
        guided against the empty caption (or negative_prompt) at cfg_scale; the pictures through
        the image tokenizer (decode=True)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or n < 1 or batch_size < 1:
            raise ValueError(f"need at least one prompt (got {len(prompts)}), n {n} >= 1 and batch_size {batch_size} >= 1")
        tok = self.load_tokenizer(tokenizer) if decode else None  # fail before sampling, not after
        rows = [p for p in prompts for _ in range(n)]
        ids = self.encode_text(rows)
        negative = self.encode_text([negative_prompt] * len(rows)) if negative_prompt else None
        gen = torch.Generator(device=self.pos_emb.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        was = self.training
        self.eval()
        out = [self.generate(ids[i:i + batch_size], cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=gen, negative_ids=None if negative is None else negative[i:i + batch_size])
               .cpu() for i in range(0, len(rows), batch_size)]
        self.train(was)
        tokens = torch.cat(out)
        images = tok.decode(tokens) if tok is not None else None
        return Samples(tokens, torch.full((len(rows),), -1, dtype=torch.long), images, rows)

    def captions(self, tokens, *, greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, batch_size: int = 256) -> list[str]:
        """Captions (strings) for (B, h, w) token grids: needs a prior trained with --order both."""
        if self.cfg.orders != "both":
            raise ValueError("this prior was trained on text-first sequences only: it cannot caption (train it with "
                             "--order both)")
        tokens = torch.as_tensor(np.asarray(tokens))
        gen = torch.Generator(device=self.pos_emb.device)
        gen.manual_seed(seed) if seed is not None else gen.seed()
        ids = []
        for i in range(0, len(tokens), batch_size):
            ids += self.caption(tokens[i:i + batch_size], greedy=greedy, temperature=temperature, top_k=top_k,
                                top_p=top_p, generator=gen)
        return [self.text.decode(i) for i in ids]

    # --- the bundle -----------------------------------------------------------------------------
    def save(self, path, *, tokenizer_path: str = "", extra: dict | None = None) -> str:
        """The prior bundle (models/prior.py's format, "kind": "text"), its text tokenizer inside
        config.json (a tokenizer.json's text; nothing for "bytes"), so prompts need no other file."""
        text = None
        if self.text is not None:
            text = {"id": self.text.id, "kind": self.text.kind, "name": self.text.name,
                    "json": None if self.text.raw is None else self.text.raw.decode("utf-8")}
        config = {"format": PRIOR_FORMAT, "format_version": TEXT_PRIOR_VERSION, "kind": "text",
                  "model": self.cfg.to_dict(), "text_tokenizer": text,
                  "tokenizer": {"id": self.cfg.tokenizer_id, "path": tokenizer_path}} | (extra or {})
        prior_id = write_bundle(path, config, self.state_dict())
        self.tokenizer_path = tokenizer_path
        return prior_id

    @classmethod
    def from_bundle(cls, config: dict, weights_bytes: bytes, where: str) -> "TextPrior":
        """Prior.load's half for text priors."""
        cfg = TextPriorConfig.from_dict(config["model"], where=f"{where}/config.json model")
        t = config.get("text_tokenizer") or {}
        text = None
        if t.get("kind") == "bytes":
            text = TextTokenizer.load("bytes")
        elif t.get("json"):
            text = TextTokenizer.from_json(t["json"], name=t.get("name", "tokenizer.json"), where=where)
        prior = cls(cfg, text)
        prior.load_state_dict(load_weights(weights_bytes))
        prior.tokenizer_path = config.get("tokenizer", {}).get("path", "")
        return prior

    def load_tokenizer(self, tokenizer=None):
        """The image tokenizer this prior was trained for (models/prior.py find_tokenizer)."""
        return find_tokenizer(self.cfg.tokenizer_id, self.tokenizer_path, tokenizer)
