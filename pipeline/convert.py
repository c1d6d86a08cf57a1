"""`vqtok convert SRC OUT`: any supported source -> WebDataset shards (KEY.png + KEY.cls, and the
source's caption as KEY.txt and its metadata as KEY.json where it has them, byte for byte).

Shards are written with webdataset's TarWriter over fsspec file objects, each to a temporary name
renamed into place when complete, so an interrupted convert leaves no half shard.
"""
from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image
from webdataset import TarWriter

from ..models.tokenizer import DEFAULT_MAX_PIXELS, DecodeError, open_image
from .errors import DataError
from .sources import FailureLog, Failure, iter_unit, list_units


@dataclass
class ConvertResult:
    shards: list[str]
    images: int
    failures: int
    seconds: float


def convert(src: str | Sequence[str], out: str, *, shard_size: int = 10_000, prefix: str = "shard",
            max_pixels: int = DEFAULT_MAX_PIXELS, verbose: bool = True) -> ConvertResult:
    """Write every readable image of `src` into OUT/PREFIX-000000.tar, ... (shard_size images
    each). IDX pixels are stored losslessly as PNG; encoded images are checked and copied as-is."""
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size}: must be at least 1 image per shard")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise DataError(f"--prefix {prefix!r}: use letters, digits, '-', '_' or '.'")
    units = list_units(src)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    failures = FailureLog(verbose=verbose)
    t0 = time.time()
    shards: list[str] = []
    writer = None
    n_in_shard = images = 0

    def close_current():
        nonlocal writer
        if writer is not None:
            writer.close()
            writer.fileobj_handle.close()
            final = shards[-1]
            fs.mv(final + ".tmp", final)
            writer = None

    seen: set[str] = set()
    for unit in units:
        for raw in iter_unit(unit, failures.add):
            if isinstance(raw.data, np.ndarray):
                data, ext = _png(raw.data), "png"
            else:
                try:  # check it decodes; keep the original bytes
                    ext = _ext_of(open_image(raw.data, max_pixels))
                except DecodeError as e:
                    failures.add(Failure(raw.key, raw.unit, str(e)))
                    continue
                data = raw.data
            key = _safe_key(raw.key)
            if key in seen:
                failures.add(Failure(raw.key, raw.unit, "duplicate key: a sample with this key was already written"))
                continue
            seen.add(key)
            if writer is None or n_in_shard == shard_size:
                close_current()
                shards.append(f"{root.rstrip('/')}/{prefix}-{len(shards):06d}.tar")
                handle = fs.open(shards[-1] + ".tmp", "wb")
                writer = TarWriter(handle, encoder=False, mtime=0)
                writer.fileobj_handle = handle
                n_in_shard = 0
            sample = {"__key__": key, ext: data}
            if raw.label is not None:
                sample["cls"] = str(raw.label).encode()
            if raw.caption is not None:  # the source's bytes as they are (tokenize cleans them: captions.py)
                sample["txt"] = _as_bytes(raw.caption)
            if raw.meta is not None:
                sample["json"] = _as_bytes(raw.meta)
            writer.write(sample)
            n_in_shard += 1
            images += 1
            if verbose and images % 10_000 == 0:
                print(f"vqtok convert: {images} images, {len(shards)} shards", flush=True)
    close_current()
    if images == 0:
        raise DataError(f"no readable images in {src!r} ({failures.count} skipped)")
    result = ConvertResult(shards=[_with_proto(out, s) for s in shards], images=images,
                           failures=failures.count, seconds=time.time() - t0)
    if verbose:
        print(f"vqtok convert: wrote {images} images in {len(shards)} shards to {out} "
              f"({failures.count} skipped) in {result.seconds:.1f}s", flush=True)
    return result


def _as_bytes(value) -> bytes:
    """A raw caption or metadata: bytes (members, sidecars) as they are; Parquet values as text/JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)).encode()


def _png(pixels: np.ndarray) -> bytes:
    arr = pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _ext_of(img: Image.Image) -> str:
    fmt = (img.format or "png").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def _safe_key(key: str) -> str:
    # WebDataset keys may not contain dots (the extension separator); slashes are fine.
    return key.replace(".", "_")


def _with_proto(out: str, path: str) -> str:
    return out.split("://", 1)[0] + "://" + path if "://" in out else path
