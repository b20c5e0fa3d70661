"""The mixed-batch LoRA math: y += scale * B(A x) for each row's own adapter, in one place.

`lora_apply` is the fast form the model calls; `lora_apply_reference` is the readable per-row definition
that tests hold it to. Both compute B(Ax), never (BA)x.

Fast form: the active adapters' A matrices are concatenated along the rank axis, so one matmul gives every
row its product with every active A ([rows, W], W = sum of active ranks, small). A 0/1 mask keeps each
row's own columns, and one more matmul with the concatenated, pre-scaled B adds the branch. Three ops per
site regardless of how many adapters share the step: on CPU the per-op overhead of one matmul pair per
adapter (the segmented form) cost more than the extra multiply-adds over W. Both matmuls go through the
base model's `Linear`, so on CPU they use the same prepacked oneDNN kernels as the base weights (about 2x
cheaper than plain matmuls for these shapes) and CUDA uses its own path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.model.linear import Linear


@dataclass
class LoraBatch:
    """One site's LoRA operands for one step's rows."""

    A: Linear                       # weight [W, in]: active adapters' A, concatenated along rank
    B: Linear                       # weight [out, W]: their B scaled by alpha/r, same order
    mask: torch.Tensor | None       # [rows, W]: 1 where the column belongs to the row's adapter; None = all rows


def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    xa = batch.A(x)
    if batch.mask is not None:
        xa.mul_(batch.mask)
    y.add_(batch.B(xa))


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, A_slots: list[torch.Tensor | None],
                         B_slots: list[torch.Tensor | None], scales: list[float], row_to_slot: list[int]) -> None:
    """A_slots[s]: [r_s, in]; B_slots[s]: [out, r_s]; row_to_slot[i] = -1 for the bare base."""
    for row, slot in enumerate(row_to_slot):
        if slot < 0 or A_slots[slot] is None:
            continue
        y[row] += scales[slot] * (B_slots[slot] @ (A_slots[slot] @ x[row]))
