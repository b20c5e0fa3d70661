"""The grouped LoRA kernel (`lora_grouped.c`): one call per site does what `server.lora.apply.lora_apply`
does there with gathers, batched matmuls and scatters.

`grouped_lora(A, expands)` prepares the weights' side of the call once per slice of a cover's stack; it
returns None where the kernel cannot serve them (no build here, not fp32 on CPU, an unexpected layout), and
the caller keeps to torch. A call returns False for rows it does not take, with the same effect.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from server.kernels.build import load_library


@functools.cache
def _lora_function():
    library = load_library("lora_grouped")
    if library is None:
        return None
    fn = library.lora_grouped
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                   ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                   ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return fn


class GroupedLora:
    """y[rows, out_rows] += B(A x[rows]) for a stack slice's groups; `__call__` says whether it ran.

    Holds the weights' side of the call (pointers and shapes as ctypes arrays, kept with the tensors they
    point into), made once per slice of a cover's stack and reused by every plan that slices it alike; the
    rows and padding, which change whenever a request joins or leaves, come with each call."""

    def __init__(self, fn, A: torch.Tensor, expands):
        self._fn = fn
        self._keep = (A, expands)
        self._groups, self._in, self._w = A.shape
        self._A, self._a_stride = A.data_ptr(), A.stride(0)
        n = len(expands)
        self._n_proj = n
        self._bt = (ctypes.c_void_p * n)(*(Bt.data_ptr() for Bt, _, _ in expands))
        self._bt_stride = (ctypes.c_long * n)(*(Bt.stride(0) for Bt, _, _ in expands))
        self._col0 = (ctypes.c_long * n)(*(columns.start for _, columns, _ in expands))
        self._cols = (ctypes.c_long * n)(*(Bt.shape[1] for Bt, _, _ in expands))
        self._out0 = (ctypes.c_long * n)(*(out_rows.start for _, _, out_rows in expands))
        self._out_n = (ctypes.c_long * n)(*(Bt.shape[2] for Bt, _, _ in expands))

    def __call__(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None, pad: torch.Tensor | None) -> bool:
        """rows: [groups * P] int64, the row of each group entry (None: one group, every row in order);
        pad: [groups, P, 1] fp32, 0 for a padding entry (None: none)."""
        if x.dtype != torch.float32 or y.dtype != torch.float32 or x.stride(-1) != 1 or y.stride(-1) != 1:
            return False
        if rows is not None and (rows.dtype != torch.int64 or not rows.is_contiguous()):
            return False
        if pad is not None and (pad.dtype != torch.float32 or not pad.is_contiguous()):
            return False
        group_size = x.shape[0] if rows is None else rows.numel() // self._groups
        ran = self._fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), self._in, self._w, self._groups,
                       group_size, None if rows is None else rows.data_ptr(),
                       None if pad is None else pad.data_ptr(), self._A, self._a_stride, self._n_proj, self._bt,
                       self._bt_stride, self._col0, self._cols, self._out0, self._out_n, torch.get_num_threads())
        return ran == 0


def grouped_lora(A: torch.Tensor, expands) -> GroupedLora | None:
    """A: [n, in, w] (A^T per group); expands: (B^T [n, w_p, out_p], columns of w, output columns of y)."""
    fn = _lora_function() if A.device.type == "cpu" and A.dtype == torch.float32 else None
    if fn is None or A.stride()[1:] != (A.shape[2], 1):
        return None
    if any(Bt.dtype != torch.float32 or Bt.stride()[1:] != (Bt.shape[2], 1) or Bt.shape[1] != columns.stop - columns.start
           for Bt, columns, _ in expands):
        return None
    return GroupedLora(fn, A, expands)
