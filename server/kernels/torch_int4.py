"""A `BlockWeight` multiplied by torch's weight-only int4 kernel (tinygemm), where the CPU block kernel does not run.

The op takes 4-bit q in [0, 15] per (output row, group of 32 inputs) as w = (q - 8) * scale + zero, the scales
and zeros side by side in one [in/32, rows, 2] tensor. Our int4 (GGUF's Q4_1) is w = d * q + m, so the same q
with scale = d and zero = m + 8 * d, repacked once at load. The scale and zero are held in the dtype the op
multiplies in (bfloat16 on CUDA, the only one tinygemm takes), so a product differs from `dequantize` + F.linear
by that rounding of d and m + 8d and by the activations' and the output's rounding to it.

8-bit weights (int8, GGUF's Q8_0) keep a scale per block of 32, which torch's int8 weight-only op (one scale per
output row) cannot take: they are dequantized once at load into the activations' dtype and multiplied by
F.linear, twice their blocks' bytes but no per-call dequantization.

On CPU, `_weight_int4pack_mm_for_cpu` has the same semantics (over its own packed layout, from unpacked q):
tests hold the conversion to the reference through it.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.kernels.block_linear import BLOCK, GROUPS, PANEL, BlockWeight, dequantize, quantize_int4

log = logging.getLogger("loraplex.kernels")

MIDPOINT = 8  # the op's q - 8


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A `BlockWeight` as this kernel multiplies it: the op's int4 layout and its scales and zeros, or, for 8
    bits, the weight itself dequantized (`scales_and_zeros` None)."""
    out_features: int
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.scales_and_zeros) if t is not None]


class TorchInt4Kernel:
    """`dtype` is the activations' (the model's): what it returns, and what 8-bit weights are held in. On
    `device` cpu it runs the op's CPU twin, in `dtype` itself; on CUDA in bfloat16."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.compute_dtype = torch.bfloat16 if cuda else dtype
        self._convert = _convert_cuda if cuda else _convert_cpu
        self._mm = torch.ops.aten._weight_int4pack_mm if cuda else torch.ops.aten._weight_int4pack_mm_for_cpu

    def pack(self, w: BlockWeight) -> PackedWeight:
        """`w` on any device, converted on this kernel's."""
        if w.bits != 4:
            return PackedWeight(w.out_features, dequantize(_on(w, self.device)).to(self.dtype), None)
        q, d, m = unpack_int4(_on(w, self.device))  # all padded rows: the op takes whole tiles of them
        scales_and_zeros = torch.stack([d, m + MIDPOINT * d], dim=-1).transpose(0, 1)
        return PackedWeight(w.out_features, self._convert(q, _inner_k_tiles(w.in_features)),
                            scales_and_zeros.to(self.compute_dtype).contiguous())

    def __call__(self, x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if w.scales_and_zeros is None:
            return F.linear(x.to(self.dtype), w.weight, bias)
        lead, inp = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, inp).to(self.compute_dtype).contiguous()
        if x2.shape[0]:  # the CUDA op launches no grid for zero rows
            y = self._mm(x2, w.weight, BLOCK, w.scales_and_zeros)[:, : w.out_features]
        else:
            y = x2.new_empty(0, w.out_features)
        y = y.to(self.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, w.out_features)


def unpack_int4(w: BlockWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [rows, in] as int32 in [0, 15], d and m [rows, in/32] as float32, for every row of the padded panels
    (the rows past out_features are zeros)."""
    panels, blocks = w.d.shape[:2]
    packed = w.q.view(panels, blocks, GROUPS // 2, PANEL, 4)  # group j in the low nibbles, j + 4 in the high
    q = torch.cat([packed & 0x0F, packed >> 4], dim=2)  # [panels, blocks, 8 groups, 16 rows, 4 inputs]
    q = q.permute(0, 3, 1, 2, 4).reshape(panels * PANEL, blocks * BLOCK).to(torch.int32)
    per_row = lambda t: t.float().permute(0, 2, 1).reshape(panels * PANEL, blocks)  # noqa: E731
    return q, per_row(w.d), per_row(w.m)


def _convert_cuda(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """The CUDA op reads [rows, in/2] bytes, input 2j in the high nibble and 2j + 1 in the low."""
    nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles)


def _convert_cpu(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), inner_k_tiles)


def _inner_k_tiles(in_features: int) -> int:
    """The most 16-input tiles the op packs together that divide the row (in is a multiple of 32)."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (tiles * 16) == 0)


def _on(w: BlockWeight, device: torch.device) -> BlockWeight:
    if w.q.device == device:
        return w
    return BlockWeight(w.bits, w.out_features, w.in_features, *(t.to(device) for t in w.tensors()))


def on_host(w: BlockWeight) -> BlockWeight:
    return _on(w, torch.device("cpu"))


@functools.cache
def torch_int4_kernel(device: torch.device, dtype: torch.dtype) -> TorchInt4Kernel | None:
    """The kernel on `device`, once it agrees with dequantize + F.linear on a small product there; else None
    (logged): the op needs a build and a GPU it runs on (tinygemm: compute capability 8.0 or later)."""
    try:
        kernel = TorchInt4Kernel(device, dtype)
        generator = torch.Generator().manual_seed(0)
        w = quantize_int4(torch.randn(40, 96, generator=generator))
        x = torch.randn(5, 96, generator=generator)
        got = kernel(x.to(device), kernel.pack(w)).float().cpu()
        want = F.linear(x.to(kernel.compute_dtype).float(), dequantize(w))
        agrees = bool((got - want).abs().max() <= 0.02 * want.abs().max())  # bf16's rounding is ~0.4% of it
    except (RuntimeError, NotImplementedError, AssertionError) as exc:  # AssertionError: a torch built without CUDA
        log.warning("torch's int4 weight-only kernel does not run on %s (%s); quantized weights use the reference",
                    device, exc)
        return None
    if not agrees:
        log.warning("torch's int4 weight-only kernel disagrees with its reference on %s; quantized weights use the "
                    "reference", device)
        return None
    log.info("quantized weights on %s: torch's int4 weight-only kernel, 8-bit weights dequantized at load", device)
    return kernel
