"""bench.simulated's model builder, on a tiny Llama shape: drawn layer by layer into int4, served natively."""

import torch

from bench.simulated import RandomCheckpoint
from server.engine.kv_cache import KVCache
from server.model.backend import resolve_backend
from server.model.config import ModelConfig
from server.model.context import build_step
from server.model.weights import build_transformer, weight_format

TINY = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
                            "vocab_size": 96, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
                            "rope_theta": 10000.0, "max_position_embeddings": 64})


def test_a_random_checkpoint_draws_the_same_tensor_for_a_name_every_time():
    checkpoint = RandomCheckpoint(TINY)
    name = "model.layers.1.mlp.down_proj.weight"
    assert checkpoint[name].shape == (64, 128) and torch.equal(checkpoint[name], checkpoint[name])
    assert "lm_head.weight" in checkpoint and torch.equal(checkpoint["model.norm.weight"], torch.ones(64))


def test_a_simulated_model_built_into_int4_decodes():
    cpu = torch.device("cpu")
    checkpoint = RandomCheckpoint(TINY)
    backend = resolve_backend(cpu, torch.float32, "torch", "int4")
    model = build_transformer(TINY, checkpoint, backend, weight_format("int4", checkpoint, backend))
    kv = KVCache(TINY, 2, 16, cpu, torch.float32)
    kv.used = 2
    logits = model.forward(torch.tensor([3, 5]), build_step([4, 4], [], cpu), kv)
    assert logits.shape == (2, 96) and bool(torch.isfinite(logits).all())
    assert {linear.backend for layer in model.layers for linear in layer.linears.values()} == {"int4"}
    assert model.lm_head.backend == "int8"
