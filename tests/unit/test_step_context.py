"""The step context: which rows run as decode rows, and that a prompt's one-token chunk run as one attends
exactly as it would as a prompt chunk."""

import torch

from server.engine.kv_cache import KVCache
from server.model.attention import attend
from server.model.config import ModelConfig
from server.model.context import PrefillChunk, build_step

CPU = torch.device("cpu")
CFG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                  tie_word_embeddings=True, attention_bias=False, max_position_embeddings=64)


def test_leading_one_token_chunks_in_the_next_slots_run_as_decode_rows():
    chunks = [PrefillChunk(2, 40, 1), PrefillChunk(3, 7, 1), PrefillChunk(4, 0, 3), PrefillChunk(5, 9, 1)]
    ctx = build_step([11, 20], chunks, CPU)
    assert ctx.num_decode == 4 and ctx.kv_len == 41
    assert ctx.decode_slots.tolist() == [0, 1, 2, 3]
    assert ctx.prefills == chunks[2:]  # a longer chunk, and everything after it, stays a prompt chunk
    assert ctx.positions.tolist() == [11, 20, 40, 7, 0, 1, 2, 9]
    assert ctx.logits_rows.tolist() == [0, 1, 2, 3, 6, 7]


def test_a_chunk_outside_the_next_slot_stays_a_prompt_chunk():
    chunk = PrefillChunk(5, 3, 1)
    ctx = build_step([4, 4], [chunk], CPU)
    assert ctx.num_decode == 2 and ctx.prefills == [chunk]


def test_a_one_token_chunk_attends_as_a_decode_row_exactly_as_a_prompt_chunk():
    g = torch.Generator().manual_seed(0)
    cache, alone = (KVCache(CFG, max_seqs=3, max_len=16, device=CPU, dtype=torch.float32) for _ in range(2))
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    alone.k.copy_(cache.k)
    alone.v.copy_(cache.v)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    ctx = build_step([5, 9], [PrefillChunk(2, 6, 1)], CPU)  # slot 2 holds 6 cached prompt tokens
    assert ctx.num_decode == 3
    got = attend(cache, 0, q, k, v, ctx)
    as_chunk = build_step([], [PrefillChunk(2, 6, 1)], CPU)  # the same token, as the step's only prompt chunk
    assert as_chunk.num_decode == 0
    want = attend(alone, 0, q[2:], k[2:], v[2:], as_chunk)
    torch.testing.assert_close(got[2:], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.k[0, 2], alone.k[0, 2]) and torch.equal(cache.v[0, 2], alone.v[0, 2])
