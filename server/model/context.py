"""Per-step batch metadata, set once per step and read by every layer.

Layers get what they need (positions, KV rows, masks, the LoRA plan) from this object instead of having
it threaded through every call, as in nano-vllm.

One step can mix decode rows and prefill chunks (as in vLLM v1): the first `num_decode` rows are one
token each of the sequences in KV slots 0..num_decode-1, in slot order; the rows after them are the
prompt tokens of each `PrefillChunk` in turn. A request that arrives mid-stream therefore rides along
with the running batch instead of stopping it for a prefill step of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class PrefillChunk:
    slot: int       # KV slot of the sequence
    start: int      # position of the chunk's first token; positions before it are already in the KV cache
    length: int     # tokens computed in this step


class LoraPlan(Protocol):
    """A step's LoRA side branches (server.lora.layers.LoraStep builds them)."""

    native: object | None  # the whole plan as the native decoder stack takes it, or None

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> None:
        """y += each row's adapter's contribution at `site` of `layer`, for the site's input x."""


@dataclass
class StepContext:
    positions: torch.Tensor          # [tokens] position of each input row
    logits_rows: torch.Tensor        # [seqs] row whose hidden state predicts each sequence's next token
    num_decode: int = 0
    decode_slots: torch.Tensor | None = None  # [num_decode] 0..num_decode-1: the KV slot of each decode row
    decode_bias: torch.Tensor | None = None  # [num_decode, 1, 1, kv_len] float32: 0 where a key is visible, else -inf
    kv_len: int = 0                  # keys the decode rows attend over (max over them)
    prefills: list[PrefillChunk] = field(default_factory=list)
    kv_slots: torch.Tensor | None = None  # [tokens] int64: each row's KV slot, where the step has prompt chunks
    lora: LoraPlan | None = None     # None when no row uses an adapter


def build_step(decode_positions: list[int], prefills: list[PrefillChunk], device: torch.device) -> StepContext:
    """The context of a step whose decode rows sit at `decode_positions` (row i = KV slot i), followed by
    the tokens of `prefills`; logits are taken for every decode row and each chunk's last token.

    Leading one-token chunks in the next KV slots (a prompt the prefix cache held all but the last token
    of, admitted into the slots after the running ones) are decode rows in all but name, and run as such:
    each prompt chunk attends on its own, a small call per layer, where decode rows share one (timings:
    docs/decisions.md)."""
    decode_positions = list(decode_positions)
    prefills = list(prefills)
    while prefills and prefills[0].length == 1 and prefills[0].slot == len(decode_positions):
        decode_positions.append(prefills.pop(0).start)
    positions = list(decode_positions)
    logits_rows = list(range(len(decode_positions)))
    for chunk in prefills:
        positions.extend(range(chunk.start, chunk.start + chunk.length))
        logits_rows.append(len(positions) - 1)
    ctx = StepContext(torch.tensor(positions, dtype=torch.long, device=device),
                      torch.tensor(logits_rows, dtype=torch.long, device=device),
                      num_decode=len(decode_positions), prefills=prefills)
    if prefills:
        slots = list(range(len(decode_positions)))
        for chunk in prefills:
            slots.extend([chunk.slot] * chunk.length)
        ctx.kv_slots = torch.tensor(slots, dtype=torch.long, device=device)
    if decode_positions:
        ctx.kv_len = max(decode_positions) + 1
        ctx.decode_slots = torch.arange(ctx.num_decode, device=device)
        keys = torch.arange(ctx.kv_len, device=device)
        hidden = keys[None, :] > ctx.positions[: ctx.num_decode, None]
        ctx.decode_bias = torch.zeros(hidden.shape, device=device).masked_fill_(
            hidden, float("-inf"))[:, None, None, :]
    return ctx
