"""The prefix cache on the real default model: a request that starts like an earlier one reuses its keys
and values, and gets the tokens it would have got without the cache; adapters never share entries."""

import asyncio

import pytest
import torch

from adapters import random_adapter
from server.engine.kv_cache import KVCache
from server.engine.request import SamplingParams
from server.model.backend import resolve_backend
from server.model.context import PrefillChunk, build_step
from server.model.weights import LoadedModel
from tests.integration.test_engine_batching import complete, start_runtime

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
SYSTEM = ("You are a lighthouse keeper on a remote island. You answer every question with a short story "
          "about the sea, the ships you have watched and the storms you have survived.")


def chat(rt, *turns: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "assistant" if i % 2 else "user", "content": text})
    return rt.encode(messages=messages)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    rt = start_runtime(tmp_path_factory.mktemp("store"))
    yield rt
    rt.stop()


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    rt = start_runtime(tmp_path_factory.mktemp("store"), prefix_cache_mb=0)
    yield rt
    rt.stop()


def persona(rt):
    shapes = rt.loaded.transformer.lora_target_shapes()
    return random_adapter("persona", shapes, rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj"),
                          seed=5, init_std=0.1)


def run(rt, prompt, adapter=None):
    return asyncio.run(complete(rt, prompt, GREEDY, adapter))


def hit_tokens(rt) -> int:
    return rt.engine.scheduler.prefix_cache.hit_tokens


def test_a_repeated_system_prompt_is_computed_once_and_answers_do_not_change(cached, uncached):
    first_prompt, second_prompt = chat(cached, "Where were you born?"), chat(cached, "What is your favourite ship?")
    expected = [run(uncached, p).token_ids for p in (first_prompt, second_prompt)]
    before = hit_tokens(cached)
    assert run(cached, first_prompt).token_ids == expected[0]
    assert run(cached, second_prompt).token_ids == expected[1]
    shared = next(i for i, (a, b) in enumerate(zip(first_prompt, second_prompt)) if a != b)
    assert hit_tokens(cached) - before == shared > cached.engine.scheduler.prefix_cache.block_tokens
    again = hit_tokens(cached)
    assert run(cached, second_prompt).token_ids == expected[1]
    assert hit_tokens(cached) - again == len(second_prompt) - 1, "a resent prompt computes its last token only"


def test_the_next_chat_turn_reuses_the_previous_answer(cached):
    question = "Tell me about the worst storm."
    answer = run(cached, chat(cached, question))
    follow_up = chat(cached, question, answer.text, "And what happened the morning after?")
    before = hit_tokens(cached)
    run(cached, follow_up)
    assert hit_tokens(cached) - before > len(chat(cached, question)), "the answer's tokens came from the cache too"


def test_an_adapter_never_reuses_keys_computed_without_it(cached, uncached):
    prompt = chat(cached, "Describe the lamp.")
    run(cached, prompt)  # the base model's blocks are now cached
    adapter, expected_adapter = persona(cached), persona(uncached)
    expected = run(uncached, prompt, expected_adapter).token_ids
    before = hit_tokens(cached)
    assert run(cached, prompt, adapter).token_ids == expected
    assert hit_tokens(cached) == before
    assert run(cached, prompt, adapter).token_ids == expected  # its own blocks, now cached
    assert hit_tokens(cached) > before


def test_the_cache_stays_within_its_memory_budget(tmp_path):
    rt = start_runtime(tmp_path, prefix_cache_mb=2)
    try:
        cache = rt.engine.scheduler.prefix_cache
        for i in range(3):
            run(rt, chat(rt, f"Question number {i}: what do you see from the tower tonight?"))
        assert len(cache) > 0
        assert cache.bytes <= cache.max_bytes == 2 * 2**20
    finally:
        rt.stop()


def test_prefill_after_a_cached_prefix_matches_a_full_prefill(default_model_folder, one_torch_thread):
    """The model-level contract the cache relies on: attending over keys already in the KV cache gives the
    logits a full prefill gives."""
    cpu = torch.device("cpu")
    model = LoadedModel(default_model_folder, resolve_backend(cpu, torch.float32))
    ids = torch.arange(100, 140)
    kv = KVCache(model.config, 2, 64, cpu, torch.float32)
    full = model.transformer.forward(ids, build_step([], [PrefillChunk(0, 0, 40)], cpu), kv)
    kv.k[:, 1, :, :32], kv.v[:, 1, :, :32] = kv.k[:, 0, :, :32], kv.v[:, 0, :, :32]
    rest = model.transformer.forward(ids[32:], build_step([], [PrefillChunk(1, 32, 8)], cpu), kv)
    torch.testing.assert_close(rest, full, rtol=1e-4, atol=1e-4)
