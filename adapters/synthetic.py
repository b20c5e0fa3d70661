"""Made-up adapters and base shapes for tests, benchmarks and demos; no files, no model needed."""

from collections.abc import Sequence

import torch

from adapters.errors import AdapterInvalid
from adapters.format import PROJECTIONS, Adapter, BaseShapes, LoraWeights, module_key, validate_name


def llama_base_shapes(num_layers: int, hidden: int, intermediate: int, kv_dim: int) -> BaseShapes:
    """(out_features, in_features) of every LoRA-able Linear in a Llama-style decoder."""
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    return {module_key(i, p): shapes[p] for i in range(num_layers) for p in PROJECTIONS}


def random_adapter(name: str, base: BaseShapes, rank: int = 8, alpha: float = 16.0,
                   targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0, b_zero: bool = False,
                   init_std: float = 0.02, dtype: torch.dtype = torch.float32) -> Adapter:
    """Every targeted module of `base` gets A with std 1/r (PEFT's "gaussian" init) and B with std init_std.

    b_zero=True gives the step-0 LoRA state (B = 0), whose output must equal the base model's; the same
    seed gives the same A either way, so the two can be compared. `dtype`: held as if stored in it.
    """
    validate_name(name)
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise AdapterInvalid(f"unknown target modules {sorted(unknown)}; known: {PROJECTIONS}")
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, (out_features, in_features) in base.items():
        if key.split(".")[2] not in targets:
            continue
        A = torch.randn(rank, in_features, generator=generator) / rank
        B = torch.randn(out_features, rank, generator=generator) * init_std
        if b_zero:
            B.zero_()
        weights[key] = LoraWeights(A.to(dtype), B.to(dtype), alpha / rank)
    if not weights:
        raise AdapterInvalid(f"the base has no modules named {list(targets)}")
    return Adapter(
        name=name,
        rank=rank,
        alpha=float(alpha),
        weights=weights,
        target_modules=tuple(sorted({k.split(".")[2] for k in weights})),
        size_bytes=sum(t.numel() * t.element_size() for w in weights.values() for t in (w.A, w.B)),
    )
