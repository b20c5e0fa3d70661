"""The base model's shape, read from a Hugging Face config.json, for the decoder families we run natively.

What each family changes is read here and nowhere else: Qwen2's q/k/v biases, Qwen3's per-head q/k norms,
Mistral's, Qwen's and Phi-3's sliding windows, Phi-3's fused projections; Gemma 2's and Gemma 3's (1 + w) norms,
pre/post norms, scaled embeddings, soft-capping, query scale, GeLU and local/global layers (Gemma 3's with
their own rope base). An option this engine does not compute is refused by name at start-up, never ignored:
a model served without it would answer wrongly and without an error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
# families users bring that are not decoders in some way this engine computes (or not checked here), and why
UNSUPPORTED_FAMILIES = {
    "gemma": "Gemma (1) (not checked against transformers here; Gemma 2 and Gemma 3 text are served)",
    "gemma3": "Gemma 3 multimodal (Gemma3ForConditionalGeneration; the text-only gemma3_text is served)",
    "phi": "Phi-2 (parallel attention and MLP, partial rotary, GeLU)",
    "mixtral": "Mixtral (mixture of experts)",
    "qwen2_moe": "Qwen2-MoE (mixture of experts)",
    "qwen3_moe": "Qwen3-MoE (mixture of experts)",
}
_LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # of the gate, in act(gate) * up
ROPE_TYPES = ("default", "llama3", "linear", "yarn", "longrope", "dynamic")
# what transformers' config classes assume for a key config.json leaves out, where it differs from Llama's
_FAMILY_DEFAULTS = {
    "gemma2": {"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
               "tie_word_embeddings": True},
    "gemma3_text": {"head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "tie_word_embeddings": True},
}


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
    activation: str = "silu"  # of the MLP's gate (ACTIVATIONS)
    norm_offset: float = 0.0  # norms scale by (norm_offset + w), in fp32 before rounding (Gemma: 1)
    sandwich_norms: bool = False  # norms on attention's and the MLP's outputs before each residual add (Gemma)
    embed_scale: float = 1.0  # token embeddings are multiplied by it, in the model's dtype (Gemma: sqrt(hidden))
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power; None: head_dim's
    attn_softcap: float | None = None  # attention scores become cap * tanh(score / cap) before the mask
    final_softcap: float | None = None  # the same on the logits
    local_rope_theta: float | None = None  # the rope base of the layers in local_rope_layers (Gemma 3)
    local_rope_layers: tuple[int, ...] = ()  # layers rotated with local_rope_theta and no rope scaling

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
        hf = _FAMILY_DEFAULTS.get(model_type, {}) | hf
        _refuse_unserved_options(model_type, hf)
        rope, local_rope = _rope_parameters(model_type, hf)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        pairs = head_dim // 2
        if _rope_type(rope) == "longrope" and not len(rope["short_factor"]) == len(rope["long_factor"]) == pairs:
            raise ModelNotSupported(f"longrope needs {pairs} short_factor and long_factor values (head_dim / 2)")
        qkv_bias = {"mistral": False, "qwen2": True, "phi3": False}.get(model_type, hf.get("attention_bias", False))
        gemma = model_type in GEMMA
        types = _layer_types(model_type, hf)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope["rope_theta"],
            rope_scaling=rope if _rope_type(rope) != "default" else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=bool(qkv_bias),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            o_bias=bool(qkv_bias) and model_type != "qwen2",
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            layer_windows=_layer_windows(model_type, hf, types),
            fused_in_checkpoint=model_type == "phi3",
            activation=_activation(model_type, hf),
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            embed_scale=hf["hidden_size"] ** 0.5 if gemma else 1.0,
            query_pre_attn_scalar=hf["query_pre_attn_scalar"] if gemma else None,
            attn_softcap=hf.get("attn_logit_softcapping") if gemma else None,
            final_softcap=hf.get("final_logit_softcapping") if gemma else None,
            local_rope_theta=local_rope["rope_theta"] if local_rope else None,
            local_rope_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention") if local_rope else (),
        )

    def served_up_to(self, max_len: int) -> "ModelConfig":
        """This model served to at most `max_len` positions. LongRoPE picks its long factors for every token
        when the served length passes the original one, as vLLM does by max_model_len: one rotation per model,
        whatever a batch holds (transformers switches per forward, by the longest sequence in it). Dynamic NTK
        changes nothing up to max_position_embeddings, past which no sequence is served."""
        return dataclasses.replace(self, max_position_embeddings=min(max_len, self.max_position_embeddings))

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

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def uses_local_rope(self, layer: int) -> bool:
        return layer in self.local_rope_layers

    def beyond_llama_layer(self) -> list[str]:
        """The options of this model's layers that a Llama layer lacks, by name (what a kernel written for
        Llama's layer must not be handed)."""
        options = {"q/k norms": self.qk_norm, f"activation {self.activation}": self.activation != "silu",
                   "(1 + w) norms": bool(self.norm_offset), "pre/post norms": self.sandwich_norms,
                   "query_pre_attn_scalar": self.attention_scale != self.head_dim ** -0.5,
                   "attention soft-capping": self.attn_softcap is not None,
                   "a local rope base": bool(self.local_rope_layers)}
        return [name for name, present in options.items() if present]


