"""Turns a step's sequences into tensors, runs the model once for all of them, returns next-token logits."""

from __future__ import annotations

import torch

from server.engine.context import StepContext
from server.engine.kv_cache import KVCache
from server.engine.request import Sequence
from server.lora.layers import BASE, LoraSlots
from server.model.llama import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCache, lora: LoraSlots):
        self.model = model
        self.kv = kv
        self.lora = lora
        self.device = model.device

    def run(self, seqs: list[Sequence], is_prefill: bool, use_lora: bool) -> torch.Tensor:
        ctx, input_ids, row_slots = self._prefill(seqs) if is_prefill else self._decode(seqs)
        if use_lora:
            ctx.lora = self.lora.plan(row_slots)
        return self.model.forward(input_ids, ctx, self.kv)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prefill(self, seqs: list[Sequence]):
        ids, positions, row_slots, lens, last_rows = [], [], [], [], []
        for seq in seqs:
            n = len(seq.prompt_ids)
            ids.extend(seq.prompt_ids)
            positions.extend(range(n))
            row_slots.extend([_lora_slot(seq)] * n)
            lens.append(n)
            last_rows.append(len(ids) - 1)
        slots = [s.kv_slot for s in seqs]
        ctx = StepContext(True, self._tensor(positions), self._tensor(slots), self._tensor(last_rows),
                          prefill_lens=lens, prefill_slots=slots)
        return ctx, self._tensor(ids), row_slots

    def _decode(self, seqs: list[Sequence]):
        # seqs are in KV-slot order 0..n-1 (Scheduler.running), which KVCache.attend relies on
        positions = [s.num_tokens - 1 for s in seqs]
        kv_len = max(positions) + 1
        pos = self._tensor(positions)
        mask = (torch.arange(kv_len, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        ctx = StepContext(False, pos, self._tensor([s.kv_slot for s in seqs]),
                          torch.arange(len(seqs), device=self.device), decode_mask=mask, kv_len=kv_len)
        return ctx, self._tensor([s.last_token for s in seqs]), [_lora_slot(s) for s in seqs]


def _lora_slot(seq: Sequence) -> int:
    return seq.lora_slot if seq.adapter is not None else BASE
