"""Which adapter sits in which device slot: LRU over slots, pinned while a running sequence uses it.

Slots are keyed by the Adapter object, not its name, so a deleted-then-reuploaded name never serves stale
weights, and requests in flight keep the version they started with. A version the registry removed or
replaced gives its slot back as soon as no running sequence uses it (`prune`), instead of holding its
weights until LRU eviction reaches it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict, deque

from adapters.format import in_float32
from server.lora.layers import LoraSlots


class AdapterSlots:
    def __init__(self, lora: LoraSlots, retired: deque[weakref.ref] | None = None):
        self.lora = lora
        self._slot_of: OrderedDict[int, tuple[object, int]] = OrderedDict()  # id(adapter) -> (adapter, slot)
        self._users: dict[int, int] = {}
        self._free = list(range(lora.max_slots))
        self._retired_feed = retired if retired is not None else deque()  # the registry's `retired`
        self._retired: set[int] = set()  # resident, retired, still in use
        self.loads = 0

    def prune(self) -> None:
        """Frees the slots of retired adapters no sequence uses; the rest go when their last user leaves."""
        while self._retired_feed:
            adapter = self._retired_feed.popleft()()
            key = id(adapter)
            if adapter is None or self._slot_of.get(key, (None,))[0] is not adapter:
                continue
            if key in self._users:
                self._retired.add(key)
            else:
                self._evict(key)

    def acquire(self, adapter) -> int | None:
        """The adapter's slot, loading it (evicting an unused one) if needed; None while every slot is in use."""
        key = id(adapter)
        if key in self._slot_of:
            self._slot_of.move_to_end(key)
        else:
            slot = self._take_slot()
            if slot is None:
                return None
            # widened for the copy: the slot scales B in float32 before casting to the device's dtype
            self.lora.set_lora(slot, in_float32(adapter))
            self.loads += 1
            self._slot_of[key] = (adapter, slot)
        self._users[key] = self._users.get(key, 0) + 1
        return self._slot_of[key][1]

    def release(self, adapter) -> None:
        key = id(adapter)
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key]
            if key in self._retired:
                self._retired.discard(key)
                self._evict(key)

    def resident(self) -> list[str]:
        return [adapter.name for adapter, _ in self._slot_of.values()]

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key in self._slot_of:  # least recently used first
            if key not in self._users:
                self._evict(key)
                return self._free.pop()
        return None

    def _evict(self, key: int) -> None:
        _, slot = self._slot_of.pop(key)
        self.lora.reset_lora(slot)
        self._free.append(slot)
