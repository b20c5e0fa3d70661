"""Preallocated KV cache: one slot per running sequence, keys/values written in place.

Running sequences always occupy slots 0..n-1 (a finished sequence's slot is refilled by moving the last
one into it), so decode attention reads `k[:n, :, :len]` as a view instead of gathering rows every step.
Positions past a sequence's length are read and masked, so they must hold finite numbers (a masked NaN
still turns the softmax into NaN). A large CPU buffer is its own anonymous mmap, whose pages read as zeros
and become resident only when written. Not `torch.empty`: glibc serves a large request from memory the
heap already holds when it has enough free (server.heap keeps up to 256 MB of freed memory), and a
model load that freed its temporaries left old bytes there. Anything else (GPU memory, small buffers) is
zeroed once.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F

from server.engine.context import StepContext
from server.kernels.attention import DecodeAttention
from server.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seqs: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_layers, max_seqs, cfg.num_kv_heads, max_len, cfg.head_dim)
        nbytes = math.prod(shape) * dtype.itemsize
        self._maps: list[mmap.mmap] = []  # the fresh pages' owners, kept for the tensors' lifetime
        if torch.device(device).type == "cpu" and nbytes > 64 * 2**20:
            self.k, self.v = (self._fresh_zeros(shape, dtype, nbytes) for _ in range(2))
        else:
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seqs = max_seqs
        self.cfg = cfg
        self.max_len = max_len
        self.used = 0

    def _fresh_zeros(self, shape, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        pages = mmap.mmap(-1, nbytes)
        self._maps.append(pages)
        return torch.frombuffer(pages, dtype=dtype).view(shape)

    def allocate(self) -> int:
        if self.used >= self.max_seqs:
            raise RuntimeError("no free KV slot")
        self.used += 1
        return self.used - 1

    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` into slot `dst`."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def scrub(self, slot: int, length: int) -> None:
        """Zeroes the first `length` positions of `slot`, so masked reads of it stay finite."""
        self.k[:, slot, :, :length] = 0
        self.v[:, slot, :, :length] = 0

    def release(self) -> None:
        """Frees the highest slot in use (callers first move what they keep out of it)."""
        self.used -= 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext,
               native_decode: DecodeAttention | None = None) -> torch.Tensor:
        """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]. Stores k, v and returns [tokens, heads, d].
        `native_decode`: the backend's decode attention kernel (None: torch)."""
        kc, vc = self.k[layer], self.v[layer]
        window = self.cfg.window(layer)
        outs = []
        n = ctx.num_decode
        if n:
            out = None
            # a window shorter than every row's keys changes nothing; the native kernel attends to them all
            if native_decode is not None and (window is None or ctx.kv_len <= window):
                out = native_decode(kc, vc, q[:n], k[:n], v[:n], ctx.positions[:n], ctx.kv_len)
            outs.append(out if out is not None else self._decode(kc, vc, q[:n], k[:n], v[:n], ctx, window))
        row = n
        for chunk in ctx.prefills:
            rows = slice(row, row + chunk.length)
            outs.append(self._prefill(kc, vc, q[rows], k[rows], v[rows], chunk.slot, chunk.start, window))
            row += chunk.length
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    @staticmethod
    def _decode(kc, vc, q, k, v, ctx: StepContext, window: int | None = None) -> torch.Tensor:
        # On CPU in fp32 the native kernel (server.kernels.attention) does this in one call; this form is its
        # reference and the path elsewhere. Written out as two batched matmuls rather than
        # scaled_dot_product_attention: for one query row per sequence this ran 1.6x faster on CPU (16 rows,
        # 90 keys: 82 vs 137 us per layer).
        n, heads, d = q.shape
        kv_heads = k.shape[1]
        positions = ctx.positions[:n]
        kc[ctx.decode_slots, :, positions] = k
        vc[ctx.decode_slots, :, positions] = v
        keys, values = kc[:n, :, : ctx.kv_len], vc[:n, :, : ctx.kv_len]
        grouped = q.view(n, kv_heads, heads // kv_heads, d)  # query head h reads KV head h // group
        scores = torch.matmul(grouped, keys.transpose(-1, -2)).float()
        scores.mul_(d ** -0.5).add_(ctx.decode_bias)
        if window is not None and ctx.kv_len > window:  # key j is seen from positions j .. j + window - 1
            before = torch.arange(ctx.kv_len, device=q.device)[None, :] <= positions[:, None] - window
            scores.masked_fill_(before[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values).view(n, heads, d)

    @staticmethod
    def _prefill(kc, vc, q, k, v, slot: int, start: int, window: int | None = None) -> torch.Tensor:
        length = q.shape[0]
        end = start + length
        kc[slot, :, start:end] = k.transpose(0, 1)
        vc[slot, :, start:end] = v.transpose(0, 1)
        if window is not None and end > window:  # query at p sees keys p - window + 1 .. p
            first = max(0, start + 1 - window)
            keys, values, causal = kc[slot, :, first:end], vc[slot, :, first:end], False
            key_at = torch.arange(first, end, device=q.device)[None, :]
            query_at = torch.arange(start, end, device=q.device)[:, None]
            mask = (key_at <= query_at) & (key_at > query_at - window)
        elif start == 0:
            keys, values, mask, causal = k.transpose(0, 1), v.transpose(0, 1), None, True
        else:  # keys before `start` came from the prefix cache; query i sees keys up to start + i
            keys, values, causal = kc[slot, :, :end], vc[slot, :, :end], False
            mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                             attn_mask=mask, is_causal=causal, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)
