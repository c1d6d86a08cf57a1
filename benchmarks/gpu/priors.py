"""The priors the train and sample parts measure (random weights: speed does not depend on them):
the demo's sizes at 7x7 tokens (a class prior as benchmarks/prior_quality.py trains it, and the
demo's text prior) and the same two kinds at 16x16 tokens of llamagen-vq16 (K = 16,384) with 12
layers of width 768 (LlamaGen-B's). Each comes with the image tokenizer its grid belongs to."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

CAPTIONS = Path(__file__).resolve().parents[2] / "examples" / "fashion-mnist" / "t10k-captions.txt"


@functools.cache
def text_tokenizer_json(kind: str) -> bytes | None:
    """"bytes": None (no file); "demo-bpe": the demo's text tokenizer, a 512-id BPE fitted on the
    bundled captions (447 ids; jobs/demo.py fits it through the pipeline, with the same function)."""
    from vqtok.models.text_tokenizer import train_bpe

    if kind == "bytes":
        return None
    captions = [c for c in CAPTIONS.read_text(encoding="utf-8").split("\n") if c]
    return train_bpe(captions, 512).to_str().encode("utf-8")


def text_tokenizer(kind: str):
    from vqtok import TextTokenizer

    data = text_tokenizer_json(kind)
    return TextTokenizer.from_json(data) if data else TextTokenizer.load("bytes")


@dataclass(frozen=True)
class PriorSpec:
    name: str
    text: bool  # a text prior, else a class prior
    n_layer: int
    n_head: int
    n_embd: int
    codebook_size: int
    grid: int
    tokenizer: str  # "conv", "vq16" or "tiny": the image tokenizer whose grids these are
    classes: int = 10
    max_text_tokens: int = 12  # the demo's: its longest caption is 10 ids of its BPE
    text_kind: str = "demo-bpe"  # a text prior's text ids: "demo-bpe" or "bytes"

    def config(self):
        from vqtok.models.gpt import PriorShape
        from vqtok.models.prior import PriorConfig
        from vqtok.models.text_prior import TextPriorConfig

        shape = PriorShape(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd).to_dict()
        if not self.text:
            return PriorConfig(codebook_size=self.codebook_size, grid_h=self.grid, grid_w=self.grid,
                               num_classes=self.classes, **shape)
        return TextPriorConfig(vocabulary=self.vocabulary().to_dict(), **shape)

    def vocabulary(self):
        from vqtok import Vocabulary

        text = text_tokenizer(self.text_kind)
        return Vocabulary(text_vocab_size=text.vocab_size, text_tokenizer_id=text.id, codebook_size=self.codebook_size,
                          grid=(self.grid, self.grid), image_tokenizer_id="", max_text_tokens=self.max_text_tokens)

    def build(self, device: str):
        """The prior on `device`, in eval mode; a text prior with its text tokenizer."""
        from vqtok.models.prior import Prior
        from vqtok.models.text_prior import TextPrior

        model = TextPrior(self.config(), text_tokenizer(self.text_kind)) if self.text else Prior(self.config())
        return model.to(device).eval()

    def image_tokenizer(self, device: str):
        """A Tokenizer (random weights) whose grids this prior models."""
        from vqtok import Tokenizer, VQVAEConfig
        from vqtok.models import VQVAE

        cfg = {"conv": lambda: VQVAEConfig(codebook_size=self.codebook_size),
               "vq16": lambda: VQVAEConfig.from_preset("llamagen-vq16", codebook_size=self.codebook_size),
               "tiny": lambda: VQVAEConfig(image_size=8, width=16, code_dim=8, codebook_size=self.codebook_size,
                                           res_blocks=1)}[self.tokenizer]()
        assert cfg.grid == self.grid, (cfg.grid, self.grid)
        return Tokenizer(VQVAE(cfg)).to(device)


PROMPTS = ["a dark t-shirt", "light trousers", "a pullover", "a dark dress", "a light coat", "a sandal",
           "a shirt", "a light sneaker", "a dark bag", "an ankle boot"]  # the demo's (jobs/demo.py)


def specs(smoke: bool) -> list[PriorSpec]:
    if smoke:
        return [PriorSpec("class prior (tiny)", False, 1, 2, 32, 16, 2, "tiny"),
                PriorSpec("text prior (tiny)", True, 1, 2, 32, 16, 2, "tiny", max_text_tokens=8)]  # the demo's BPE
    return [PriorSpec("class prior, demo size (4 x 256, 7x7, K=512)", False, 4, 4, 256, 512, 7, "conv"),
            PriorSpec("text prior, the demo's (4 x 128, 7x7, K=512, its BPE)", True, 4, 4, 128, 512, 7, "conv"),
            PriorSpec("class prior 12 x 768, 16x16, K=16384, 1000 classes", False, 12, 12, 768, 16384, 16, "vq16",
                      classes=1000),
            PriorSpec("text prior 12 x 768, 16x16, K=16384, bytes", True, 12, 12, 768, 16384, 16, "vq16",
                      max_text_tokens=64, text_kind="bytes")]
