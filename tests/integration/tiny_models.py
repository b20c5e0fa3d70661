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


def byte_tokens() -> list[str]:
    """A byte-level BPE vocabulary of GGUF_VOCAB tokens: GPT-2's 256 byte characters, one merge's result and
    an end-of-text token (small, so transformers converts it in moments)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "<|endoftext|>"]


GGUF_VOCAB = 258


def write_gguf(model, path: Path, arch: str) -> Path:
    """`model` (a tiny Llama, Qwen2, Qwen3, Phi-3, Gemma 2 or Gemma 3 text model built by transformers, vocabulary
    GGUF_VOCAB) written as llama.cpp's converter writes it: its config as `arch`.* keys (`_gguf_config`), a
    byte-level tokenizer (`byte_tokens`), tensors under gguf's names for `arch`, norms and biases in F32 (a
    Gemma's norms as 1 + w, the scale its RMS norm multiplies by), every matrix in Q8_0, and for `llama` the
    rows of attn_q and attn_k permuted as llama.cpp permutes them."""
    from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
    from gguf.quants import quantize

    cfg = model.config
    writer = GGUFWriter(str(path), arch)
    _gguf_config(writer, cfg, arch)
    tokens = byte_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # normal, then the control token
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_pad_token_id(len(tokens) - 1)  # else Phi-3's config keeps its default, past this vocabulary

    names = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise ValueError(f"gguf has no {arch} name for {hf_name}")
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        if arch == "llama" and name.endswith(("attn_q", "attn_k")):
            n = heads if name.endswith("attn_q") else kv_heads
            tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, -1).transpose(1, 2).reshape(tensor.shape)
        kind = GGMLQuantizationType.Q8_0 if tensor.dim() == 2 else GGMLQuantizationType.F32
        data = tensor.detach().float().numpy()
        writer.add_tensor(f"{name}.{suffix}", data if kind == GGMLQuantizationType.F32 else quantize(data, kind),
                          raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_config(writer, cfg, arch: str) -> None:
    """The config keys llama.cpp's converter writes for `arch`. Gemma 2's omit the rope base (llama.cpp's
    default is Gemma 2's) and carry both soft-caps; Gemma 3's carry the global layers' rope base and linear
    scaling. Neither carries query_pre_attn_scalar: llama.cpp takes head_dim (hidden / heads for a 27B)."""
    for key, value in {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
                       "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    if arch == "gemma3":
        rope = rope["full_attention"]
        if rope.get("rope_type", "default") != "default":
            writer.add_string(f"{arch}.rope.scaling.type", rope["rope_type"])
            writer.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])
    if arch != "gemma2":
        writer.add_float32(f"{arch}.rope.freq_base", float(rope["rope_theta"]))
    if arch.startswith("gemma"):
        writer.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(cfg, key, None) is not None:
                writer.add_float32(f"{arch}.{key}", getattr(cfg, key))
