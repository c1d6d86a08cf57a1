"""Nearest-code search with plain torch ops: chunked GEMM + blocked argmin; N x K never exists.

score(x, e_k) = ||e_k||^2 - 2 x . e_k is the squared distance minus ||x||^2, which does not change
the argmin. Rows are processed in chunks whose (rows, K) score block stays in cache, written by one
addmm into a reused buffer.

The argmin is blocked, because torch's argmin is ~15x slower per element than its amin: view the
scores as (rows, K/B, B), take each block's minimum with amin, argmin over the K/B block minima
(the first block holding the row's minimum), then argmin inside that one block. Blocks are in index
order and both argmins return the first minimum, so ties still go to the lowest index. K is padded
to a multiple of B with +inf scores, which never win.
"""
from __future__ import annotations

import torch

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


def distance_to(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """||x - e_idx||^2 measured directly (O(N*D)): exactly 0 when x equals its code, never < 0,
    free of the cancellation in ||x||^2 + ||e||^2 - 2 x.e."""
    diff = x.float() - codebook.float()[idx]
    return (diff * diff).sum(dim=1)
