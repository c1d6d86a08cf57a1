"""Tokenization throughput and memory, side by side in one run.

    python benchmarks/tokenize_throughput.py [--images 70000] [--shard-size 5000] [--batch-size 256]
                                             [--tokenizer DIR] [--no-handwritten] [--no-append]
                                             [--case fmnist|photo256|all] [--photo-images 32,96]
                                             [--photo-batch 8]

On the full Fashion-MNIST (70k images written as WebDataset shards) it measures
  1. encoder-only: Tokenizer.encode on pre-decoded uint8 images already in memory (same model,
     batch size and torch threads as the pipeline's encoder): the ceiling;
  2. `vqtok tokenize` end to end (a fresh process: embedded Ray start-up, decode, encode, commit);
  3. the Ray Data pipeline a user would write by hand: read_webdataset -> map_batches with the
     encoder in an actor -> write_parquet (no exactly-once commit, no failure records);
  4. peak memory (sum of RSS over the job's process group, driver and Ray workers) tokenizing
     10k vs 70k images: streaming means it stays flat.
Bars (tokenization issue): end to end >= 0.8x encoder-only; >= 1x the hand-written pipeline;
peak RSS(70k) <= 1.25x peak RSS(10k).

The tokenizer is the default architecture with random weights unless --tokenizer is given:
throughput does not depend on what the weights learned.

The photo256 case (--case photo256; `all` runs both) does the same at 256 px with the LlamaGen VQ-16
architecture (VQVAEConfig.from_preset("llamagen-vq16"): 72M parameters, 16x16 tokens, K=16384; random
weights) on JPEG files of real photographs (the colour JPEGs of >= 1 Mpx from Debian's
desktop-background packages, as benchmarks/decode_speed.py finds them) in an image folder: of every 8
files, 7 are 512x384 (or 384x512) crops at quality 90 of an original reduced to a random shorter side of
384-768 px, and 1 is an original multi-megapixel file as packaged. It reports encoder-only img/s
(Tokenizer.encode on pre-decoded uint8 256x256 images, the same batch size and threads), `vqtok tokenize`
end to end on the files (a fresh process: Ray start-up, read, reduced JPEG decode, encode, commit),
read + decode img/s per core, and peak RSS at two corpus sizes (--photo-images). On a GPU it also times
the encoder under bf16 autocast and says how many decode cores keep it busy; on a CPU-only machine the
table says those were not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, ensure_fashion_mnist, table  # noqa: E402

OUT = Path(__file__).parent / "out" / "tokenize"


def prepare(images: int, shard_size: int, tokenizer: str | None) -> tuple[Path, Path]:
    import torch

    from vqtok import Tokenizer, VQVAEConfig, convert
    from vqtok.models import VQVAE

    shards = OUT / f"fmnist-{images}-{shard_size}"
    if not (shards / "_done").exists():
        src = ensure_fashion_mnist()
        convert([str(src / "train-images-idx3-ubyte.gz"), str(src / "t10k-images-idx3-ubyte.gz")], str(shards),
                shard_size=shard_size)
        (shards / "_done").write_text("")
    if tokenizer:
        return shards, Path(tokenizer)
    bundle = OUT / "tokenizer-default-random"
    if not (bundle / "model.safetensors").exists():
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig())
        with torch.no_grad():
            model.quantizer.codebook.normal_()
        Tokenizer(model).save(bundle)
    return shards, bundle


def encoder_only(bundle: Path, batch: int, threads: int, n: int) -> float:
    import numpy as np
    import torch

    from vqtok import Tokenizer
    from vqtok.pipeline.sources import read_idx

    torch.set_num_threads(threads)
    src = ensure_fashion_mnist()
    images = np.concatenate([read_idx(str(src / "train-images-idx3-ubyte.gz")),
                             read_idx(str(src / "t10k-images-idx3-ubyte.gz"))])[:n]
    tok = Tokenizer.load(bundle)
    tok.encode(images[:batch], batch_size=batch)  # warm-up
    t = time.perf_counter()
    for i in range(0, n, batch):
        tok.encode(images[i:i + batch], batch_size=batch)
    return n / (time.perf_counter() - t)


def decode_per_core(shard: str, image_size: int = 28, channels: int = 1) -> float:
    """Images/s one core reads and decodes from a shard (the Ray read task's work), no Ray."""
    import pyarrow as pa

    from vqtok.models.tokenizer import Preprocess
    from vqtok.pipeline.sources import list_units
    from vqtok.pipeline.stages import read_units, unit_items

    batch = pa.Table.from_pylist(unit_items([(list_units(shard)[0], 0)]))
    t = time.perf_counter()
    n = sum(c.num_rows for c in read_units(batch, preprocess=Preprocess(image_size=image_size, channels=channels),
                                           batch_size=256, max_pixels=1 << 26)) - 1  # less the unit's end row
    return n / (time.perf_counter() - t)


class PeakRSS:
    """Samples the summed RSS of every process in a process group (driver + Ray's processes)."""

    def __init__(self, pgid: int):
        self.pgid, self.peak, self._stop = pgid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    if os.getpgid(int(d.name)) != self.pgid:
                        continue
                    total += int((d / "statm").read_text().split()[1]) * page
                except (OSError, ValueError, ProcessLookupError):
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


def run_measured(code: str) -> tuple[dict, float, int]:
    """Run python code in a fresh process group; returns (its JSON result, wall seconds, peak RSS)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    rss = PeakRSS(p.pid)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    peak = rss.stop()
    try:
        os.killpg(p.pid, 9)  # Ray helpers that outlive the driver
    except ProcessLookupError:
        pass
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak


def vqtok_code(bundle: Path, data: str, out: str, batch: int, **options) -> str:
    return textwrap.dedent(f"""
        import json, vqtok
        r = vqtok.tokenize({str(bundle)!r}, {data!r}, {out!r}, batch_size={batch}, verbose=False, **{options!r})
        print(json.dumps({{"rows": r.rows, "images": r.images_run, "seconds": r.seconds,
                          "stream_seconds": r.stream_seconds}}))
    """)


def handwritten_code(bundle: Path, shards: list[str], out: str, batch: int, threads: int) -> str:
    return textwrap.dedent(f"""
        import json, os, time
        import numpy as np, ray
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False

        class Encode:
            def __init__(self):
                import torch
                from vqtok import Tokenizer
                torch.set_num_threads({threads})
                self.tok = Tokenizer.load({str(bundle)!r})
            def __call__(self, batch):
                tokens = self.tok.encode(np.stack(batch["png"]), batch_size={batch}).numpy()
                return {{"key": batch["__key__"], "tokens": tokens.reshape(len(tokens), -1).astype(np.uint16),
                        "label": batch["cls"]}}

        ds = ray.data.read_webdataset({shards!r})
        ds = ds.map_batches(Encode, batch_size={batch}, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
        ds.write_parquet({out!r})
        import pyarrow.dataset as pads
        rows = pads.dataset({out!r}).count_rows()
        print(json.dumps({{"rows": rows, "seconds": time.perf_counter() - t0}}))
    """)


# ---------------------------------------------------------------------------------------------
# 256 px photographs, LlamaGen VQ-16
# ---------------------------------------------------------------------------------------------
PHOTO_ORIGINAL_EVERY = 8  # one original multi-megapixel file among every 8 files; the rest 512x384 crops
PHOTO_UNIT = 8  # files per folder unit, on average: several units even in the small corpus


def photo_corpus(n: int) -> tuple[Path, dict]:
    """An image folder of n JPEG files of real photographs: 7 in 8 are 512x384 (or 384x512) crops at
    quality 90 of an original reduced (bicubic) to a random shorter side of 384-768 px, 1 in 8 is an
    original as packaged (distinct originals, as long as there are enough). Deterministic in n."""
    import io
    import random

    from PIL import Image

    from decode_speed import originals

    folder = OUT / f"photo256-{n}"
    if (folder / "_done").exists():
        return folder, json_load(folder / "_done")
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files = originals()
    rng = random.Random(n)
    mix = {"crops": 0, "originals": 0, "original_mpx": []}
    for i in range(n):
        if i % PHOTO_ORIGINAL_EVERY == PHOTO_ORIGINAL_EVERY - 1:  # originals from the end of the list,
            src = files[-1 - mix["originals"] % len(files)]  # crops from its start
            data = src.read_bytes()
            with Image.open(src) as im:
                mix["original_mpx"].append(im.size[0] * im.size[1] / 1e6)
            mix["originals"] += 1
        else:
            img = Image.open(files[mix["crops"] % len(files)])
            short = rng.randint(384, 768)
            img.draft("RGB", (short * 2, short * 2))
            img = img.convert("RGB")
            w, h = img.size
            r = short / min(w, h)
            img = img.resize((max(short, round(w * r)), max(short, round(h * r))), Image.Resampling.BICUBIC)
            cw, ch = (512, 384) if img.size[0] >= img.size[1] else (384, 512)
            x, y = rng.randint(0, img.size[0] - cw), rng.randint(0, img.size[1] - ch)
            buf = io.BytesIO()
            img.crop((x, y, x + cw, y + ch)).save(buf, "JPEG", quality=90)
            data = buf.getvalue()
            mix["crops"] += 1
        (folder / f"{i:05d}.jpg").write_bytes(data)
    (folder / "_done").write_text(json.dumps(mix))
    return folder, mix


def json_load(path: Path):
    return json.loads(path.read_text())


def photo_bundle() -> Path:
    import torch

    from vqtok import Tokenizer, VQVAEConfig
    from vqtok.models import VQVAE

    bundle = OUT / "tokenizer-llamagen-vq16-random"
    if not (bundle / "model.safetensors").exists():
        torch.manual_seed(0)
        model = VQVAE(VQVAEConfig.from_preset("llamagen-vq16"))
        model.quantizer.initialized.fill_(True)
        Tokenizer(model).save(bundle)
    return bundle


def photo_decode(folder: Path, image_size: int = 256) -> tuple[np.ndarray, float]:
    """Every file of the folder read and decoded as `vqtok tokenize` does (the bundle's policy), in
    this process on one core: (the images, img/s)."""
    from vqtok import Tokenizer
    
    pre = Tokenizer.load(photo_bundle()).preprocess
    files = sorted(folder.glob("*.jpg"))
    t = time.perf_counter()
    images = np.stack([pre.decode(f.read_bytes()) for f in files])
    return images, len(files) / (time.perf_counter() - t)


def photo_encoder_only(images: np.ndarray, batch: int, threads: int, device: str = "cpu",
                       bf16: bool = False) -> float:
    import torch

    from vqtok import Tokenizer

    torch.set_num_threads(threads)
    tok = Tokenizer.load(photo_bundle(), device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
        tok.encode(images[:batch], batch_size=batch)  # warm-up
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        tok.encode(images, batch_size=batch)
        if device != "cpu":
            torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t)


def photo256(args, threads: int) -> str:
    import torch

    sizes = [int(x) for x in args.photo_images.split(",")]
    small, large = min(sizes), max(sizes)
    bundle = photo_bundle()
    (folder_s, mix_s), (folder_l, mix_l) = photo_corpus(small), photo_corpus(large)
    batch = args.photo_batch
    print(f"photo256: corpora of {small} and {large} JPEG files ({mix_l['crops']} crops + {mix_l['originals']} "
          f"originals in the larger); llamagen-vq16 random weights; batch {batch}, {threads} threads", flush=True)
    images, dec = photo_decode(folder_s)
    print(f"photo256 read + decode: {dec:,.1f} img/s per core", flush=True)
    enc = photo_encoder_only(images, batch, threads)
    print(f"photo256 encoder-only: {enc:,.2f} img/s", flush=True)
    gpu = torch.cuda.is_available()
    if gpu:
        enc_gpu = photo_encoder_only(images, batch, threads, device="cuda")
        enc_bf16 = photo_encoder_only(images, batch, threads, device="cuda", bf16=True)
    opts = dict(folder_unit_size=PHOTO_UNIT)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        runs = {}
        for n, folder in ((small, folder_s), (large, folder_l)):
            r, wall, rss = run_measured(vqtok_code(bundle, str(folder), f"{tmp}/tok-{n}", batch, **opts))
            assert r["rows"] == n, r
            runs[n] = (r, wall, rss)
            print(f"photo256 vqtok tokenize {n} files: {n / wall:,.2f} img/s whole command ({wall:.1f}s), "
                  f"{n / r['stream_seconds']:,.2f} once Ray is up; peak RSS {rss / 2**20:,.0f} MiB", flush=True)
    r, wall, rss_l = runs[large]
    rss_s = runs[small][2]
    e2e, stream = large / wall, large / r["stream_seconds"]
    rows = [
        ["encoder-only (pre-decoded uint8, in memory)", f"{enc:,.2f}", "1.00x", "-", "-"],
        [f"vqtok tokenize {small} files, whole command", f"{small / runs[small][1]:,.2f}",
         f"{small / runs[small][1] / enc:.2f}x", f"{runs[small][1]:.1f}", f"{rss_s / 2**20:,.0f}"],
        [f"vqtok tokenize {large} files, whole command", f"{e2e:,.2f}", f"{e2e / enc:.2f}x", f"{wall:.1f}",
         f"{rss_l / 2**20:,.0f}"],
        [f"vqtok tokenize {large} files, once Ray is up", f"{stream:,.2f}", f"{stream / enc:.2f}x",
         f"{r['stream_seconds']:.1f}", "-"],
    ]
    if gpu:
        rows += [["encoder-only on the GPU, fp32", f"{enc_gpu:,.1f}", "-", "-", "-"],
                 ["encoder-only on the GPU, bf16 autocast", f"{enc_bf16:,.1f}", "-", "-", "-"]]
    body = table([f"256 px photographs, llamagen-vq16, batch {batch}", "img/s", "of encoder-only", "seconds",
                  "peak RSS MiB"], rows)
    mpx = mix_l["original_mpx"]
    body += (f"\n\nCorpus: an image folder of JPEG files of real photographs (colour JPEGs of >= 1 Mpx from "
             f"Debian's desktop-background packages); of every {PHOTO_ORIGINAL_EVERY} files "
             f"{PHOTO_ORIGINAL_EVERY - 1} are 512x384 crops (quality 90) of an original reduced to a random shorter "
             f"side of 384-768 px and 1 is an original as packaged: {large} files = {mix_l['crops']} crops + "
             f"{mix_l['originals']} originals ({min(mpx):.1f}-{max(mpx):.1f} Mpx); the {small}-file corpus is built "
             f"the same way. Folder units of {PHOTO_UNIT} files on average. Tokenizer: "
             f"VQVAEConfig.from_preset('llamagen-vq16') (72M parameters, 16x16 tokens, K=16384), random weights "
             f"(speed does not depend on them); the bundle's preprocessing policy (reduced JPEG decode). "
             f"Encoder-only: Tokenizer.encode on the {small}-file corpus decoded beforehand, after one warm-up batch. "
             f"{threads} torch threads everywhere; embedded Ray, 1 encoder.")
    ratio = rss_l / max(rss_s, 1)
    body += (f"\nPeak RSS (driver + Ray processes): {rss_s / 2**20:,.0f} MiB for {small} files, "
             f"{rss_l / 2**20:,.0f} MiB for {large} ({ratio:.2f}x).")
    cores = os.cpu_count() or 1
    body += (f"\nRead + decode (folder files, the bundle's policy: reduced JPEG decode, resize, crop): {dec:,.1f} "
             f"img/s per core, {dec / enc:,.0f}x the encoder's img/s: at 256 px with this model the encoder, not "
             f"decoding, bounds a CPU-only run.")
    if gpu:
        body += (f"\nOn the GPU ({torch.cuda.get_device_name(0)}): keeping the bf16 encoder busy at {enc_bf16:,.0f} "
                 f"img/s takes {enc_bf16 / dec:,.1f} decode cores at {dec:,.1f} img/s each.")
    else:
        body += ("\nNo GPU on this machine: on one, the same script also reports the encoder under bf16 autocast "
                 "and the decode cores needed to keep it busy; neither was measured here.")
    bars = [(f"peak RSS {large} <= 1.25x {small}", ratio <= 1.25)]
    body += "\nBars: " + "; ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in bars)
    return body


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=70_000)
    p.add_argument("--shard-size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--no-handwritten", action="store_true")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--case", default="all", choices=["fmnist", "photo256", "all"],
                   help="fmnist: Fashion-MNIST 28 px, default architecture; photo256: 256 px photographs, llamagen-vq16")
    p.add_argument("--photo-images", default="32,96", help="photo256: the two corpus sizes (files)")
    p.add_argument("--photo-batch", type=int, default=8, help="photo256: images per encoder batch")
    args = p.parse_args()

    threads = os.cpu_count() or 1  # what `vqtok tokenize` gives its one CPU encoder
    if args.case in ("photo256", "all"):
        OUT.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        body = photo256(args, threads) + f"\nWhole case: {time.perf_counter() - t0:.0f} s."
        print(body)
        if not args.no_append:
            append_results("Batch tokenization throughput at 256 px, LlamaGen VQ-16 "
                           "(benchmarks/tokenize_throughput.py --case photo256)", body)
        if args.case == "photo256":
            return 0
    shards, bundle = prepare(args.images, args.shard_size, args.tokenizer)
    tars = sorted(str(s) for s in shards.glob("*.tar"))
    small = tars[: max(1, 10_000 // args.shard_size)]
    n_small = len(small) * args.shard_size
    print(f"{len(tars)} shards of {args.shard_size} in {shards}; tokenizer {bundle}; batch {args.batch_size}, "
          f"{threads} threads", flush=True)

    enc = encoder_only(bundle, args.batch_size, threads, args.images)
    print(f"encoder-only: {enc:,.0f} img/s", flush=True)
    dec = decode_per_core(tars[0])
    print(f"read + decode: {dec:,.0f} img/s per core", flush=True)
    with tempfile.TemporaryDirectory(dir=OUT) as tmp:
        full, wall, rss_full = run_measured(vqtok_code(bundle, ",".join(tars), f"{tmp}/full", args.batch_size))
        assert full["rows"] == args.images, full
        e2e = full["rows"] / wall
        stream = full["rows"] / full["stream_seconds"]
        print(f"vqtok tokenize: {e2e:,.0f} img/s whole command ({wall:.1f}s), {stream:,.0f} img/s once Ray is up; "
              f"peak RSS {rss_full / 2**20:,.0f} MiB", flush=True)
        small_r, _, rss_small = run_measured(vqtok_code(bundle, ",".join(small), f"{tmp}/small", args.batch_size))
        assert small_r["rows"] == n_small
        print(f"vqtok tokenize {n_small:,} images: peak RSS {rss_small / 2**20:,.0f} MiB", flush=True)
        hand = hand_wall = None
        if not args.no_handwritten:
            h, hand_wall, _ = run_measured(handwritten_code(bundle, tars, f"{tmp}/hand", args.batch_size, threads))
            assert h["rows"] == args.images, h
            hand = h["rows"] / hand_wall
            print(f"hand-written Ray Data: {hand:,.0f} img/s ({hand_wall:.1f}s)", flush=True)

    rows = [
        ["encoder-only (in memory)", f"{enc:,.0f}", "1.00x", "-"],
        ["vqtok tokenize, whole command", f"{e2e:,.0f}", f"{e2e / enc:.2f}x", f"{wall:.1f}"],
        ["vqtok tokenize, once Ray is up", f"{stream:,.0f}", f"{stream / enc:.2f}x", f"{full['stream_seconds']:.1f}"],
    ]
    if hand:
        rows.append(["hand-written Ray Data pipeline", f"{hand:,.0f}", f"{hand / enc:.2f}x", f"{hand_wall:.1f}"])
    body = table([f"{args.images:,} images, batch {args.batch_size}", "img/s", "of encoder-only", "seconds"], rows)
    ratio_rss = rss_full / max(rss_small, 1)
    body += (f"\n\nPeak RSS (driver + Ray processes): {rss_small / 2**20:,.0f} MiB for {n_small:,} images, "
             f"{rss_full / 2**20:,.0f} MiB for {args.images:,} ({ratio_rss:.2f}x).")
    cores = os.cpu_count() or 1
    bound = 1 / (1 + enc / (dec * cores))
    body += (f"\nRead + decode (webdataset tar iterator, PIL, preprocessing): {dec:,.0f} img/s per core. On this "
             f"{cores}-core machine decoding and encoding share the cores, so even perfect overlap caps end to end "
             f"at 1 / (1 + encoder-only / (decode x cores)) = {bound:.2f}x encoder-only. With the encoder on a GPU, "
             f"keeping it busy at G img/s takes G / {dec:,.0f} decode cores.")
    bars = [("end to end >= 0.8x encoder-only (whole command)", e2e / enc >= 0.8),
            ("end to end >= 0.8x encoder-only (once Ray is up)", stream / enc >= 0.8),
            ("peak RSS 70k <= 1.25x 10k", ratio_rss <= 1.25)]
    if hand:
        bars.append(("vqtok >= hand-written Ray Data (whole command)", e2e >= hand))
    body += "\nBars: " + "; ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in bars)
    print(body)
    if not args.no_append:
        append_results("Batch tokenization throughput (benchmarks/tokenize_throughput.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
