"""Import a pretrained tokenizer: `vqtok import-tokenizer --from llamagen|taming --checkpoint FILE --out BUNDLE`.

    result = vqtok.import_tokenizer("llamagen", "vq_ds16_c2i.pt", "tokenizers/llamagen-vq16")
    tok = vqtok.Tokenizer.load(result.bundle)          # then vqtok tokenize / train-prior as usual

Reads the checkpoint (a path or fsspec URL) without executing code, infers the architecture from the
weights (models/checkpoint_import.py), and writes a vqtok bundle whose codes equal the original
model's on the same pixels. config.json records where the weights came from ("origin": source,
file name, sha256). Nothing is written when the checkpoint is refused.
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..models import Tokenizer
from ..models.checkpoint_import import SOURCES, import_checkpoint
from ..models.config import Config, ConfigError, option
from .options import Command, job_main
from .progress import fmt_duration
from .rundir import is_url, prepare_output, upload_outputs


@dataclass(kw_only=True)
class ImportConfig(Config):
    WHAT = "import-tokenizer config"
    source: str = option("", f"whose checkpoint: {' or '.join(SOURCES)}", flag="--from")
    checkpoint: str = option("", "the checkpoint file, a path or URL (LlamaGen: vq_ds16_c2i.pt; taming: last.ckpt)")
    out: str = option("", "the bundle directory to write (a path or URL)")
    image_size: int = option(256, "the image size the tokenizer is used at (not stored in the weights; "
                                  "a multiple of its downsampling)")

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"--from {self.source or '(missing)'}: name the checkpoint's project, one of "
                              f"{', '.join(SOURCES)}")
        if not self.checkpoint:
            raise ConfigError("--checkpoint is required: the checkpoint file (e.g. vq_ds16_c2i.pt)")
        if not self.out:
            raise ConfigError("--out is required: the directory to write the bundle to (e.g. tokenizers/llamagen-vq16)")


@dataclass
class ImportResult:
    bundle: str
    tokenizer_id: str
    config: dict  # the model config written to the bundle
    ignored: list[str]  # training-only weights of the checkpoint that were skipped
    seconds: float


def import_tokenizer(source: str, checkpoint: str, out: str, *, image_size: int = 256) -> ImportResult:
    """Import a LlamaGen or taming-transformers VQ checkpoint into a vqtok tokenizer bundle."""
    return run(ImportConfig(source=source, checkpoint=str(checkpoint), out=str(out), image_size=image_size))


def run(cfg: ImportConfig) -> ImportResult:
    import fsspec

    t0 = time.time()
    try:
        with fsspec.open(cfg.checkpoint, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--checkpoint {cfg.checkpoint} is a directory: give the checkpoint file in it") from None
    model, report = import_checkpoint(cfg.source, data, image_size=cfg.image_size, where=cfg.checkpoint)
    mc = report.config
    print(f"vqtok: {cfg.checkpoint}: a {cfg.source} VQGAN, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params: width {mc.width}, channel_mult {','.join(map(str, mc.channel_mult))} (downsample {mc.downsample}), "
          f"{mc.res_blocks} res blocks, z {mc.code_dim}, K={mc.codebook_size} codes of dim {mc.codebook_dim}"
          f"{' (l2-normalised)' if mc.l2_normalize else ''}; {report.imported} tensors imported"
          + (f", {len(report.ignored)} training-only skipped ({_first(report.ignored)})" if report.ignored else ""),
          flush=True)
    origin = {"source": cfg.source, "checkpoint": Path(cfg.checkpoint).name,
              "sha256": hashlib.sha256(data).hexdigest(), "imported_tensors": report.imported}
    tok = Tokenizer(model)
    if is_url(cfg.out):
        prepare_output(cfg.out)
        with tempfile.TemporaryDirectory(prefix="vqtok-import-") as local:
            tok_id = tok.save(Path(local), origin=origin)
            upload_outputs(Path(local), cfg.out)
    else:
        out = prepare_output(cfg.out)
        tok_id = tok.save(out, origin=origin)
    seconds = time.time() - t0
    print(f"vqtok: wrote {cfg.out} (id {tok_id[:16]}...): {mc.image_size}x{mc.image_size}x{mc.channels} images -> "
          f"{mc.grid}x{mc.grid} tokens, in {fmt_duration(seconds)}", flush=True)
    print(f"vqtok: next: vqtok tokenize --tokenizer {cfg.out} --data 'IMAGES' --out TOKENS", flush=True)
    return ImportResult(cfg.out, tok_id, mc.to_dict(), report.ignored, seconds)


def _first(names: list[str]) -> str:
    prefixes = sorted({n.split(".")[0] + "." for n in names})
    return ", ".join(p + "*" for p in prefixes)


COMMAND = Command("import-tokenizer", "import a pretrained LlamaGen or taming-transformers VQ tokenizer",
                  ImportConfig, run)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
