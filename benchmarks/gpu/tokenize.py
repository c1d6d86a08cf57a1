"""Tokenization without Ray (issue 24, item 6): the stages of `vqtok tokenize` (pipeline/stages.py)
driven by a process pool instead of Ray Data: read_units (read + JPEG decode) in P worker
processes, BatchEncoder (the llamagen-vq16 architecture at 256 px, random weights, as
`vqtok tokenize` runs it: fp32) on the GPU in this process, UnitCollector and commit_unit writing
Parquet parts through a TokenWriter. On WebDataset shards of real photographs (examples/photos,
512 px JPEGs), it reports img/s end to end against encoder-only (Tokenizer.encode on the same
images pre-decoded in host memory, the same batch size), with P = 1 to 16 decode processes: how
many keep the GPU busy (the share of the wall time spent in the encoder's calls). Every P must
write the same tokens (checked)."""
from __future__ import annotations

import io
import multiprocessing as mp
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from .common import NO_CUDA, Part, rate

TITLE = "Tokenization without Ray at 256 px: decode processes -> GPU encoder -> Parquet commit"
PHOTOS = Path(__file__).resolve().parents[2] / "examples" / "photos"
SIZES = {False: dict(shards=32, per_shard=64, batch=64, processes=(1, 2, 4, 8, 16)),
         True: dict(shards=2, per_shard=3, batch=2, processes=(1, 2))}


def write_corpus(folder: Path, shards: int, per_shard: int) -> str:
    """WebDataset shards of the example photographs (cycled; each image its own key)."""
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    if not photos:
        raise FileNotFoundError(f"no JPEG photographs in {PHOTOS}: the suite needs the checkout's examples/photos")
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for _ in range(per_shard):
                data = photos[i % len(photos)]
                info = tarfile.TarInfo(f"img{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, fileobj=io.BytesIO(data))
                i += 1
    return str(folder / "shard-*.tar")


def decode_unit(item: dict, preprocess, batch_size: int) -> list[pa.Table]:
    """In a worker process: one unit read and decoded into its rows (read_units' tables)."""
    from vqtok.models.tokenizer import DEFAULT_MAX_PIXELS
    from vqtok.pipeline.stages import read_units

    return list(read_units(pa.Table.from_pylist([item]), preprocess=preprocess, batch_size=batch_size,
                           max_pixels=DEFAULT_MAX_PIXELS))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def tokenize(pool, encoder, meta: dict, units, out: Path, batch: int, tokenizer_dir: str) -> dict:
    """One Ray-free tokenize run into `out`: decode in the pool, encode and commit here."""
    from vqtok.pipeline.stages import UnitCollector, commit_unit, unit_items
    from vqtok.pipeline.token_writer import TokenWriter

    with TokenWriter.open(str(out), meta, units, tokenizer_location=tokenizer_dir) as output:
        pending = output.pending(units)
        unit_of = {i: u for u, i in pending}
        collector = UnitCollector()
        images, encoding = 0, 0.0
        t0 = time.perf_counter()
        args = ((item, encoder.tok.preprocess, batch) for item in unit_items(pending))
        for tables in pool.imap_unordered(_decode_args, args):
            for table in tables:
                t1 = time.perf_counter()
                encoded = encoder(table)  # returns host arrays: the GPU work is done
                encoding += time.perf_counter() - t1
                for finished in collector.add(encoded):
                    images += commit_unit(output, meta, unit_of[finished.part_index], finished).num_rows
        seconds = time.perf_counter() - t0
    if collector.in_flight:
        raise RuntimeError(f"{collector.in_flight} units did not complete")
    return {"images": images, "seconds": seconds, "encoding": encoding}


def _decode_args(args) -> list[pa.Table]:
    return decode_unit(*args)


def run(part: Part) -> None:
    import torch

    from vqtok import TokenDataset, Tokenizer, VQVAEConfig
    from vqtok.models import VQVAE
    from vqtok.models.bundle import read_bundle, vqtok_version
    from vqtok.pipeline.captions import TextFields
    from vqtok.pipeline.sources import list_units
    from vqtok.pipeline.stages import BatchEncoder
    from vqtok.pipeline.token_format import dataset_metadata

    if not part.smoke and not torch.cuda.is_available():
        part.skip(NO_CUDA)
    size = SIZES[part.smoke]
    pattern = write_corpus(part.work / "corpus", size["shards"], size["per_shard"])
    torch.manual_seed(0)
    cfg = (VQVAEConfig.from_preset("llamagen-vq16", image_size=16, width=32, codebook_size=32, res_blocks=1)
           if part.smoke else VQVAEConfig.from_preset("llamagen-vq16"))
    tok_dir = part.work / "tokenizer"
    Tokenizer(VQVAE(cfg)).save(tok_dir)
    encoder = BatchEncoder(read_bundle(str(tok_dir)), device=part.device)
    tok = encoder.tok
    meta = dataset_metadata(codebook_size=cfg.codebook_size, tokenizer_id=tok.id, grid=tok.grid,
                            preprocess=tok.preprocess.to_dict(), vqtok_version=vqtok_version(), text=TextFields().to_dict())
    units = list_units([pattern])
    n = size["shards"] * size["per_shard"]

    t = part.table(f"{n:,} JPEG photographs in {size['shards']} shards -> {cfg.image_size} px -> llamagen-vq16 "
                   f"architecture (fp32) -> Parquet, batch {size['batch']}",
                   ["pipeline", "img/s", "of encoder-only", "GPU busy", "seconds"])
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    pixels = np.stack([tok.preprocess.decode(photos[i % len(photos)]) for i in range(size["batch"])])
    tok.encode(pixels, batch_size=size["batch"])  # warm-up: cuDNN's and Triton's first calls
    reps = 1 if part.smoke else max(4, n // size["batch"] // 4)
    t0 = time.perf_counter()
    for _ in range(reps):
        tok.encode(pixels, batch_size=size["batch"]).cpu()
    encoder_only = reps * size["batch"] / (time.perf_counter() - t0)
    t.add("encoder only: Tokenizer.encode on pre-decoded pixels in host memory", rate(encoder_only), "1.00x", "100%", "")

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["gpu.tokenize"])
    first = None
    for p in size["processes"]:
        if not part.has_time(8 + 2 * n / max(encoder_only, 1), f"{p} decode processes"):
            break
        with context.Pool(p, initializer=_one_thread) as pool:
            pool.map(_ready, range(p))  # the workers are up before the clock starts
            r = tokenize(pool, encoder, meta, units, part.work / f"tokens-{p}", size["batch"], str(tok_dir))
        if r["images"] != n:
            raise RuntimeError(f"{p} decode processes committed {r['images']} rows, expected {n}")
        tokens = TokenDataset(str(part.work / f"tokens-{p}")).to_numpy()[0]
        first = tokens if first is None else first
        if not np.array_equal(tokens, first):
            raise RuntimeError(f"{p} decode processes wrote other tokens than {size['processes'][0]}")
        per_s = r["images"] / r["seconds"]
        t.add(f"end to end, {p} decode process{'es' if p > 1 else ''}", rate(per_s), f"{per_s / encoder_only:.2f}x",
              f"{100 * r['encoding'] / r['seconds']:.0f}%", f"{r['seconds']:.1f}")
    t.note("end to end: from the first unit handed to the pool to the last commit (the pool is started before); "
           "GPU busy: the share of that time spent in the encoder's calls; every process count wrote the same tokens")


def _ready(_) -> bool:
    return True
