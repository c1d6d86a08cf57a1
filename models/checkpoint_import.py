"""Pretrained VQGAN-class tokenizers of other projects -> vqtok models, weight for weight.

    model, report = import_checkpoint("llamagen", "vq_ds16_c2i.pt", image_size=256)

Sources (both use the layer arithmetic of models/vqgan.py; only the names and a few layouts differ):
- `llamagen`: FoundationVision/LlamaGen's VQ-8/VQ-16 (tokenizer/tokenizer_image/vq_model.py), saved
  as a torch file holding {"model": state_dict}. Codes are l2-normalised at use (the stored
  embedding is not): the imported codebook is stored normalised, which is what LlamaGen compares
  against and decodes from.
- `taming`: taming-transformers' VQGAN (taming/models/vqgan.py), a Lightning .ckpt holding
  {"state_dict": ...}; plain codes (no l2), usually K=1024 or 16384 of dimension 256. Its `loss.*`
  weights (discriminator, LPIPS) are training-only and skipped.

Everything about the shape is read from the weights: width (conv_in), channel multipliers (each
level's first convolution), residual blocks per level, z-channels, K and the code dimension. The
image size is not in the weights (the convolutions take any multiple of the downsampling): the
caller names it. Loading uses torch.load(weights_only=True) (plus argparse.Namespace, which
LlamaGen's training checkpoints carry): a checkpoint that would need code execution to load is
refused, as is one that is truncated or not a torch file; other top-level entries (optimizer
states, a discriminator, "ema") are not read. Every weight is
accounted for: a missing one or an unexpected one is refused, each listed by name.

The mapping runs from vqtok's names to the source's (`source_names`): every vqtok weight names the
source weight(s) it is built from (attention's q, k, v are concatenated into one qkv convolution;
1x1 convolutions into and out of the code space become the quantizer's linear projections).
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ConfigError
from .vqvae import VQVAE, VectorQuantizer, VQVAEConfig

SOURCES = ("llamagen", "taming")
# weights a source's checkpoint carries that a tokenizer does not use
IGNORED = {"llamagen": ("quantize.codebook_used",), "taming": ("loss.",)}
WHERE = {"llamagen": '"model"', "taming": '"state_dict"'}


class CheckpointError(ConfigError):
    """The checkpoint cannot be imported: the message says which file, what is wrong and the fix."""


@dataclass
class ImportReport:
    source: str
    config: VQVAEConfig
    imported: int  # source tensors used
    ignored: list[str] = field(default_factory=list)  # training-only source tensors skipped


# ---------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------
def load_state_dict(source: str, data: bytes, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint's bytes, loaded without executing code."""
    if source not in SOURCES:
        raise CheckpointError(f"--from {source!r}: use one of {', '.join(SOURCES)}")
    if not data:
        raise CheckpointError(f"{where}: the file is empty")
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"{where}: not a PyTorch checkpoint (it starts with {data[:8]!r}); give the .pt/.ckpt "
                              f"file the {source} project saved")
    try:
        # argparse.Namespace is the one Python object allowed: LlamaGen's train script saves its
        # arguments in every checkpoint, and rebuilding one only sets attributes
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"{where}: loading it would execute code (it holds Python objects such as {found.group(1)}, not "
                f"only tensors); vqtok never runs code from a checkpoint. Re-save its weights where you trust the "
                f"file: torch.save({{{WHERE[source]}: sd}}, 'weights.pt') where sd is the model's state_dict()") from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise CheckpointError(f"{where}: not a checkpoint that loads without executing code "
                              f"({reason.group(1).strip() if reason else 'pickle refused'})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                              f"check the download (its size and checksum)") from None
    key = WHERE[source].strip('"')
    if not isinstance(ckpt, dict) or key not in ckpt:
        top = sorted(ckpt)[:12] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{where}: a {source} checkpoint holds its weights under {WHERE[source]}; this one "
                              f"holds {top}. Is it a {source} tokenizer checkpoint (--from {source})?")
    sd = ckpt[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{where}: {WHERE[source]} is not a mapping of weight names to tensors")
    return sd


# ---------------------------------------------------------------------------------------------
# The shape, from the weights
# ---------------------------------------------------------------------------------------------
def _prefix(source: str, part: str) -> str:
    """Where a level's layers live: llamagen encoder.conv_blocks.I, taming encoder.down.I / decoder.up.I."""
    if source == "llamagen":
        return f"{part}.conv_blocks"
    return f"{part}.down" if part == "encoder" else f"{part}.up"


def _block(source: str) -> str:
    return "res" if source == "llamagen" else "block"


def _count(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(source: str, sd: dict[str, torch.Tensor], image_size: int, where: str) -> VQVAEConfig:
    """The VQVAEConfig whose model holds exactly these weights."""
    need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointError(f"{where}: not a {source} VQ tokenizer: missing {absent} (found e.g. {sorted(sd)[:5]})")
    width, channels = sd["encoder.conv_in.weight"].shape[:2]
    enc = _prefix(source, "encoder")
    levels = _count(sd, rf"^{re.escape(enc)}\.(\d+)\.")
    blocks = _count(sd, rf"^{re.escape(enc)}\.0\.{_block(source)}\.(\d+)\.")
    mult = []
    for i in range(levels):
        w = sd.get(f"{enc}.{i}.{_block(source)}.0.conv1.weight")
        if w is None or w.shape[0] % width:
            raise CheckpointError(f"{where}: level {i} of the encoder has no first residual block "
                                  f"({enc}.{i}.{_block(source)}.0.conv1.weight) or an odd width")
        mult.append(int(w.shape[0] // width))
    k, d = sd["quantize.embedding.weight"].shape
    z = sd["encoder.conv_out.weight"].shape[0]
    if levels < 1 or blocks < 1:
        raise CheckpointError(f"{where}: found {levels} encoder levels with {blocks} residual blocks: not a {source} VQGAN")
    # vqtok's layout: attention after each residual block of the lowest level only
    attn_levels = sorted({int(m.group(1)) for key in sd if (m := re.match(rf"^{re.escape(enc)}\.(\d+)\.attn\.", key))})
    if attn_levels != [levels - 1]:
        raise CheckpointError(f"{where}: self-attention at encoder levels {attn_levels}; vqtok's vqgan has it at the "
                              f"lowest resolution only (level {levels - 1}): this layout cannot be imported")
    try:
        return VQVAEConfig(arch="vqgan", image_size=image_size, channels=int(channels), width=int(width),
                           channel_mult=mult, res_blocks=int(blocks), code_dim=int(z), codebook_size=int(k),
                           codebook_dim=int(d), l2_normalize=source == "llamagen", kmeans_init=False)
    except ConfigError as e:
        raise CheckpointError(f"{where}: the weights say {levels} levels (channel_mult {mult}, downsampling "
                              f"{2 ** (levels - 1)}), width {width}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Names: vqtok -> source
# ---------------------------------------------------------------------------------------------
def _leaf(source: str, rest: str) -> list[str]:
    """A residual block's or attention's own parameter names in the source's spelling."""
    if rest.startswith("shortcut."):
        return ["nin_shortcut." + rest[len("shortcut."):]]
    if rest.startswith("qkv."):
        tail = rest[len("qkv."):]
        return [f"q.{tail}", f"k.{tail}", f"v.{tail}"]
    if rest.startswith("proj."):
        return ["proj_out." + rest[len("proj."):]]
    return [rest]


def source_names(source: str, key: str, levels: int) -> list[str]:
    """The source weight(s) a vqtok weight is made of."""
    if key == "quantizer.codebook":
        return ["quantize.embedding.weight"]
    if key.startswith("quantizer.proj_in."):
        return ["quant_conv." + key.split(".", 2)[2]]
    if key.startswith("quantizer.proj_out."):
        return ["post_quant_conv." + key.split(".", 2)[2]]
    part, rest = key.split(".", 1)
    if m := re.match(r"levels\.(\d+)\.(blocks|attn)\.(\d+)\.(.*)", rest):
        i, kind, j, leaf = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if source == "taming" and part == "decoder":
            i = levels - 1 - i  # taming indexes decoder levels by resolution, vqtok by execution order
        kind = "attn" if kind == "attn" else _block(source)
        return [f"{_prefix(source, part)}.{i}.{kind}.{j}.{p}" for p in _leaf(source, leaf)]
    if m := re.match(r"(down|up)\.(\d+)\.conv\.(.*)", rest):
        i = int(m.group(2))
        if source == "taming" and part == "decoder":
            i = levels - 1 - i
        what = "downsample" if m.group(1) == "down" else "upsample"
        return [f"{_prefix(source, part)}.{i}.{what}.conv.{m.group(3)}"]
    if m := re.match(r"mid\.(block1|attn|block2)\.(.*)", rest):
        llamagen = {"block1": "0", "attn": "1", "block2": "2"}
        taming = {"block1": "block_1", "attn": "attn_1", "block2": "block_2"}
        name = (llamagen if source == "llamagen" else taming)[m.group(1)]
        return [f"{part}.mid.{name}.{p}" for p in _leaf(source, m.group(2))]
    return [key]  # conv_in, norm_out, conv_out: the same names


# ---------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------
def import_state_dict(source: str, sd: dict[str, torch.Tensor], *, image_size: int = 256,
                      where: str = "<checkpoint>") -> tuple[VQVAE, ImportReport]:
    cfg = infer_config(source, sd, image_size, where)
    model = VQVAE(cfg)
    training = tuple(f"quantizer.{b}" for b in VectorQuantizer.TRAINING_BUFFERS)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(training)}
    levels = len(cfg.channel_mult)
    plan = {k: source_names(source, k, levels) for k in ours}
    wanted = {name for names in plan.values() for name in names}
    ignored = sorted(k for k in sd if k.startswith(IGNORED[source]) and k not in wanted)
    missing = sorted(wanted - set(sd))
    unexpected = sorted(set(sd) - wanted - set(ignored))
    if missing or unexpected:
        msg = [f"{where}: the weights do not match a {source} VQGAN of the shape they imply "
               f"(width {cfg.width}, channel_mult {cfg.channel_mult}, {cfg.res_blocks} residual blocks per level)"]
        if missing:
            msg.append(f"missing {len(missing)}: " + ", ".join(missing))
        if unexpected:
            msg.append(f"unexpected {len(unexpected)}: " + ", ".join(unexpected))
        raise CheckpointError("; ".join(msg))
    state = {}
    for key, names in plan.items():
        parts = [sd[n].float() for n in names]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        target = ours[key].shape
        if tensor.numel() != ours[key].numel():
            shapes = ", ".join(f"{n} {tuple(sd[n].shape)}" for n in names)
            raise CheckpointError(f"{where}: {shapes} does not fit vqtok's {key} {tuple(target)} for the shape the "
                                  f"other weights imply")
        state[key] = tensor.reshape(target)  # 1x1 convolutions -> the quantizer's linear projections
    if cfg.l2_normalize:  # LlamaGen normalises codes at use; vqtok stores them normalised
        state["quantizer.codebook"] = F.normalize(state["quantizer.codebook"], dim=-1)
    model.load_state_dict(state, strict=False)
    model.quantizer.initialized.fill_(True)
    report = ImportReport(source, cfg, imported=len(wanted), ignored=ignored)
    return model.eval(), report


def import_checkpoint(source: str, data: bytes, *, image_size: int = 256, where: str = "<checkpoint>"):
    """A checkpoint's bytes -> (VQVAE, ImportReport)."""
    return import_state_dict(source, load_state_dict(source, data, where), image_size=image_size, where=where)
