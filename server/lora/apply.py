"""The mixed-batch LoRA math: y += scale * B(A x) for each row's own adapter, in one place.

`lora_apply` is the fast form the model calls; `lora_apply_reference` is the readable per-row definition
that tests hold it to. Both compute B(Ax), never (BA)x.

Fast form: the active adapters' A matrices are concatenated along the rank axis, so one matmul gives every
row its product with every active A ([rows, W], W = sum of active ranks, small). A 0/1 mask keeps each
row's own columns, and one more matmul per projection of the site, with that projection's concatenated,
pre-scaled B, adds the branch to its output rows. The op count per site does not grow with the number of
adapters: on CPU the per-op overhead of one matmul pair per adapter (the segmented form) cost more than the
extra multiply-adds over W. One expand per projection, rather than one block-structured B for the whole
fused site, keeps zeros out of B: for an adapter on q, k and v, 2/3 of a site-wide B is zeros that every step
would read (8 all-projection r16 adapters: 233 MB per step instead of 156 MB). All matmuls go through the
base model's `Linear`, so on CPU they use the same prepacked oneDNN kernels as the base weights (about 2x
cheaper than plain matmuls for these shapes) and CUDA uses its own path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.linear import Linear


@dataclass(frozen=True)
class Expand:
    """One projection's B for the adapters of a batch that target it."""

    B: Linear                       # weight [rows, W_p]: those adapters' B scaled by alpha/r, in column order
    columns: slice                  # its W_p columns of A x
    rows: slice                     # its output rows inside the fused site


@dataclass
class LoraBatch:
    """One site's LoRA operands for one step's rows."""

    A: Linear                       # weight [W, in]: active adapters' A, concatenated along rank
    expands: tuple[Expand, ...]     # one per targeted projection; their columns partition W
    mask: torch.Tensor | None       # [rows, W]: 1 where the column belongs to the row's adapter; None = all rows


def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    xa = batch.A(x)
    if batch.mask is not None:
        xa.mul_(batch.mask)
    if len(batch.expands) == 1 and batch.expands[0].rows == slice(0, y.shape[1]):
        y.add_(batch.expands[0].B(xa))
        return
    for expand in batch.expands:
        y[:, expand.rows].add_(expand.B(xa[:, expand.columns].contiguous()))


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, A_slots: list[torch.Tensor | None],
                         B_slots: list[torch.Tensor | None], scales: list[float], row_to_slot: list[int]) -> None:
    """A_slots[s]: [r_s, in]; B_slots[s]: [out, r_s]; row_to_slot[i] = -1 for the bare base."""
    for row, slot in enumerate(row_to_slot):
        if slot < 0 or A_slots[slot] is None:
            continue
        y[row] += scales[slot] * (B_slots[slot] @ (A_slots[slot] @ x[row]))
