"""Quantized weights in blocks of 32 inputs and the CPU kernel that multiplies by them (`block_linear.c`).

A `BlockWeight` holds W as w = d * q + m per (output row, block of 32 inputs): 4-bit q in [0, 15] with an
offset m (int4, the layout of GGUF's Q4_1), or 8-bit q in [-127, 127] with m = 0 (int8). The kernel rounds
each activation row to 15-bit integers per block of 32 (`quantize_activations`) and multiplies in integers;
`linear_reference` (those activations times `dequantize(W)` by `F.linear`) is the plain reference every
fast path is tested against. `block_kernel()` returns the kernel, or None where it cannot run (then
`BlockWeight` callers use the reference).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.kernels.build import load_library

log = logging.getLogger("loraplex.kernels")

BLOCK = 32  # inputs per block: GGUF's block size
PANEL = 16  # output rows per panel: one AVX-512 register of int32 lanes
ACTIVATION_MAX = 127 * 128  # activations' integer range per block (block_linear.c's)
GROUPS = BLOCK // 4  # groups of 4 inputs per block, the bytes one int32 lane of a dot product takes


@dataclass(frozen=True, eq=False)
class BlockWeight:
    bits: int
    out_features: int
    in_features: int
    q: torch.Tensor   # uint8, the kernel's layout (see block_linear.c)
    d: torch.Tensor   # float16 [panels, blocks, 16]
    m: torch.Tensor   # float16 [panels, blocks, 16]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m))

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.d, self.m]


def quantize_int4(weight: torch.Tensor) -> BlockWeight:
    """Asymmetric 4 bits per weight, one scale and offset per 32 inputs of a row (as GGUF's Q4_1)."""
    rows = _blocks(weight)
    low, high = rows.amin(-1), rows.amax(-1)
    d, low = _half((high - low) / 15), _half(low)  # the grid as stored, so q is chosen on it
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((rows - low[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
    return _pack(4, weight.shape, q, d, low)


def quantize_int8(weight: torch.Tensor) -> BlockWeight:
    """Symmetric 8 bits per weight, one scale per output row (per-output-channel)."""
    rows = _blocks(weight)
    scale = _half(rows.abs().amax(dim=(1, 2)) / 127)
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = (rows * inv[:, None, None]).round().clamp(-127, 127).to(torch.int8)
    d = scale[:, None].expand(-1, rows.shape[1]).contiguous()
    return _pack(8, weight.shape, q, d, torch.zeros_like(d))


def from_blocks(bits: int, shape: tuple[int, int], q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> BlockWeight:
    """From per-row blocks: q [out, in/32, 32] (uint8 0..15 for 4 bits, int8 for 8), d and m [out, in/32]."""
    return _pack(bits, shape, q, d.float(), m.float())


def dequantize(w: BlockWeight) -> torch.Tensor:
    """The [out, in] float32 weight: the reference the kernel is held to."""
    panels, blocks = w.d.shape[:2]
    if w.bits == 4:  # [panels, blocks, 4, 16, 4]: group j low, group j + 4 high
        packed = w.q.view(panels, blocks, GROUPS // 2, PANEL, 4)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=2).float()
    else:
        q = w.q.view(panels, blocks, GROUPS, PANEL, 4).float() - 128
    per_input = q.permute(0, 1, 2, 4, 3).reshape(panels, blocks, BLOCK, PANEL)
    rows = per_input * w.d[:, :, None, :].float() + w.m[:, :, None, :].float()   # [panels, blocks, 32, 16]
    full = rows.permute(0, 3, 1, 2).reshape(panels * PANEL, blocks * BLOCK)
    return full[: w.out_features]


def dequantize_rows(w: BlockWeight, rows: torch.Tensor) -> torch.Tensor:
    """dequantize(w)[rows], reading only those rows' blocks: an embedding lookup in a tied quantized table."""
    panels, blocks = w.d.shape[:2]
    panel, lane = rows // PANEL, rows % PANEL
    if w.bits == 4:  # [n, blocks, 4, 4] each, then groups 0-3 from the low nibbles and 4-7 from the high
        packed = w.q.view(panels, blocks, GROUPS // 2, PANEL, 4)[panel, :, :, lane]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=2).float()
    else:
        q = w.q.view(panels, blocks, GROUPS, PANEL, 4)[panel, :, :, lane].float() - 128
    d, m = (t[panel, :, lane].float()[..., None] for t in (w.d, w.m))
    values = q.reshape(len(rows), blocks, BLOCK) * d + m
    return values.reshape(len(rows), blocks * BLOCK)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel multiplies it: each block of 32 inputs rounded to integers with scale
    max|x| / ACTIVATION_MAX (the same float operations as block_linear.c's quantize_row), as float32."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / ACTIVATION_MAX
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return ((blocks * inverse).round() * scale).reshape(x.shape)


def linear_reference(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    return F.linear(quantize_activations(x), dequantize(w))


def _half(t: torch.Tensor) -> torch.Tensor:
    """Rounded to the float16 the kernel stores scales and offsets in, kept float32."""
    return t.half().float()


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out, in/32, 32] float32 (`_pack` pads the rows to whole panels)."""
    out, inp = weight.shape
    if inp % BLOCK:
        raise ValueError(f"a {out}x{inp} weight cannot be quantized in blocks of {BLOCK} inputs")
    return weight.float().reshape(out, inp // BLOCK, BLOCK)


def _pack(bits: int, shape, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> BlockWeight:
    out, inp = shape
    padded, blocks = -(-out // PANEL) * PANEL, inp // BLOCK
    if q.shape[0] != padded:  # rows past `out` are zero weights: q = 0, d = m = 0
        q = torch.cat([q, q.new_zeros(padded - q.shape[0], *q.shape[1:])])
        d, m = (torch.cat([t, t.new_zeros(padded - t.shape[0], blocks)]) for t in (d, m))
    panels = padded // PANEL
    # [panels, blocks, 8 groups, 16 rows, 4 inputs]: a group is what one 32-bit lane of a dot product takes
    grouped = q.view(panels, PANEL, blocks, GROUPS, 4).permute(0, 2, 3, 1, 4)
    if bits == 4:
        grouped = grouped.to(torch.uint8)
        packed = grouped[:, :, : GROUPS // 2] | (grouped[:, :, GROUPS // 2 :] << 4)
    else:
        packed = (grouped.to(torch.int16) + 128).to(torch.uint8)
    in_panels = lambda t: t.reshape(panels, PANEL, blocks).transpose(1, 2).to(torch.float16).contiguous()  # noqa: E731
    return BlockWeight(bits, out, inp, packed.contiguous(), in_panels(d), in_panels(m))


class BlockKernel:
    """`vnni=True` takes the AVX-512 VNNI path where the CPU has it (chosen in C at each call), else AVX2's."""

    def __init__(self, library: ctypes.CDLL, vnni: bool = True):
        self._fn = library.block_linear
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                             ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                             ctypes.c_long, ctypes.c_int, ctypes.c_int]
        self.vnni = vnni

    def __call__(self, x: torch.Tensor, w: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead, inp = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, inp)
        if x2.stride(1) != 1 or x2.dtype != torch.float32:
            x2 = x2.contiguous().float()
        panels = w.d.shape[0]
        y = torch.empty(x2.shape[0], panels * PANEL, dtype=torch.float32)
        if x2.shape[0]:
            self._fn(x2.data_ptr(), x2.shape[0], inp, x2.stride(0), w.q.data_ptr(), w.bits, w.d.data_ptr(),
                     w.m.data_ptr(), panels, y.data_ptr(), y.stride(0), torch.get_num_threads(), int(self.vnni))
        if y.shape[1] != w.out_features:
            y = y[:, : w.out_features]
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, w.out_features)


@functools.cache
def block_kernel() -> BlockKernel | None:
    """The kernel, once it agrees with the reference on a small product here; else None (logged)."""
    library = load_library("block_linear")
    if library is None:
        return None
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 96, generator=generator)
    x = torch.randn(5, 96, generator=generator)
    for kernel in (BlockKernel(library, vnni=False), BlockKernel(library)):
        for w in (quantize_int4(weight), quantize_int8(weight)):
            if not torch.allclose(kernel(x, w), linear_reference(x, w), atol=1e-4, rtol=1e-4):
                log.warning("block_linear kernel disagrees with its reference here; quantized weights use the "
                            "reference")
                return None
    log.info("quantized weights: int8 activations per block, %s dot products", kernel_path(library))
    return kernel


def kernel_path(library: ctypes.CDLL) -> str:
    return "avx512-vnni" if library.block_linear_has_vnni() else "avx2"


@functools.cache
def block_kernel_variants() -> dict[str, BlockKernel]:
    """Each path that runs here, by name, for tests that hold every one to the reference."""
    kernel = block_kernel()
    if kernel is None:
        return {}
    library = load_library("block_linear")
    variants = {"avx2": BlockKernel(library, vnni=False)}
    if kernel_path(library) == "avx512-vnni":
        variants["avx512-vnni"] = kernel
    return variants
