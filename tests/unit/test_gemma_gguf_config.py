"""A Gemma GGUF's converted config is filled as llama.cpp reads the file, where transformers' conversion keeps
its config class's defaults: the 27B models' query scale, Gemma 3's rope scaling, and a Gemma 3 file without
a sliding window (every layer global). The tiny files of tests/integration/test_gguf_models.py cover the rest."""

from server.model.config import ModelConfig
from server.model.loader import gemma_config_from_gguf

LOCAL_ROPE = {"rope_type": "default", "rope_theta": 10_000.0}


def converted_gemma3(layers: int, hidden: int, heads: int, head_dim: int) -> dict:
    """A gemma3 file's config as transformers' conversion writes it (only what the fill reads or changes)."""
    return {"model_type": "gemma3_text", "vocab_size": 256, "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads // 2,
            "head_dim": head_dim, "query_pre_attn_scalar": 256, "sliding_window": 1024,
            "rope_parameters": {"sliding_attention": dict(LOCAL_ROPE),
                                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}}


def test_gemma3_27b_scales_queries_by_hidden_over_heads_and_its_global_layers_rope_is_scaled():
    values = {"gemma3.attention.sliding_window": 1024, "gemma3.rope.scaling.type": "linear",
              "gemma3.rope.scaling.factor": 8.0}
    filled = gemma_config_from_gguf(values, converted_gemma3(62, 5376, 32, 128))
    assert filled["query_pre_attn_scalar"] == 168
    assert filled["rope_parameters"] == {"sliding_attention": LOCAL_ROPE, "full_attention": {
        "rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}}
    cfg = ModelConfig.from_hf(filled)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
    assert cfg.local_rope_theta == 10_000.0 and cfg.window(0) == 1024 and cfg.window(5) is None


def test_gemma3_below_27b_scales_queries_by_head_dim_and_a_file_without_a_window_has_no_local_layers():
    filled = gemma_config_from_gguf({}, converted_gemma3(26, 1152, 4, 256))
    assert filled["query_pre_attn_scalar"] == 256
    cfg = ModelConfig.from_hf(filled)
    assert cfg.layer_windows == (None,) * 26 and cfg.local_rope_layers == ()


def test_gemma2_reads_both_soft_caps_from_the_file_and_27b_scales_queries_by_hidden_over_heads():
    converted = {"model_type": "gemma2", "num_hidden_layers": 46, "hidden_size": 4608, "num_attention_heads": 32,
                 "head_dim": 128, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                 "final_logit_softcapping": 30.0, "rope_parameters": dict(LOCAL_ROPE)}
    values = {"gemma2.attn_logit_softcapping": 40.0, "gemma2.final_logit_softcapping": 20.0}
    filled = gemma_config_from_gguf(values, converted)
    assert (filled["query_pre_attn_scalar"], filled["attn_logit_softcapping"], filled["final_logit_softcapping"]) \
        == (144, 40.0, 20.0)
    assert converted["query_pre_attn_scalar"] == 256  # the converted config itself is left as it was
