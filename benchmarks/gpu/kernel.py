"""Nearest-code search on CUDA, side by side in one run (issue 24, item 2): vqtok's Triton kernel
(vqtok.nearest_code) in exact and fast mode against torch's cdist + argmin and mm + argmin, in a
fair fight:
  - exact mode (fp32-accurate: three TF32 products per term) against fp32 peers with TF32 off
    (torch.set_float32_matmul_precision("highest")) and on ("high");
  - fast mode (fp16 products, then an exact re-search of the rows whose rounding could flip the
    answer) against bf16 and fp16 peers, whose answers nobody checks: the "agrees" column counts
    the rows where a method picks the code vqtok's exact mode picks;
  - peers chunked over N where their (rows, K) scores would pass PEER_SCORE_BYTES (at
    K = 262,144 the whole N x K is 64 GiB of fp32);
  - all against the device's bf16 matmul rate (an 8192^3 product measured in the same run).
Per shape also: the first call's seconds (Triton compiles and autotunes per K, D and mode;
compiled kernels stay on disk for later processes), the peak memory vqtok allocates beyond its
inputs (it never makes N x K), and what limits the shape: the share of the fast kernel's time that
its tensor-core products need at the measured bf16 rate; the rest is the argmin epilogue (each of
the N x K scores compared on CUDA cores), which a small D cannot amortise.
flash-kmeans reports 1.95 ms for its fp16 fused assignment at (1,048,576, 4096, 64) on an H200:
an outside reference, not measured here.
"""
from __future__ import annotations

import contextlib

import torch

from .common import NO_CUDA, Part, oom, seconds, wall

TITLE = "Nearest-code search on CUDA: vqtok's kernel vs torch cdist/mm + argmin"
# (N, K, D), the cheap ones first: the last is about 9 TFLOP a call
SHAPES = [(65536, 8192, 256), (65536, 16384, 8), (65536, 512, 16), (1 << 20, 4096, 64), (65536, 262144, 256)]
SMOKE_SHAPES = [(70, 40, 24), (33, 70, 8)]
PEER_SCORE_BYTES = 8 << 30  # a peer's (rows, K) score block per chunk
SMOKE_PEER_SCORE_BYTES = 16 * 40 * 4  # chunks in the smoke run too
MATMUL_N = 8192


def cdist_argmin(x, e):
    return torch.cdist(x, e).argmin(1)


def mm_argmin(x, e):
    return ((e * e).sum(1) - 2 * x @ e.T).argmin(1)


# method -> (function, operand dtype, fp32 matmul precision)
EXACT_PEERS = {"cdist fp32": (cdist_argmin, torch.float32, "highest"), "cdist fp32 TF32": (cdist_argmin, torch.float32, "high"),
               "mm fp32": (mm_argmin, torch.float32, "highest"), "mm fp32 TF32": (mm_argmin, torch.float32, "high")}
FAST_PEERS = {"cdist bf16": (cdist_argmin, torch.bfloat16, None), "cdist fp16": (cdist_argmin, torch.float16, None),
              "mm bf16": (mm_argmin, torch.bfloat16, None), "mm fp16": (mm_argmin, torch.float16, None)}


@contextlib.contextmanager
def fp32_matmul(precision: str | None):
    """torch's fp32 matmul precision for the block ("highest": no TF32, "high": TF32)."""
    old = torch.get_float32_matmul_precision()
    if precision:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def chunked(fn, x, e, rows: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for i in range(0, x.shape[0], rows):
        out[i:i + rows] = fn(x[i:i + rows], e)
    return out


def matmul_rate(part: Part, dtype, precision: str | None = None) -> float:
    n = 64 if part.smoke else MATMUL_N
    a, b = (torch.randn(n, n, device=part.device, dtype=dtype) for _ in range(2))
    with fp32_matmul(precision):
        t = seconds(part, lambda: a @ b, repeat=10, warmup=3)
    return 2 * n**3 / t


def peak_extra(part: Part, fn) -> int | None:
    """Bytes allocated at the peak of fn() beyond what was allocated before (CUDA only)."""
    if part.device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(part: Part) -> None:
    from functools import partial

    from vqtok import nearest_code

    nearest_code = partial(nearest_code, backend="triton")  # also on the CPU (smoke): the interpreter
    if not part.smoke and not torch.cuda.is_available():
        part.skip(NO_CUDA)
    rates = {"bf16": matmul_rate(part, torch.bfloat16), "fp32": matmul_rate(part, torch.float32, "highest"),
             "fp32 TF32": matmul_rate(part, torch.float32, "high")}
    part.note("matmul rates measured in this run (" + ("64" if part.smoke else str(MATMUL_N)) + "^3): "
              + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in rates.items())
              + "; exact mode's ceiling is a third of the TF32 rate (three TF32 products per term)")
    summary = part.table("Per shape: vqtok exact and fast mode (Gaussian x and codes)", [
        "N x K x D", "exact ms", "fast ms", "fast TFLOP/s", "fast of bf16 matmul", "exact vs cdist fp32 / TF32",
        "fast vs cdist bf16 / fp16", "fast vs mm bf16", "re-searched", "first call s exact / fast",
        "peak extra MiB exact / fast (N x K fp32)", "tuned exact / fast (of kept)", "limit"])
    methods = part.table("Every method", ["N x K x D", "method", "ms", "TFLOP/s", "of bf16 matmul", "vs cdist fp32",
                                          "agrees with vqtok exact"])
    targets = []
    for n, k, d in SMOKE_SHAPES if part.smoke else SHAPES:
        if not part.has_time(25 if k * d < 1 << 24 else 60, f"{n}x{k}x{d}"):
            continue
        try:
            targets += one_shape(part, nearest_code, n, k, d, rates, summary, methods)
        except Exception as e:  # one shape's failure (out of memory) leaves the others
            if not oom(e):
                raise
            summary.note(f"{n}x{k}x{d}: out of memory ({str(e)[:120]})")
        if part.device == "cuda":
            torch.cuda.empty_cache()
    part.note("first call: compiling the configurations the kernel keeps for this D (in threads, where an earlier "
              "part had not: compiled kernels stay on disk) and Triton's autotuning over them for this K, D and mode "
              "(kept on disk too, where this Triton has cache_results); 'tuned': the configuration chosen")
    part.note("targets (issue 24): " + "; ".join(f"{what} {'PASS' if ok else 'FAIL'}" for what, ok in targets))


