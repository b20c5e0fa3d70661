"""The tensors a config's checkpoint must hold, by name and shape, checked before anything is built.

A tensor the config does not account for is refused as loudly as a missing one: it is how a family option
this engine does not read shows itself (a bias, a norm), and serving without it would answer wrongly.
"""

from __future__ import annotations

from server.model.config import ModelConfig
from server.model.geometry import FUSED_SITES, biased_sites, hf_weight_name, projection_shapes


class CheckpointMismatch(Exception):
    pass


# fused projections some families store (Phi-3), and the unfused ones they hold, in row order
FUSED_IN_CHECKPOINT = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class UnfusedCheckpoint:
    """A checkpoint whose fused projections read as the unfused ones they hold: row slices of the same
    read-only tensor, so loading, merging and exact restore see the names every other family has."""

    def __init__(self, ckpt, cfg: ModelConfig):
        rows = {proj: out for proj, (out, _) in projection_shapes(cfg).items()}
        self._tensors = {}
        for name in ckpt.keys():
            fused = next((f for f in FUSED_IN_CHECKPOINT if name.endswith(f".{f}.weight")), None)
            if fused is None:
                self._tensors[name] = ckpt[name]
                continue
            start = 0
            for proj in FUSED_IN_CHECKPOINT[fused]:
                self._tensors[name.replace(fused, proj)] = ckpt[name][start : start + rows[proj]]
                start += rows[proj]
            if start != ckpt[name].shape[0]:
                raise CheckpointMismatch(f"{name} has {ckpt[name].shape[0]} rows; config.json says {start}")

    def __getitem__(self, name: str):
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self):
        return self._tensors.keys()


def layer_norms(cfg: ModelConfig) -> tuple[str, ...]:
    """The checkpoint's names of a layer's norms over the hidden state."""
    sandwich = ("pre_feedforward_layernorm", "post_feedforward_layernorm") if cfg.sandwich_norms else ()
    return ("input_layernorm", "post_attention_layernorm") + sandwich


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    biased = [p for site in biased_sites(cfg) for p in FUSED_SITES[site]]
    for i in range(cfg.num_layers):
        for proj, shape in projection_shapes(cfg).items():
            shapes[hf_weight_name(i, proj)] = shape
            if proj in biased:
                shapes[hf_weight_name(i, proj).replace(".weight", ".bias")] = shape[:1]
        for norm in layer_norms(cfg):
            shapes[f"model.layers.{i}.{norm}.weight"] = (cfg.hidden_size,)
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                shapes[f"model.layers.{i}.self_attn.{norm}.weight"] = (cfg.head_dim,)
    return shapes


def check_checkpoint(cfg: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """`found`: the checkpoint's tensor shapes by name. Raises CheckpointMismatch naming the first tensor
    that is missing, of another shape, or not accounted for by the config."""
    expected = expected_tensors(cfg)
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointMismatch(f"{where}: config.json ({cfg.model_type}) needs {missing[0]}, which the "
                                 f"checkpoint lacks ({len(missing)} missing)")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise CheckpointMismatch(f"{where}: {name} is {list(found[name])} in the checkpoint; config.json says "
                                     f"{list(shape)}")
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # transformers ties over it as well
    unused = sorted(n for n in found
                    if n not in expected and n not in ignored and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise CheckpointMismatch(f"{where}: the checkpoint holds {unused[0]}, which config.json ({cfg.model_type}) "
                                 f"does not account for ({len(unused)} such tensors): a family option loraplex "
                                 "does not compute")
