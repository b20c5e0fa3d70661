"""Turns a step's sequences into tensors, runs the model once for all of them, returns next-token logits."""

from __future__ import annotations

import torch

from server.engine.kv_cache import KVCache
from server.engine.request import Sequence
from server.lora.layers import BASE, LoraSlots
from server.model.context import PrefillChunk, build_step
from server.model.llama import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCache, lora: LoraSlots):
        self.model = model
        self.kv = kv
        self.lora = lora
        self.device = model.device

    def run(self, decode: list[Sequence], prefill: list[Sequence], use_lora: bool) -> torch.Tensor:
        """Logits [len(decode) + len(prefill), vocab], in that order. `decode` must be the sequences in KV
        slots 0..len(decode)-1 in slot order (Scheduler.running), which server.model.attention relies on; each
        prefill sequence computes `chunk_tokens` of its prompt from `cached_tokens` on."""
        ids = [s.last_token for s in decode]
        row_slots = [_lora_slot(s) for s in decode]
        chunks = []
        for seq in prefill:
            new = seq.prompt_ids[seq.cached_tokens : seq.cached_tokens + seq.chunk_tokens]
            ids.extend(new)
            row_slots.extend([_lora_slot(seq)] * len(new))
            chunks.append(PrefillChunk(seq.kv_slot, seq.cached_tokens, len(new)))
        ctx = build_step([s.num_tokens - 1 for s in decode], chunks, self.device)
        if use_lora:
            ctx.lora = self.lora.plan(row_slots)
        return self.model.forward(torch.tensor(ids, dtype=torch.long, device=self.device), ctx, self.kv)


def _lora_slot(seq: Sequence) -> int:
    return seq.lora_slot if seq.adapter is not None else BASE
