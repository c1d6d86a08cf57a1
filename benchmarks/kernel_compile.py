"""What the Triton kernel's first call compiles, and how long that takes: before and after the
kernel kept fewer configurations per D and compiled them in threads.

Triton compiles each configuration the autotuner times (about a second each, per mode), on the
first call for a new K, D and mode: in every process (each Ray worker, each suite part), before
its first batch. This compiles those configurations for an H100/H200 (sm_90) ahead of time, with
the ptxas Triton's wheel carries, so it runs on a machine with no GPU:
  - before: the configuration set and pruning of commit 4164a8c (54 configurations; the tile
    and shared-memory rule only), compiled one after another as Triton's autotuner does;
  - now, serial: vqtok.kernels.triton_kernel.configs_for, one after another;
  - now, threads: the same compiles on a pool of threads, which is what the kernel's first launch
    does on a GPU (_precompile: Triton's asynchronous compile mode runs each compile on the pool;
    VQTOK_COMPILE_THREADS, default the cores up to 16). Here compile_ahead runs on the pool directly,
    since the JIT's warmup needs a GPU.
Each (phase, D) runs in a fresh process with an empty Triton cache, the phases in turns per D.
The GPU machine's cores differ from this one's: the ratios carry over, the seconds do not.

    python benchmarks/kernel_compile.py [--d 8,16,64,256] [--no-append]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_results, machine, table  # noqa: E402

H100_SMEM = 232_448  # shared memory per block on an H100/H200 (opt-in)


def before_configs(d: int, elem: int = 4) -> list:
    """The configuration set and prune of commit 4164a8c, for comparison."""
    import triton

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
               for bn, bk, w in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8))
               for bd in (32, 64, 128) for s in (2, 3, 4)]
    keep = [c for c in configs if c.kwargs["BLOCK_D"] <= max(16, triton.next_power_of_2(d))
            and (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_D"] * elem * c.num_stages <= H100_SMEM]
    return keep or configs[:1]


def phase(name: str, d: int, threads: int) -> dict:
    """In this process (TRITON_INTERPRET=0, a fresh TRITON_CACHE_DIR): compile both modes' configurations."""
    from concurrent.futures import ThreadPoolExecutor

    from vqtok.kernels import triton_kernel as tk

    configs = before_configs(d) if name == "before" else tk.configs_for(d, 4, H100_SMEM)
    jobs = [(c, low) for low in (False, True) for c in configs]
    t0 = time.perf_counter()
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda job: tk.compile_ahead(job[0], low=job[1]), jobs))
    else:
        for c, low in jobs:
            tk.compile_ahead(c, low=low)
    return {"configs": len(configs), "compiles": len(jobs), "s": time.perf_counter() - t0}


def run_phase(name: str, d: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "TRITON_CACHE_DIR": cache,
                            "TRITON_DEFAULT_FP_FUSION": "1"}
        out = subprocess.run([sys.executable, __file__, "--phase", name, "--d", str(d), "--threads", str(threads)],
                             env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} at D={d} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", default="8,16,64,256", help="comma-separated D values (the GPU suite's shapes)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the 'now, threads' phase")
    p.add_argument("--phase", help=argparse.SUPPRESS)  # the child: one phase at one D
    p.add_argument("--no-append", action="store_true", help="print the table only")
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, int(args.d), args.threads)))
        return
    rows, totals = [], {"before": 0.0, "serial": 0.0, "threads": 0.0}
    for d in (int(v) for v in args.d.split(",")):
        r = {"before": run_phase("before", d, 1), "serial": run_phase("now", d, 1),
             "threads": run_phase("now", d, args.threads)}
        for k in totals:
            totals[k] += r[k]["s"]
        rows.append([d, f"{r['before']['configs']} / {r['serial']['configs']}", f"{r['before']['s']:.1f}",
                     f"{r['serial']['s']:.1f}", f"{r['threads']['s']:.1f}", f"{r['before']['s'] / r['threads']['s']:.1f}x"])
        print(rows[-1], flush=True)
    rows.append(["all", "", f"{totals['before']:.1f}", f"{totals['serial']:.1f}", f"{totals['threads']:.1f}",
                 f"{totals['before'] / totals['threads']:.1f}x"])
    body = table(["D", "configurations per mode, before / now", "before s (serial)", "now s (serial)",
                  f"now s ({args.threads} threads)", "before / now"], rows)
    body += ("\n\nBoth modes (exact and fast) compiled for sm_90 ahead of time (vqtok.kernels.triton_kernel."
             "compile_ahead), fp32 operands, 227 KiB of shared memory per block; each cell a fresh process and "
             f"Triton cache. {os.cpu_count()} cores here: the threads' gain grows with the cores (the GPU machine "
             "has 16). The first call also times each configuration (Triton's autotuner, about 0.1 s each on the "
             "GPU), not measured here.")
    print(body)
    if not args.no_append:
        append_results("Triton kernel: what the first call compiles (sm_90, ahead of time)", body)
    else:
        print(machine())


if __name__ == "__main__":
    main()
