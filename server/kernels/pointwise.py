"""The decoder layer's small fused steps (`pointwise.c`): RMS norm, rotary embedding of q and k in place, and
SiLU(gate) * up.

`pointwise_kernels()` is None where the library cannot be built here. Each method returns None (or False)
for what it does not take (not fp32, a layout it was not written for), and the caller keeps to torch, whose
form each is tested against.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from server.kernels.build import load_library

_long, _ptr, _int, _float = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_float


def _rows_fp32(t: torch.Tensor) -> bool:
    """fp32 on CPU, dense along its last dimension."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1


class PointwiseKernels:
    def __init__(self, library: ctypes.CDLL):
        self._rms_norm = library.rms_norm
        self._rms_norm.argtypes = [_ptr, _long, _ptr, _long, _long, _float, _ptr, _long, _int]
        self._rope = library.rope
        self._rope.argtypes = [_ptr, _long, _long, _long, _long, _ptr, _ptr, _long, _int]
        self._silu_mul = library.silu_mul
        self._silu_mul.argtypes = [_ptr, _long, _long, _long, _ptr, _long, _int]
        for fn in (self._rms_norm, self._rope, self._silu_mul):
            fn.restype = _int

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """x [rows, hidden] -> a new [rows, hidden] tensor."""
        if x.dim() != 2 or not (_rows_fp32(x) and _rows_fp32(weight)) or not weight.is_contiguous():
            return None
        if weight.numel() != x.shape[1]:  # the kernel would read past the weight; torch raises instead
            return None
        out = torch.empty(x.shape, dtype=torch.float32)
        ran = self._rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), x.shape[0], x.shape[1], eps,
                             out.data_ptr(), out.stride(0), torch.get_num_threads())
        return out if ran == 0 else None

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Rotates x [rows, heads, d] (heads d apart) in place; cos, sin [rows, 1, d] or [rows, d]."""
        rows, heads, d = x.shape
        cos, sin = cos.reshape(rows, d), sin.reshape(rows, d)
        if not (_rows_fp32(x) and _rows_fp32(cos) and _rows_fp32(sin)) or x.stride(1) != d:
            return False
        if cos.stride(0) != sin.stride(0):
            return False
        ran = self._rope(x.data_ptr(), x.stride(0), rows, heads, d, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
                         torch.get_num_threads())
        return ran == 0

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """gate_up [rows, 2n] (gate then up) -> silu(gate) * up, a new [rows, n] tensor."""
        if gate_up.dim() != 2 or not _rows_fp32(gate_up) or gate_up.shape[1] % 2:
            return None
        rows, n = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, n, dtype=torch.float32)
        ran = self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), rows, n, out.data_ptr(), out.stride(0),
                             torch.get_num_threads())
        return out if ran == 0 else None


@functools.cache
def pointwise_kernels() -> PointwiseKernels | None:
    library = load_library("pointwise")
    return PointwiseKernels(library) if library else None
