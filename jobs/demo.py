"""`vqtok demo [--out DIR]`: the whole path on the bundled Fashion-MNIST sample, on an embedded
local Ray, in under 10 minutes on a 2-core CPU: convert the sample to WebDataset shards (the
images with their captions, examples/fashion-mnist/t10k-captions.txt), train a tokenizer on 2 Ray
Train workers, tokenize to Parquet (tokens and captions), fit a byte-level BPE text tokenizer on the
captions, export them as LM-ready rows, train a text prior over captions and image tokens in one
vocabulary, and sample a grid from ten prompts. It is a Pipeline (jobs/run.py) with the settings
below; a re-run skips what exists.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..models.config import Config, option
from .options import Command, job_main
from .run import Pipeline, PipelineConfig, PipelineResult

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"  # shipped in the wheel too
# one prompt per garment, in the captions' own words (examples/make_fashion_mnist_captions.py)
PROMPTS = ["a dark t-shirt", "light trousers", "a pullover", "a dark dress", "a light coat", "a sandal",
           "a shirt", "a light sneaker", "a dark bag", "an ankle boot"]


def demo_config(out: str = "runs/demo", *, quick: bool = False) -> PipelineConfig:
    """quick: a shortened setting (for CI): the same stages, a few steps each."""
    tok_steps, prior_steps = (60, 60) if quick else (1200, 800)
    return PipelineConfig(
        out=out,
        data=[str(SAMPLE)],
        convert_shard_size=2500,
        train={"steps": tok_steps, "batch_size": 128, "workers": 2, "log_every": 100 if not quick else 20,
               "checkpoint_every": 500 if not quick else 30},
        tokenize={"workers": 1},
        # a BPE of the captions (text-tokenizer/): 447 ids, so each caption word is one; 10 ids in the longest
        # caption (51 as UTF-8 bytes): the prior's sequences are 65 ids, not 105
        text_tokenizer={"vocab_size": 512},
        export={"order": "both"},  # the tokens and captions as LM rows (export/)
        prior={"steps": prior_steps, "batch_size": 64, "model": {"n_layer": 4, "n_head": 4, "n_embd": 128}, "lr": 2e-3,
               "max_text_tokens": 12,
               "log_every": 100 if not quick else 20, "eval_every": 500 if not quick else 30,
               "checkpoint_every": 500 if not quick else 30},
        sample={"n": 10, "prompts": PROMPTS, "cfg_scale": 3.0, "seed": 0},
    )


def demo(out: str = "runs/demo", *, quick: bool = False) -> PipelineResult:
    return Pipeline(demo_config(out, quick=quick)).run()


@dataclass(kw_only=True)
class DemoOptions(Config):
    WHAT = "demo"
    out: str = option("runs/demo", "where everything goes")
    quick: bool = option(False, "a few steps per stage (a smoke test, not a useful model)")


COMMAND = Command("demo", "the whole path on the bundled sample: tokenizer, tokens with captions, a text prior, "
                           "samples from prompts", DemoOptions,
                  lambda o: demo(o.out, quick=o.quick), config_file=False)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
