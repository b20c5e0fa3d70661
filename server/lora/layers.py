"""Adapter weights resident on the compute device, stacked per layer and site, and the per-step LoRA plan.

Like vLLM's LoRA layers, each device slot holds one adapter (`set_lora` / `reset_lora`). A site is one
fused base projection (qkv, o, gate_up, down); a slot holds, per site, each targeted projection's A [r, in]
and B [rows, r] with alpha/r folded in. A cover concatenates the A of every projection of a site into one
shrink matmul and keeps one expand matmul per projection (see server.lora.apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.apply import Expand, LoraBatch, lora_apply
from server.lora.covers import CoverCache
from server.model.linear import Linear

SITES = ("qkv", "o", "gate_up", "down")
BASE = -1  # row_slots value of a row served by the bare base model


@dataclass(frozen=True)
class SiteLayout:
    in_features: int
    out_features: int
    projections: dict[str, tuple[int, int]]  # proj -> (first output row, rows) inside the fused weight


@dataclass(frozen=True)
class _SiteOperands:
    A: Linear                        # the cover's A for every projection of the site, projection-major
    expands: tuple[Expand, ...]
    columns: tuple[tuple[int, int], ...]   # (slot, rank width) of each owner, in column order


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
                 device: torch.device, dtype: torch.dtype, backend: str = "torch"):
        self.layouts = layouts
        self.backend = backend
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
        reuses the concatenated, packed weights (they do not depend on which row uses which), so a request
        joining or leaving costs one mask per site, not a repack.
        """
        key = tuple(row_slots)
        if key != self._plan_key:
            self._plan = self._build(row_slots)
            self._plan_key = key
        return self._plan

    def _build(self, row_slots: list[int]) -> LoraStep | None:
        active = frozenset(s for s in row_slots if s != BASE)
        if not active:
            return None
        covers = self.covers.select(active)
        # every row uses the one adapter of the one cover: nothing to mask
        masked = not (len(active) == 1 and covers[0][0] == active and BASE not in row_slots)
        rows = torch.tensor(row_slots, device=self.device)
        masks: dict[tuple, torch.Tensor] = {}
        return LoraStep([[tuple(self._batch(ops[layer][s], rows, masked, masks) for _, ops in covers
                                if ops[layer][s] is not None)
                          for s in range(len(SITES))] for layer in range(self.num_layers)])

    def _cover_operands(self, slots: frozenset[int]) -> list[list[_SiteOperands | None]]:
        ordered = sorted(slots)
        return [[self._site_operands(layer, s, ordered) for s in range(len(SITES))] for layer in range(self.num_layers)]

    def _site_operands(self, layer: int, s: int, slots: list[int]) -> _SiteOperands | None:
        held = self.lora[layer][s]
        a_parts, expands, columns = [], [], []
        width = 0
        for proj, (first, rows) in sorted(self.layouts[SITES[s]].projections.items(), key=lambda kv: kv[1][0]):
            owners = [slot for slot in slots if held[slot] is not None and proj in held[slot]]
            if not owners:
                continue
            a_parts += [held[slot][proj][0] for slot in owners]
            b = torch.cat([held[slot][proj][1] for slot in owners], dim=1)
            expands.append(Expand(Linear(b, None, self.backend, editable=False), slice(width, width + b.shape[1]),
                                  slice(first, first + rows)))
            columns += [(slot, held[slot][proj][0].shape[0]) for slot in owners]
            width += b.shape[1]
        if not expands:
            return None
        A = Linear(torch.cat(a_parts), None, self.backend, editable=False)
        return _SiteOperands(A, tuple(expands), tuple(columns))

    def _batch(self, op: _SiteOperands, rows: torch.Tensor, masked: bool, masks: dict) -> LoraBatch:
        if not masked:
            return LoraBatch(op.A, op.expands, None)
        mask = masks.get(op.columns)
        if mask is None:  # sites with the same column layout (usually every layer) share one mask
            slots = torch.tensor([slot for slot, _ in op.columns], device=self.device)
            widths = torch.tensor([width for _, width in op.columns], device=self.device)
            col_owner = torch.repeat_interleave(slots, widths)
            mask = masks[op.columns] = (rows[:, None] == col_owner[None, :]).to(self.dtype)
        return LoraBatch(op.A, op.expands, mask)
