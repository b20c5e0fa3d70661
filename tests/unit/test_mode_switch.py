"""Merged-mode switching (server.lora.mode_switch) on a tiny model: auto merges an adapter the running
requests have wanted for SETTLE_STEPS steps in a row, a change of running set restores the base bit for bit,
and unmerged never merges."""

import torch

from adapters import llama_base_shapes, random_adapter
from bench.simulated import RandomCheckpoint
from server.lora.mode_switch import ModeSwitch
from server.lora.policy import SETTLE_STEPS
from server.model.backend import torch_backend
from server.model.config import ModelConfig
from server.model.weights import build_transformer, weight_format

TINY = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                            "vocab_size": 96, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                            "rope_theta": 10000.0, "max_position_embeddings": 64})
SHAPES = llama_base_shapes(TINY.num_layers, TINY.hidden_size, TINY.intermediate_size, TINY.kv_size)


def tiny_model():
    checkpoint = RandomCheckpoint(TINY)
    backend = torch_backend()
    return build_transformer(TINY, checkpoint, backend, weight_format("none", checkpoint, backend)), checkpoint


def weights(model) -> list[torch.Tensor]:
    return [linear.effective_weight().clone() for layer in model.layers for linear in layer.linears.values()]


def test_auto_merges_a_settled_adapter_and_restores_the_exact_base_when_the_set_changes():
    model, checkpoint = tiny_model()
    adapter = random_adapter("a", SHAPES, rank=4, seed=1, init_std=0.1)
    switch = ModeSwitch(model, checkpoint, "auto")
    base = weights(model)
    for _ in range(SETTLE_STEPS):
        assert switch.update([adapter, adapter]) is None and switch.merged is None
    merged = switch.update([adapter, adapter])
    assert merged.merged and not merged.restored and switch.merged is adapter
    assert any(not torch.equal(now, before) for now, before in zip(weights(model), base))
    restored = switch.update([adapter, None])  # a base-only request joins
    assert restored.restored and not restored.merged and switch.merged is None
    assert all(torch.equal(now, before) for now, before in zip(weights(model), base))


def test_unmerged_never_merges():
    model, checkpoint = tiny_model()
    adapter = random_adapter("a", SHAPES, rank=4, seed=1, init_std=0.1)
    switch = ModeSwitch(model, checkpoint, "unmerged")
    for _ in range(3 * SETTLE_STEPS):
        assert switch.update([adapter]) is None
    assert switch.merged is None
