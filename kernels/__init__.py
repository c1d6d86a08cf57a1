"""Nearest-code search, the hot loop of quantization: `nearest_code` (kernels/nearest_code.py: the
dispatch and the torch path), the fused Triton kernel (kernels/triton_kernel.py), the measured
distance to the chosen code that both return (kernels/distance.py, imported by both: the dispatch
imports the Triton kernel, never the reverse) and the fp64 reference the tests compare both to
(kernels/reference.py). Imports only torch (and triton when the Triton backend is asked for)."""
from .nearest_code import nearest_code, nearest_code_torch
from .reference import nearest_code_reference

__all__ = ["nearest_code", "nearest_code_reference", "nearest_code_torch"]
