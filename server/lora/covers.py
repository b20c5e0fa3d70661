"""Which sets of stacked adapter weights ("covers") serve a step's active adapters, on the torch path
(CUDA, bf16, or no native kernel: on CPU in fp32 the kernel reads each adapter from its slot instead).

A cover is the weights of some device slots stacked once per site, so the rows of those slots cost one
batched matmul per site and projection, however many adapters the cover holds. Building one copies every
weight of its adapters (8 all-projection r16 adapters: 156 MB, several decode steps' time). Closed-loop traffic
changes the set of adapters in the batch every few steps (a request ends and its adapter has no other row
for a while; a new adapter arrives), so a cover is built per set only when reuse fails:

- a cached cover holding every active slot serves the step alone, if no more than half its slots idle
  (an idle slot between busy ones is padding the batched matmul still multiplies);
- else the cached cover holding the most active slots serves them, and a second cover the rest, when the
  rest is the smaller part: one new adapter costs a cover of a few slots, not of all of them;
- else one new cover of exactly the active slots.

At most two covers serve a step, so a step costs at most two batched matmul sets per site. Covers are evicted
least recently used, and dropped when one of their slots is loaded with another adapter.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class CoverCache(Generic[T]):
    def __init__(self, build: Callable[[frozenset[int]], T], max_covers: int = 8):
        self._build = build
        self._max_covers = max_covers
        self._covers: OrderedDict[frozenset[int], T] = OrderedDict()
        self.builds = 0
        self.build_seconds = 0.0

    def select(self, active: frozenset[int]) -> list[tuple[frozenset[int], T]]:
        """(cover's slots, its operands) for the covers that serve `active`; each active slot is in exactly
        one of them."""
        whole = self._fitting(active, frozenset())
        if whole is not None:
            return [self._use(whole)]
        partial = [c for c in self._covers if 2 * len(c & active) >= len(c)]
        if partial:
            best = max(partial, key=lambda c: (len(c & active), -len(c)))
            rest = active - best
            if len(rest) < len(best & active):
                taken = best & active
                return [self._use(best), self._use(self._fitting(rest, taken) or self._new(rest))]
        return [self._use(self._new(active))]

    def forget(self, slot: int) -> None:
        for cover in [c for c in self._covers if slot in c]:
            del self._covers[cover]

    def __len__(self) -> int:
        return len(self._covers)

    def _fitting(self, active: frozenset[int], taken: frozenset[int]) -> frozenset[int] | None:
        fits = [c for c in self._covers if active <= c and len(c) <= 2 * len(active) and not c & taken]
        return min(fits, key=len) if fits else None

    def _new(self, slots: frozenset[int]) -> frozenset[int]:
        started = time.perf_counter()
        self._covers[slots] = self._build(slots)
        self.builds += 1
        self.build_seconds += time.perf_counter() - started
        while len(self._covers) > self._max_covers:
            self._covers.popitem(last=False)
        return slots

    def _use(self, cover: frozenset[int]) -> tuple[frozenset[int], T]:
        self._covers.move_to_end(cover)
        return cover, self._covers[cover]
