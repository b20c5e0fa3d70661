"""One request's failure is that request's alone: the engine on the real default model.

A poisoned request (an adapter whose numbers overflow, a sampler that fails on its row) ends with
finish_reason "error" and a reason, while the requests beside it and behind it in the queue finish with
exactly the tokens they get alone, and no queue place or KV slot leaks.
"""

import asyncio

import pytest

from adapters import random_adapter
from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings
from tests.integration.test_engine_batching import complete, run_alone

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three.",
             "What is two plus two?"]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    # two KV slots: one victim runs beside the poisoned request, the others queue behind and reuse its slot
    runtime = Runtime(Settings(store_dir=tmp_path_factory.mktemp("store"), max_batch=2, max_seq_len=512, threads=1,
                               max_pending=8))
    shapes = runtime.loaded.transformer.lora_target_shapes()
    # finite but huge, added past the registry's magnitude check: a stand-in for any adapter whose numbers
    # overflow on some input, which the engine must contain even if a check lets one through
    huge = random_adapter("huge", shapes, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"), init_std=1e30)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("adapters.registry.validate", lambda adapter, base, limits: None)
        runtime.registry.add(huge, persist=False)
    runtime.registry.add(random_adapter("fine", shapes, init_std=0.1, seed=3), persist=False)
    yield runtime
    runtime.stop()


@pytest.fixture(scope="module")
def prompts(rt) -> list[list[int]]:
    return [rt.encode(messages=[{"role": "user", "content": q}]) for q in QUESTIONS]


def run_batch(rt, requests):
    async def all_at_once():
        return await asyncio.gather(*(complete(rt, ids, params, adapter) for ids, params, adapter in requests))
    return asyncio.run(all_at_once())


def test_an_overflowing_adapter_fails_alone_while_running_and_queued_victims_finish(rt, prompts):
    fine = rt.registry.get("fine")
    alone = [run_alone(rt, ids, GREEDY, fine if i % 2 else None) for i, ids in enumerate(prompts)]
    huge = rt.registry.get("huge")
    requests = [(prompts[0], GREEDY, None), (prompts[0], GREEDY, huge)]
    requests += [(ids, GREEDY, fine if i % 2 else None) for i, ids in enumerate(prompts) if i]
    results = run_batch(rt, requests)
    poisoned = results[1]
    assert poisoned.finish_reason == "error"
    victims = [results[0], *results[2:]]
    for got, want in zip(victims, alone):
        assert got.finish_reason == want.finish_reason != "error"
        assert got.token_ids == want.token_ids, (got, want)
    # its slot was scrubbed: the next requests read finite numbers there
    assert run_alone(rt, prompts[3], GREEDY, fine).token_ids == alone[3].token_ids
    assert rt.engine.pending == 0


def test_an_overflowing_adapter_served_merged_leaves_the_base_exact(rt, prompts, tmp_path):
    merged = Runtime(Settings(store_dir=tmp_path, max_batch=2, max_seq_len=512, threads=1, lora_mode="merged"))
    try:
        base_before = run_alone(merged, prompts[2], GREEDY).token_ids
        merges = merged.engine.stats.merges
        assert run_alone(merged, prompts[2], GREEDY, rt.registry.get("huge")).finish_reason == "error"
        assert merged.engine.stats.merges > merges
        assert run_alone(merged, prompts[2], GREEDY).token_ids == base_before
        assert merged.engine.pending == 0
    finally:
        merged.stop()


def test_a_failure_in_one_rows_sampling_ends_only_that_request(rt, prompts, monkeypatch):
    import server.engine.engine as engine_module

    real_sample = engine_module.sample

    def sample_failing_on_seed_13(logits, seqs):
        if any(s.params.seed == 13 for s in seqs):
            raise RuntimeError("this row's sampling failed")
        return real_sample(logits, seqs)

    monkeypatch.setattr(engine_module, "sample", sample_failing_on_seed_13)
    alone = run_alone(rt, prompts[4], GREEDY)
    poisoned = SamplingParams(max_new_tokens=12, temperature=0.8, seed=13)
    results = run_batch(rt, [(prompts[4], GREEDY, None), (prompts[1], poisoned, None)])
    assert results[1].finish_reason == "error"
    assert results[0].token_ids == alone.token_ids and results[0].finish_reason != "error"
    assert rt.engine.pending == 0


def test_a_seed_the_generator_refuses_never_takes_a_queue_place(rt, prompts):
    # the HTTP schemas refuse such seeds; the engine still must not leak a place if one gets through
    for _ in range(12):
        with pytest.raises((ValueError, RuntimeError)):
            rt.engine.submit(prompts[0], SamplingParams(seed=2**64), None, sink=None)
    assert rt.engine.pending == 0
    assert run_alone(rt, prompts[0], GREEDY).finish_reason != "error"


def test_tiny_temperature_and_top_p_sample_the_top_token(rt, prompts):
    greedy = run_alone(rt, prompts[1], GREEDY).token_ids
    for params in (SamplingParams(max_new_tokens=12, temperature=1e-30, seed=1),
                   SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-46, seed=1)):
        got = run_alone(rt, prompts[1], params)
        assert got.finish_reason != "error"
        assert got.token_ids == greedy

