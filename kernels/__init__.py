"""Nearest-code search: the hot loop of quantization.

`nearest_code(x, codebook)` returns, for every row of x (N, D), the index of the closest codebook
row (K, D) in squared L2 distance, ties going to the lowest index on every backend.

Backends: "torch" (chunked GEMM + argmin, CPU or GPU). The fused Triton kernel is planned as
backend "triton" (see the nearest-code kernel issue); until it lands "auto" means "torch".
"""
from __future__ import annotations

import torch

from .cpu import nearest_code_torch
from .reference import nearest_code_reference

__all__ = ["nearest_code", "nearest_code_reference", "nearest_code_torch"]

_BACKENDS = ("auto", "torch")
_PRECISIONS = ("exact", "fast")


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    precision: str = "exact",
    backend: str = "auto",
    return_distance: bool = False,
):
    """Indices (int64, (N,)) of the nearest codebook rows; with return_distance also the squared
    distances (float32, (N,), clamped at 0)."""
    if backend not in _BACKENDS:
        raise ValueError(f"nearest_code: backend={backend!r} is not available; use one of {_BACKENDS}")
    if precision not in _PRECISIONS:
        raise ValueError(f"nearest_code: precision={precision!r}; use one of {_PRECISIONS}")
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_code: expected x (N, D) and codebook (K, D) with the same D, "
            f"got {tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    if codebook.shape[0] < 1:
        raise ValueError("nearest_code: the codebook is empty (K = 0)")
    idx, dist = nearest_code_torch(x, codebook, return_distance=return_distance)
    return (idx, dist) if return_distance else idx
