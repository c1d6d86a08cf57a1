"""Tokenizer training throughput with 1 and 2 workers, side by side in one run.

    python benchmarks/train_scaling.py [--steps 300] [--batch-size 128] [--no-append]

Runs `vqtok train-vqvae` (default model) on the bundled Fashion-MNIST sample three ways: in one
process (2 torch threads), on Ray Train with 1 worker (2 CPUs), and on Ray Train with 2 workers
(1 CPU each, gloo all-reduce), same global batch. Training images/s comes from each run's
metrics.json (train time only; Ray start-up is reported separately as the command's wall time).
On a 2-core machine 2 workers share the same cores as 1 worker with 2 threads, so the figure to read
is the cost of data parallelism (all-reduce, duplicated data loading), not a speed-up; the speed-up
is for machines with a GPU (or more cores) per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, steps: int, batch: int, extra: list[str]) -> tuple[float, float]:
    exe = Path(sys.executable).with_name("vqtok")
    t = time.perf_counter()
    r = subprocess.run([str(exe), "train-vqvae", "--data", str(REPO / "examples" / "fashion-mnist"), "--out", str(out),
                        "--steps", str(steps), "--batch-size", str(batch), "--log-every", "50",
                        "--checkpoint-every", str(steps), *extra],
                       capture_output=True, text=True, start_new_session=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-2000:])
    m = json.loads((out / "metrics.json").read_text())
    return steps * batch / m["train_seconds_this_run"], wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-append", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    setups = [
        ("one process", ["--threads", str(cores)]),
        ("Ray Train, 1 worker", ["--address", "local", "--cpus-per-worker", str(cores), "--threads", str(cores)]),
        ("Ray Train, 2 workers", ["--workers", "2", "--cpus-per-worker", str(max(1, cores // 2))]),
    ]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(setups):
            rate, wall = run(Path(tmp) / f"run{i}", args.steps, args.batch_size, extra)
            base = base or rate
            rows.append([name, f"{rate:,.0f}", f"{rate / base:.2f}x", f"{wall:.0f}"])
            print(f"{name}: {rate:,.0f} img/s training, {wall:.0f}s command", flush=True)
    body = table([f"default model, batch {args.batch_size}, {args.steps} steps", "train img/s", "vs one process",
                  "command s"], rows)
    print(body)
    if not args.no_append:
        append_results("Tokenizer training scaling, CPU (benchmarks/train_scaling.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
