"""Preallocated KV cache: one slot per running sequence, keys/values written in place.

Running sequences always occupy slots 0..n-1 (a finished sequence's slot is refilled by moving the last
one into it), so decode attention reads `k[:n, :, :len]` as a view instead of gathering rows every step.
The buffers are allocated with `torch.empty`: on CPU only the pages actually written become resident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.engine.context import StepContext
from server.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, max_seqs: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_layers, max_seqs, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.used = 0

    def allocate(self) -> int:
        if self.used >= self.max_seqs:
            raise RuntimeError("no free KV slot")
        self.used += 1
        return self.used - 1

    def free(self, slot: int, length: int) -> int | None:
        """Frees `slot`; returns the slot whose sequence was moved into it (or None). `length` is the
        number of positions the moved sequence has written."""
        last = self.used - 1
        self.used -= 1
        if slot == last:
            return None
        self.k[:, slot, :, :length] = self.k[:, last, :, :length]
        self.v[:, slot, :, :length] = self.v[:, last, :, :length]
        return last

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]. Stores k, v and returns [tokens, heads, d]."""
        kc, vc = self.k[layer], self.v[layer]
        if ctx.is_prefill:
            return self._prefill(kc, vc, q, k, v, ctx)
        n = q.shape[0]
        rows = torch.arange(n, device=q.device)
        kc[rows, :, ctx.positions] = k
        vc[rows, :, ctx.positions] = v
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), kc[:n, :, : ctx.kv_len], vc[:n, :, : ctx.kv_len],
            attn_mask=ctx.decode_mask, enable_gqa=True)
        return out.squeeze(2)

    def _prefill(self, kc, vc, q, k, v, ctx: StepContext) -> torch.Tensor:
        outs = []
        start = 0
        for slot, length in zip(ctx.prefill_slots, ctx.prefill_lens):
            qs, ks, vs = (t[start : start + length].transpose(0, 1) for t in (q, k, v))
            kc[slot, :, :length] = ks
            vc[slot, :, :length] = vs
            o = F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0),
                                               is_causal=True, enable_gqa=True)
            outs.append(o.squeeze(0).transpose(0, 1))
            start += length
        return torch.cat(outs, dim=0)
