"""Adapter weights resident on the compute device, stacked per layer and site, and the per-step LoRA plan.

Like vLLM's LoRA layers, each device slot holds one adapter (`set_lora` / `reset_lora`). A site is one
fused base projection (qkv, o, gate_up, down); a slot holds, per site, each targeted projection's A [r, in]
and B [rows, r] with alpha/r folded in. A cover stacks its slots' weights per site along a batch axis, and a
step's plan groups the rows by the position of their adapter in the cover (see server.lora.apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from server.lora.apply import LoraBatch, SiteStack, lora_apply
from server.lora.covers import CoverCache

SITES = ("qkv", "o", "gate_up", "down")
BASE = -1  # row_slots value of a row served by the bare base model


@dataclass(frozen=True)
class SiteLayout:
    in_features: int
    out_features: int
    projections: dict[str, tuple[int, int]]  # proj -> (first output row, rows) inside the fused weight


@dataclass(frozen=True)
class _SiteOperands:
    stack: SiteStack
    owners: frozenset[int]           # the cover positions whose adapter targets the site


class LoraStep:
    """Per-step plan: batches[layer][site_index] holds one LoraBatch per cover serving the step (see
    server.lora.covers; empty where no active adapter touches the site)."""

    def __init__(self, batches: list[list[tuple[LoraBatch, ...]]]):
        self.batches = batches


def add_lora(y: torch.Tensor, x: torch.Tensor, step: LoraStep | None, layer: int, site: str) -> None:
    if step is None:
        return
    for batch in step.batches[layer][SITES.index(site)]:
        lora_apply(y, x, batch)


class LoraSlots:
    def __init__(self, num_layers: int, layouts: dict[str, SiteLayout], max_slots: int,
                 device: torch.device, dtype: torch.dtype):
        self.layouts = layouts
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.device = device
        self.dtype = dtype
        # lora[layer][site][slot] -> {proj: (A [r, in], B [rows, r] scaled)} or None
        self.lora = [[[None] * max_slots for _ in SITES] for _ in range(num_layers)]
        self._plan_key: tuple | None = None
        self._plan: LoraStep | None = None
        self.covers: CoverCache[list] = CoverCache(self._cover_operands)

    def set_lora(self, slot: int, adapter) -> None:
        """Copies an `adapters.Adapter` into `slot`, replacing what was there."""
        self.reset_lora(slot)
        for key, w in adapter.weights.items():
            _, layer, proj = key.split(".")
            s = next(i for i, site in enumerate(SITES) if proj in self.layouts[site].projections)
            held = self.lora[int(layer)][s][slot]
            if held is None:
                held = self.lora[int(layer)][s][slot] = {}
            held[proj] = (w.A.to(self.device, self.dtype), (w.B * w.scale).to(self.device, self.dtype))
        self._invalidate(slot)

    def reset_lora(self, slot: int) -> None:
        for layer in range(self.num_layers):
            for s in range(len(SITES)):
                self.lora[layer][s][slot] = None
        self._invalidate(slot)

    def _invalidate(self, slot: int) -> None:
        self._plan_key = None
        self.covers.forget(slot)

    def plan(self, row_slots: list[int]) -> LoraStep | None:
        """The LoRA operands for a step whose rows use `row_slots` (BASE for no adapter).

        Rebuilt only when the rows' slots change; a steady decode batch reuses the last plan. A rebuild
        reuses the covers' stacked weights (they do not depend on which row uses which), so a request
        joining or leaving costs a few small index tensors, not a copy of weights.
        """
        key = tuple(row_slots)
        if key != self._plan_key:
            self._plan = self._build(row_slots)
            self._plan_key = key
        return self._plan

    def _build(self, row_slots: list[int]) -> LoraStep | None:
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(row_slots):
            if slot != BASE:
                groups.setdefault(slot, []).append(row)
        if not groups:
            return None
        covers = self.covers.select(frozenset(groups))
        # A group far above the typical size (a prompt chunk) runs as its own batch, or every other group
        # would be padded to its size.
        large = max(4, 2 * math.ceil(sum(map(len, groups.values())) / len(groups)))
        specs = []
        for slots, ops in covers:
            order = sorted(slots)  # positions, as _cover_operands stacks them
            mine = [j for j, slot in enumerate(order) if slot in groups]
            big = [j for j in mine if len(groups[order[j]]) > large]
            small = [j for j in mine if j not in big]
            runs = [([j], [order[j]]) for j in big]
            if small:  # positions between them idle in this run (padding only): slicing the stack copies nothing
                span = list(range(small[0], small[-1] + 1))
                runs.append((span, [order[j] if j in small else None for j in span]))
            for run, members in runs:
                serving = frozenset(j for j, slot in zip(run, members) if slot is not None)
                specs.append((ops, serving, self._gather(run, members, groups, len(row_slots))))
        return LoraStep([[tuple(LoraBatch.of(ops[layer][s].stack, *gather) for ops, serving, gather in specs
                                if ops[layer][s] is not None and ops[layer][s].owners & serving)
                          for s in range(len(SITES))] for layer in range(self.num_layers)])

    def _gather(self, run: list[int], members: list[int | None], groups: dict[int, list[int]], rows: int):
        """(positions, rows, pad) of a LoraBatch for cover positions `run`; members[i] is the slot whose
        rows position run[i] serves (None: it idles, padded)."""
        positions = slice(run[0], run[-1] + 1)
        if len(run) == 1 and groups[members[0]] == list(range(rows)):
            return positions, None, None
        width = max(len(groups[slot]) for slot in members if slot is not None)
        index, pad = [], []
        for slot in members:
            mine = groups[slot] if slot is not None else []
            index += mine + [0] * (width - len(mine))
            pad += [1] * len(mine) + [0] * (width - len(mine))
        index_t = torch.tensor(index, device=self.device)
        if all(pad):
            return positions, index_t, None
        return positions, index_t, torch.tensor(pad, device=self.device, dtype=self.dtype).view(len(run), width, 1)

    def _cover_operands(self, slots: frozenset[int]) -> list[list[_SiteOperands | None]]:
        ordered = sorted(slots)
        return [[self._site_operands(layer, s, ordered) for s in range(len(SITES))] for layer in range(self.num_layers)]

    def _site_operands(self, layer: int, s: int, slots: list[int]) -> _SiteOperands | None:
        """Stacks the slots' weights for one site; a slot without some projection (or with a smaller rank)
        holds zeros there, which add nothing."""
        held = [self.lora[layer][s][slot] or {} for slot in slots]
        layout = self.layouts[SITES[s]]
        projections = sorted((p for p in layout.projections if any(p in h for h in held)),
                             key=lambda p: layout.projections[p][0])
        if not projections:
            return None
        widths = [max(h[p][0].shape[0] for h in held if p in h) for p in projections]
        A = torch.zeros(len(slots), layout.in_features, sum(widths), device=self.device, dtype=self.dtype)
        expands, column = [], 0
        for proj, width in zip(projections, widths):
            first, rows = layout.projections[proj]
            Bt = torch.zeros(len(slots), width, rows, device=self.device, dtype=self.dtype)
            for j, h in enumerate(held):
                if proj in h:
                    a, b = h[proj]
                    A[j, :, column : column + a.shape[0]] = a.T
                    Bt[j, : a.shape[0]] = b.T
            expands.append((Bt, slice(column, column + width), slice(first, first + rows)))
            column += width
        owners = frozenset(j for j, h in enumerate(held) if h)
        return _SiteOperands(SiteStack(A, tuple(expands)), owners)
