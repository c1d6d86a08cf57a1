"""The squared distance to a chosen code, shared by both backends of the nearest-code search (the
torch path in kernels/nearest_code.py and the Triton kernel in kernels/triton_kernel.py), so that
neither imports the other for it."""
from __future__ import annotations

import torch


def distance_to(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """||x - e_idx||^2 measured directly (O(N*D)): exactly 0 when x equals its code, never < 0,
    free of the cancellation in ||x||^2 + ||e||^2 - 2 x.e."""
    diff = x.float() - codebook.float()[idx]
    return (diff * diff).sum(dim=1)
