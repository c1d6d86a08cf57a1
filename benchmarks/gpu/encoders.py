"""Encoders on CUDA (issue 24, item 3): img/s of vqtok's default 28 px conv tokenizer and of the
llamagen-vq16 architecture at 256 px (random weights: speed does not depend on them), from uint8
pixels already on the GPU (Preprocess.to_model, encoder, quantizer), batches of 64 to 256 (and
1,024 for the small conv):
  fp32                what Tokenizer.encode and `vqtok tokenize` run today (cuDNN's default TF32 convolutions)
  bf16                under torch.autocast(bfloat16) (the quantizer stays fp32: it turns autocast off)
  bf16 channels_last  the model and the pixels in channels_last memory format as well
  + torch.compile     the encoder compiled too (its first call's seconds include the compilation)
Per row also the quantizer's share of the time (quantizer.indices on the encoder's output, timed
alone) and the tokens equal to fp32's (bf16 moves encoder outputs: near-ties flip)."""
from __future__ import annotations

import torch

from .common import NO_CUDA, Part, rate, seconds, wall

TITLE = "Encoders on CUDA: img/s, fp32 vs bf16 autocast, channels_last, torch.compile"
COMPILE_S = {"conv": 40, "vqgan": 90}  # about what compiling the encoder takes, for the time check


def models(smoke: bool):
    """(name, config, batch sizes)."""
    from vqtok import VQVAEConfig

    if smoke:
        return [("conv 28px (tiny)", VQVAEConfig(width=16, code_dim=8, codebook_size=16, res_blocks=1), (4,)),
                ("vqgan 16px (llamagen-vq16 shape, tiny)",
                 VQVAEConfig.from_preset("llamagen-vq16", image_size=16, width=32, codebook_size=32, res_blocks=1), (2,))]
    return [("conv 28px (default)", VQVAEConfig(), (64, 256, 1024)),
            ("llamagen-vq16 256px", VQVAEConfig.from_preset("llamagen-vq16"), (64, 256))]


def encode(model, pixels, *, bf16: bool, channels_last: bool) -> torch.Tensor:
    from vqtok import Preprocess

    x = Preprocess.to_model(pixels)  # (B, C, S, S) float in [-1, 1]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model.encode(x)


VARIANTS = [("fp32", False, False), ("bf16", True, False), ("bf16 channels_last", True, True)]
COMPILED = ("bf16 channels_last + torch.compile", True, True)


def run(part: Part) -> None:
    from vqtok.models import VQVAE

    if not part.smoke and not torch.cuda.is_available():
        part.skip(NO_CUDA)
    t = part.table("Encoder + quantizer from uint8 pixels on the device", [
        "model", "batch", "variant", "img/s", "vs fp32", "quantizer share", "tokens equal to fp32", "first call s"])
    built = []
    for name, cfg, batches in models(part.smoke):
        torch.manual_seed(0)
        model = VQVAE(cfg).to(part.device).eval()
        s = cfg.image_size
        pixels = {b: torch.randint(0, 256, (b, s, s, cfg.channels), dtype=torch.uint8, device=part.device) for b in batches}
        fp32 = {}  # batch -> (seconds, tokens)
        for variant in VARIANTS:
            if variant[2]:
                model = model.to(memory_format=torch.channels_last)
            measure(part, t, name, model, pixels, fp32, *variant)
        built.append((name, model, pixels, fp32))
    for name, model, pixels, fp32 in built:  # compiled last: compiling takes longest
        if part.has_time(COMPILE_S[model.cfg.arch] + 10, f"{name}: {COMPILED[0]}"):
            model.encoder = torch.compile(model.encoder, backend="eager" if part.smoke else "inductor")
            measure(part, t, name, model, pixels, fp32, *COMPILED)
    t.note("random weights; pixels pre-decoded on the device (no reading, decoding or host copies: the ceiling "
           "tokenize can reach); the quantizer share is quantizer.indices alone over the row's total")


def measure(part: Part, t, name: str, model, pixels: dict, fp32: dict, variant: str, bf16: bool, cl: bool) -> None:
    """One row per batch size: img/s of encode(), the quantizer's share, tokens equal to fp32's."""
    from vqtok import Preprocess

    for b, px in pixels.items():
        if not part.has_time(10, f"{name} batch {b}: {variant}"):
            continue
        fn = lambda: encode(model, px, bf16=bf16, channels_last=cl)  # noqa: E731
        first, tokens = wall(part, fn)
        secs = seconds(part, fn, repeat=3 if model.cfg.image_size >= 256 else 5)
        with torch.no_grad(), torch.autocast(part.device, dtype=torch.bfloat16, enabled=bf16):
            x = Preprocess.to_model(px)
            z = model.encoder(x.contiguous(memory_format=torch.channels_last) if cl else x)
        quant = seconds(part, lambda: model.quantizer.indices(z), repeat=5)
        fp32.setdefault(b, (secs, tokens))
        base, ref = fp32[b]
        t.add(name, b, variant, rate(b / secs), f"{base / secs:.2f}x", f"{100 * quant / secs:.0f}%",
              f"{100 * (tokens == ref).float().mean().item():.2f}%", f"{first:.1f}")
