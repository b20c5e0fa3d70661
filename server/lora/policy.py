"""Merged or unmerged: which LoRA mode serves the next step.

Merged costs nothing per step but serves one adapter at a time and pays a merge + restore to switch;
unmerged serves any mix at the price of the side branch in every step. In `auto`, a running set that
has wanted one adapter for `SETTLE_STEPS` steps in a row is served merged, anything else unmerged: a set
is often uniform for a moment only (the first request of a burst, the last one left), and a merge of an
all-projection adapter costs several decode steps to be undone a step later, while an unmerged step costs
little over the base's (`make bench`'s swap row and decode-step table; figures in docs/decisions.md). Switches
happen only between steps, and both modes compute the same function, so a switch never changes what an
in-flight request gets beyond rounding. A weighted mix (adapters.mix) is never merged: it is built per
request, so a merge would rarely be reused before its restore.
"""

from __future__ import annotations

from adapters.mix import is_mix

MODES = ("auto", "merged", "unmerged")
SETTLE_STEPS = 8


def merge_target(mode: str, running_adapters: list) -> object | None:
    """The adapter to hold merged for the next step, or None to serve the bare base plus side branches."""
    if mode == "unmerged" or not running_adapters:
        return None
    first = running_adapters[0]
    if first is None or is_mix(first) or any(a is not first for a in running_adapters):
        return None
    return first


def admits_mixed(mode: str) -> bool:
    """Forced-merged mode can only run one adapter (or the bare base) at a time."""
    return mode != "merged"


class MergeChoice:
    """The adapter to hold merged for each next step, with auto's wait (see the module docstring)."""

    def __init__(self, mode: str, settle_steps: int = SETTLE_STEPS):
        self.mode = mode
        self.settle_steps = settle_steps
        self._wanted: object | None = None
        self._wanted_steps = 0

    def next(self, running_adapters: list, merged: object | None) -> object | None:
        wanted = merge_target(self.mode, running_adapters)
        if wanted is not self._wanted:
            self._wanted, self._wanted_steps = wanted, 0
        self._wanted_steps += 1
        if self.mode != "auto" or wanted is None or wanted is merged or self._wanted_steps > self.settle_steps:
            return wanted
        return None
