"""A frozen projection whose weight is held quantized (QLoRA's base): `Linear`'s interface over a `BlockWeight`.

The quantized base is never written. A hot-swap computes the merged projection from a full-precision
scratch, dequant(W) + scale * B @ A, while every projection the adapter does not touch stays quantized;
restore drops the scratch and points back at the untouched quantized weight, so the base is exact after
any number of swaps by construction. LoRA's side branch (unmerged) is full precision as everywhere.

The backend's kernel decides how the blocks are multiplied: the CPU block kernel reads them as they are;
torch's int4 kernel (CUDA) multiplies a copy converted once at load, and the blocks stay in host memory as
the scratch's source; with neither, the reference (dequantize + F.linear) runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.kernels.block_linear import (
    BlockKernel, BlockWeight, dequantize, linear_reference, quantize_int4, quantize_int8,
)
from server.kernels.torch_int4 import TorchInt4Kernel, on_host
from server.model.linear import RowEdit

FORMATS = ("int8", "int4")


class QuantizedLinear:
    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None, fmt: str,
                 kernel: BlockKernel | TorchInt4Kernel | None):
        """`kernel`: the backend's (`Backend.block`), or None to multiply by the reference."""
        self.bias = bias
        self.backend = fmt
        self.out_features, self.in_features = weight.out_features, weight.in_features
        self.device = weight.q.device
        self.dtype = torch.float32  # the outputs': the block kernel's and the reference's
        self._kernel = kernel
        self._packed = None
        if isinstance(kernel, TorchInt4Kernel):
            self._packed = kernel.pack(weight)
            self.device, self.dtype = kernel.device, kernel.dtype
            weight = on_host(weight)
        self.quantized = weight
        self._scratch: torch.Tensor | None = None  # dequant(W) + merged deltas (fp32), while an adapter is merged

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._scratch is not None:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self._scratch, bias).to(self.dtype)
        if self._packed is not None:
            return self._kernel(x, self._packed, self.bias)
        if self._kernel is None:
            y = linear_reference(x, self.quantized)
            return y if self.bias is None else y + self.bias
        return self._kernel(x, self.quantized, self.bias)

    def panels(self) -> None:
        """No fp32 panels (see `native_operand`)."""
        return None

    def native_operand(self) -> list[int] | None:
        """(q, panels, bits, scales, offsets) for the native decoder stack; None while merged (the scratch is
        row-major fp32) or where the CPU block kernel does not run."""
        if self._scratch is not None or not isinstance(self._kernel, BlockKernel) or self.bias is not None:
            return None
        w = self.quantized
        return [w.q.data_ptr(), w.d.shape[0], w.bits, w.d.data_ptr(), w.m.data_ptr()]

    def tensors(self) -> list[torch.Tensor]:
        """What a step multiplies by: the blocks, or the kernel's converted copy (the blocks then on the host)."""
        weights = self._packed.tensors() if self._packed is not None else self.quantized.tensors()
        return [t for t in (*weights, self.bias, self._scratch) if t is not None]

    def effective_weight(self) -> torch.Tensor:
        """The weight as the reference holds it (the scratch while merged), fp32 on the compute device."""
        return self._scratch.clone() if self._scratch is not None else self._dequantized()

    def merge(self, edits: list[RowEdit]) -> None:
        if self._scratch is None:
            self._scratch = self._dequantized()
        for edit in edits:
            self._scratch[edit.rows].addmm_(edit.B, edit.A, alpha=edit.scale)

    def restore(self) -> None:
        self._scratch = None

    def _dequantized(self) -> torch.Tensor:
        return dequantize(self.quantized).to(self.device)


def quantize(weight: torch.Tensor, fmt: str) -> BlockWeight:
    if fmt == "int4":
        return quantize_int4(weight)
    if fmt == "int8":
        return quantize_int8(weight)
    raise ValueError(f"unknown weight format {fmt!r}; known: {FORMATS}")
