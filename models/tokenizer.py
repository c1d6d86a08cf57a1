"""The tokenizer: the preprocessing policy, the bundle, and encode/decode.

    tok = Tokenizer.load("runs/demo/tokenizer-run/tokenizer")
    tokens = tok.encode(images)      # uint8 (B, H, W[, C]) numpy/tensor or list of PIL -> (B, h, w) int64
    images = tok.decode(tokens)      # -> uint8 (B, S, S) for grayscale, (B, S, S, 3) for RGB
    tok.id                           # sha256 of config.json then model.safetensors

The bundle (models/bundle.py) is config.json (format "vqtok-tokenizer", the VQVAEConfig, the
preprocessing, the grid) and model.safetensors (inference weights, codebook included). Loading
never executes code from the bundle: JSON and safetensors only.

The preprocessing policy (Preprocess), recorded in the bundle so tokenizing later repeats it:
0. Decoding (POLICY, what new bundles record): a JPEG that vqtok decodes from its bytes is decoded
   at a reduced scale (libjpeg's DCT-domain 1/2, 1/4 or 1/8, PIL's Image.draft) when that keeps its
   shorter side at least 2 x image_size (DRAFT_MARGIN); other images, and JPEGs too small for it,
   are decoded whole. Bundles that recorded LEGACY_POLICY (or no policy) decode every image whole.
1. Mode: channels=1 -> grayscale ("L"), channels=3 -> RGB. Transparent pixels are composited onto
   white first; 16-bit grayscale keeps its top 8 bits; any other mode is converted by PIL.
2. Geometry: resize so the shorter side equals image_size (bicubic), then center-crop a square.
3. Values: uint8 [0, 255] -> float [-1, 1] (x / 127.5 - 1) for the model, and back with rounding.

Why a margin of 2 (benchmarks/decode_speed.py, `make bench-decode`; RESULTS.md "Decode speed"):
the reduced decode filters like a box, not like the bicubic resize. On 32 desktop-background
JPEGs of 1-18 Mpx, decoded to 256 px, reducing only to >= 1 x image_size gave a median of 49.2 dB
PSNR against the whole decode but 29.6 dB on a fine-textured dune photograph; keeping >= 2 x
image_size (the bicubic resize then does the last factor of 2-4 itself) gave a median of 54.5 dB
and 44.9 dB at worst, at 1.85x the whole decode's img/s (2.13x for >= 1x). The same margin is
where LlamaGen/ADM's center_crop_arr stops box-downsampling.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from .bundle import (CONFIG_FILE, WEIGHTS_FILE, bundle_hash, bundle_id, load_weights, parse_config, read_bundle,
                     vqtok_version, write_bundle)
from .vqvae import VQVAE, VQVAEConfig

BUNDLE_FORMAT = "vqtok-tokenizer"
BUNDLE_VERSION = 1

__all__ = ["Preprocess", "Tokenizer", "read_bundle", "bundle_id"]

# Every policy this vqtok can apply, and the JPEG draft margin each implies (0: decode whole). A
# policy string, once recorded in a bundle, never changes meaning: a new behaviour is a new string.
LEGACY_POLICY = "shorter-side-bicubic-resize+center-crop; uint8/127.5-1"
POLICY = "jpeg-draft(>=2x)+shorter-side-bicubic-resize+center-crop; uint8/127.5-1"
DRAFT_MARGIN = 2
POLICIES = {LEGACY_POLICY: 0, POLICY: DRAFT_MARGIN}


def jpeg_draft(img: Image.Image, min_side: int) -> int:
    """Ask a JPEG whose pixels are not loaded yet to decode at 1/2, 1/4 or 1/8 scale, the largest
    reduction that keeps both sides >= min_side (so the shorter side too); returns the reduction
    (1: decoded whole). Anything else (not a JPEG, already loaded, too small) is left alone. The
    mode is kept: conversion to L or RGB happens after, as for a whole decode."""
    if img.format != "JPEG" or not img.tile or min_side <= 0:
        return 1
    w = img.size[0]
    img.draft(img.mode, (min_side, min_side))
    return w // img.size[0]


def _unknown_policy(policy: str, where: str = "") -> ValueError:
    known = "; ".join(repr(p) for p in POLICIES)
    return ValueError(f"{where}unknown preprocessing policy {policy!r}: this vqtok ({vqtok_version()}) knows "
                      f"{known}. The bundle needs a newer vqtok: upgrade it (pip install -U vqtok)")


@dataclass(kw_only=True, frozen=True)
class Preprocess:
    image_size: int
    channels: int
    policy: str = POLICY

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}: use 1 (grayscale) or 3 (RGB)")
        if self.image_size < 4:
            raise ValueError(f"image_size={self.image_size}: must be at least 4 pixels")
        if self.policy not in POLICIES:
            raise _unknown_policy(self.policy)

    def to_dict(self) -> dict:
        return asdict(self)

    def draft(self, img: Image.Image) -> int:
        """Step 0 of the policy, for an opened image whose pixels are not loaded yet (call it after
        Image.open and any header check, before load/convert): a reduced JPEG decode where the
        policy allows one. Returns the reduction (1, 2, 4 or 8). Changes `img` in place, so vqtok
        calls it only on images it opened itself (pipeline/sources.py decode_image); a PIL image
        given to Tokenizer.encode is used as given."""
        return jpeg_draft(img, POLICIES[self.policy] * self.image_size)

    # --- one image -> (S, S, C) uint8 --------------------------------------------------------
    def pil_to_array(self, img: Image.Image) -> np.ndarray:
        """A decoded PIL image -> (S, S, C) uint8 following the policy. Raises ValueError for
        modes that cannot be made into pixels."""
        img = _to_mode(img, "L" if self.channels == 1 else "RGB")
        s = self.image_size
        w, h = img.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        arr = np.asarray(img, dtype=np.uint8)
        return arr.reshape(s, s, self.channels)

    def array_to_array(self, arr: np.ndarray) -> np.ndarray:
        """A uint8 array (H, W) or (H, W, C) -> (S, S, C) uint8. Arrays of the right size and
        channel count pass through untouched (the fast path)."""
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got dtype {arr.dtype}; convert with .astype(np.uint8)")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"an image must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {arr.shape}")
        s, c = self.image_size, arr.shape[2]
        if arr.shape[:2] == (s, s) and c == self.channels:
            return arr
        if arr.shape[:2] == (s, s) and c == 1 and self.channels == 3:
            return np.repeat(arr, 3, axis=2)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
        return self.pil_to_array(Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode))

    # --- batches: uint8 (B, S, S, C) <-> float (B, C, S, S) -----------------------------------
    @staticmethod
    def to_model(batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, C) -> float32 (B, C, S, S) in [-1, 1]."""
        return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)

    @staticmethod
    def from_model(x: torch.Tensor) -> torch.Tensor:
        """float (B, C, S, S) in [-1, 1] -> uint8 (B, S, S, C), rounded and clamped."""
        return x.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _to_mode(img: Image.Image, target: str) -> Image.Image:
    if img.mode == target:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return _to_mode(Image.fromarray(arr, "L"), target)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    try:
        return img.convert(target)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert image mode {img.mode!r} to {target!r}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------

