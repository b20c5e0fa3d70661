"""The mixed-batch LoRA math: y += scale * B(A x) for each row's own adapter, in one place.

`lora_apply` is the fast form the model calls; `lora_apply_reference` is the readable per-row definition
that tests hold it to. Both compute B(Ax), never (BA)x.

Fast form (grouped, like Punica's and vLLM's BGMV/SGMV kernels, here from batched matmuls): a cover's
adapters are stacked along a batch axis, each row is gathered to its adapter's position (padded to the
largest group), and one `torch.bmm` per site gives every row its own A x, one more per projection its own
B (A x), added back to the row with an accumulating `index_put_`. The op count per site does not grow
with the number of adapters, and each row is multiplied only through its own adapter (a masked matmul over
every active adapter's A multiplies every row through every adapter: docs/decisions.md). Each projection
keeps its own B, so no zeros sit in a fused site's B (2/3 of it for an adapter on q, k and v).

On CPU in fp32 a step skips all of that: `SlotGroups` hands each site's rows, grouped by adapter, to one
native call (`server.kernels.lora`) that reads each adapter's weights where its device slot keeps them,
once, front to back, and adds into y's rows directly, and no weights are stacked (the bmm form stays the
reference it is tested against, and the path for CUDA, bf16 and machines without the kernel; `make bench`'s
decode-step table times both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.kernels.lora import SlotGroupsKernel


@dataclass(frozen=True)
class SiteStack:
    """One cover's weights for one site, stacked by cover position."""

    A: torch.Tensor       # [n, in, w]: each position's A^T for the site's projections, zero-padded to w
    expands: tuple[tuple[torch.Tensor, slice, slice], ...]  # per projection: (B^T [n, w_p, rows] with alpha/r
    #                       folded in, its columns of w, its output rows in the fused site)
    _slices: dict = field(default_factory=dict, compare=False, repr=False)

    def sliced(self, positions: slice) -> tuple[torch.Tensor, tuple]:
        """A and expands for a range of positions, made once per range: a plan is rebuilt whenever a request
        joins or leaves, and remaking these for every layer and site was most of a rebuild."""
        key = (positions.start, positions.stop)
        if key not in self._slices:
            if len(self._slices) >= 64:  # views only, but a big cover has many ranges
                self._slices.clear()
            self._slices[key] = (self.A[positions],
                                 tuple((Bt[positions], columns, out_rows) for Bt, columns, out_rows in self.expands))
        return self._slices[key]


@dataclass(frozen=True)
class LoraBatch:
    """The rows one contiguous range of a cover's positions serves at one site in one step."""

    A: torch.Tensor                # [n, in, w]: a slice of the stack's A (a view: no weight is copied)
    expands: tuple[tuple[torch.Tensor, slice, slice], ...]  # the stack's expands, B^T sliced alike
    rows: torch.Tensor | None      # [n * P]: the row each (position, slot in its group) reads and adds to;
    #                                None = one position serving every row in order
    pad: torch.Tensor | None       # [n, P, 1]: 0 where a group is padded to P (those entries read row 0)

    @classmethod
    def of(cls, stack: SiteStack, positions: slice, rows: torch.Tensor | None, pad: torch.Tensor | None):
        return cls(*stack.sliced(positions), rows, pad)

    def apply(self, y: torch.Tensor, x: torch.Tensor) -> None:
        lora_apply(y, x, self)


@dataclass(frozen=True)
class SlotRows:
    """A step's rows grouped by device slot, shared by every layer and site of the step."""

    groups: int
    offsets: torch.Tensor          # [groups + 1] int64: group g is entries offsets[g] .. offsets[g + 1]
    rows: torch.Tensor | None      # int64, the row of each entry; None = entry e is row e


@dataclass(frozen=True)
class SlotGroups:
    """One site of one layer in a step served by the native kernel straight from the slots' weights."""

    kernel: SlotGroupsKernel
    step: SlotRows
    table: torch.Tensor            # [groups, 2 + 3 * projections] int64: each group's weight addresses (see
    #                                lora_grouped.c); the tensors they point into live in the slots
    out0: torch.Tensor             # [projections] int64: each projection's first output column in the site
    out_n: torch.Tensor            # [projections] int64: its output columns

    def apply(self, y: torch.Tensor, x: torch.Tensor) -> None:
        step = self.step
        if not self.kernel(y, x, step.groups, step.offsets, step.rows, self.table, self.out0, self.out_n):
            raise RuntimeError("the native LoRA kernel refused a step the plan gave it")


@dataclass(frozen=True)
class SlotTable:
    """A step's native operands for every layer and site at once, as the native decoder layers
    (`server.kernels.decoder`) take them: the same tables its `SlotGroups` hold slices of."""

    step: SlotRows
    table: torch.Tensor            # [layers, sites, groups, 2 + 3 * projections] int64
    out0: torch.Tensor             # [sites, projections] int64
    out_n: torch.Tensor            # [sites, projections] int64


def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    if batch.rows is None:
        xa = torch.matmul(x, batch.A[0])
        for Bt, columns, out_rows in batch.expands:
            y[:, out_rows].add_(torch.matmul(xa[:, columns], Bt[0]))
        return
    xa = torch.bmm(x.index_select(0, batch.rows).view(batch.A.shape[0], -1, x.shape[1]), batch.A)
    if batch.pad is not None:  # padded entries read row 0: zero them before they add back into it
        xa.mul_(batch.pad)
    for Bt, columns, out_rows in batch.expands:
        part = torch.bmm(xa[:, :, columns], Bt)
        # index_put_ with accumulate, not index_add_: the faster on CPU into a column slice (docs/decisions.md)
        y[:, out_rows].index_put_((batch.rows,), part.view(-1, part.shape[2]), accumulate=True)


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, A_slots: list[torch.Tensor | None],
                         B_slots: list[torch.Tensor | None], scales: list[float], row_to_slot: list[int]) -> None:
    """A_slots[s]: [r_s, in]; B_slots[s]: [out, r_s]; row_to_slot[i] = -1 for the bare base."""
    for row, slot in enumerate(row_to_slot):
        if slot < 0 or A_slots[slot] is None:
            continue
        y[row] += scales[slot] * (B_slots[slot] @ (A_slots[slot] @ x[row]))
