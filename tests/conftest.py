"""Shared fixtures: the bundled Fashion-MNIST sample, real image files and tar shards."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok import Tokenizer, VQVAEConfig
from vqtok.models import VQVAE
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


def pids_with(text: str) -> list[int]:
    """PIDs whose command line contains `text` (Ray names its workers: ray::RayTrainWorker, ...)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def wait_for(cond, timeout: float = 180.0, every: float = 0.02) -> None:
    import time

    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `vqtok` console script as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    exe = Path(sys.executable).with_name("vqtok")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


# ----------------------------------------------------------------------------------------------
# Tokenization: a tiny bundle and real tar shards of the sample
# ----------------------------------------------------------------------------------------------
TINY = VQVAEConfig(width=32, code_dim=16, codebook_size=32, res_blocks=1)
PER_SHARD = 150


def make_bundle(path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = VQVAE(TINY)
    with torch.no_grad():  # a spread-out random codebook, so tokens vary from image to image
        model.quantizer.codebook.normal_()
    Tokenizer(model).save(path)
    return path


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("tok") / "tokenizer", seed=0)


def write_shards(folder: Path, images, labels, n_shards: int, per: int = PER_SHARD, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(start, start + n_shards):
        members = []
        for i in range(s * per, (s + 1) * per):
            members += [(f"img{i:06d}.png", png_bytes(images[i])), (f"img{i:06d}.cls", str(int(labels[i])).encode())]
        paths.append(write_tar(folder / f"shard-{s:04d}.tar", members))
    return paths


@pytest.fixture(scope="session")
def shards(tmp_path_factory, fmnist) -> Path:
    images, labels = fmnist
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, images, labels, 4)
    return folder


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray for a test module's in-process runs."""
    from vqtok.jobs._ray import init_ray

    ray = init_ray(None)
    yield ray
    ray.shutdown()


def part_hashes(out: Path) -> dict:
    """unit -> (part number, sha256, rows) of each committed part (names also carry the run id)."""
    from vqtok.pipeline.token_dataset import TokenDataset

    return {p.unit: (p.name.split("-")[1], p.sha256, p.rows) for p in TokenDataset(out).parts}


# ----------------------------------------------------------------------------------------------
# Kills: a corpus big enough to kill a job in the middle of, its clean run, a job as a process
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def many_shards(tmp_path_factory, fmnist) -> Path:
    images, labels = fmnist
    folder = tmp_path_factory.mktemp("many")
    write_shards(folder, images, labels, 20, per=500)
    return folder


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory, bundle, many_shards) -> Path:
    out = tmp_path_factory.mktemp("clean") / "tokens"
    r = run_cli("tokenize", "--tokenizer", str(bundle), "--data", str(many_shards), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def start_tokenize(bundle, data, out, *extra) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("vqtok")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([str(exe), "tokenize", "--tokenizer", str(bundle), "--data", str(data), "--out", str(out),
                             "--progress-seconds", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def committed(out: Path) -> int:
    from vqtok import DataError, TokenDataset

    try:
        return len(TokenDataset(out).parts)
    except (FileNotFoundError, DataError):
        return 0


def kill_group(p: subprocess.Popen) -> None:
    """Ray agents started by a SIGKILLed driver outlive it; clear them from the process group."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------------
# A real S3-compatible server (moto) on 127.0.0.1, for object-store paths
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_env():
    """One server for the session: fsspec caches filesystem instances (with their endpoint) per
    process, so a second server on another port would be invisible to them."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="vqtok")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
