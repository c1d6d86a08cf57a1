"""The one preprocessing policy: decoded image -> fixed-size uint8 array -> model input.

1. Mode: channels=1 -> grayscale ("L"), channels=3 -> RGB. Transparent pixels are composited onto
   white first; 16-bit grayscale keeps its top 8 bits; any other mode is converted by PIL.
2. Geometry: resize so the shorter side equals image_size (bicubic), then center-crop a square.
3. Values: uint8 [0, 255] -> float [-1, 1] (x / 127.5 - 1) for the model, and back with rounding.

The policy is recorded in the tokenizer config, so tokenizing later repeats it exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

POLICY = "shorter-side-bicubic-resize+center-crop; uint8/127.5-1"


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

    def to_dict(self) -> dict:
        return asdict(self)

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
