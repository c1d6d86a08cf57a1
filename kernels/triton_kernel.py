"""Fused nearest-code search in Triton: a GEMM with an argmin epilogue; N x K never exists.

One program owns BLOCK_N rows of x. It streams the codebook in BLOCK_K tiles; for each tile it
accumulates x . e over D in BLOCK_D slices (so any D works, power of two or not), forms the score
s = ||e||^2 - 2 x.e (||e||^2 precomputed from exactly the values fed to the dot) and merges the
tile's (min, argmin) into a running pair with a strict `<`, tiles visited in ascending index order:
ties go to the lowest index, no atomics, bitwise repeatable. The D slice, which orders the sums, is
fixed per D (d_slice), so the autotuner's choice of tiles should not change a score's bits either.

Returned distances are ||x - e_idx||^2 measured for the chosen code (O(N*D) after the search).

precision="exact": fp32-accurate products (input_precision="tf32x3": three tf32 products per term
                   on tensor cores; the interpreter computes them in fp32).
precision="fast":  fp16 products with fp32 accumulation, plus a fix-up. The kernel also tracks the
                   second-best score per row; rows whose best/second gap is within the rounding
                   bound of the fp16 dot are re-searched over all K in exact mode.
                   fp16 rather than bf16: the same tensor-core rate, an 8x tighter rounding bound
                   (fewer rows to fix up), and it is the low-precision dot Triton's interpreter
                   emulates exactly (its bf16 cast does not round to nearest), so CI tests the very
                   code the GPU runs. Inputs beyond fp16's range fall back to exact mode.

On a CPU tensor the same kernel runs under Triton's interpreter (TRITON_INTERPRET=1).

On a GPU, Triton's autotuner picks the tiles per (K, D, bucket of N, mode): configs_for says which
configurations are worth timing for a D, _precompile compiles them in threads before the first
timing, tuning_rows is N's bucket. compile_ahead compiles the kernel for sm_90 without a GPU.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# Without CUDA only Triton's interpreter can run the kernel, and Triton reads TRITON_INTERPRET both
# when it is imported (and decorates kernels) and while a kernel launches (lazy imports check it).
# The variable is set to 1 for exactly those moments (the import and decoration below, each
# launch) and removed after, so the rest of the process and its subprocesses see the environment
# as it was. A TRITON_INTERPRET set before (as CI sets TRITON_INTERPRET=1) is left alone.
_SUPPLY_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
_INTERPRET_LOCK = threading.Lock()  # os.environ is process-wide: one launch sets and removes it at a time


@contextlib.contextmanager
def _interpreter_env():
    if not _SUPPLY_INTERPRET:
        yield
        return
    with _INTERPRET_LOCK:
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            yield
        finally:
            del os.environ["TRITON_INTERPRET"]


with _interpreter_env():
    import triton
    import triton.language as tl

from .distance import distance_to  # noqa: E402

FP16_UNIT = 2.0**-11  # unit roundoff of float16 (11 significant bits)
FP16_SAFE = 30_000.0  # operands beyond this (in magnitude) take the exact path
FP32_UNIT = 2.0**-24
SMEM_FALLBACK = 101_376  # bytes of shared memory per block where the device cannot be asked (sm_86's)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _smem_per_block() -> int:
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return getattr(props, "shared_memory_per_block_optin", 0) or SMEM_FALLBACK
    except Exception:
        return SMEM_FALLBACK


def smem_bytes(config, elem_size: int) -> int:
    """Shared memory a configuration takes, an upper bound: the x and codebook slices in flight,
    staged as loaded (the fp16 cast of fast mode comes after the load): num_stages - 1 x slices and
    num_stages + 1 codebook slices. That is what Triton's sm_90 code allocates for fp32 operands
    (tests/test_kernels.py compiles the kept configurations for sm_90 and checks it); fast mode
    takes less. 16-bit operands take far less than this (Triton 3.6 and 3.9 convert them before the
    dot without multi-buffering the loads): here it only prunes more than it must."""
    bn, bk, bd = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.kwargs["BLOCK_D"]
    return (bn * (config.num_stages - 1) + bk * (config.num_stages + 1)) * bd * elem_size


def d_slice(d: int) -> int:
    """BLOCK_D for D: one value per D, never tuned. The exact mode's tf32x3 dot sums its three
    partial products slice by slice, so the slice width decides the order of the fp32 additions:
    with the width tuned, two configurations (two processes, two batch sizes) could round a
    near-tie apart. 16 (tl.dot's smallest) up to D = 16, 32 up to 32, then 64: no more than a
    slice's padding is loaded, and D = 256 is a loop of four, long enough to pipeline."""
    return min(64, max(16, triton.next_power_of_2(d)))


def configs_for(d: int, elem_size: int = 4, smem: int | None = None, configs: list | None = None) -> list:
    """The configurations worth compiling for D, operands of `elem_size` bytes and `smem` bytes of
    shared memory per block (default: the current device's), out of `configs` (default: all):
    - the D slice d_slice(D) (the tiles, warps and stages are tuned; the slice is not);
    - pipelining no deeper than the loop over D is long (num_stages <= max(2, its steps)): Triton
      pipelines that loop, so deeper stages only take shared memory;
    - tiles that fit in shared memory.
    Compiling is the first call's cost (about a second per configuration and mode), so fewer is
    better: at fp32, 13 at D = 256, 6 at D = 64 and at D <= 16, of 54. Where none fits (a small
    GPU), the one with D's slice that takes the least."""
    configs = gpu_configs() if configs is None else configs
    smem = _smem_per_block() if smem is None else smem
    same_slice = [c for c in configs if c.kwargs["BLOCK_D"] == d_slice(d)]
    keep = [c for c in same_slice
            if c.num_stages <= max(2, triton.cdiv(d, c.kwargs["BLOCK_D"])) and smem_bytes(c, elem_size) <= smem]
    return keep or sorted(same_slice, key=lambda c: smem_bytes(c, elem_size))[:1] or configs[:1]


def _prune(configs, named_args, **kwargs):
    """Triton's early_config_prune: configs_for this launch's D and operands."""
    tensors = [t for t in (named_args.get("x_ptr"), named_args.get("e_ptr")) if hasattr(t, "element_size")]
    elem = max((t.element_size() for t in tensors), default=4)
    return configs_for(int(named_args.get("D", 256)), elem, configs=configs)


def _configs():
    if _interpreting():  # the interpreter runs one config; small tiles keep it quick
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    return gpu_configs()


def gpu_configs() -> list:
    """Every configuration the autotuner may time on a GPU (before _prune picks those for a D)."""
    out = []
    for bn, bk, warps in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8)):
        for bd in (16, 32, 64):  # every d_slice: 16 for the tokenizers' D of 8 and 16 (tl.dot's smallest)
            for stages in (2, 3, 4):
                out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=warps,
                                         num_stages=stages))
    return out


