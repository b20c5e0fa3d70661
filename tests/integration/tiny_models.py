"""Tiny random-weight model folders built by transformers itself (nothing downloaded), for tests that start
a server on a folder other than the default model's."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # not its chat template


def tiny_llama(folder: Path, tokenizer_from: Path | None = None, **config) -> Path:
    """A 2-layer Llama saved to `folder`, with the tokenizer files of `tokenizer_from` (whose vocabulary
    sets the model's), or no tokenizer at all."""
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_from))) if tokenizer_from is not None else 64
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, **config)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES if tokenizer_from is not None else ():
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


# a Hugging Face projection's GGUF name, as llama.cpp's converter writes them
GGUF_PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down",
                    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's, fused
GGUF_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def byte_tokens() -> list[str]:
    """A byte-level BPE vocabulary of GGUF_VOCAB tokens: GPT-2's 256 byte characters, one merge's result and
    an end-of-text token (small, so transformers converts it in moments)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "<|endoftext|>"]


GGUF_VOCAB = 258


def write_gguf(model, path: Path, arch: str, quant=None) -> Path:
    """`model` (a tiny Llama, Qwen2, Qwen3 or Phi-3 built by transformers, vocabulary GGUF_VOCAB) written as
    llama.cpp's converter writes it: its config as `arch`.* keys, a byte-level tokenizer (`byte_tokens`), norms
    and biases in F32, the embedding and lm_head in Q8_0, projections in `quant` (Q8_0 by default), and for
    `llama` the rows of attn_q and attn_k permuted as llama.cpp permutes them."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    quant = quant or GGMLQuantizationType.Q8_0
    cfg = model.config
    writer = GGUFWriter(str(path), arch)
    for key, value in {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
                       "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_float32(f"{arch}.rope.freq_base", float(getattr(cfg, "rope_theta", None)
                                                       or cfg.rope_parameters["rope_theta"]))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    tokens = byte_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # normal, then the control token
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_pad_token_id(len(tokens) - 1)  # else Phi-3's config keeps its default, past this vocabulary

    def add(name: str, tensor: torch.Tensor, kind=GGMLQuantizationType.F32) -> None:
        data = tensor.detach().float().numpy()
        writer.add_tensor(name, data if kind == GGMLQuantizationType.F32 else quantize(data, kind), raw_dtype=kind)

    state = model.state_dict()
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    add("token_embd.weight", state["model.embed_tokens.weight"], GGMLQuantizationType.Q8_0)
    add("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"], GGMLQuantizationType.Q8_0)
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf_name, name in GGUF_NORMS.items():
            if prefix + hf_name + ".weight" in state:
                add(f"blk.{i}.{name}.weight", state[prefix + hf_name + ".weight"])
        for hf_name, name in GGUF_PROJECTIONS.items():
            if prefix + hf_name + ".weight" not in state:
                continue
            weight = state[prefix + hf_name + ".weight"]
            if arch == "llama" and name in ("attn_q", "attn_k"):
                n = heads if name == "attn_q" else kv_heads
                weight = weight.reshape(n, 2, weight.shape[0] // n // 2, -1).transpose(1, 2).reshape(weight.shape)
            add(f"blk.{i}.{name}.weight", weight, quant)
            if prefix + hf_name + ".bias" in state:
                add(f"blk.{i}.{name}.bias", state[prefix + hf_name + ".bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
