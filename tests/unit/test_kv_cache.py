"""The KV cache's memory: positions no sequence wrote are read (masked) by attention, so they must be zeros
however the heap was used before, and stay non-resident until written."""

import math

import torch

from server.engine.kv_cache import KVCache
from server.heap import keep_freed_memory
from server.model.config import ModelConfig

# 2 layers x 16 slots x 4 KV heads x 1,024 positions x 256 dims of fp32: 128 MiB each for keys and values
CFG = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 64,
                           "vocab_size": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                           "max_position_embeddings": 1024})


def test_a_large_cache_reads_as_zeros_after_the_heap_held_nans():
    keep_freed_memory()  # as the server runs: freed memory stays in the heap for reuse
    poison = [torch.full((4 * 2**20,), float("nan")) for _ in range(48)]  # 16 MiB each: heap, not mmap
    del poison  # 768 MiB of NaNs freed, kept by the heap
    kv = KVCache(CFG, 16, 1024, torch.device("cpu"), torch.float32)
    assert math.prod(kv.k.shape) * 4 > 64 * 2**20
    assert bool((kv.k == 0).all()) and bool((kv.v == 0).all())
    kv.k[1, 3, 2, 7] = 1.0  # writable, shaped as the model reads it
    assert kv.k[1, 3, 2, 7].sum() == 256
