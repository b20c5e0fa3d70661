"""Adapter weights resident on the compute device, per layer and site, and the per-step LoRA plan.

Like vLLM's LoRA layers, each device slot holds one adapter (`set_lora` / `reset_lora`). A site is one
fused base projection (qkv, o, gate_up, down); a slot holds, per site, A^T of its projections there side by
side [in, w] and each projection's B^T [r, rows] with alpha/r folded in. Where the backend has the grouped
kernel (CPU, fp32) a step's plan groups the rows by slot and the kernel reads each slot's weights in place
(`SlotGroups`); elsewhere a cover stacks its slots' weights per site along a batch axis for batched matmuls
(see server.lora.apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch

from server.kernels.lora import MAX_RANK_COLUMNS
from server.lora.apply import LoraBatch, SiteStack, SlotGroups, SlotRows, SlotTable
from server.lora.covers import CoverCache
from server.model.backend import Backend
from server.model.geometry import SITES, SiteLayout, parse_module_key

BASE = -1  # row_slots value of a row served by the bare base model

@dataclass(frozen=True)
class _SiteOperands:
    stack: SiteStack
    owners: frozenset[int]           # the cover positions whose adapter targets the site


class LoraStep:
    """Per-step plan: batches[layer][site_index] holds one LoraBatch (or SlotGroups) per cover serving the
    step (see server.lora.covers; empty where no active adapter touches the site). `native` is the whole
    plan as one SlotTable where the native kernel serves the step, else None."""

    def __init__(self, batches: list[list[tuple[LoraBatch | SlotGroups, ...]]], native: SlotTable | None = None):
        self.batches = batches
        self.native = native

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, site: str) -> None:
        """y += each row's adapter's B(A x) at one site of one layer (server.model.context.LoraPlan)."""
        for batch in self.batches[layer][SITES.index(site)]:
            batch.apply(y, x)


class LoraSlots:
    def __init__(self, num_layers: int, layouts: dict[str, SiteLayout], max_slots: int, backend: Backend):
        """Slots in the backend's device and dtype, planned for its grouped LoRA kernel where it has one."""
        self.layouts = layouts
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.device = backend.device
        self.dtype = backend.dtype
        # lora[layer][site][slot] -> {proj: (A [r, in], B [rows, r] scaled)} (views of the slot's tensors) or None
        self.lora = [[[None] * max_slots for _ in SITES] for _ in range(num_layers)]
        self._plan_key: tuple | None = None
        self._plan: LoraStep | None = None
        self.covers: CoverCache[list] = CoverCache(self._cover_operands)
        self._kernel = backend.lora
        # per site, its projections in output order; the native table's rows (see lora_grouped.c)
        self._projections = [sorted(layouts[site].projections, key=lambda p: layouts[site].projections[p][0])
                             for site in SITES]
        self._width = max(map(len, self._projections))
        self._entry = 2 + 3 * self._width
        # [sites, projections]: each projection's first output column in its fused site, and its columns
        self._out0 = torch.tensor([self._padded([layouts[site].projections[p][0] for p in projs])
                                   for site, projs in zip(SITES, self._projections)])
        self._out_n = torch.tensor([self._padded([layouts[site].projections[p][1] for p in projs])
                                    for site, projs in zip(SITES, self._projections)])
        self._table = torch.zeros(max_slots, num_layers, len(SITES), self._entry, dtype=torch.int64)
        self._wide: set[int] = set()  # slots with more rank columns at a site than the kernel takes

    def _padded(self, values: list[int]) -> list[int]:
        return values + [0] * (self._width - len(values))

    def set_lora(self, slot: int, adapter) -> None:
        """Copies an `adapters.Adapter` into `slot`, replacing what was there."""
        self.reset_lora(slot)
        by_site: dict[tuple[int, int], dict] = {}
        for key, w in adapter.weights.items():
            layer, proj = parse_module_key(key)
            s = next(i for i, site in enumerate(SITES) if proj in self.layouts[site].projections)
            by_site.setdefault((layer, s), {})[proj] = w
        table = [[[0] * self._entry for _ in SITES] for _ in range(self.num_layers)]
        for (layer, s), weights in by_site.items():
            order = [p for p in self._projections[s] if p in weights]
            At = torch.cat([weights[p].A.T for p in order], dim=1).to(self.device, self.dtype).contiguous()
            entry = table[layer][s]
            entry[0], entry[1] = At.data_ptr(), At.shape[1]
            held, column = {}, 0
            for proj in order:
                w = weights[proj]
                rank = w.A.shape[0]
                Bt = (w.B * w.scale).T.to(self.device, self.dtype).contiguous()
                held[proj] = (At[:, column : column + rank].T, Bt.T)
                i = self._projections[s].index(proj)
                entry[2 + i], entry[2 + self._width + i], entry[2 + 2 * self._width + i] = Bt.data_ptr(), column, rank
                column += rank
            self.lora[layer][s][slot] = held
            if At.shape[1] > MAX_RANK_COLUMNS:
                self._wide.add(slot)
        self._table[slot] = torch.tensor(table, dtype=torch.int64)
        self._invalidate(slot)

    def reset_lora(self, slot: int) -> None:
        for layer in range(self.num_layers):
            for s in range(len(SITES)):
                self.lora[layer][s][slot] = None
        self._table[slot] = 0
        self._wide.discard(slot)
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
        if self._kernel is not None and not self._wide & groups.keys():
            return self._build_native(groups, len(row_slots))
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

    def _build_native(self, groups: dict[int, list[int]], rows: int) -> LoraStep:
        """Rows grouped by slot, and per layer and site the slots' weight addresses: nothing is copied but
        addresses, so a request joining or leaving costs a few small tensors."""
        order = sorted(groups)
        entries = [row for slot in order for row in groups[slot]]
        step = SlotRows(len(order), torch.tensor([0, *accumulate(len(groups[slot]) for slot in order)]),
                        None if entries == list(range(rows)) else torch.tensor(entries))
        table = self._table[order].permute(1, 2, 0, 3).contiguous()  # [layer, site, group, entry]
        busy = (table[:, :, :, 1] > 0).any(dim=2).tolist()
        return LoraStep([[(SlotGroups(self._kernel, step, table[layer, s], self._out0[s], self._out_n[s]),)
                          if busy[layer][s] else () for s in range(len(SITES))] for layer in range(self.num_layers)],
                        SlotTable(step, table, self._out0, self._out_n))

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
