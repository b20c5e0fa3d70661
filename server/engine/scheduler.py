"""Waiting and running sequences; what runs in the next step.

Continuous batching: every step decodes one token for every running sequence and prefills the sequences
admitted at that step (they join the running batch), in one forward. Finished sequences leave at once and
free their KV slot.
`running[i]` is the sequence in KV slot i, so the decode batch is in slot order. Waiting sequences queue
per adapter and are admitted round-robin across adapters (as LoRAX's router does), so a flood of requests
for one adapter cannot starve the others.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Sequence, Status
from server.lora.manager import AdapterSlots


class AdapterQueues:
    """One FIFO per adapter (None = base); iteration order is the round-robin order."""

    def __init__(self) -> None:
        self._queues: OrderedDict[int, deque[Sequence]] = OrderedDict()

    @staticmethod
    def _key(seq: Sequence) -> int:
        return id(seq.adapter)

    def append(self, seq: Sequence) -> None:
        self._queues.setdefault(self._key(seq), deque()).append(seq)

    def remove(self, seq: Sequence) -> None:
        key = self._key(seq)
        self._queues[key].remove(seq)
        if not self._queues[key]:
            del self._queues[key]

    def heads(self) -> list[tuple[int, Sequence]]:
        return [(key, q[0]) for key, q in self._queues.items()]

    def pop(self, key: int) -> Sequence:
        """Takes the head of one adapter's queue and sends that adapter to the back of the rotation."""
        queue = self._queues.pop(key)
        seq = queue.popleft()
        if queue:
            self._queues[key] = queue
        return seq

    def __contains__(self, seq: Sequence) -> bool:
        return any(seq in q for q in self._queues.values())

    def __iter__(self):
        return (seq for q in self._queues.values() for seq in q)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return bool(self._queues)


class Scheduler:
    def __init__(self, kv: KVCache, adapter_slots: AdapterSlots, max_prefill_tokens: int, admits_mixed: bool,
                 prefix_cache: PrefixCache | None = None):
        self.kv = kv
        self.prefix_cache = prefix_cache
        self.adapter_slots = adapter_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.admits_mixed = admits_mixed
        self.waiting = AdapterQueues()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(decode, prefill): the running sequences whose prompts are done, in slot order, then the ones
        computing a prompt chunk in this step (whose slots follow theirs); each has `chunk_tokens` set.

        At most `max_prefill_tokens` prompt tokens run per step, so a long prompt is split over several
        steps and the running streams keep getting tokens meanwhile. A partly computed prompt is always
        the last running sequence, and nothing is admitted behind it until it is done."""
        budget = self.max_prefill_tokens
        if self.running and not self.running[-1].prompt_done:
            partial = self.running[-1]
            done = partial.plan_chunk(budget)
            return self.running[:-1], [partial, *(self._admit(budget - partial.chunk_tokens) if done else [])]
        return list(self.running), self._admit(budget)

    def _admit(self, budget: int) -> list[Sequence]:
        self.adapter_slots.prune()  # deleted adapters' slots first, so they are free to take
        admitted: list[Sequence] = []
        blocked: set[int] = set()  # adapters that cannot be admitted in this step
        while budget > 0 and self.kv.used < self.kv.max_seqs:
            candidates = [(key, seq) for key, seq in self.waiting.heads() if key not in blocked]
            if not candidates:
                break
            key, seq = candidates[0]
            if not self.admits_mixed and not self._same_group(seq, admitted):
                blocked.add(key)
                continue
            if seq.adapter is not None:
                slot = self.adapter_slots.acquire(seq.adapter)
                if slot is None:  # every device slot is pinned by running sequences
                    blocked.add(key)
                    continue
                seq.lora_slot = slot
            self.waiting.pop(key)
            seq.kv_slot = self.kv.allocate()
            if self.prefix_cache is not None:
                hit = self.prefix_cache.match(seq.cache_scope, seq.adapter, seq.prompt_ids)
                seq.cached_tokens = self.prefix_cache.load(hit, seq.kv_slot)
            done = seq.plan_chunk(budget)
            budget -= seq.chunk_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            if not done:
                break  # a partly computed prompt must stay the last running sequence
        return admitted

    def _same_group(self, seq: Sequence, admitted: list[Sequence]) -> bool:
        group = self.running or admitted
        return not group or group[0].adapter is seq.adapter

    def prefilled(self, seqs: list[Sequence]) -> None:
        """Called after a step that computed these sequences' prompt chunks: advances them, and offers the
        keys and values now in their slots to the prefix cache."""
        for seq in seqs:
            seq.cached_tokens += seq.chunk_tokens
            seq.chunk_tokens = 0
            if self.prefix_cache is not None:
                computed = seq.prompt_ids[: seq.cached_tokens]
                self.prefix_cache.store(seq.cache_scope, seq.adapter, computed, seq.kv_slot)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if seq.kv_slot < 0:
            return
        if self.prefix_cache is not None and reason != "error":  # the next message of a chat resends all of this
            written = (seq.prompt_ids + seq.output_ids)[: seq.kv_tokens]
            self.prefix_cache.store(seq.cache_scope, seq.adapter, written, seq.kv_slot)
        if reason == "error":  # it may have written non-finite keys, which the slot's next owner reads masked
            self.kv.scrub(seq.kv_slot, min(seq.num_tokens, self.kv.max_len))
        self._vacate(seq.kv_slot)
        seq.kv_slot = -1
        if seq.adapter is not None:
            self.adapter_slots.release(seq.adapter)

    def _vacate(self, slot: int) -> None:
        """Frees `slot`, keeping the running sequences in slots 0..n-1 with a partly computed prompt last."""
        last = len(self.running) - 1
        partial = self.running[last] if slot != last and not self.running[last].prompt_done else None
        if partial is None:
            if slot != last:
                self._move(last, slot)
        else:  # the last decoding sequence fills the hole, the partial one moves down behind it
            if slot != last - 1:
                self._move(last - 1, slot)
            self._move(last, last - 1)
        self.running.pop()
        self.kv.release()

    def _move(self, src: int, dst: int) -> None:
        seq = self.running[src]
        # mid-step a sequence may not have been handed this step's token yet, and then kv_tokens is one
        # short of what the step wrote: copy one position more (an unwritten one at worst); a prompt's chunk
        # computed this step is in its slot before `prefilled` counts it (chunk_tokens is 0 between steps)
        length = min(seq.kv_tokens + 1, self.kv.max_len) if seq.prompt_done else seq.cached_tokens + seq.chunk_tokens
        self.kv.move(src, dst, length)
        seq.kv_slot = dst
        self.running[dst] = seq
