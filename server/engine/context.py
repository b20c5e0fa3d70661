"""Per-step batch metadata, set once per step and read by every layer.

Layers get what they need (positions, KV rows, masks, the LoRA plan) from this object instead of having
it threaded through every call, as in nano-vllm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    is_prefill: bool
    positions: torch.Tensor          # [tokens] position of each input row
    kv_slots: torch.Tensor           # [seqs] KV-cache slot of each sequence
    logits_rows: torch.Tensor        # [seqs] row whose hidden state predicts the sequence's next token
    prefill_lens: list[int] = field(default_factory=list)   # tokens of each sequence (prefill only)
    prefill_slots: list[int] = field(default_factory=list)  # KV slot of each sequence, as ints (prefill only)
    decode_mask: torch.Tensor | None = None  # [seqs, 1, 1, kv_len]: True where a key is visible (decode only)
    kv_len: int = 0                  # keys each decode row attends over (max over the batch)
    lora: object | None = None       # server.lora.layers.LoraStep, or None when no row uses an adapter

    def __post_init__(self):
        if self.is_prefill and not self.prefill_slots:
            self.prefill_slots = self.kv_slots.tolist()  # once per step, not once per layer
