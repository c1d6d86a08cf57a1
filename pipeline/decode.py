"""Raw sample -> preprocessed uint8 pixels, refusing what is not a safe, whole image.

Corrupt, truncated, zero-byte, non-image, oversized (decompression bombs: checked from the header,
before any pixel is decoded) and odd-mode images raise DecodeError with the reason; callers skip
and record them.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..models.preprocess import Preprocess
from .sources import RawSample

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 Mpx: larger images are refused as decompression bombs


class DecodeError(ValueError):
    pass


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> a fully decoded PIL image, after the safety checks (empty input,
    non-image, decompression bomb from the header, truncation). Raises DecodeError."""
    if len(data) == 0:
        raise DecodeError("zero-byte image")
    try:
        with warnings.catch_warnings():
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
            img.load()
            return img
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(f"not an image ({len(data)} bytes starting {data[:8]!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def decode_image(data: bytes, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> (S, S, C) uint8 following the preprocessing policy."""
    img = open_image(data, max_pixels)
    try:
        return preprocess.pil_to_array(img)
    except ValueError as e:  # a mode the policy cannot convert
        raise DecodeError(str(e)) from None


def decode_sample(raw: RawSample, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if isinstance(raw.data, np.ndarray):
        try:
            return preprocess.array_to_array(raw.data)
        except ValueError as e:
            raise DecodeError(str(e)) from None
    return decode_image(raw.data, preprocess, max_pixels)
