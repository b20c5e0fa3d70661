"""Merged or unmerged: which LoRA mode serves the next step.

Merged costs nothing per step but serves one adapter at a time and pays a merge + restore to switch;
unmerged serves any mix at the price of the side branch in every step. In `auto`, a running set that
wants one adapter is served merged, any mix unmerged. Switches happen only between steps, and both modes
compute the same function, so a switch never changes what an in-flight request gets beyond rounding.
"""

from __future__ import annotations

MODES = ("auto", "merged", "unmerged")


def merge_target(mode: str, running_adapters: list) -> object | None:
    """The adapter to hold merged for the next step, or None to serve the bare base plus side branches."""
    if mode == "unmerged" or not running_adapters:
        return None
    first = running_adapters[0]
    if first is None or any(a is not first for a in running_adapters):
        return None
    return first


def admits_mixed(mode: str) -> bool:
    """Forced-merged mode can only run one adapter (or the bare base) at a time."""
    return mode != "merged"
