"""Prior sampling on CUDA (issue 24, item 5): images/s of Prior.sample and TextPrior.sample (the
KV cache on, as always), benchmarks/gpu/priors.py's priors at 7x7 and 16x16 tokens, with and
without classifier-free guidance (which samples a conditional and an unconditional row per image),
tokens only and decoded to pictures by the image tokenizer on the GPU; at 7x7 also without the KV
cache (Prior.generate(use_cache=False)), for what the cache buys."""
from __future__ import annotations

import torch

from .common import NO_CUDA, Part, rate, seconds
from .priors import PROMPTS, specs

TITLE = "Prior sampling on CUDA: images/s with the KV cache, with and without guidance"


def run(part: Part) -> None:
    if not part.smoke and not torch.cuda.is_available():
        part.skip(NO_CUDA)
    t = part.table("Sampling (one batch per call)", ["prior", "batch", "guidance", "KV cache", "decoded", "images/s",
                                                     "tokens/s"])
    for spec in specs(part.smoke):
        if not part.has_time(15 if spec.grid < 16 else 25, spec.name):
            continue
        torch.manual_seed(0)
        prior, tok = spec.build(part.device), spec.image_tokenizer(part.device)
        n = 4 if part.smoke else 256 if spec.grid < 16 else 64
        scale = 3.0 if spec.text else 2.0
        runs = [(1.0, True, False), (scale, True, False), (scale, True, True)]
        if spec.grid < 16:
            runs.append((1.0, False, False))
        for cfg_scale, cache, decode in runs:
            fn = sampler(prior, spec, n, cfg_scale=cfg_scale, cache=cache, decode=decode, tokenizer=tok)
            secs = seconds(part, fn, repeat=2 if spec.grid < 16 else 1)  # a 16x16 call takes a second or more
            t.add(spec.name, n, f"scale {cfg_scale:g}" if cfg_scale != 1 else "none", "on" if cache else "off",
                  "yes" if decode else "tokens only", rate(n / secs), rate(n * spec.grid**2 / secs))
        del prior, tok
        if part.device == "cuda":
            torch.cuda.empty_cache()
    t.note("random weights (speed does not depend on them); decoded: the pictures made by the image tokenizer on "
           "the same GPU (7x7: the 28 px conv, 16x16: llamagen-vq16 at 256 px); without the KV cache every step "
           "recomputes the whole sequence")


def sampler(prior, spec, n: int, *, cfg_scale: float, cache: bool, decode: bool, tokenizer):
    """A call that samples n images the way users do (Prior.sample / TextPrior.sample); without the
    cache, the priors' generate(use_cache=False), which sample() does not expose."""
    if not cache:
        labels = torch.arange(n, device=next(prior.parameters()).device) % spec.classes
        if spec.text:
            ids = prior.encode_text([PROMPTS[i % len(PROMPTS)] for i in range(n)])
            return lambda: prior.generate(ids, cfg_scale=cfg_scale, use_cache=False)
        return lambda: prior.generate(n, labels, cfg_scale=cfg_scale, use_cache=False)
    if spec.text:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        return lambda: prior.sample(prompts, n=1, cfg_scale=cfg_scale, seed=0, batch_size=n, tokenizer=tokenizer,
                                    decode=decode)
    classes = [i % spec.classes for i in range(n)]
    return lambda: prior.sample(n, classes=classes, cfg_scale=cfg_scale, seed=0, batch_size=n, tokenizer=tokenizer,
                                decode=decode)
