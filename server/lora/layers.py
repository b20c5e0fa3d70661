"""Adapter weights resident on the compute device, stacked per layer and site, and the per-step LoRA plan.

Like vLLM's LoRA layers, each device slot holds one adapter (`set_lora` / `reset_lora`). A site is one
fused base projection (qkv, o, gate_up, down); an adapter's weights for the projections inside a site are
stored as one A [w, in] and one block-structured B^T [w, out_site], with alpha/r folded in, so a site costs
one LoRA matmul pair whatever subset of projections an adapter targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.lora.apply import LoraBatch, lora_apply
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
    A: Linear                        # active adapters' A, concatenated along rank
    B: Linear                        # their scaled B, same order
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
        # a[layer][site][slot] -> [w, in] or None; bt likewise -> [w, out]
        self.a = [[[None] * max_slots for _ in SITES] for _ in range(num_layers)]
        self.bt = [[[None] * max_slots for _ in SITES] for _ in range(num_layers)]
        self._plan_key: tuple | None = None
        self._plan: LoraStep | None = None
        self.covers: CoverCache[list] = CoverCache(self._cover_operands)

    def set_lora(self, slot: int, adapter) -> None:
        """Copies an `adapters.Adapter` into `slot`, replacing what was there."""
        self.reset_lora(slot)
        by_site: dict[tuple[int, str], list] = {}
        for key, w in adapter.weights.items():
            _, layer, proj = key.split(".")
            site = next(s for s, lay in self.layouts.items() if proj in lay.projections)
            by_site.setdefault((int(layer), site), []).append((proj, w))
        for (layer, site), items in by_site.items():
            layout = self.layouts[site]
            items.sort(key=lambda item: layout.projections[item[0]][0])
            a = torch.cat([w.A for _, w in items], dim=0)
            bt = torch.zeros(a.shape[0], layout.out_features, dtype=torch.float32)
            rank_start = 0
            for proj, w in items:
                first, rows = layout.projections[proj]
                r = w.A.shape[0]
                bt[rank_start : rank_start + r, first : first + rows] = (w.B * w.scale).T
                rank_start += r
            s = SITES.index(site)
            self.a[layer][s][slot] = a.to(self.device, self.dtype)
            self.bt[layer][s][slot] = bt.to(self.device, self.dtype)
        self._invalidate(slot)

    def reset_lora(self, slot: int) -> None:
        for layer in range(self.num_layers):
            for s in range(len(SITES)):
                self.a[layer][s][slot] = None
                self.bt[layer][s][slot] = None
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
        owners = [slot for slot in slots if self.a[layer][s][slot] is not None]
        if not owners:
            return None
        a = torch.cat([self.a[layer][s][slot] for slot in owners])
        b = torch.cat([self.bt[layer][s][slot] for slot in owners]).T.contiguous()
        columns = tuple((slot, self.a[layer][s][slot].shape[0]) for slot in owners)
        return _SiteOperands(Linear(a, None, self.backend), Linear(b, None, self.backend), columns)

    def _batch(self, op: _SiteOperands, rows: torch.Tensor, masked: bool, masks: dict) -> LoraBatch:
        if not masked:
            return LoraBatch(op.A, op.B, None)
        mask = masks.get(op.columns)
        if mask is None:  # sites with the same column layout (usually every layer) share one mask
            slots = torch.tensor([slot for slot, _ in op.columns], device=self.device)
            widths = torch.tensor([width for _, width in op.columns], device=self.device)
            col_owner = torch.repeat_interleave(slots, widths)
            mask = masks[op.columns] = (rows[:, None] == col_owner[None, :]).to(self.dtype)
        return LoraBatch(op.A, op.B, mask)
