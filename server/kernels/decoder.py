"""A step's decoder layers in one native call (`decoder_layers.c`), through the same kernels the
Python layers call one by one (panel products, RMS norm, rotary embedding, decode attention, SiLU * up and
the grouped LoRA), whose addresses it is handed.

`decoder_layers_kernel()` is None where any of those kernels cannot run here; `server.model.llama` then
keeps to its layer-by-layer path.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from server.kernels.attention import decode_attention_kernel
from server.kernels.build import load_library
from server.kernels.lora import slot_groups_kernel
from server.kernels.panel import panel_kernel
from server.kernels.pointwise import pointwise_kernels

# (library, function) in the order of decoder_layers.c's F_* fields
_FUNCTIONS = (("panel_linear", "panel_linear"), ("pointwise", "rms_norm"), ("pointwise", "rope"),
              ("pointwise", "silu_mul"), ("decode_attention", "decode_attention"), ("lora_grouped", "lora_slot_groups"),
              ("block_linear", "block_linear"))
OPERAND_FIELDS = 5  # per projection: data, panels, bits (0: fp32 panels), scales, offsets
WEIGHT_FIELDS = 2 + 4 * OPERAND_FIELDS  # per layer: input norm, qkv, o, post norm, gate_up, down


class DecoderLayersKernel:
    def __init__(self, library: ctypes.CDLL, functions: torch.Tensor, holders: list[ctypes.CDLL]):
        self._functions = functions
        self._holders = holders  # the libraries the addresses point into, kept loaded
        self._work = library.decoder_layers_work
        self._work.restype = ctypes.c_long
        self._work.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self._fn = library.decoder_layers
        self._fn.restype = ctypes.c_int
        p, l, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        self._fn.argtypes = [p, p, l, l, p, p, f, f, p, p, l, p, p, l, l, l, p, p, l, p, p, p, l, p, p, p, l,
                             ctypes.c_int]

    def __call__(self, h: torch.Tensor, weights: torch.Tensor, dims: torch.Tensor, eps: float, scale: float,
                 cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor | None, positions: torch.Tensor, lora) -> None:
        """h [n, hidden] in place; weights [layers, WEIGHT_FIELDS] int64; dims [hidden, heads, kv_heads, d,
        intermediate] int64; cos, sin [n, d]; k_cache, v_cache [layers, slots, kv_heads, max_len, d];
        slots, positions [n] int64: each row's KV slot (None: row i is slot i) and position; lora a
        `server.lora.apply.SlotTable` or None. The caller checks dtypes and layouts (fp32, dense rows); a
        refusal here is a bug, raised."""
        n, layers = h.shape[0], weights.shape[0]
        work = torch.empty(self._work(n, layers, weights.data_ptr(), dims.data_ptr()), dtype=torch.float32)
        if lora is None:
            groups, offsets, rows, table, n_proj, out0, out_n = 0, None, None, None, 0, None, None
        else:
            step = lora.step
            groups, offsets, table = step.groups, step.offsets.data_ptr(), lora.table.data_ptr()
            rows = None if step.rows is None else step.rows.data_ptr()
            n_proj, out0, out_n = lora.out0.shape[1], lora.out0.data_ptr(), lora.out_n.data_ptr()
        ran = self._fn(self._functions.data_ptr(), h.data_ptr(), n, layers, weights.data_ptr(), dims.data_ptr(), eps,
                       scale, cos.data_ptr(), sin.data_ptr(), cos.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                       k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                       None if slots is None else slots.data_ptr(), positions.data_ptr(), groups,
                       offsets, rows, table, n_proj, out0, out_n, work.data_ptr(), work.numel(),
                       torch.get_num_threads())
        if ran != 0:
            raise RuntimeError(f"the native decoder layers refused a step (code {ran})")


@functools.cache
def decoder_layers_kernel() -> DecoderLayersKernel | None:
    if None in (panel_kernel(), pointwise_kernels(), decode_attention_kernel(), slot_groups_kernel()):
        return None
    libraries = {name: load_library(name) for name in {name for name, _ in _FUNCTIONS} | {"decoder_layers"}}
    if None in libraries.values():
        return None
    addresses = [ctypes.cast(getattr(libraries[name], fn), ctypes.c_void_p).value for name, fn in _FUNCTIONS]
    return DecoderLayersKernel(libraries["decoder_layers"], torch.tensor(addresses, dtype=torch.int64),
                               list(libraries.values()))
