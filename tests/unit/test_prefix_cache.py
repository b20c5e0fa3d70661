"""The prefix cache's bookkeeping on a tiny KV cache: what matches, and what it keeps alive."""

import dataclasses
import gc
import weakref

import pytest
import torch

from server.engine.kv_cache import KVCache
from server.engine.prefix_cache import PrefixCache
from server.model.config import ModelConfig

BLOCK = 4
TINY = ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4, rope_scaling=None,
                   tie_word_embeddings=True, attention_bias=False, max_position_embeddings=64)


class Adapter:  # the cache only needs identity and weak references
    pass


def cache_with_written_slot(tokens: int) -> PrefixCache:
    kv = KVCache(TINY, max_seqs=2, max_len=32, device=torch.device("cpu"), dtype=torch.float32)
    kv.k[:, 0, :, :tokens] = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1)
    kv.v[:, 0, :, :tokens] = -kv.k[:, 0, :, :tokens]
    return PrefixCache(kv, BLOCK, max_bytes=1 << 20)


def test_blocks_match_only_the_adapter_and_scope_that_computed_them():
    cache, prompt, adapter = cache_with_written_slot(12), list(range(12)), Adapter()
    cache.store("key-a", adapter, prompt, slot=0)
    assert cache.match("key-a", adapter, prompt + [99]).tokens == 12
    assert cache.match("key-a", adapter, prompt).tokens == 11  # the last token is always computed
    assert cache.match("key-a", Adapter(), prompt + [99]).tokens == 0
    assert cache.match("key-a", None, prompt + [99]).tokens == 0
    assert cache.match("key-b", adapter, prompt + [99]).tokens == 0


def test_a_prompts_tail_is_kept_and_serves_the_tokens_that_agree():
    cache, adapter = cache_with_written_slot(10), Adapter()
    stored = list(range(10))  # two whole blocks and a tail of two
    cache.store("", adapter, stored, slot=0)
    assert cache.match("", adapter, stored).tokens == 9
    assert cache.match("", adapter, stored + [20, 21]).tokens == 10
    assert cache.match("", adapter, stored[:9] + [30, 31]).tokens == 9
    assert cache.match("", adapter, stored[:5] + [30, 31, 32, 33, 34]).tokens == 5  # inside a whole block
    assert cache.match("", Adapter(), stored + [20]).tokens == 0
    assert cache.match("other", adapter, stored + [20]).tokens == 0


def test_a_tail_that_a_kept_block_begins_with_is_not_kept_again():
    cache, prompt = cache_with_written_slot(12), list(range(12))
    cache.store("", None, prompt, slot=0)
    kept, held = len(cache), cache.bytes
    cache.store("", None, prompt[:10], slot=0)
    assert (len(cache), cache.bytes) == (kept, held)


def test_loading_a_partial_hit_copies_exactly_the_tokens_that_agree():
    cache, prompt = cache_with_written_slot(10), list(range(10))
    cache.store("", None, prompt, slot=0)
    hit = cache.match("", None, prompt[:7] + [40, 41])
    assert cache.load(hit, slot=1) == 7
    assert torch.equal(cache.kv.k[:, 1, :, :7], cache.kv.k[:, 0, :, :7])
    assert torch.equal(cache.kv.v[:, 1, :, :7], cache.kv.v[:, 0, :, :7])
    assert not cache.kv.k[:, 1, :, 7:].any()


def test_kept_bytes_stay_within_the_budget_as_old_blocks_are_evicted():
    kv = KVCache(TINY, max_seqs=2, max_len=32, device=torch.device("cpu"), dtype=torch.float32)
    token_bytes = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4
    cache = PrefixCache(kv, BLOCK, max_bytes=10 * token_bytes)
    for first in range(20):
        prompt = [first] + list(range(6))  # a whole block and a tail of three, 7 tokens of KV each
        cache.store("", None, prompt, slot=0)
        assert cache.bytes <= 10 * token_bytes
    assert cache.match("", None, [19] + list(range(6)) + [9]).tokens == 7  # the newest survives
    assert cache.match("", None, [0] + list(range(6)) + [9]).tokens == 0


def test_loading_a_hit_copies_its_keys_and_values_into_the_slot():
    cache, prompt = cache_with_written_slot(8), list(range(8))
    cache.store("", None, prompt, slot=0)
    hit = cache.match("", None, prompt + [1])
    assert cache.load(hit, slot=1) == 8
    assert torch.equal(cache.kv.k[:, 1, :, :8], cache.kv.k[:, 0, :, :8])
    assert torch.equal(cache.kv.v[:, 1, :, :8], cache.kv.v[:, 0, :, :8])


def test_cached_blocks_do_not_keep_a_deleted_adapter_alive():
    cache, prompt, adapter = cache_with_written_slot(8), list(range(8)), Adapter()
    cache.store("", adapter, prompt, slot=0)
    gone = weakref.ref(adapter)
    del adapter
    gc.collect()
    assert gone() is None
    assert len(cache) == 2  # its blocks wait for eviction, matching nothing


def test_an_adapter_that_inherits_a_gone_adapters_id_gets_no_stale_hit():
    cache, prompt = cache_with_written_slot(8), list(range(8))
    first = Adapter()
    cache.store("", first, prompt, slot=0)
    old_id = id(first)
    del first
    gc.collect()
    others = []  # CPython soon hands the freed memory, and with it the id, to a new object of that size
    while len(others) < 10_000 and id(second := Adapter()) != old_id:
        others.append(second)
    if id(second) != old_id:
        pytest.skip("this interpreter did not reuse the id")
    assert cache.match("", second, prompt + [1]).tokens == 0
    cache.store("", second, prompt, slot=0)
    assert cache.match("", second, prompt + [1]).tokens == 8


def test_with_a_ring_the_blocks_it_still_holds_are_kept_and_a_hit_loads_as_if_computed():
    ringed = dataclasses.replace(TINY, layer_windows=(3, None))  # layer 0 keeps a ring of 3 + 4 - 1 positions
    kv = KVCache(ringed, max_seqs=2, max_len=32, device=torch.device("cpu"), dtype=torch.float32, max_chunk=4)
    assert kv.rings == (6, None)
    cache, prompt = PrefixCache(kv, BLOCK, max_bytes=1 << 20), list(range(14))
    history = torch.arange(2 * 14 * 4, dtype=torch.float32).view(2, 1, 14, 4)  # [layers, kv_heads, positions, d]
    for start in range(0, 14, 4):  # prompt chunks of 4, each offered to the cache once computed
        end = min(start + 4, 14)
        kv.write(0, start, history[:, :, start:end], -history[:, :, start:end])
        cache.store("", None, prompt[:end], slot=0)
    hit = cache.match("", None, prompt + [99])
    assert cache.load(hit, slot=1) == 14
    k, v = kv.read(1, kv.held_from(14), 14)
    assert torch.equal(k, history[:, :, 8:]) and torch.equal(v, -history[:, :, 8:])
    assert torch.equal(kv.read(1, 0, 14)[0][1], history[1])  # the flat layer holds every position

    kv.write(0, 0, history[:, :, :4], history[:, :, :4])
    fresh = PrefixCache(kv, BLOCK, max_bytes=1 << 20)
    fresh.store("", None, prompt[:4], slot=0)
    kv.write(0, 4, history[:, :, 4:], history[:, :, 4:])  # ten positions at once: the ring holds the last six
    fresh.store("", None, prompt, slot=0)
    assert len(fresh) == 1 and fresh.match("", None, prompt + [99]).tokens == 4  # nothing it lost, nothing after
