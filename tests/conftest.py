"""Shared fixtures: the bundled Fashion-MNIST sample, real image files and tar shards."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.pipeline.sources import read_idx

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "examples" / "fashion-mnist"
SAMPLE_IMAGES = SAMPLE_DIR / "t10k-images-idx3-ubyte.gz"
SAMPLE_LABELS = SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz"

# A model small enough that a test trains it in seconds on 2 cores.
TINY_MODEL = ["--width", "32", "--code-dim", "16", "--codebook-size", "32", "--res-blocks", "1"]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (10000, 28, 28), labels uint8 (10000,)) from the bundled sample."""
    return read_idx(str(SAMPLE_IMAGES)), read_idx(str(SAMPLE_LABELS))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def png_bomb_header(width: int = 40_000, height: int = 40_000) -> bytes:
    """A real PNG signature + IHDR claiming a huge image, followed by a tiny IDAT: what a
    decompression bomb looks like to a decoder that reads the header first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `vqtok` console script as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    exe = Path(sys.executable).with_name("vqtok")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
