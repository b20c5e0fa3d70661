"""Attention of a step's rows over the KV cache: decode rows against their sequences' keys, prompt chunks
causally against theirs, each writing its new keys and values into the cache first.

The cache (server.engine.kv_cache) is storage only; this is the math the model runs over it. Decode rows sit
in KV slots 0..n-1 (see server.model.context), so their keys are read as a view, not gathered. Positions past
a sequence's length are read and masked: the cache keeps them finite. A windowed layer's cache may be a ring
(position p at entry p % ring): once a sequence passes the ring, every entry is read and masked by the
position it holds; the order of keys does not matter to the softmax, and rope is applied before the write.
Scores scale by `scale` (the head width's -1/2 power unless the family says otherwise) and, where a family
caps them, become cap * tanh(score / cap) before the mask, as transformers' eager attention computes them.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from server.kernels.attention import DecodeAttention
from server.model.context import StepContext


class KVTensors(Protocol):
    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """A layer's keys, values [slots, kv_heads, entries, head_dim] and ring length (None: entry p holds
        position p; else position p sits at entry p % ring, see server.engine.kv_cache)."""


def attend(kv: KVTensors, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext,
           window: int | None = None, native_decode: DecodeAttention | None = None, scale: float | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d]. Stores k, v in the cache's `layer` and returns
    [tokens, heads, d]. `window`: the layer's sliding window, if any; `native_decode`: the backend's decode
    attention kernel (None: torch); `scale`: of the scores (None: d ** -0.5); `softcap`: their cap, if any."""
    kc, vc, ring = kv.layer(layer)
    if scale == q.shape[-1] ** -0.5:  # as None: each path then scales as it does by default, to the last bit
        scale = None
    outs = []
    n = ctx.num_decode
    if n:
        out = None
        # the kernel scales by d ** -0.5 and caps nothing; a window shorter than every row's keys changes
        # nothing, and the kernel attends to them all
        plain = softcap is None and scale is None
        # (on a ring too: while no row passes the window, each position is its own entry)
        if native_decode is not None and plain and (window is None or ctx.kv_len <= window):
            out = native_decode(kc, vc, q[:n], k[:n], v[:n], ctx.positions[:n], ctx.kv_len)
        if out is None:
            out = _decode(kc, vc, q[:n], k[:n], v[:n], ctx, window, scale, softcap, ring)
        outs.append(out)
    row = n
    for chunk in ctx.prefills:
        rows = slice(row, row + chunk.length)
        outs.append(_prefill(kc, vc, q[rows], k[rows], v[rows], chunk.slot, chunk.start, window, scale, softcap,
                             ring))
        row += chunk.length
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def _decode(kc, vc, q, k, v, ctx: StepContext, window: int | None = None, scale: float | None = None,
            softcap: float | None = None, ring: int | None = None) -> torch.Tensor:
    # The native kernel's reference and the path without it. Two batched matmuls, not SDPA: faster for one
    # query row per sequence (the timings and how they were taken: docs/decisions.md).
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    positions = ctx.positions[:n]
    hidden = None  # [n, keys]: keys outside a row's window, or never written for its sequence
    if ring is not None and ctx.kv_len > ring:
        kc[ctx.decode_slots, :, positions % ring] = k
        vc[ctx.decode_slots, :, positions % ring] = v
        keys, values, bias = kc[:n], vc[:n], None
        held = ring_positions(positions, ring)
        hidden = (held < 0) | (held <= positions[:, None] - window)
    else:
        kc[ctx.decode_slots, :, positions] = k
        vc[ctx.decode_slots, :, positions] = v
        keys, values, bias = kc[:n, :, : ctx.kv_len], vc[:n, :, : ctx.kv_len], ctx.decode_bias
        if window is not None and ctx.kv_len > window:  # key j is seen from positions j .. j + window - 1
            hidden = torch.arange(ctx.kv_len, device=q.device)[None, :] <= positions[:, None] - window
    grouped = q.view(n, kv_heads, heads // kv_heads, d)  # query head h reads KV head h // group
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float()
    scores.mul_(d ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    if bias is not None:
        scores.add_(bias)
    if hidden is not None:
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(n, heads, d)


def ring_positions(last: torch.Tensor, ring: int) -> torch.Tensor:
    """[rows, ring]: the position each entry of a ring holds once a row's sequence has written positions up to
    last[row]: the newest one congruent to the entry, negative where none was written."""
    entries = torch.arange(ring, device=last.device)
    return last[:, None] - (last[:, None] - entries[None, :]) % ring


def _prefill(kc, vc, q, k, v, slot: int, start: int, window: int | None = None, scale: float | None = None,
             softcap: float | None = None, ring: int | None = None) -> torch.Tensor:
    length = q.shape[0]
    end = start + length
    wraps = ring is not None and end > ring
    if wraps and length > ring - window + 1:  # its keys would overwrite ones its first queries see
        raise ValueError(f"a prompt chunk of {length} tokens on a KV ring of {ring} for a window of {window}")
    entries = torch.arange(start, end, device=q.device) % ring if wraps else slice(start, end)
    kc[slot, :, entries] = k.transpose(0, 1)
    vc[slot, :, entries] = v.transpose(0, 1)
    if wraps:  # every entry, each masked by the position it holds (all written: the sequence passed the ring)
        keys, values, causal = kc[slot], vc[slot], False
        key_at = ring_positions(torch.tensor([end - 1], device=q.device), ring)
        query_at = torch.arange(start, end, device=q.device)[:, None]
        mask = (key_at <= query_at) & (key_at > query_at - window)
    elif window is not None and end > window:  # query at p sees keys p - window + 1 .. p
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
    if softcap is not None:  # SDPA cannot cap its scores
        if causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril_()
        return _capped(q.transpose(0, 1), keys, values, mask, scale, softcap).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                         attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def _capped(q, keys, values, mask, scale: float | None, softcap: float) -> torch.Tensor:
    """q [heads, rows, d] over keys, values [kv_heads, keys, d], where mask [rows, keys] is True."""
    group = q.shape[0] // keys.shape[0]  # query head h reads KV head h // group
    keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = soft_cap(torch.matmul(q, keys.transpose(-1, -2)).float() * scale, softcap)
    probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, values)
