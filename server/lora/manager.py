"""Which adapter sits in which device slot: LRU over slots, pinned while a running sequence uses it.

Slots are keyed by the Adapter object, not its name, so a deleted-then-reuploaded name never serves stale
weights, and requests in flight keep the version they started with.
"""

from __future__ import annotations

from collections import OrderedDict

from server.lora.layers import LoraSlots


class AdapterSlots:
    def __init__(self, lora: LoraSlots):
        self.lora = lora
        self._slot_of: OrderedDict[int, tuple[object, int]] = OrderedDict()  # id(adapter) -> (adapter, slot)
        self._users: dict[int, int] = {}
        self._free = list(range(lora.max_slots))
        self.loads = 0

    def acquire(self, adapter) -> int | None:
        """The adapter's slot, loading it (evicting an unused one) if needed; None while every slot is in use."""
        key = id(adapter)
        if key in self._slot_of:
            self._slot_of.move_to_end(key)
        else:
            slot = self._take_slot()
            if slot is None:
                return None
            self.lora.set_lora(slot, adapter)
            self.loads += 1
            self._slot_of[key] = (adapter, slot)
        self._users[key] = self._users.get(key, 0) + 1
        return self._slot_of[key][1]

    def release(self, adapter) -> None:
        key = id(adapter)
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key]

    def resident(self) -> list[str]:
        return [adapter.name for adapter, _ in self._slot_of.values()]

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, (_, slot) in self._slot_of.items():  # least recently used first
            if key not in self._users:
                del self._slot_of[key]
                self.lora.reset_lora(slot)
                return slot
        return None
