"""The base model's shape, read from a Hugging Face config.json, for the Llama-style families we run natively.

What each family changes is read here and nowhere else: Qwen2's q/k/v biases, Qwen3's per-head q/k norms,
Mistral's, Qwen's and Phi-3's sliding windows, Phi-3's fused projections. An option this engine does not compute is refused by name at
start-up, never ignored: a model served without it would answer wrongly and without an error.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# families users bring that are not Llama-style decoders in some way this engine computes, and why
UNSUPPORTED_FAMILIES = {
    "gemma": "Gemma (scaled embeddings, (1 + w) norms, GeLU)",
    "gemma2": "Gemma 2 (soft-capping, pre/post norms, alternating local/global attention)",
    "gemma3": "Gemma 3 (q/k norms, pre/post norms, local/global attention with two rope bases)",
    "gemma3_text": "Gemma 3 (q/k norms, pre/post norms, local/global attention with two rope bases)",
    "phi": "Phi-2 (parallel attention and MLP, partial rotary, GeLU)",
    "mixtral": "Mixtral (mixture of experts)",
    "qwen2_moe": "Qwen2-MoE (mixture of experts)",
    "qwen3_moe": "Qwen3-MoE (mixture of experts)",
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


class ModelNotSupported(Exception):
    pass


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q_proj, k_proj and v_proj
    max_position_embeddings: int
    o_bias: bool = False  # a bias on o_proj (Llama's attention_bias sets both)
    qk_norm: bool = False  # an RMS norm over each head of q and of k, before rotation (Qwen3)
    layer_windows: tuple[int | None, ...] = ()  # keys each layer's query sees (itself included); None: all
    fused_in_checkpoint: bool = False  # q/k/v and gate/up stored as qkv_proj and gate_up_proj (Phi-3)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        try:
            return cls._read(hf)
        except KeyError as exc:
            raise ModelNotSupported(f"config.json has no {exc.args[0]!r}") from None

    @classmethod
    def _read(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type", "")
        if model_type in UNSUPPORTED_FAMILIES:
            raise ModelNotSupported(f"model_type {model_type!r}: {UNSUPPORTED_FAMILIES[model_type]} is not supported; "
                                    f"loraplex serves {', '.join(SUPPORTED_MODEL_TYPES)}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelNotSupported(
                f"model_type {model_type!r} is not supported; loraplex serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _refuse_unserved_options(hf)
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ModelNotSupported(f"rope type {rope_type!r} is not supported (default, llama3)")
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelNotSupported("partial_rotary_factor (rotary embedding on part of each head) is not supported")
        heads = hf["num_attention_heads"]
        qkv_bias = {"llama": hf.get("attention_bias", False), "mistral": False, "qwen2": True,
                    "qwen3": hf.get("attention_bias", False), "phi3": False}[model_type]
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=bool(qkv_bias),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            o_bias=bool(qkv_bias) and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
            layer_windows=_layer_windows(model_type, hf),
            fused_in_checkpoint=model_type == "phi3",
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def smallest_window(self) -> int | None:
        windows = [w for w in self.layer_windows if w is not None]
        return min(windows) if windows else None


def _refuse_unserved_options(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelNotSupported(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise ModelNotSupported("mlp_bias is not supported")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ModelNotSupported(f"quantization_config ({method}) is not supported: serve the full-precision "
                                "checkpoint (--quantization int8/int4 quantizes it at load)")
    for option in ("attn_logit_softcapping", "final_logit_softcapping", "logit_scale"):
        if hf.get(option) is not None:
            raise ModelNotSupported(f"{option} is not supported")
    for arch in hf.get("architectures") or []:
        if not arch.endswith("ForCausalLM"):
            raise ModelNotSupported(f"architecture {arch!r} is not supported (causal language models only)")


def _layer_windows(model_type: str, hf: dict) -> tuple[int | None, ...]:
    """As transformers reads them: Mistral's and Phi-3's sliding_window holds for every layer; Qwen's only where
    use_sliding_window is set, for the layers layer_types marks (or, without it, from max_window_layers on)."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if model_type in ("mistral", "phi3"):
        return (window,) * layers if window else ()
    if model_type not in ("qwen2", "qwen3") or not hf.get("use_sliding_window") or not window:
        return ()
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(layers)]
    unknown = set(types) - set(_LAYER_TYPES)
    if unknown:
        raise ModelNotSupported(f"layer_types {sorted(unknown)} are not supported ({', '.join(_LAYER_TYPES)})")
    return tuple(window if t == "sliding_attention" else None for t in types)