class Tokenizer:
    def __init__(self, model: VQVAE, *, id: str | None = None, preprocess_policy: str = POLICY):
        """`preprocess_policy`: the policy a loaded bundle recorded (from_bytes passes it); a new
        tokenizer takes the current POLICY."""
        self.model = model.eval()
        self.config = model.cfg
        self.preprocess = Preprocess(image_size=model.cfg.image_size, channels=model.cfg.channels,
                                     policy=preprocess_policy)
        self._id = id

    # --- bundle I/O ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, origin: dict | None = None) -> str:
        """Write the bundle to the directory `path` (atomically); returns the bundle id. `origin`
        (recorded in config.json) says where imported weights came from."""
        config = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "vqtok_version": vqtok_version(),
            "model": self.config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "grid": [self.config.grid, self.config.grid],
        }
        if origin:
            config["origin"] = origin
        self._id = write_bundle(path, config, self.model.inference_state_dict())
        return self._id

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Tokenizer":
        """Load a bundle from a local directory or any fsspec URL (s3://bucket/tok)."""
        return cls.from_bytes(*read_bundle(path), device=device, where=str(path))

    @classmethod
    def from_bytes(cls, config_bytes: bytes, weights_bytes: bytes, device: str | torch.device = "cpu",
                   where: str = "<bytes>") -> "Tokenizer":
        """Rebuild a tokenizer from the two bundle files' bytes (what `read_bundle` returns); this is
        how Ray workers receive a bundle that only the driver can read."""
        config = parse_config(config_bytes, fmt=BUNDLE_FORMAT, version=BUNDLE_VERSION, where=where)
        # bundles written before the policy had alternatives decoded every image whole
        policy = (config.get("preprocess") or {}).get("policy", LEGACY_POLICY)
        if policy not in POLICIES:
            raise _unknown_policy(policy, where=f"{where}/{CONFIG_FILE}: ")
        model = VQVAE(VQVAEConfig.from_dict(config["model"], where=f"{where}/{CONFIG_FILE} model"))
        state = load_weights(weights_bytes)
        missing, unexpected = model.load_state_dict(state, strict=False)
        training_only = tuple(f"quantizer.{b}" for b in model.quantizer.TRAINING_BUFFERS)
        missing = [k for k in missing if not k.startswith(training_only)]
        if missing or unexpected:
            raise ValueError(f"{where}/{WEIGHTS_FILE}: weights do not match config.json (missing {missing}, unexpected {unexpected})")
        model.quantizer.initialized.fill_(True)
        return cls(model.to(device), id=bundle_hash(config_bytes, weights_bytes), preprocess_policy=policy)

    @property
    def id(self) -> str:
        if self._id is None:
            raise ValueError("this tokenizer has not been saved; its id is the hash of the saved bundle")
        return self._id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def grid(self) -> tuple[int, int]:
        return (self.config.grid, self.config.grid)

    def to(self, device) -> "Tokenizer":
        self.model.to(device)
        return self

    # --- encode / decode ----------------------------------------------------------------------
    def prepare(self, images) -> torch.Tensor:
        """Images -> uint8 (B, S, S, C) after the bundle's preprocessing."""
        if isinstance(images, Image.Image):
            raise TypeError("encode takes a batch: pass [image] for one PIL image")
        if isinstance(images, Sequence) and len(images) and isinstance(images[0], Image.Image):
            return torch.from_numpy(np.stack([self.preprocess.pil_to_array(im) for im in images]))
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {arr.dtype}")
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"images must be shaped (B, H, W) or (B, H, W, C), got {arr.shape}")
        s, c = self.preprocess.image_size, self.preprocess.channels
        if arr.shape[1:] != (s, s, c):
            arr = np.stack([self.preprocess.array_to_array(a) for a in arr])
        arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    @torch.no_grad()
    def encode(self, images, batch_size: int = 256) -> torch.Tensor:
        """Images -> token grids (B, h, w) int64 on the tokenizer's device."""
        pixels = self.prepare(images)
        out = [
            self.model.encode(Preprocess.to_model(pixels[i : i + batch_size].to(self.device)))
            for i in range(0, pixels.shape[0], batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, *self.grid, dtype=torch.int64)

    @torch.no_grad()
    def decode(self, tokens, batch_size: int = 256) -> torch.Tensor:
        """Token grids (B, h, w) -> uint8 images (B, S, S) grayscale or (B, S, S, 3) RGB, on CPU."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != self.grid:
            raise ValueError(f"tokens must be shaped (B, {self.grid[0]}, {self.grid[1]}), got {tuple(tokens.shape)}")
        k = self.config.codebook_size
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= k):
            raise ValueError(f"token values must be in [0, {k}), got [{int(tokens.min())}, {int(tokens.max())}]")
        out = [
            Preprocess.from_model(self.model.decode(tokens[i : i + batch_size].to(self.device))).cpu()
            for i in range(0, tokens.shape[0], batch_size)
        ]
        images = torch.cat(out)
        return images[..., 0] if self.config.channels == 1 else images
