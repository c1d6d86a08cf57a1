"""What both priors are made of (models/prior.py: class-conditional and unconditional; models/text_prior.py:
text): the transformer's shape options, its blocks (pre-LayerNorm, causal self-attention with a KV
cache), next-token sampling, the prior bundle's format name and versions, and finding the image
tokenizer a prior was trained for."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, option


@dataclass(kw_only=True)
class PriorShape(Config):
    """The transformer's size: a prior's own options (the training job takes them as flags)."""

    WHAT = "prior model"
    n_layer: int = option(4, "transformer blocks")
    n_head: int = option(4, "attention heads")
    n_embd: int = option(256, "width")
    dropout: float = option(0.0, "dropout")
    class_dropout: float = option(0.1, "probability a label is replaced by the null class in training (for guidance)")


# The prior bundle. A prior bundle is a directory: config.json (format, the PriorConfig with the tokenizer id, and the
# tokenizer's location when it was trained) and model.safetensors. `vqtok train-prior` writes it to
# PRIOR_DIR/prior; Prior.load takes either PRIOR_DIR or the bundle directory itself.
PRIOR_FORMAT = "vqtok-prior"
PRIOR_VERSION = 1  # class-conditional and unconditional priors (Prior)
TEXT_PRIOR_VERSION = 2  # text priors (models/text_prior.py), "kind": "text": older vqtok refuses them by version


def find_tokenizer(want: str, recorded: str, tokenizer=None):
    """The image tokenizer a prior was trained for: the one given (a Tokenizer or a path), else the
    recorded location; its id must be `want`."""
    from .tokenizer import Tokenizer

    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        where = str(tokenizer or recorded)
        if not where:
            raise FileNotFoundError(f"this prior does not record where its tokenizer ({want[:16]}) is: pass one "
                                    f"(--tokenizer PATH)")
        try:
            tokenizer = Tokenizer.load(where)
        except FileNotFoundError:
            raise FileNotFoundError(f"the prior's tokenizer ({want[:16]}) was at {where}, which is not a tokenizer "
                                    f"bundle now: pass its new location (--tokenizer PATH)") from None
    if want and tokenizer.id != want:
        raise ValueError(f"tokenizer {tokenizer.id[:16]} is not the one this prior was trained for ({want[:16]}): its "
                         f"codes mean other things; pass the tokenizer whose token dataset trained the prior")
    return tokenizer


def bits(nats: float) -> float:
    """A loss in nats per token, in bits per token."""
    return nats / math.log(2)


@dataclass
class Samples:
    tokens: torch.Tensor  # int64 (n, h, w)
    labels: torch.Tensor  # int64 (n,), -1 for unconditional samples
    images: torch.Tensor | None  # uint8 (n, S, S) or (n, S, S, 3), decoded by the tokenizer
    prompts: list[str] | None = None  # a text prior's samples: each one's prompt


class SelfAttention(nn.Module):
    def __init__(self, cfg: PriorShape):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:  # incremental decoding: attend over everything cached so far
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # with a cache, the new queries are the last t positions: causal within them, all of the past
        causal = t > 1
        if cache is not None and k.shape[2] > t and t > 1:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: PriorShape):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


def init_weights(model: nn.Module, n_layer: int, positions) -> None:
    """GPT-2's initialisation, for both priors: N(0, 0.02) linears and embeddings, zero biases, the
    residual projections scaled by depth, and N(0, 0.02) learned position parameters."""
    def one(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(one)  # children before parents, as the priors always drew their weights
    for name, p in model.named_parameters():
        if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
    for p in positions:
        nn.init.normal_(p, 0.0, 0.02)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, K) logits: temperature, then top-k, then nucleus (top-p)."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

