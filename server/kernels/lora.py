"""The grouped LoRA kernel (`lora_grouped.c`): one call per site does what `server.lora.apply.lora_apply`
does there with gathers, batched matmuls and scatters.

`grouped_lora(...)` prepares the call for one `LoraBatch` once (pointers and shapes as ctypes arrays, kept
with the tensors they point into), since a plan is reused for every step its adapter mix lasts. It returns
None where the kernel cannot serve the batch (no build here, not fp32 on CPU, an unexpected layout), and the
caller keeps to torch.
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
    """y[rows, out_rows] += B(A x[rows]) for one batch's groups; `__call__` says whether it ran."""

    def __init__(self, fn, A: torch.Tensor, expands, rows: torch.Tensor | None, pad: torch.Tensor | None):
        self._fn = fn
        self._pad = None if pad is None else pad.reshape(-1).contiguous()
        self._keep = (A, expands, rows)  # the tensors the pointers below point into
        self._groups, self._in, self._w = A.shape
        self._A, self._a_stride = A.data_ptr(), A.stride(0)
        self._rows = None if rows is None else rows.data_ptr()
        self._group_size = None if rows is None else rows.numel() // self._groups
        n = len(expands)
        self._n_proj = n
        self._bt = (ctypes.c_void_p * n)(*(Bt.data_ptr() for Bt, _, _ in expands))
        self._bt_stride = (ctypes.c_long * n)(*(Bt.stride(0) for Bt, _, _ in expands))
        self._col0 = (ctypes.c_long * n)(*(columns.start for _, columns, _ in expands))
        self._cols = (ctypes.c_long * n)(*(Bt.shape[1] for Bt, _, _ in expands))
        self._out0 = (ctypes.c_long * n)(*(out_rows.start for _, _, out_rows in expands))
        self._out_n = (ctypes.c_long * n)(*(Bt.shape[2] for Bt, _, _ in expands))

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        if x.dtype != torch.float32 or y.dtype != torch.float32 or x.stride(-1) != 1 or y.stride(-1) != 1:
            return False
        group_size = x.shape[0] if self._rows is None else self._group_size
        ran = self._fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), self._in, self._w, self._groups,
                       group_size, self._rows, None if self._pad is None else self._pad.data_ptr(), self._A,
                       self._a_stride, self._n_proj, self._bt, self._bt_stride, self._col0, self._cols,
                       self._out0, self._out_n, torch.get_num_threads())
        return ran == 0


def grouped_lora(A: torch.Tensor, expands, rows: torch.Tensor | None, pad: torch.Tensor | None) -> GroupedLora | None:
    """A: [n, in, w] (A^T per group); expands: (B^T [n, w_p, out_p], columns of w, output columns of y)."""
    fn = _lora_function() if A.device.type == "cpu" and A.dtype == torch.float32 else None
    if fn is None or A.stride()[1:] != (A.shape[2], 1):
        return None
    if any(Bt.dtype != torch.float32 or Bt.stride()[1:] != (Bt.shape[2], 1) or Bt.shape[1] != columns.stop - columns.start
           for Bt, columns, _ in expands):
        return None
    if rows is not None and (rows.dtype != torch.int64 or rows.stride(0) != 1):
        return None
    return GroupedLora(fn, A, expands, rows, pad)
