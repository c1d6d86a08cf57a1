"""fp64 reference for the nearest-code search. Slow and simple: tests compare everything to it."""
from __future__ import annotations

import torch


def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact argmin_k ||x - e_k||^2 in float64, ties to the lowest index.

    Returns (indices int64 (N,), squared distances float64 (N,)).
    """
    x64 = x.detach().to(torch.float64)
    e64 = codebook.detach().to(torch.float64)
    d = ((x64[:, None, :] - e64[None, :, :]) ** 2).sum(-1)  # (N, K), direct differences: no cancellation
    dist, idx = d.min(dim=1)  # torch.min returns the first minimal index
    return idx, dist
