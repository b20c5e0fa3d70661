"""The compute backend: which kernels this process multiplies, normalises, attends and adds LoRA with.

Chosen once at start-up (`resolve_backend`, from the device, the dtype, the base weights' format and which
kernels build and pass their self-checks here; `server.runtime` logs it) and passed to everything that
computes, which never asks again. `torch_backend` is plain torch throughout: the reference every kernel is
tested against, and what a test passes to run the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.kernels.attention import DecodeAttention, decode_attention_kernel
from server.kernels.block_linear import BlockKernel, block_kernel
from server.kernels.decoder import DecoderLayersKernel, decoder_layers_kernel
from server.kernels.lora import SlotGroupsKernel, slot_groups_kernel
from server.kernels.onednn import linear_works as onednn_linear_works
from server.kernels.panel import PanelKernel, panel_kernel
from server.kernels.pointwise import PointwiseKernels, pointwise_kernels
from server.kernels.torch_int4 import TorchInt4Kernel, torch_int4_kernel

LINEARS = ("auto", "torch", "mkldnn", "panel")


@dataclass(frozen=True)
class Backend:
    device: torch.device
    dtype: torch.dtype
    linear: str = "torch"                        # full-precision projections: panel, mkldnn or torch (F.linear)
    panel: PanelKernel | None = None             # set where linear is "panel"
    pointwise: PointwiseKernels | None = None    # RMS norm, rotary embedding, SiLU * up; None: torch
    decode_attention: DecodeAttention | None = None  # None: two batched matmuls
    lora: SlotGroupsKernel | None = None         # grouped LoRA from the slots' weights; None: stacked covers
    decoder_layers: DecoderLayersKernel | None = None  # a decode step's layers in one call; None: layer by layer
    block: BlockKernel | TorchInt4Kernel | None = None  # quantized base weights; None: the reference product

    def describe(self, quantization: str = "none") -> str:
        """One line for the start-up log."""
        if quantization == "none":
            linear = self.linear
        elif isinstance(self.block, TorchInt4Kernel):
            linear = "torch int4 kernel"
        else:
            linear = "block kernel" if self.block else "reference"
        native = [name for name, kernel in (("pointwise", self.pointwise), ("decode attention", self.decode_attention),
                                            ("grouped lora", self.lora), ("decoder stack", self.decoder_layers))
                  if kernel is not None]
        return f"linear: {linear}; native kernels: {', '.join(native) or 'none'}"


def torch_backend(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> Backend:
    return Backend(torch.device(device), dtype)


def resolve_backend(device: torch.device, dtype: torch.dtype, linear: str = "auto",
                    quantization: str = "none") -> Backend:
    """The kernels that run here for `dtype` on `device`; `linear` names the projections' kernel (auto: the
    fastest that runs), `quantization` the base weights' format (anything but none asks for `quantized_kernel`)."""
    device = torch.device(device)
    cpu, fp32 = device.type == "cpu", dtype == torch.float32
    linear = _linear_kind(linear, device, dtype)
    return Backend(
        device, dtype, linear,
        panel=panel_kernel() if linear == "panel" else None,
        # each pointwise call checks its tensors (a quantized base's fp32 outputs take it under bf16 too)
        pointwise=pointwise_kernels() if cpu else None,
        decode_attention=decode_attention_kernel() if cpu and fp32 else None,
        lora=slot_groups_kernel() if cpu and fp32 else None,
        decoder_layers=decoder_layers_kernel() if cpu and fp32 else None,
        block=quantized_kernel(device, dtype) if quantization != "none" else None)


def quantized_kernel(device: torch.device, dtype: torch.dtype) -> BlockKernel | TorchInt4Kernel | None:
    """What multiplies a quantized base on `device`: the block kernel on CPU, torch's int4 kernel on CUDA (each
    where it runs); None: the reference, dequantize + F.linear."""
    if device.type == "cpu":
        return block_kernel()
    return torch_int4_kernel(device, dtype) if device.type == "cuda" else None


def serves_quantized(fmt: str, device: torch.device) -> bool:
    """Whether `fmt` (int8, int4, gguf) can be served on `device`: every format on CPU, int4 on CUDA. On CUDA
    8-bit blocks are held dequantized in the model's dtype (no kernel takes their per-block scales), so int8
    would save nothing; a GGUF file's embedding blocks are looked up on the host where it was read."""
    return device.type == "cpu" or (device.type == "cuda" and fmt == "int4")


def gguf_by_default(device: torch.device) -> bool:
    """auto serves a GGUF folder in its own blocks only where the CPU block kernel runs: faster than fp32 at every
    batch size there (`python -m bench.quantized`); nothing else is measured against full precision."""
    return device.type == "cpu" and block_kernel() is not None


def linear_kinds(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The projection kernels that run here for `dtype`, plain `F.linear` first."""
    names = ["torch"]
    if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and onednn_linear_works(dtype):
        names.append("mkldnn")
    if device.type == "cpu" and dtype == torch.float32 and panel_kernel():
        names.append("panel")
    return names


def _linear_kind(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name not in LINEARS:
        raise ValueError(f"linear backend {name!r} is not one of {LINEARS}")
    if name == "panel" and (device.type != "cpu" or dtype != torch.float32 or panel_kernel() is None):
        raise ValueError("the panel linear backend needs a CPU with AVX2/FMA, a C compiler (or a cached build) "
                         "and float32")
    if name != "auto":
        return name
    if device.type != "cpu":
        return "torch"
    # the panel kernel is the faster at decode's row counts; a long prompt's chunk pays a little once per
    # prompt (python -m bench.micro_linear; figures in docs/decisions.md)
    if dtype == torch.float32 and panel_kernel():
        return "panel"
    if dtype in (torch.float32, torch.bfloat16) and onednn_linear_works(dtype):
        return "mkldnn"
    return "torch"

