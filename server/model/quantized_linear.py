"""A frozen projection whose weight is held quantized (QLoRA's base): `Linear`'s interface over a `BlockWeight`.

The quantized base is never written. A hot-swap computes the merged projection from a full-precision
scratch, dequant(W) + scale * B @ A, while every projection the adapter does not touch stays quantized;
restore drops the scratch and points back at the untouched quantized weight, so the base is exact after
any number of swaps by construction. LoRA's side branch (unmerged) is full precision as everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.kernels.block_linear import (
    BlockKernel, BlockWeight, dequantize, linear_reference, quantize_int4, quantize_int8,
)
from server.model.linear import RowEdit

FORMATS = ("int8", "int4")


class QuantizedLinear:
    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None, fmt: str, kernel: BlockKernel | None):
        """`kernel`: the backend's block kernel, or None to multiply by the reference."""
        self.quantized = weight
        self.bias = bias
        self.backend = fmt
        self.out_features, self.in_features = weight.out_features, weight.in_features
        self._kernel = kernel
        self._scratch: torch.Tensor | None = None  # dequant(W) + merged deltas, while an adapter is merged

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._scratch is not None:
            return F.linear(x, self._scratch, self.bias)
        if self._kernel is None:
            y = linear_reference(x, self.quantized)
            return y if self.bias is None else y + self.bias
        return self._kernel(x, self.quantized, self.bias)

    def panels(self) -> None:
        """No fp32 panels (see `native_operand`)."""
        return None

    def native_operand(self) -> list[int] | None:
        """(q, panels, bits, scales, offsets) for the native decoder stack; None while merged (the scratch is
        row-major fp32) or where the block kernel does not run."""
        if self._scratch is not None or self._kernel is None or self.bias is not None:
            return None
        w = self.quantized
        return [w.q.data_ptr(), w.d.shape[0], w.bits, w.d.data_ptr(), w.m.data_ptr()]

    def tensors(self) -> list[torch.Tensor]:
        held = [*self.quantized.tensors(), self.bias, self._scratch]
        return [t for t in held if t is not None]

    def effective_weight(self) -> torch.Tensor:
        return self._scratch.clone() if self._scratch is not None else dequantize(self.quantized)

    def merge(self, edits: list[RowEdit]) -> None:
        if self._scratch is None:
            self._scratch = dequantize(self.quantized)
        for edit in edits:
            self._scratch[edit.rows].addmm_(edit.B, edit.A, alpha=edit.scale)

    def restore(self) -> None:
        self._scratch = None


def quantize(weight: torch.Tensor, fmt: str) -> BlockWeight:
    if fmt == "int4":
        return quantize_int4(weight)
    if fmt == "int8":
        return quantize_int8(weight)
    raise ValueError(f"unknown weight format {fmt!r}; known: {FORMATS}")
