"""The tokenizer: how an image becomes model pixels (Preprocess, the one decode) and tokens (Tokenizer).

    tok = Tokenizer.load("runs/demo/tokenizer-run/tokenizer")
    tokens = tok.encode(images)      # uint8 (B, H, W[, C]) numpy/tensor or list of PIL -> (B, h, w) int64
    tokens = tok.encode_file(paths)  # image files (paths, URLs or bytes): vqtok tokenize's tokens
    images = tok.decode(tokens)      # -> uint8 (B, S, S) for grayscale, (B, S, S, 3) for RGB
    tok.id                           # sha256 of config.json then model.safetensors

    pre = tok.preprocess             # or Preprocess(image_size=28, channels=1)
    pixels = pre.decode(open("shirt.jpg", "rb").read())     # (S, S, C) uint8, or DecodeError
    batch = pre.batch([pixels, ...])                         # uint8 (B, S, S, C) tensor
    x = Preprocess.to_model(batch)                           # float (B, C, S, S) in [-1, 1]

The bundle (models/bundle.py) is config.json (format "vqtok-tokenizer", the VQVAEConfig, the
preprocessing, the grid) and model.safetensors (inference weights, codebook included). Loading
never executes code from the bundle: JSON and safetensors only.

`Preprocess.decode` is the one decode: `vqtok tokenize`'s read tasks, training's image stream,
`vqtok convert`'s checks and `Tokenizer.encode_file` all call it, so the same bytes give the same
pixels everywhere. The policy is recorded in the tokenizer bundle so tokenizing later repeats it:

0. Safety (open_image): empty input, non-images, decompression bombs (judged from the header,
   before any pixel is decoded, against max_pixels) and truncated or corrupt files raise
   DecodeError, with the reason.
1. Reduced decode (POLICY, what new bundles record): a JPEG decoded from its bytes is decoded at a
   reduced scale (libjpeg's DCT-domain 1/2, 1/4 or 1/8, PIL's Image.draft) when that keeps its
   shorter side at least 2 x image_size (DRAFT_MARGIN); other images, and JPEGs too small for it,
   are decoded whole. Bundles that recorded LEGACY_POLICY (or no policy) decode every image whole.
   A PIL image handed over already opened is used as given (drafting would change the caller's
   image): that is why Tokenizer.encode(PIL images) can differ from `vqtok tokenize` on a large
   JPEG, and Tokenizer.encode_file does not.
2. Mode: channels=1 -> grayscale ("L"), channels=3 -> RGB. Transparent pixels are composited onto
   white first; 16-bit grayscale keeps its top 8 bits; any other mode is converted by PIL.
3. Geometry: resize so the shorter side equals image_size (bicubic), then center-crop a square.
4. Values: uint8 [0, 255] -> float [-1, 1] (x / 127.5 - 1) for the model, and back with rounding.

Why a margin of 2 (benchmarks/decode_speed.py, `make bench-decode`; RESULTS.md "Decode speed"):
the reduced decode filters like a box, not like the bicubic resize. On 32 desktop-background
JPEGs of 1-18 Mpx, decoded to 256 px, reducing only to >= 1 x image_size gave a median of 49.2 dB
PSNR against the whole decode but 29.6 dB on a fine-textured dune photograph; keeping >= 2 x
image_size (the bicubic resize then does the last factor of 2-4 itself) gave a median of 54.5 dB
and 44.9 dB at worst, at 1.85x the whole decode's img/s (2.13x for >= 1x). The same margin is
where LlamaGen/ADM's center_crop_arr stops box-downsampling.
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .bundle import (CONFIG_FILE, WEIGHTS_FILE, bundle_hash, bundle_id, load_weights, parse_config, read_bundle,
                     vqtok_version, write_bundle)
from .vqvae import VQVAE, VQVAEConfig

BUNDLE_FORMAT = "vqtok-tokenizer"
BUNDLE_VERSION = 1

__all__ = ["Tokenizer", "Preprocess", "DecodeError", "open_image", "DEFAULT_MAX_PIXELS", "read_bundle", "bundle_id"]


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 Mpx: larger images are refused as decompression bombs

# Every policy this vqtok can apply, and the JPEG draft margin each implies (0: decode whole). A
# policy string, once recorded in a bundle, never changes meaning: a new behaviour is a new string.
LEGACY_POLICY = "shorter-side-bicubic-resize+center-crop; uint8/127.5-1"
POLICY = "jpeg-draft(>=2x)+shorter-side-bicubic-resize+center-crop; uint8/127.5-1"
DRAFT_MARGIN = 2
POLICIES = {LEGACY_POLICY: 0, POLICY: DRAFT_MARGIN}


class DecodeError(ValueError):
    """An input that is not a safe, whole image (the message says why); callers skip and record it."""


def unknown_policy(policy: str, where: str = "") -> ValueError:
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
            raise unknown_policy(self.policy)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(S, S, C): what decode returns."""
        return (self.image_size, self.image_size, self.channels)

    # --- one image -> (S, S, C) uint8 --------------------------------------------------------
    def decode(self, data, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """One image -> (S, S, C) uint8 following the policy; DecodeError (with the reason) for
        anything that is not a safe, whole image. `data`: encoded image bytes (the whole policy,
        reduced JPEG decode included), uint8 pixels (H, W[, C]) as an IDX file holds them, or an
        opened PIL image (used as given: no reduced decode)."""
        try:
            if isinstance(data, np.ndarray):
                return self._from_array(data)
            if isinstance(data, Image.Image):
                return self._from_pil(data)
            return self._from_pil(self.open(data, max_pixels))
        except DecodeError:
            raise
        except ValueError as e:  # a mode or shape the policy cannot make into pixels
            raise DecodeError(str(e)) from None

    def open(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Encoded bytes -> the decoded PIL image decode() starts from: after the safety checks, and
        decoded reduced where the policy says so (step 1), before mode and geometry."""
        return open_image(bytes(data), max_pixels, draft_to=POLICIES[self.policy] * self.image_size)

    def batch(self, images) -> torch.Tensor:
        """A batch of images -> uint8 (B, S, S, C): a list of anything `decode` takes, or a uint8
        array/tensor (B, H, W[, C]) (arrays already (B, S, S, C) pass through untouched)."""
        if isinstance(images, (Image.Image, bytes)):
            raise TypeError("a batch is expected: pass [image] for one image")
        if isinstance(images, (list, tuple)):
            if not images:
                return torch.empty(0, *self.shape, dtype=torch.uint8)
            return torch.from_numpy(np.stack([self.decode(im) for im in images]))
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {arr.dtype}")
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"images must be shaped (B, H, W) or (B, H, W, C), got {arr.shape}")
        if arr.shape[1:] != self.shape:
            arr = np.stack([self._from_array(a) for a in arr])
        arr = np.ascontiguousarray(arr)
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def _from_pil(self, img: Image.Image) -> np.ndarray:
        img = _to_mode(img, "L" if self.channels == 1 else "RGB")
        s = self.image_size
        w, h = img.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        return np.asarray(img, dtype=np.uint8).reshape(self.shape)

    def _from_array(self, arr: np.ndarray) -> np.ndarray:
        """uint8 (H, W) or (H, W, C) -> (S, S, C); arrays of the right size and channel count pass
        through untouched (the fast path)."""
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
        return self._from_pil(Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode))

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
# Opening encoded bytes safely
# ---------------------------------------------------------------------------------------------
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


# PIL's own decompression-bomb check, at its stock limit (warns above ~89.5 Mpx, raises above twice
# that), runs inside Image.open and some loaders (GIF frames, ICO, ...).
_PIL_LIMIT = Image.MAX_IMAGE_PIXELS
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limit(max_pixels: int):
    """Make PIL's check agree with ours (w * h > max_pixels, from the header) for one decode, so a
    --max-image-pixels above PIL's limit is honoured. PIL reads a module global, shared by every
    thread, so it is raised only for the call and restored after, under a lock that serialises
    such calls: only decodes that need the raise take the lock (the default 64 Mpx does not, so
    the common path stays lock-free and parallel), and one never restores the global under another.
    A lock-free decode that runs meanwhile sees the raised value, which is harmless: its own header
    check still applies its own, lower limit. Setting the global once for the whole process instead
    would silently lift PIL's protection for every other user of PIL in it."""
    if _PIL_LIMIT is None or max_pixels <= _PIL_LIMIT:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_to: int = 0) -> Image.Image:
    """Encoded image bytes -> a fully decoded PIL image, after the safety checks (empty input,
    non-image, decompression bomb from the header, truncation). Raises DecodeError. With
    `draft_to` > 0, a JPEG is decoded reduced to no less than that many pixels a side (jpeg_draft)
    after the checks, which judge the original size."""
    if len(data) == 0:
        raise DecodeError("zero-byte image")
    try:
        with _pil_limit(max_pixels), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(
                    f"decompression bomb refused: {w}x{h} = {w * h} pixels > max {max_pixels} "
                    f"(raise --max-image-pixels if such images are genuine)"
                )
            if w == 0 or h == 0:
                raise DecodeError(f"empty image ({w}x{h})")
            jpeg_draft(img, draft_to)
            img.load()
            return img
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(f"not an image ({len(data)} bytes starting {data[:8]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb refused: {e} (max {max_pixels} pixels: raise --max-image-pixels "
                          f"if such images are genuine)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise more than the types above on crafted
        # headers (TypeError, IndexError, struct.error, NotImplementedError...): one bad image must
        # not end the job. BaseException (KeyboardInterrupt, SystemExit) still propagates.
        raise DecodeError(f"undecodable image ({type(e).__name__} in the decoder: {e})") from None


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
