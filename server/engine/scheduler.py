"""Waiting and running sequences; what runs in the next step.

Continuous batching: every step either prefills newly admitted sequences (they join the running batch) or
decodes one token for every running sequence. Finished sequences leave at once and free their KV slot.
`running[i]` is the sequence in KV slot i, so the decode batch is in slot order.
"""

from __future__ import annotations

from collections import deque

from server.engine.kv_cache import KVCache
from server.engine.request import Sequence, Status
from server.lora.manager import AdapterSlots


class Scheduler:
    def __init__(self, kv: KVCache, adapter_slots: AdapterSlots, max_prefill_tokens: int, admits_mixed: bool):
        self.kv = kv
        self.adapter_slots = adapter_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.admits_mixed = admits_mixed
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        admitted = self._admit()
        if admitted:
            return admitted, True
        return list(self.running), False

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        tokens = 0
        skipped: list[Sequence] = []
        while self.waiting and self.kv.used < self.kv.max_seqs:
            seq = self.waiting[0]
            if admitted and tokens + len(seq.prompt_ids) > self.max_prefill_tokens:
                break
            if not self.admits_mixed and not self._same_group(seq, admitted):
                skipped.append(self.waiting.popleft())
                continue
            if seq.adapter is not None:
                slot = self.adapter_slots.acquire(seq.adapter)
                if slot is None:  # every device slot is pinned by running sequences
                    skipped.append(self.waiting.popleft())
                    continue
                seq.lora_slot = slot
            self.waiting.popleft()
            seq.kv_slot = self.kv.allocate()
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            tokens += len(seq.prompt_ids)
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def _same_group(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        group = self.running or admitted
        return not group or group[0].adapter is seq.adapter

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if seq.kv_slot < 0:
            return
        last = self.running[-1]
        moved_from = self.kv.free(seq.kv_slot, last.num_tokens)
        if moved_from is not None:
            last.kv_slot = seq.kv_slot
            self.running[seq.kv_slot] = last
        self.running.pop()
        seq.kv_slot = -1
        if seq.adapter is not None:
            self.adapter_slots.release(seq.adapter)
