"""The tokenizer: the preprocessing policy, the bundle, and encode/decode.

    tok = Tokenizer.load("runs/demo/tokenizer-run/tokenizer")
    tokens = tok.encode(images)      # uint8 (B, H, W[, C]) numpy/tensor or list of PIL -> (B, h, w) int64
    tokens = tok.encode_file(paths)  # image files (paths, URLs or bytes): vqtok tokenize's tokens
    images = tok.decode(tokens)      # -> uint8 (B, S, S) for grayscale, (B, S, S, 3) for RGB
    tok.id                           # sha256 of config.json then model.safetensors

The bundle (models/bundle.py) is config.json (format "vqtok-tokenizer", the VQVAEConfig, the
preprocessing, the grid) and model.safetensors (inference weights, codebook included). Loading
never executes code from the bundle: JSON and safetensors only.

Preprocessing (models/preprocess.py, Preprocess) is recorded in the bundle so tokenizing later
repeats it: `encode_file` gives exactly the pixels, and so the tokens, of `vqtok tokenize`.
"""
from __future__ import annotations

import os

import fsspec
import torch

from .bundle import (CONFIG_FILE, WEIGHTS_FILE, bundle_hash, bundle_id, load_weights, parse_config, read_bundle,
                     vqtok_version, write_bundle)
from .preprocess import DEFAULT_MAX_PIXELS, LEGACY_POLICY, POLICIES, POLICY, Preprocess, unknown_policy
from .vqvae import VQVAE, VQVAEConfig

BUNDLE_FORMAT = "vqtok-tokenizer"
BUNDLE_VERSION = 1

__all__ = ["Tokenizer", "read_bundle", "bundle_id"]

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
            raise unknown_policy(policy, where=f"{where}/{CONFIG_FILE}: ")
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
    @torch.no_grad()
    def encode(self, images, batch_size: int = 256) -> torch.Tensor:
        """Images -> token grids (B, h, w) int64 on the tokenizer's device. `images`: a uint8 array
        or tensor (B, H, W[, C]), or a list of PIL images, uint8 arrays or encoded bytes, each made
        into model pixels by the bundle's Preprocess. A PIL image is used as given: it was decoded
        already, so a large JPEG opened with PIL is not decoded reduced the way `vqtok tokenize`
        decodes its bytes. For `vqtok tokenize`'s tokens of a file, use encode_file."""
        return self._encode_pixels(self.preprocess.batch(images), batch_size)

    @torch.no_grad()
    def encode_file(self, files, batch_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Image files -> token grids (B, h, w) int64: exactly the pixels `vqtok tokenize` makes of
        those files (Preprocess.decode on their bytes), so the same tokens when they are encoded in
        the same batch (tokenize encodes a unit's images in consecutive batches of --batch-size).
        `files`: one path, fsspec URL or bytes, or a list of them. Raises DecodeError naming the
        file for one that is not a safe, whole image."""
        if isinstance(files, (str, bytes, os.PathLike)):
            files = [files]
        pixels = []
        for f in files:
            if isinstance(f, bytes):
                data = f
            else:
                with fsspec.open(str(f), "rb") as fh:
                    data = fh.read()
            try:
                pixels.append(self.preprocess.decode(data, max_pixels))
            except ValueError as e:
                where = "<bytes>" if isinstance(f, bytes) else str(f)
                raise type(e)(f"{where}: {e}") from None
        return self._encode_pixels(self.preprocess.batch(pixels), batch_size)

    def _encode_pixels(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
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
