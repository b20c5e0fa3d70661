"""What a config.json asks of the engine is read or refused by name, never ignored; a checkpoint that does
not fit its config is refused naming the tensor."""

import pytest
from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, MixtralConfig,
                          PhiConfig, Qwen2Config)

from server.model.checkpoint_layout import CheckpointMismatch, check_checkpoint, expected_tensors
from server.model.config import ModelConfig, ModelNotSupported

SHAPE = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


def hf(config) -> dict:
    return config.to_dict()


@pytest.mark.parametrize("config, named", [(GemmaConfig(**SHAPE), "Gemma \\(1\\)"), (PhiConfig(**SHAPE), "Phi-2"),
                                           (MixtralConfig(**SHAPE), "Mixtral")])
def test_an_unsupported_family_is_refused_by_name(config, named):
    with pytest.raises(ModelNotSupported, match=named):
        ModelConfig.from_hf(hf(config))


@pytest.mark.parametrize("change, named", [
    ({"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'proportional'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config \\(awq\\)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
])
def test_an_option_not_computed_is_refused_by_name(change, named):
    with pytest.raises(ModelNotSupported, match=named):
        ModelConfig.from_hf(hf(LlamaConfig(**SHAPE)) | change)


def test_sliding_windows_are_read_per_layer_as_transformers_reads_them():
    assert ModelConfig.from_hf(hf(MistralConfig(**SHAPE, sliding_window=8))).layer_windows == (8, 8, 8)
    assert ModelConfig.from_hf(hf(MistralConfig(**SHAPE, sliding_window=None))).window(0) is None
    qwen = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert ModelConfig.from_hf(hf(qwen)).layer_windows == (None, 8, 8)
    # Qwen2 checkpoints ship a sliding_window that use_sliding_window leaves off
    off = hf(Qwen2Config(**SHAPE, use_sliding_window=False)) | {"sliding_window": 4096}
    assert ModelConfig.from_hf(off).smallest_window is None


def test_gemma_layers_alternate_local_and_global_as_transformers_reads_them():
    gemma2 = ModelConfig.from_hf(hf(Gemma2Config(**SHAPE, sliding_window=8)))
    assert gemma2.layer_windows == (8, None, 8)  # every second layer global
    assert (gemma2.attn_softcap, gemma2.final_softcap, gemma2.local_rope_layers) == (50.0, 30.0, ())
    pattern = hf(Gemma3TextConfig(**SHAPE, sliding_window=8, sliding_window_pattern=3))
    gemma3 = ModelConfig.from_hf(pattern)
    assert gemma3.layer_windows == (8, 8, None) and gemma3.local_rope_layers == (0, 1)
    assert (gemma3.attn_softcap, gemma3.final_softcap, gemma3.qk_norm) == (None, None, True)
    # a file written before layer_types carries only the pattern
    old = {k: v for k, v in pattern.items() if k != "layer_types"}
    assert ModelConfig.from_hf(old).layer_windows == (8, 8, None)


def test_gemma3_reads_both_rope_bases_from_either_form_of_config():
    new = ModelConfig.from_hf(hf(Gemma3TextConfig(**SHAPE, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})))
    old = ModelConfig.from_hf({k: v for k, v in hf(Gemma3TextConfig(**SHAPE)).items() if k != "rope_parameters"} |
                              {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    for cfg in (new, old):
        assert (cfg.rope_theta, cfg.rope_scaling["factor"], cfg.local_rope_theta) == (1_000_000.0, 8.0, 10_000.0)


def test_gemma_keys_a_config_leaves_out_take_transformers_defaults():
    written = hf(Gemma2Config(**SHAPE))
    bare = {k: v for k, v in written.items()
            if k not in ("hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                         "final_logit_softcapping", "tie_word_embeddings")} | {"hidden_act": "gelu_pytorch_tanh"}
    assert ModelConfig.from_hf(bare) == ModelConfig.from_hf(written)


@pytest.mark.parametrize("change, named", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'proportional'"),
])
def test_a_gemma_option_not_computed_is_refused_by_name(change, named):
    with pytest.raises(ModelNotSupported, match=named):
        ModelConfig.from_hf(hf(Gemma2Config(**SHAPE)) | change)


def test_biases_follow_the_family():
    llama = ModelConfig.from_hf(hf(LlamaConfig(**SHAPE, attention_bias=True)))
    qwen2 = ModelConfig.from_hf(hf(Qwen2Config(**SHAPE)))
    assert (llama.attention_bias, llama.o_bias) == (True, True)
    assert (qwen2.attention_bias, qwen2.o_bias) == (True, False)


def test_a_checkpoint_with_a_tensor_the_config_does_not_use_is_refused():
    cfg = ModelConfig.from_hf(hf(LlamaConfig(**SHAPE)))
    shapes = expected_tensors(cfg)
    check_checkpoint(cfg, shapes, "model")
    extra = shapes | {"model.layers.0.self_attn.o_proj.bias": (64,)}
    with pytest.raises(CheckpointMismatch, match="o_proj.bias"):
        check_checkpoint(cfg, extra, "model")


def test_a_checkpoint_missing_or_misshapen_tensor_is_refused():
    cfg = ModelConfig.from_hf(hf(LlamaConfig(**SHAPE, tie_word_embeddings=False)))
    shapes = expected_tensors(cfg)
    with pytest.raises(CheckpointMismatch, match="lm_head.weight"):
        check_checkpoint(cfg, {k: v for k, v in shapes.items() if k != "lm_head.weight"}, "model")
    with pytest.raises(CheckpointMismatch, match="model.norm.weight is \\[32\\]"):
        check_checkpoint(cfg, shapes | {"model.norm.weight": (32,)}, "model")