# A Triton kernel: made one (triton.jit, then autotune) below its body, with TRITON_INTERPRET in place
def _nearest_code_kernel(
    x_ptr, e_ptr, esq_ptr, idx_ptr, best_ptr, second_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_ek, stride_ed,
    N_TUNE,  # N's bucket (tuning_rows): read by the autotuner's key only
    LOW_PRECISION: tl.constexpr,  # fp16 tiles into the dot (fast mode); else tf32x3 (exact)
    TRACK_SECOND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    second = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            x = tl.load(x_ptr + rows64[:, None] * stride_xn + ds[None, :] * stride_xd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            e = tl.load(e_ptr + cols64[:, None] * stride_ek + ds[None, :] * stride_ed,
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            if LOW_PRECISION:
                acc = tl.dot(x.to(tl.float16), tl.trans(e.to(tl.float16)), acc)
            else:  # three tf32 products per term: fp32-accurate on tensor cores
                acc = tl.dot(x.to(tl.float32), tl.trans(e.to(tl.float32)), acc, input_precision="tf32x3")
        esq = tl.load(esq_ptr + cols, mask=col_mask, other=float("inf"))  # padding never wins
        score = esq[None, :] - 2.0 * acc  # (BLOCK_N, BLOCK_K)
        tile_best = tl.min(score, axis=1)
        tile_arg = tl.argmin(score, axis=1, tie_break_left=True) + k0
        if TRACK_SECOND:
            # The second-best score over all tiles seen so far. Within this tile: the minimum over
            # every column but the tile's argmin. Across tiles: of the running best and this tile's
            # best, the larger one is no longer the best, so it is a second-best candidate; the new
            # second is the least of the old second, the tile's second and that loser. (A tie at
            # the best gives second == best: a zero gap, which the fast mode re-searches.)
            is_arg = cols[None, :] == tile_arg[:, None]
            tile_second = tl.min(tl.where(is_arg, float("inf"), score), axis=1)
            second = tl.minimum(second, tl.minimum(tile_second, tl.maximum(best, tile_best)))
        better = tile_best < best  # strict: an earlier tile keeps a tie
        best_idx = tl.where(better, tile_arg, best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(idx_ptr + rows, best_idx, mask=row_mask)
    tl.store(best_ptr + rows, best, mask=row_mask)
    if TRACK_SECOND:
        tl.store(second_ptr + rows, second, mask=row_mask)


def _autotune(**options):
    """triton.autotune with `options` this Triton version knows (cache_results came in 3.3)."""
    known = inspect.signature(triton.autotune).parameters
    return triton.autotune(**{k: v for k, v in options.items() if k in known})


with _interpreter_env():  # what triton.jit makes of the kernel depends on TRITON_INTERPRET
    _jit_kernel = triton.jit(_nearest_code_kernel)
    # The best configuration per (K, D, mode, dtypes) is also kept on disk (cache_results), beside
    # the compiled kernels: a later process (each Ray worker, the next job) skips the timing.
    _nearest_code_kernel = _autotune(configs=_configs(), key=["K", "D", "N_TUNE", "LOW_PRECISION"],
                                     prune_configs_by={"early_config_prune": _prune},
                                     cache_results=True)(_jit_kernel)

# Before the autotuner first times a (K, D, N bucket, mode, dtypes), every configuration it will
# time is compiled in a pool of threads, through Triton's own asynchronous compile mode (the compiler
# and ptxas release the GIL): the autotuner then finds them compiled instead of compiling one after
# another (about a second each). VQTOK_COMPILE_THREADS sets the threads (default: the cores, at most
# 16); 1 turns this off.
def _compile_threads() -> int:
    try:
        asked = int(os.environ.get("VQTOK_COMPILE_THREADS", "0"))
    except ValueError:
        asked = 0  # not a number: the default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return asked if asked > 0 else min(16, cores)


COMPILE_THREADS = _compile_threads()
_precompiled: dict = {}  # key -> threading.Event, set when that key's configurations are compiled
_precompile_lock = threading.Lock()


def _precompile(args: tuple, kwargs: dict) -> int:
    """Compile the configurations _prune keeps for this launch, in parallel; returns how many were
    asked for (0: done before for this key, or not applicable). A configuration that fails to
    compile is left to the autotuner, which skips it; any other failure only loses the speed-up."""
    if _interpreting() or COMPILE_THREADS <= 1:
        return 0
    named = dict(zip(_nearest_code_kernel.arg_names, args))
    x, e = named["x_ptr"], named["e_ptr"]
    key = (x.device, x.dtype, e.dtype, named["K"], named["D"], named["N_TUNE"], kwargs["LOW_PRECISION"],
           kwargs["TRACK_SECOND"])
    with _precompile_lock:
        done = _precompiled.get(key)
        if done is None:
            done = _precompiled[key] = threading.Event()
            mine = True
        else:
            mine = False
    if not mine:  # another thread compiles this key: wait for it rather than compile it again
        done.wait()
        return 0
    try:
        return _compile_all(args, kwargs, _prune(_nearest_code_kernel.configs, named))
    finally:
        done.set()


def _compile_all(args: tuple, kwargs: dict, configs: list) -> int:
    if len(configs) < 2:  # the autotuner times nothing: its one compile is all there is
        return 0
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # Triton >= 3.5
    except ImportError:
        return 0
    try:
        with ThreadPoolExecutor(min(COMPILE_THREADS, len(configs)), thread_name_prefix="vqtok-compile") as pool:
            with AsyncCompileMode(pool, ignore_errors=True):  # on leaving, the compiled kernels are Triton's
                for config in configs:
                    try:
                        _jit_kernel.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
                    except Exception:  # noqa: BLE001 - this configuration only: the autotuner skips it
                        pass
    except Exception:  # noqa: BLE001 - the autotuner compiles as it goes
        pass
    return len(configs)


def compile_ahead(config, *, low: bool, arch: int = 90, dtype: str = "fp32"):
    """The kernel compiled for an NVIDIA GPU of compute capability `arch` (90: H100/H200) on a
    machine without one (Triton compiles ahead of time with the ptxas its wheel carries), in fast
    mode (`low`) or exact, for x and codebook of `dtype` ("fp32", "bf16", "fp16"): Triton's compiled
    kernel, whose .metadata.shared is the shared memory it takes. For checking configurations and
    their compile time where no GPU is (tests/test_kernels.py, benchmarks/kernel_compile.py).
    Without CUDA, run it in a process started with TRITON_INTERPRET=0: otherwise this module imports
    Triton as its interpreter, which compiles nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _SUPPLY_INTERPRET or _interpreting():
        raise RuntimeError("compile_ahead: Triton was imported as its interpreter (no CUDA here, or TRITON_INTERPRET=1), "
                           "which compiles nothing; start the process with TRITON_INTERPRET=0")
    fn = _jit_kernel
    signature = {"x_ptr": f"*{dtype}", "e_ptr": f"*{dtype}", "idx_ptr": "*i32"}
    signature |= {n: "*fp32" for n in ("esq_ptr", "best_ptr", "second_ptr")}
    signature |= {n: "i32" for n in ("N", "K", "D", "stride_xn", "stride_xd", "stride_ek", "stride_ed", "N_TUNE")}
    constants = {"LOW_PRECISION": low, "TRACK_SECOND": low, **config.kwargs}
    signature |= {n: "constexpr" for n in constants}
    signature = {n: signature[n] for n in fn.arg_names}  # in the kernel's argument order
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def tuning_rows(n: int) -> int:
    """N's bucket in the autotuner's key: 1,024, then powers of 4 up to 1,048,576 (2^20). The best
    tiles for 500 rows are not those for a million, and a choice is kept on disk (cache_results):
    without N in the key, a first call on a small batch would choose for every later large one.
    The bucket is a power of four: it never changes what Triton compiles, only what it times."""
    bucket = 1024
    while bucket < n and bucket < 1 << 20:
        bucket *= 4
    return bucket


_last_config: dict = {}


def last_configs() -> dict[str, str]:
    """The configuration each mode's last call ran ({"exact": ..., "fast": ...}, as
    "BLOCK_N x BLOCK_K x BLOCK_D, warps, stages"; not the fast mode's exact re-search): what the
    autotuner chose, for benchmarks to report. Per process, not per thread."""
    return {mode: f"{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}x{c.kwargs['BLOCK_D']} w{c.num_warps} s{c.num_stages}"
            for mode, c in _last_config.items() if c is not None}


def kernel_args(x, e, esq, idx, best, second) -> tuple:
    """The kernel's positional arguments for these tensors (what the autotuner and _precompile see)."""
    n, d = x.shape
    return (x, e, esq, idx, best, second, n, e.shape[0], d, x.stride(0), x.stride(1), e.stride(0), e.stride(1),
            tuning_rows(n))


def _launch(x, e, esq, *, low: bool, track_second: bool, record: bool = True):
    n = x.shape[0]
    idx = torch.empty(n, dtype=torch.int32, device=x.device)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    second = torch.empty(n if track_second else 1, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, best, second
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    args = kernel_args(x, e, esq, idx, best, second)
    kwargs = {"LOW_PRECISION": low, "TRACK_SECOND": track_second}
    # Triton compiles for and launches on the current device: make it x's (x on cuda:1, say)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if x.is_cuda:
            _precompile(args, kwargs)
        with _interpreter_env():
            _nearest_code_kernel[grid](*args, **kwargs)
    if record:
        _last_config["fast" if low else "exact"] = getattr(_nearest_code_kernel, "best_config", None)
    return idx, best, second


def fast_dot_bound(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per row, twice the worst-case error of a fast score ||e~||^2 - 2 x~.e~ against the exact
    score (both operands rounded to fp16, products exact and accumulated in fp32; Cauchy-Schwarz).
    A row whose best/second gap exceeds this has the exact argmin from the fast search."""
    u = 2 * FP16_UNIT + FP16_UNIT**2
    d = x.shape[1]
    x_norm = x.float().norm(dim=1)
    e_max = e.float().norm(dim=1).max()
    per_score = u * e_max**2 + 2 * (u + d * FP32_UNIT) * x_norm * e_max
    return 2 * per_score


def nearest_code_triton(x: torch.Tensor, codebook: torch.Tensor, *, precision: str = "exact",
                        return_distance: bool = False, stats: dict | None = None):
    """Indices int64 (N,) and, when asked, squared distances (N,) float32 >= 0.
    `stats`, when given, receives {"flagged": rows re-searched in exact mode, "rows": N}."""
    fast = precision == "fast"
    if fast and x.numel() and codebook.numel():
        fast = max(float(x.abs().max()), float(codebook.abs().max())) < FP16_SAFE
    e_fed = codebook.half().float() if fast else codebook.float()
    esq = (e_fed * e_fed).sum(dim=1).contiguous()  # from exactly the values the dot sees
    idx, best, second = _launch(x, codebook, esq, low=fast, track_second=fast)
    idx = idx.long()
    if fast:
        flagged = (second - best) <= fast_dot_bound(x, codebook)
        rows = flagged.nonzero().flatten()
        if rows.numel():
            esq32 = (codebook.float() ** 2).sum(dim=1).contiguous()
            sub = x[rows]
            r_idx, _, _ = _launch(sub, codebook, esq32, low=False, track_second=False, record=False)
            idx[rows] = r_idx.long()
        if stats is not None:
            stats.update(flagged=int(rows.numel()), rows=x.shape[0])
    elif stats is not None:
        stats.update(flagged=x.shape[0] if precision == "fast" else 0, rows=x.shape[0])
    # Distances are measured for the chosen codes directly: exactly 0 for x equal to its code.
    return idx, distance_to(x, codebook, idx) if return_distance else None
