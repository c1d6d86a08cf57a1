"""Shared by the benchmark scripts: machine description, tables, appending to RESULTS.md."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        mem = 0
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def ensure_fashion_mnist() -> Path:
    """The full Fashion-MNIST (70k) from the Debian package, installed if missing."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        print("installing the Debian package dataset-fashion-mnist ...", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True)
    return FASHION_MNIST


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def append_results(title: str, body: str, *, when: str | None = None, where: str | None = None,
                   path: Path = RESULTS) -> None:
    """A section `## title`, then the date and machine (now and this one, unless the run being reported
    happened elsewhere: `when`, `where`), then `body`, appended to `path`."""
    stamp = when or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title}\n{stamp}; {where or machine()}\n\n{body}\n"
    with open(path, "a") as f:
        f.write(text)
    print(f"appended to {path}")


def interleaved(fns: dict, repeat: int) -> dict:
    """Best time of each method over `repeat` rounds, the methods taking turns within a round. Timed
    one method after another instead, faiss (its own OpenMP threads) measured right after torch's
    bursts ran up to 1.5x slower on some runs, which flattered the vs-faiss ratio."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
