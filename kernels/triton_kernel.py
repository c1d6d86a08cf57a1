"""Fused nearest-code search in Triton: a GEMM with an argmin epilogue; N x K never exists.

One program owns BLOCK_N rows of x. It streams the codebook in BLOCK_K tiles; for each tile it
accumulates x . e over D in BLOCK_D slices (so any D works, power of two or not), forms the score
s = ||e||^2 - 2 x.e (||e||^2 precomputed from exactly the values fed to the dot) and merges the
tile's (min, argmin) into a running pair with a strict `<`, tiles visited in ascending index order:
ties go to the lowest index, no atomics, bitwise repeatable.

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
"""
from __future__ import annotations

import contextlib
import os
import threading

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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _prune(configs, named_args, **kwargs):
    """Drop tile configurations whose pipelined tiles overflow shared memory."""
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 101_376
    except Exception:
        smem = 101_376
    # Tiles are staged in shared memory as loaded (the fp16 cast happens after the load).
    elem = max(t.element_size() for t in (named_args.get("x_ptr"), named_args.get("e_ptr"))
               if hasattr(t, "element_size")) if "x_ptr" in named_args else 4
    d = named_args.get("D", 256)
    keep = []
    for c in configs:
        bn, bk, bd = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_D"]
        if bd > max(16, triton.next_power_of_2(d)):
            continue  # a slice wider than D only loads padding
        if (bn + bk) * bd * elem * c.num_stages <= smem:
            keep.append(c)
    return keep or configs[:1]


def _configs():
    if _interpreting():  # the interpreter runs one config; small tiles keep it quick
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
    out = []
    for bn, bk, warps in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8)):
        for bd in (32, 64, 128):
            for stages in (2, 3, 4):
                out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=warps,
                                         num_stages=stages))
    return out


# A Triton kernel: made one (triton.jit, then autotune) below its body, with TRITON_INTERPRET in place
def _nearest_code_kernel(
    x_ptr, e_ptr, esq_ptr, idx_ptr, best_ptr, second_ptr,
    N, K, D,
    stride_xn, stride_xd, stride_ek, stride_ed,
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


with _interpreter_env():  # what triton.jit makes of the kernel depends on TRITON_INTERPRET
    _nearest_code_kernel = triton.autotune(configs=_configs(), key=["K", "D", "LOW_PRECISION"],
                                           prune_configs_by={"early_config_prune": _prune})(
        triton.jit(_nearest_code_kernel))


def _launch(x, e, esq, *, low: bool, track_second: bool):
    n, d = x.shape
    k = e.shape[0]
    idx = torch.empty(n, dtype=torch.int32, device=x.device)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    second = torch.empty(n if track_second else 1, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, best, second
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with _interpreter_env():
        _nearest_code_kernel[grid](
            x, e, esq, idx, best, second, n, k, d,
            x.stride(0), x.stride(1), e.stride(0), e.stride(1),
            LOW_PRECISION=low, TRACK_SECOND=track_second,
        )
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
            r_idx, _, _ = _launch(sub, codebook, esq32, low=False, track_second=False)
            idx[rows] = r_idx.long()
        if stats is not None:
            stats.update(flagged=int(rows.numel()), rows=x.shape[0])
    elif stats is not None:
        stats.update(flagged=x.shape[0] if precision == "fast" else 0, rows=x.shape[0])
    # Distances are measured for the chosen codes directly: exactly 0 for x equal to its code.
    return idx, distance_to(x, codebook, idx) if return_distance else None
