"""Nearest-code search with plain torch ops: chunked GEMM + argmin, never the full N x K matrix.

score(x, e_k) = ||e_k||^2 - 2 x . e_k is the squared distance minus ||x||^2, which does not change
the argmin. The N x K score block is built a row chunk at a time so that it stays small.
"""
from __future__ import annotations

import torch

# Rows per chunk: the score block is CHUNK_ROWS x K floats. 1024 x 512 x 4 B = 2 MiB.
_TARGET_BLOCK_ELEMS = 1 << 19


def nearest_code_torch(
    x: torch.Tensor, codebook: torch.Tensor, return_distance: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """argmin_k ||x - e_k||^2 for x (N, D) and codebook (K, D), in fp32, ties to the lowest index."""
    x = x.detach().float()
    e = codebook.detach().float()
    n, k = x.shape[0], e.shape[0]
    e_sq = (e * e).sum(dim=1)  # (K,) from exactly the values fed to the dot
    et = e.t().contiguous()  # (D, K)
    chunk = max(1, min(n, _TARGET_BLOCK_ELEMS // max(k, 1)))
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    scores = torch.empty(chunk, k, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = scores[: stop - start]
        torch.addmm(e_sq, x[start:stop], et, beta=1.0, alpha=-2.0, out=s)  # (rows, K)
        idx[start:stop] = s.argmin(dim=1)  # the first minimal index on ties
    return idx, distance_to(x, e, idx) if return_distance else None


def distance_to(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """||x - e_idx||^2 measured directly (O(N*D)): exactly 0 when x equals its code, never < 0,
    free of the cancellation in ||x||^2 + ||e||^2 - 2 x.e."""
    diff = x.float() - codebook.float()[idx]
    return (diff * diff).sum(dim=1)
