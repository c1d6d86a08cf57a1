"""Nearest-code search: the hot loop of quantization.

`nearest_code(x, codebook)` returns, for every row of x (N, D), the index of the closest codebook
row (K, D) in squared L2 distance, ties going to the lowest index on every backend.

backend="auto":   the fused Triton kernel for CUDA tensors, the chunked torch path on CPU.
backend="triton": the Triton kernel; on CPU tensors it runs under Triton's interpreter
                  (TRITON_INTERPRET=1): slow, but the same code, which is how CI tests it.
backend="torch":  chunked GEMM + argmin with torch ops (CPU or GPU).
precision="exact" (fp32-accurate) or "fast" (fp16 products + exact re-search of close rows;
                  Triton only; the torch path is always exact).
"""
from __future__ import annotations

import torch

from .cpu import nearest_code_torch
from .reference import nearest_code_reference

__all__ = ["nearest_code", "nearest_code_reference", "nearest_code_torch"]

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
