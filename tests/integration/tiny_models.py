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
