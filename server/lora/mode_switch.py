"""Switches the served model between merged and unmerged LoRA between steps, as `policy.MergeChoice` says.

The one holder of which adapter, if any, is merged into the base weights now: the engine asks it before each
step and runs the step with side branches only while nothing is merged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.lora import policy
from server.lora.merge import MergedAdapter, merge_into_base, restore_base


@dataclass(frozen=True)
class Switch:
    """What one `ModeSwitch.update` did."""
    restored: bool   # the adapter merged before was taken out (the base restored exactly)
    merged: bool     # an adapter was merged in
    seconds: float


class ModeSwitch:
    def __init__(self, model, checkpoint, lora_mode: str):
        """`model`: the Transformer the runner computes with; `checkpoint`: what it was loaded from (the
        exact-restore source for rows a kernel keeps no copy of)."""
        self._model = model
        self._checkpoint = checkpoint
        self._choice = policy.MergeChoice(lora_mode)
        self._merged: MergedAdapter | None = None

    @property
    def merged(self) -> object | None:
        """The adapter merged into the base now, or None."""
        return self._merged.adapter if self._merged else None

    def update(self, running_adapters: list) -> Switch | None:
        """Merges, restores or swaps for the next step's running adapters; None where nothing changes."""
        current = self.merged
        target = self._choice.next(running_adapters, current)
        if target is current:
            return None
        started = time.perf_counter()
        restored = self._merged is not None
        if restored:
            restore_base(self._merged)
            self._merged = None
        if target is not None:
            self._merged = merge_into_base(self._model, target, self._checkpoint)
        return Switch(restored, target is not None, time.perf_counter() - started)