def _refuse_unserved_options(model_type: str, hf: dict) -> None:
    if hf.get("mlp_bias"):
        raise ModelNotSupported("mlp_bias is not supported")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ModelNotSupported(f"quantization_config ({method}) is not supported: serve the full-precision "
                                "checkpoint (--quantization int8/int4 quantizes it at load)")
    capped = ("logit_scale",) + (() if model_type in GEMMA else ("attn_logit_softcapping", "final_logit_softcapping"))
    for option in capped:
        if hf.get(option) is not None:
            raise ModelNotSupported(f"{option} is not supported")
    if hf.get("use_bidirectional_attention"):
        raise ModelNotSupported("use_bidirectional_attention is not supported (causal attention only)")
    for arch in hf.get("architectures") or []:
        if not arch.endswith("ForCausalLM"):
            raise ModelNotSupported(f"architecture {arch!r} is not supported (causal language models only)")


def _activation(model_type: str, hf: dict) -> str:
    """Gemma's MLP reads hidden_activation (its config.json's hidden_act is a leftover transformers ignores)."""
    key = "hidden_activation" if model_type in GEMMA else "hidden_act"
    name = hf.get(key, "silu")
    if name not in ACTIVATIONS:
        raise ModelNotSupported(f"{key} {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return name


def _rope_type(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _rope_parameters(model_type: str, hf: dict) -> tuple[dict, dict | None]:
    """The rope of every layer (of the global ones where the sliding ones have their own), and the sliding
    layers' (Gemma 3: rope_parameters per layer type, or in older files rope_local_base_freq)."""
    params = dict(hf.get("rope_parameters") or {})
    local = None
    if model_type == "gemma3_text":
        rope = dict(params.get("full_attention") or {}) | dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local = dict(params.get("sliding_attention") or {})
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        if _rope_type(local) != "default":
            raise ModelNotSupported(f"rope type {_rope_type(local)!r} on sliding layers is not supported (default)")
    else:
        rope = dict(params or hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if _rope_type(rope) not in ROPE_TYPES:
        raise ModelNotSupported(f"rope type {_rope_type(rope)!r} is not supported ({', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelNotSupported("partial_rotary_factor (rotary embedding on part of each head) is not supported")
    return _with_attention_factor(rope, hf), local


def _with_attention_factor(rope: dict, hf: dict) -> dict:
    """YaRN's and LongRoPE's factor and the attention factor their cos/sin are multiplied by, as transformers
    derives them, fixed here from the model's own max_position_embeddings (not the length it is served to)."""
    kind = _rope_type(rope)
    if kind not in ("yarn", "longrope"):
        return rope
    # transformers' precedence: Phi-3's top-level field, then the rope's own, then max_position_embeddings
    max_positions = hf.get("max_position_embeddings", 2048)
    original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or \
        max_positions
    factor = rope.get("factor") or max_positions / original
    attention = rope.get("attention_factor")
    if attention is None and kind == "yarn":
        mscale, all_dims = rope.get("mscale"), rope.get("mscale_all_dim")
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dims) if mscale and all_dims else \
            _yarn_mscale(factor)
    elif attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return rope | {"original_max_position_embeddings": original, "factor": factor, "attention_factor": attention}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _layer_types(model_type: str, hf: dict) -> list[str]:
    """Gemma's layer_types, or the pattern transformers fills in without them: every period-th layer global
    (Gemma 2 every second, Gemma 3 sliding_window_pattern, 6 by default). Other families: []."""
    if model_type not in GEMMA:
        return []
    period = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % period else "full_attention"
                                      for i in range(hf["num_hidden_layers"])]
    _check_layer_types(types)
    return types


def _check_layer_types(types: list[str]) -> None:
    unknown = set(types) - set(_LAYER_TYPES)
    if unknown:
        raise ModelNotSupported(f"layer_types {sorted(unknown)} are not supported ({', '.join(_LAYER_TYPES)})")


def _layer_windows(model_type: str, hf: dict, gemma_types: list[str]) -> tuple[int | None, ...]:
    """As transformers reads them: Mistral's and Phi-3's sliding_window holds for every layer; Gemma's for the
    layers its layer types mark sliding; Qwen's only where use_sliding_window is set, for the layers
    layer_types marks (or, without it, from max_window_layers on)."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if model_type in ("mistral", "phi3"):
        return (window,) * layers if window else ()
    if model_type in GEMMA:
        return tuple(window if t == "sliding_attention" else None for t in gemma_types) if window else ()
    if model_type not in ("qwen2", "qwen3") or not hf.get("use_sliding_window") or not window:
        return ()
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(layers)]
    _check_layer_types(types)
    return tuple(window if t == "sliding_attention" else None for t in types)
