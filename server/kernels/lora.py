"""The grouped LoRA kernel (`lora_grouped.c`): one call per site does what `server.lora.apply.lora_apply`
does there with stacked weights, gathers, batched matmuls and scatters, reading each adapter's weights
where its device slot keeps them.

`slot_groups_kernel()` is None where the kernel cannot run (no build here); callers then keep to torch. It
serves fp32 tensors on CPU only, so the backend (server.model.backend) hands it out there alone.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from server.kernels.build import load_library

MAX_RANK_COLUMNS = 1024  # the kernel's scratch per row: the summed ranks of one adapter's projections at a site


class SlotGroupsKernel:
    """`__call__` adds every group's B(A x) into its rows of y; the groups' weights come as a table of
    addresses (see lora_grouped.c), so one table serves every layer and site of a step."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, y: torch.Tensor, x: torch.Tensor, n_groups: int, offsets: torch.Tensor,
                 rows: torch.Tensor | None, table: torch.Tensor, out0: torch.Tensor, out_n: torch.Tensor) -> bool:
        """offsets: [n_groups + 1] int64, group g's entries; rows: int64, the row of each entry (None: entry
        e is row e); table: [n_groups, 2 + 3 * n_proj] int64; out0, out_n: [n_proj] int64. False where it
        did not run (y untouched)."""
        if x.dtype != torch.float32 or y.dtype != torch.float32 or x.stride(-1) != 1 or y.stride(-1) != 1:
            return False
        ran = self._fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[1], n_groups,
                       offsets.data_ptr(), None if rows is None else rows.data_ptr(), table.data_ptr(),
                       out0.numel(), out0.data_ptr(), out_n.data_ptr(), torch.get_num_threads())
        return ran == 0


@functools.cache
def slot_groups_kernel() -> SlotGroupsKernel | None:
    library = load_library("lora_grouped")
    if library is None:
        return None
    fn = library.lora_slot_groups
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int]
    return SlotGroupsKernel(fn)
