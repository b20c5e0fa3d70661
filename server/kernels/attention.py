"""The decode attention kernel (`decode_attention.c`): one call per layer writes the decode rows' new keys
and values into the KV cache and attends each row over its own sequence's keys.

`decode_attention_kernel()` is None where the kernel cannot be built here; a call returns None for what the
kernel does not take (not fp32, an unexpected layout), and the caller keeps to torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from server.kernels.build import load_library


class DecodeAttention:
    def __init__(self, library: ctypes.CDLL):
        self._fn = library.decode_attention
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                             ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                             ctypes.c_long, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]

    def __call__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor | None:
        """k_cache, v_cache: [slots, kv_heads, max_len, d] (row i's sequence in slot i); q: [n, heads, d];
        k, v: [n, kv_heads, d]; positions: [n] int64, each below kv_len. Returns [n, heads, d] or None."""
        n, heads, d = q.shape
        tensors = (k_cache, v_cache, q, k, v)
        if any(t.dtype != torch.float32 or t.stride(-1) != 1 or t.stride(-2) != d for t in tensors):
            return None
        if k_cache.stride() != v_cache.stride() or kv_len > k_cache.shape[2] or n > k_cache.shape[0]:
            return None
        if positions.dtype != torch.int64 or positions.stride(0) != 1:
            return None
        out = torch.empty(n, heads, d, dtype=torch.float32, device=q.device)
        ran = self._fn(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                       k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), None,
                       positions.data_ptr(), n, heads, k.shape[1], d, d ** -0.5, out.data_ptr(),
                       torch.get_num_threads())
        return out if ran == 0 else None


@functools.cache
def decode_attention_kernel() -> DecodeAttention | None:
    library = load_library("decode_attention")
    return DecodeAttention(library) if library else None
