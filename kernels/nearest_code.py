"""Nearest-code search: the hot loop of quantization.

`nearest_code(x, codebook)` returns, for every row of x (N, D), the index of the closest codebook
row (K, D) in squared L2 distance, ties going to the lowest index on every backend.

backend="auto":   the fused Triton kernel for CUDA tensors, the chunked torch path on CPU.
backend="triton": the Triton kernel; on CPU tensors it runs under Triton's interpreter
                  (TRITON_INTERPRET=1): slow, but the same code, which is how CI tests it.
backend="torch":  chunked GEMM + argmin with torch ops (CPU or GPU).
precision="exact" (fp32-accurate) or "fast" (fp16 products + exact re-search of close rows;
                  Triton only; the torch path is always exact).

The torch path (below the dispatch; read it first) is a chunked GEMM + blocked argmin, and
N x K never exists. The score

    score(x, e_k) = ||e_k||^2 - 2 x . e_k

is the squared distance minus ||x||^2, which does not change the argmin. Rows are processed in
chunks whose (rows, K) score block stays in cache, written by one addmm into a reused buffer.

The argmin is blocked, because torch's argmin is ~15x slower per element than its amin: view the
scores as (rows, K/B, B), take each block's minimum with amin, argmin over the K/B block minima
(the first block holding the row's minimum), then argmin inside that one block. Blocks are in index
order and both argmins return the first minimum, so ties still go to the lowest index. K is padded
to a multiple of B with +inf scores, which never win.
"""
from __future__ import annotations

import torch

from .distance import distance_to

_BACKENDS = ("auto", "triton", "torch")
_PRECISIONS = ("exact", "fast")


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    precision: str = "exact",
    backend: str = "auto",
    return_distance: bool = False,
    stats: dict | None = None,
):
    """Indices (int64, (N,)) of the nearest codebook rows; with return_distance also the squared
    distances (float32, (N,), >= 0). `stats` (a dict) receives the fast mode's re-searched rows."""
    if backend not in _BACKENDS:
        raise ValueError(f"nearest_code: backend={backend!r}; use one of {_BACKENDS}")
    if precision not in _PRECISIONS:
        raise ValueError(f"nearest_code: precision={precision!r}; use one of {_PRECISIONS}")
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code: expected x (N, D) and codebook (K, D) with the same D, "
            f"got {tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    if codebook.shape[0] < 1:
        raise ValueError("nearest_code: the codebook is empty (K = 0)")
    if x.device != codebook.device:
        raise ValueError(f"nearest_code: x is on {x.device} but the codebook on {codebook.device}")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        from .triton_kernel import nearest_code_triton  # imports triton only when asked

        idx, dist = nearest_code_triton(x.detach(), codebook.detach(), precision=precision,
                                        return_distance=return_distance, stats=stats)
    else:
        idx, dist = nearest_code_torch(x, codebook, return_distance=return_distance)
    return (idx, dist) if return_distance else idx


# ---------------------------------------------------------------------------------------------
# The torch path: chunked GEMM + blocked argmin
# ---------------------------------------------------------------------------------------------
_TARGET_BLOCK_ELEMS = 1 << 20  # score-block size per chunk (4 MiB of fp32): tuned on 2 cores, see
# benchmarks/RESULTS.md; smaller blocks starve the GEMM, larger ones leave the cache


def _argmin_block(k: int) -> int:
    """Block width B for the blocked argmin (0: plain argmin for small K)."""
    if k < 64:
        return 0
    return 32 if k <= 512 else (64 if k <= 4096 else 128)


def nearest_code_torch(
    x: torch.Tensor, codebook: torch.Tensor, return_distance: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """argmin_k ||x - e_k||^2 for x (N, D) and codebook (K, D), in fp32, ties to the lowest index."""
    x = x.detach().float()
    e = codebook.detach().float()
    n, d = x.shape
    k = e.shape[0]
    b = _argmin_block(k)
    kp = -(-k // b) * b if b else k  # K padded to a multiple of the block
    et = torch.zeros(d, kp, dtype=torch.float32, device=x.device)  # (D, Kp)
    et[:, :k] = e.t()
    e_sq = torch.full((kp,), float("inf"), dtype=torch.float32, device=x.device)
    e_sq[:k] = (e * e).sum(dim=1)  # from exactly the values fed to the dot
    chunk = max(1, min(n, _TARGET_BLOCK_ELEMS // kp))
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    scores = torch.empty(chunk, kp, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = scores[: stop - start]
        torch.addmm(e_sq, x[start:stop], et, beta=1.0, alpha=-2.0, out=s)  # (rows, Kp)
        if b:
            blocks = s.view(stop - start, kp // b, b)  # (rows, Kp/B, B)
            first = blocks.amin(dim=2).argmin(dim=1)  # (rows,) the first block holding the minimum
            inside = blocks.gather(1, first.view(-1, 1, 1).expand(-1, 1, b)).squeeze(1).argmin(dim=1)
            torch.add(inside, first, alpha=b, out=idx[start:stop])
        else:
            idx[start:stop] = s.argmin(dim=1)  # the first minimal index on ties
    return idx, distance_to(x, e, idx) if return_distance else None

