"""oneDNN's fp32/bf16 linear through torch's mkldnn ops: a weight reordered ("prepacked") once into its
blocked layout, then multiplied by it. `linear_works(dtype)` says whether this torch build runs it here.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F


def pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def linear(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, kernel, bias, "none", [], "")


def buffer(kernel: torch.Tensor) -> torch.Tensor:
    """A dense 1-d tensor aliasing a oneDNN tensor's memory (valid while `kernel` lives)."""
    raw = (ctypes.c_char * torch.ops.mkldnn._nbytes(kernel)).from_address(torch.ops.mkldnn.data_ptr(kernel))
    return torch.frombuffer(raw, dtype=kernel.dtype)


@functools.cache
def linear_works(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 16, dtype=dtype)
        x = torch.randn(3, 16, dtype=dtype)
        return torch.allclose(linear(x, pack(w), None).float(), F.linear(x, w).float(), atol=1e-2, rtol=1e-2)
    except RuntimeError:
        return False
