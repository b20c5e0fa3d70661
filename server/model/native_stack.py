"""A step's decoder layers run as one native call (`server.kernels.decoder`), where they can be.

The layer-by-layer path in `server.model.llama` stays the definition: this computes the same through the
same kernels, and tests hold the two to equal logits (decode rows) or close ones (prompt chunks, which
attend a row at a time here and with torch's SDPA there). It serves a step when the model computes every
projection with the panel kernel or, on a quantized base, the block kernel (CPU, fp32 activations, no
biases, no q/k norms), the KV cache is fp32 on CPU and holds every layer in one tensor (no ring), no sliding
window is shorter than the step's keys, the LoRA plan, if any, is the native kernel's, and no prompt chunk
reaches past LONG_CHUNK_KEYS keys: row-at-a-time attention re-reads a sequence's keys for every row of its
chunk, so a long chunk is faster layer by layer with torch's SDPA (the crossover, measured in-process in
turns: docs/decisions.md).
"""

from __future__ import annotations

import torch

from server.kernels.decoder import WEIGHT_FIELDS, DecoderLayersKernel
from server.model.attention import KVTensors
from server.model.context import StepContext
from server.model.geometry import SITES


LONG_CHUNK_KEYS = 512


class NativeStack:
    def __init__(self, kernel: DecoderLayersKernel, model):
        self._kernel = kernel
        self._model = model
        cfg = model.cfg
        self._dims = torch.tensor([cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.intermediate_size])
        self._scale = cfg.head_dim ** -0.5

    @classmethod
    def build(cls, model, kernel: DecoderLayersKernel | None) -> NativeStack | None:
        """None where the model cannot take this path at all (`kernel`: the backend's, None where it has none)."""
        cfg = model.cfg
        if kernel is None or model.device.type != "cpu" or model.dtype != torch.float32:
            return None
        if cfg.hidden_size % 8 or cfg.head_dim % 16 or cfg.intermediate_size % 8:  # the kernels' vector widths
            return None
        if cfg.num_heads % cfg.num_kv_heads or cfg.qk_norm:
            return None
        if any(linear.native_operand() is None for layer in model.layers for linear in layer.linears.values()):
            return None
        norms = [norm for layer in model.layers for norm in (layer.input_norm, layer.post_attention_norm)]
        if not all(norm.is_contiguous() for norm in norms):
            return None
        return cls(kernel, model)

    def run(self, h: torch.Tensor, ctx: StepContext, cos: torch.Tensor, sin: torch.Tensor, kv: KVTensors) -> bool:
        """Runs every layer on h in place and returns True, or returns False (nothing touched) for a step it
        does not take."""
        n = h.shape[0]
        keys = max([ctx.kv_len] + [chunk.start + chunk.length for chunk in ctx.prefills])
        if not h.is_contiguous() or any(chunk.start + chunk.length > LONG_CHUNK_KEYS for chunk in ctx.prefills):
            return False
        window = self._model.cfg.smallest_window
        if window is not None and keys > window:  # the kernel attends to every key: right until a window binds
            return False
        if ctx.positions.dtype != torch.int64 or not ctx.positions.is_contiguous():
            return False
        lora = None
        if ctx.lora is not None:
            lora = ctx.lora.native
            if lora is None:
                return False
        if kv.k is None:  # some layer's keys live in a ring, apart from the one tensor the kernel reads
            return False
        if kv.k.dtype != torch.float32 or kv.k.device.type != "cpu" or kv.k.stride() != kv.v.stride():
            return False
        weights = self._weights()
        if weights is None:  # a projection merged into a full-precision scratch
            return False
        cos, sin = cos.reshape(n, -1), sin.reshape(n, -1)
        if not (cos.is_contiguous() and sin.is_contiguous()):
            return False
        self._kernel(h, weights, self._dims, self._model.cfg.rms_norm_eps, self._scale, cos, sin,
                     kv.k, kv.v, ctx.kv_slots, ctx.positions, lora)
        return True

    def _weights(self) -> torch.Tensor | None:
        """Each layer's weight operands as the kernel takes them, read every step: a hot-swap points a
        projection at other panels (or, on a quantized base, at a scratch the stack does not take: None)."""
        rows = []
        for layer in self._model.layers:
            qkv, o, gate_up, down = (layer.linears[site].native_operand() for site in SITES)
            if None in (qkv, o, gate_up, down):
                return None
            rows.append([layer.input_norm.data_ptr(), *qkv, *o, layer.post_attention_norm.data_ptr(), *gate_up,
                         *down])
        weights = torch.tensor(rows, dtype=torch.int64)
        assert weights.shape[1] == WEIGHT_FIELDS
        return weights
