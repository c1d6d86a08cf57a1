"""The tokenizer bundle: a directory with config.json + model.safetensors, and the API around it.

    tok = Tokenizer.load("runs/demo/tokenizer-run/tokenizer")
    tokens = tok.encode(images)      # uint8 (B, H, W[, C]) numpy/tensor or list of PIL -> (B, h, w) int64
    images = tok.decode(tokens)      # -> uint8 (B, S, S) for grayscale, (B, S, S, 3) for RGB
    tok.id                           # sha256 of config.json then model.safetensors

Loading never executes code from the bundle: JSON and safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
import fsspec
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .preprocess import Preprocess
from .vqvae import VQVAE, VQVAEConfig

BUNDLE_FORMAT = "vqtok-tokenizer"
BUNDLE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vqtok")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


class Tokenizer:
    def __init__(self, model: VQVAE, *, id: str | None = None):
        self.model = model.eval()
        self.config = model.cfg
        self.preprocess = Preprocess(image_size=model.cfg.image_size, channels=model.cfg.channels)
        self._id = id

    # --- bundle I/O ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write the bundle to `path` (a directory) atomically: files go to a staging directory
        that is renamed into place. Returns the bundle id."""
        path = Path(path)
        staging = path.with_name(path.name + ".staging")
        staging.mkdir(parents=True, exist_ok=True)
        config = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "vqtok_version": _version(),
            "model": self.config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "grid": [self.config.grid, self.config.grid],
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.inference_state_dict().items()}
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
        if path.exists():
            old = path.with_name(path.name + ".old")
            os.replace(path, old)
            os.replace(staging, path)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            os.replace(staging, path)
        self._id = bundle_id(path)
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
        config = json.loads(config_bytes)
        if config.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{where}/{CONFIG_FILE}: format is {config.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        if config.get("format_version", 0) > BUNDLE_VERSION:
            raise ValueError(
                f"{where}/{CONFIG_FILE}: bundle format_version {config['format_version']} is newer than this vqtok "
                f"understands ({BUNDLE_VERSION}); upgrade vqtok"
            )
        model = VQVAE(VQVAEConfig.from_dict(config["model"]))
        state = load_safetensors(weights_bytes)
        missing, unexpected = model.load_state_dict(state, strict=False)
        training_only = tuple(f"quantizer.{b}" for b in model.quantizer.TRAINING_BUFFERS)
        missing = [k for k in missing if not k.startswith(training_only)]
        if missing or unexpected:
            raise ValueError(f"{where}/{WEIGHTS_FILE}: weights do not match config.json (missing {missing}, unexpected {unexpected})")
        model.quantizer.initialized.fill_(True)
        return cls(model.to(device), id=hashlib.sha256(config_bytes + weights_bytes).hexdigest())

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


def read_bundle(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """The bytes of a bundle's config.json and model.safetensors, from a directory or fsspec URL."""
    base = str(path).rstrip("/")
    try:
        fs, root = fsspec.core.url_to_fs(base)
        return fs.cat_file(f"{root}/{CONFIG_FILE}"), fs.cat_file(f"{root}/{WEIGHTS_FILE}")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(
            f"{path} is not a tokenizer bundle: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it "
            f"(train one with `vqtok train-vqvae`, which writes RUN_DIR/tokenizer/)"
        ) from None


def bundle_id(path: str | os.PathLike) -> str:
    """sha256 over config.json's bytes followed by model.safetensors' bytes."""
    return hashlib.sha256(b"".join(read_bundle(path))).hexdigest()