def one_shape(part: Part, nearest_code, n: int, k: int, d: int, rates: dict, summary, methods) -> list:
    from vqtok.kernels.triton_kernel import configs_for, last_configs

    shape = f"{n}x{k}x{d}"
    g = torch.Generator(device=part.device).manual_seed(n + k + d)
    x = torch.randn(n, d, device=part.device, generator=g)
    e = torch.randn(k, d, device=part.device, generator=g)
    flops = 2 * n * k * d
    first, t, extra, stats, tuned = {}, {}, {}, {}, {}
    for mode in ("exact", "fast"):
        first[mode], _ = wall(part, lambda: nearest_code(x, e, precision=mode))
        tuned[mode] = last_configs().get(mode, "?")
        t[mode] = seconds(part, lambda: nearest_code(x, e, precision=mode, stats=stats if mode == "fast" else None))
        extra[mode] = peak_extra(part, lambda: nearest_code(x, e, precision=mode))
    ref = nearest_code(x, e, precision="exact")
    fast_idx = nearest_code(x, e, precision="fast")
    near = e[torch.randint(0, k, (n,), device=part.device, generator=g)] + 0.05 * torch.randn(n, d, device=part.device, generator=g)
    vq_stats = {}
    t["fast, VQ-like x"] = seconds(part, lambda: nearest_code(near, e, precision="fast", stats=vq_stats))

    def row(method, secs, agree):
        methods.add(shape, method, f"{secs * 1e3:.2f}", f"{flops / secs / 1e12:.1f}", f"{100 * flops / secs / rates['bf16']:.0f}%",
                    f"{t['cdist fp32'] / secs:.2f}x" if "cdist fp32" in t else "", agree)

    limit = PEER_SCORE_BYTES if not part.smoke else SMOKE_PEER_SCORE_BYTES
    rows = max(1, min(n, limit // (k * 4)))
    cast = {}
    for name, (fn, dtype, precision) in (EXACT_PEERS | FAST_PEERS).items():
        xi, ei = cast.setdefault(dtype, (x.to(dtype), e.to(dtype)))
        out = {}
        try:
            with fp32_matmul(precision):
                t[name] = seconds(part, lambda: out.__setitem__("idx", chunked(fn, xi, ei, rows)), repeat=3)
        except Exception as err:  # a dtype torch does not support here, or out of memory
            methods.add(shape, name, "error", f"{type(err).__name__}: {str(err)[:100]}", "", "", "")
            if part.device == "cuda":
                torch.cuda.empty_cache()
            continue
        row(name, t[name], f"{100 * (out['idx'] == ref).float().mean().item():.3f}%")
    del cast
    row("vqtok exact", t["exact"], "100% (itself)")
    row("vqtok fast", t["fast"], f"{100 * (fast_idx == ref).float().mean().item():.3f}%")
    row("vqtok fast, VQ-like x (a code + 5% noise)", t["fast, VQ-like x"],
        f"re-searched {100 * vq_stats.get('flagged', 0) / n:.2f}%")

    ratio = lambda peer, mode: f"{t[peer] / t[mode]:.1f}x" if peer in t else "n/a"  # noqa: E731
    mib = lambda b: "n/a (CPU)" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    share = flops / rates["bf16"] / t["fast"]
    why = (f"tensor cores ({100 * share:.0f}% of the time at the bf16 rate)" if share >= 0.5 else
           f"the argmin epilogue: the products need {100 * share:.0f}% of the time at the bf16 rate")
    flagged = stats.get("flagged", 0) / n
    if flagged > 0.01:
        why += f"; {100 * flagged:.1f}% of rows re-searched in exact mode"
    summary.add(shape, f"{t['exact'] * 1e3:.2f}", f"{t['fast'] * 1e3:.2f}", f"{flops / t['fast'] / 1e12:.1f}",
                f"{100 * flops / t['fast'] / rates['bf16']:.0f}%",
                f"{ratio('cdist fp32', 'exact')} / {ratio('cdist fp32 TF32', 'exact')}",
                f"{ratio('cdist bf16', 'fast')} / {ratio('cdist fp16', 'fast')}", ratio("mm bf16", "fast"),
                f"{100 * flagged:.2f}%", f"{first['exact']:.1f} / {first['fast']:.1f}",
                f"{mib(extra['exact'])} / {mib(extra['fast'])} ({n * k * 4 / 2**20:,.0f})",
                f"{tuned['exact']} / {tuned['fast']} ({len(configs_for(d, 4)) if part.device == 'cuda' else 1})", why)
    targets = []
    if d >= 256:
        targets.append((f"{shape} fast >= 60% of bf16 matmul", flops / t["fast"] >= 0.6 * rates["bf16"]))
    if d <= 16:
        for peer, mode in (("cdist fp32", "exact"), ("cdist bf16", "fast")):
            if peer in t:
                targets.append((f"{shape} {mode} >= 5x {peer}", t[peer] / t[mode] >= 5))
    if extra["fast"] is not None:
        targets.append((f"{shape} no N x K allocation", max(extra.values()) < n * k * 2))
    return targets
