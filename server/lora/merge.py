"""Hot-swap: merge one adapter into the base weights in place, serve, then restore the base exactly.

Exactness guarantee: after any number of `merge_into_base` / `restore_base` cycles, every base weight is
bit-identical (`torch.equal`) to the one loaded at start-up. Subtracting the delta again (what PEFT's
unmerge does) is not exact: (W + d) - d rounds, and tests/integration/test_merge_exactness.py measures
12-16% of bf16 weights drifted after 1-50 such cycles. So `restore_base` never subtracts: it copies the
touched rows back from the read-only, memory-mapped checkpoint with the same conversion used at load
(`copy_checkpoint_tensor`). Only touched rows are copied, and the packed
kernels derived from the untouched base are kept aside during the merge and put back, since they were
computed from the very bits being restored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.model.checkpoint import MappedCheckpoint, copy_checkpoint_tensor
from server.model.linear import Linear
from server.model.llama import Transformer, hf_weight_name, projection_rows


@dataclass
class MergedAdapter:
    adapter: object                                        # the adapters.Adapter merged in
    touched: list[tuple[int, str]] = field(default_factory=list)   # (layer, proj)
    base_kernels: dict[int, tuple[Linear, torch.Tensor]] = field(default_factory=dict)


def merge_into_base(model: Transformer, adapter) -> MergedAdapter:
    """W[rows of proj] += scale * B @ A for every module of the adapter, in place."""
    merged = MergedAdapter(adapter)
    cfg = model.cfg
    for key, w in adapter.weights.items():
        _, layer, proj = key.split(".")
        layer = int(layer)
        site, start, size = projection_rows(cfg, proj)
        linear = model.linear(layer, site)
        rows = linear.weight[start : start + size]
        B, A = w.B.to(model.device, torch.float32), w.A.to(model.device, torch.float32)
        if rows.dtype == torch.float32:  # one fused kernel, no delta-sized temporaries
            rows.addmm_(B, A, alpha=w.scale)
        else:  # sum in float32, round once into the narrow dtype
            rows.copy_((rows.float() + (B @ A) * w.scale).to(rows.dtype))
        merged.touched.append((layer, proj))
        merged.base_kernels.setdefault(id(linear), (linear, linear.kernel))
    for linear, _ in merged.base_kernels.values():
        linear.refresh()
    return merged


def restore_base(model: Transformer, ckpt: MappedCheckpoint, merged: MergedAdapter) -> None:
    cfg = model.cfg
    for layer, proj in merged.touched:
        site, start, size = projection_rows(cfg, proj)
        weight = model.linear(layer, site).weight
        copy_checkpoint_tensor(ckpt, hf_weight_name(layer, proj), weight[start : start + size])
    for linear, kernel in merged.base_kernels.values():
        linear.kernel = kernel
