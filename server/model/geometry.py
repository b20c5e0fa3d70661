"""Where each projection of a Llama-family layer lives: its fused site, its rows there, its checkpoint name.

The model computes q/k/v and gate/up as one fused weight each (one matmul for all of them); adapters and
checkpoints name the unfused Hugging Face projections. This module is the one translation between the two,
used by the weight loader, the LoRA slots, merges and the checkpoint checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.model.config import ModelConfig

# Each fused site and the HF projections it stacks along its output rows, in order.
FUSED_SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}
SITES = tuple(FUSED_SITES)


@dataclass(frozen=True)
class SiteLayout:
    in_features: int
    out_features: int
    projections: dict[str, tuple[int, int]]  # proj -> (first output row, rows) inside the fused weight


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each unfused projection of one layer, by its Hugging Face name."""
    return {"q_proj": (cfg.q_size, cfg.hidden_size), "k_proj": (cfg.kv_size, cfg.hidden_size),
            "v_proj": (cfg.kv_size, cfg.hidden_size), "o_proj": (cfg.hidden_size, cfg.q_size),
            "gate_proj": (cfg.intermediate_size, cfg.hidden_size), "up_proj": (cfg.intermediate_size, cfg.hidden_size),
            "down_proj": (cfg.hidden_size, cfg.intermediate_size)}


def biased_sites(cfg: ModelConfig) -> tuple[str, ...]:
    """The fused sites whose projections carry a bias."""
    return ("qkv",) * cfg.attention_bias + ("o",) * cfg.o_bias


def projection_rows(cfg: ModelConfig, proj: str) -> tuple[str, int, int]:
    """Site of an HF projection and the rows [start, start+size) it occupies in that site's fused weight."""
    sizes = {p: out for p, (out, _) in projection_shapes(cfg).items()}
    for site, projs in FUSED_SITES.items():
        if proj in projs:
            start = sum(sizes[p] for p in projs[: projs.index(proj)])
            return site, start, sizes[proj]
    raise KeyError(proj)


def site_layouts(cfg: ModelConfig) -> dict[str, SiteLayout]:
    """Each fused site's input width, output rows and where each of its projections sits in them."""
    layouts = {}
    for site, projs in FUSED_SITES.items():
        rows = {p: projection_rows(cfg, p)[1:] for p in projs}
        out = sum(size for _, size in rows.values())
        in_features = cfg.intermediate_size if site == "down" else cfg.q_size if site == "o" else cfg.hidden_size
        layouts[site] = SiteLayout(in_features, out, rows)
    return layouts


def hf_weight_name(layer: int, proj: str) -> str:
    group = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{group}.{proj}.weight"


def module_key(layer: int, proj: str) -> str:
    """An adapter's name for one projection: "layers.{layer}.{proj}"."""
    return f"layers.{layer}.{proj}"


def parse_module_key(key: str) -> tuple[int, str]:
    """(layer, proj) of a key named as `module_key` names it."""
    _, layer, proj = key.split(".")
    return int(layer), proj
