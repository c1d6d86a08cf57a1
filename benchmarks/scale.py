"""Tokenization at scale on this machine: a million images, memory flat, and a resume that reads no
byte of a committed unit.

    python benchmarks/scale.py [--shards 1000] [--per-shard 1000] [--kill-at 0.4] [--no-append]

The corpus: Fashion-MNIST's 70k images (train + test) written round-robin into `--shards`
WebDataset shards of `--per-shard` images, every key distinct (`sNNNNN-iNNNN`), 1,000,000 images by
default. The tokenizer: the default architecture with random weights (speed does not depend on
what the weights learned). Measured, each run a fresh `vqtok tokenize` process (embedded Ray):
  1. the first 10 shards (10k images): wall time, img/s, peak RSS (summed over the process group:
     driver and Ray's processes);
  2. the whole corpus, clean: the same figures; the bar is peak RSS(1M) <= 1.25x peak RSS(10k);
  3. the whole corpus again into a second OUT, SIGKILLed (the whole process group) once `--kill-at`
     of the units are committed; then every committed unit's shard is overwritten with zeros
     in place, keeping its size and mtime (so its signature is unchanged): a resume that read any
     byte of a committed unit would get garbage rows or failures. The resumed dataset must equal the
     clean one part for part (sha256 of every part's bytes) with no failures.
The corpus is left poisoned afterwards and rebuilt on the next run.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, ensure_fashion_mnist, table  # noqa: E402
from tokenize_throughput import PeakRSS, prepare, run_measured, vqtok_code  # noqa: E402

OUT = Path(__file__).parent / "out" / "scale"


def build_corpus(n_shards: int, per: int) -> Path:
    import numpy as np
    from PIL import Image

    from vqtok.pipeline.sources import read_idx

    corpus = OUT / f"corpus-{n_shards}x{per}"
    if (corpus / "_done").exists():
        return corpus
    src = ensure_fashion_mnist()
    images = np.concatenate([read_idx(str(src / "train-images-idx3-ubyte.gz")), read_idx(str(src / "t10k-images-idx3-ubyte.gz"))])
    labels = np.concatenate([read_idx(str(src / "train-labels-idx1-ubyte.gz")), read_idx(str(src / "t10k-labels-idx1-ubyte.gz"))])
    t0 = time.time()
    pngs = []
    for im in images:  # encode each distinct image once; the corpus repeats them under distinct keys
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    corpus.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in range(n_shards):
        with tarfile.open(corpus / f"shard-{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per):
                j = n % len(pngs)
                for ext, data in (("png", pngs[j]), ("cls", str(int(labels[j])).encode())):
                    info = tarfile.TarInfo(f"s{s:05d}-i{i:04d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        if s % 100 == 99:
            print(f"  corpus: {s + 1}/{n_shards} shards ({time.time() - t0:.0f}s)", flush=True)
    (corpus / "_done").write_text(str(n))
    return corpus


def committed_units(out: Path) -> dict[str, tuple[str, int]]:
    from vqtok import TokenDataset

    try:
        return {p.unit: (p.sha256, p.rows) for p in TokenDataset(out).parts}
    except FileNotFoundError:
        return {}


def poison(paths: list[str]) -> None:
    """Overwrite each file with zeros in place, keeping its size and mtime (its unit signature)."""
    for path in paths:
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(bytes(st.st_size))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def killed_then_resumed(bundle: Path, data: str, out: Path, batch: int, units: int, kill_at: float) -> dict:
    code = vqtok_code(bundle, data, str(out), batch)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    rss = PeakRSS(p.pid)
    t0 = time.time()
    while len(committed_units(out)) < kill_at * units:
        if p.poll() is not None:
            raise RuntimeError(f"the run ended before the kill:\n{p.stderr.read()[-3000:]}")
        time.sleep(2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    rss.stop()
    first = time.time() - t0
    at_kill = committed_units(out)
    print(f"  killed after {first:.0f}s with {len(at_kill)} of {units} units committed; poisoning their shards",
          flush=True)
    poison(list(at_kill))
    (Path(data) / "_poisoned").write_text("")
    result, wall, peak = run_measured(code)
    return {"at_kill": len(at_kill), "first_seconds": first, "resume": result, "resume_wall": wall, "resume_peak": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--kill-at", type=float, default=0.4)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()

    import shutil

    corpus = OUT / f"corpus-{args.shards}x{args.per_shard}"
    if (corpus / "_poisoned").exists():
        shutil.rmtree(corpus)
    print(f"building the corpus ({args.shards} shards x {args.per_shard} images) ...", flush=True)
    corpus = build_corpus(args.shards, args.per_shard)
    _, bundle = prepare(10_000, 5000, None)  # only the tokenizer bundle is used
    total = args.shards * args.per_shard
    small_n = min(10, args.shards)
    small = str(corpus / f"shard-{{00000..{small_n - 1:05d}}}.tar")
    full = str(corpus)
    for d in ("small", "clean", "resumed"):
        shutil.rmtree(OUT / d, ignore_errors=True)

    rows = []
    print(f"1. {small_n * args.per_shard:,} images ...", flush=True)
    r_small, wall_small, peak_small = run_measured(vqtok_code(bundle, small, str(OUT / "small"), args.batch_size))
    rows.append([f"{r_small['rows']:,} images ({small_n} shards), clean", f"{wall_small:,.0f}",
                 f"{r_small['images'] / wall_small:,.0f}", f"{peak_small / 2**20:,.0f}", "1.00x"])
    print(f"2. {total:,} images, clean ...", flush=True)
    r_full, wall_full, peak_full = run_measured(vqtok_code(bundle, full, str(OUT / "clean"), args.batch_size))
    rows.append([f"{r_full['rows']:,} images ({args.shards} shards), clean", f"{wall_full:,.0f}",
                 f"{r_full['images'] / wall_full:,.0f}", f"{peak_full / 2**20:,.0f}",
                 f"{peak_full / peak_small:.2f}x"])
    print(f"3. {total:,} images, killed at {args.kill_at:.0%} of the units, committed shards poisoned, resumed ...",
          flush=True)
    k = killed_then_resumed(bundle, full, OUT / "resumed", args.batch_size, args.shards, args.kill_at)
    res = k["resume"]
    rows.append([f"resume after SIGKILL ({k['at_kill']} of {args.shards} units committed)", f"{k['resume_wall']:,.0f}",
                 f"{res['images'] / k['resume_wall']:,.0f}", f"{k['resume_peak'] / 2**20:,.0f}",
                 f"{k['resume_peak'] / peak_small:.2f}x"])

    clean, resumed = committed_units(OUT / "clean"), committed_units(OUT / "resumed")
    differing = sorted(u for u in set(clean) | set(resumed) if clean.get(u) != resumed.get(u))
    from vqtok import TokenDataset

    failures = TokenDataset(OUT / "resumed").failures
    ok_mem = peak_full <= 1.25 * peak_small
    body = table(["run", "wall s", "img/s (whole command)", "peak RSS MiB", "RSS vs 10k"], rows)
    body += textwrap.dedent(f"""

        Corpus: Fashion-MNIST (70k distinct images) written round-robin into {args.shards} WebDataset shards of
        {args.per_shard} images, every key distinct; default-architecture tokenizer with random weights; batch
        {args.batch_size}, 1 encoder, embedded Ray. Peak RSS is summed over the job's process group (driver + Ray).
        Bar: peak RSS(1M) <= 1.25x peak RSS(10k): {"met" if ok_mem else "MISSED"} ({peak_full / peak_small:.2f}x).
        Resume: killed after {k['first_seconds']:.0f}s with {k['at_kill']} units committed; their {k['at_kill']} shards were then
        overwritten with zeros (size and mtime kept), so reading any byte of them would have changed the result.
        The resumed run tokenized {res['images']:,} images; parts differing from the clean run: {len(differing)};
        skipped inputs: {failures}.""")
    print(body)
    if not args.no_append:
        append_results("Tokenization at scale: 1M images, memory, resume (benchmarks/scale.py)", body)
    return 0 if not differing and failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
