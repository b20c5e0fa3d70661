"""Scheduling across many adapters on the real model: fairness, device-slot LRU, 1,000 registered adapters."""

import asyncio
import time

import pytest

from adapters import llama_base_shapes, random_adapter
from server.engine.request import SamplingParams
from server.runtime import Runtime
from server.settings import Settings

pytestmark = pytest.mark.integration

SHAPES = llama_base_shapes(30, 576, 1536, 192)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    rt = Runtime(Settings(store_dir=tmp_path_factory.mktemp("sched"), max_batch=4, lora_slots=4,
                          lora_mode="unmerged", max_seq_len=256))
    yield rt
    rt.stop()


async def _finish_time(rt, adapter, max_new_tokens=12, prompt="Hello there") -> tuple[float, list[int]]:
    ids, tokens = rt.encode(prompt=prompt), []
    async for event in rt.engine.stream(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0,
                                                            ignore_eos=True), adapter):
        tokens += event.token_ids
    return time.monotonic(), tokens


def test_a_flood_on_one_adapter_does_not_starve_another(runtime):
    flood, lone = (random_adapter(n, SHAPES, seed=s, init_std=0.05) for n, s in (("flood", 1), ("lone", 2)))

    async def scenario():
        flood_tasks = [asyncio.create_task(_finish_time(runtime, flood)) for _ in range(16)]
        await asyncio.sleep(0.05)  # the flood is queued first
        lone_done, _ = await _finish_time(runtime, lone)
        flood_done = [t for t, _ in await asyncio.gather(*flood_tasks)]
        return lone_done, flood_done

    lone_done, flood_done = asyncio.run(scenario())
    # round-robin admission: the lone request takes one of the next free slots, not the 17th
    assert sum(t > lone_done for t in flood_done) >= 8, (lone_done, sorted(flood_done))


def test_thousand_registered_adapters_and_slot_lru(runtime):
    for i in range(1000):
        runtime.registry.add(random_adapter(f"many-{i:04d}", SHAPES, rank=2, targets=("q_proj",), seed=100 + i,
                                            init_std=0.02), persist=False)
    assert len(runtime.registry) >= 1000
    picked = [runtime.registry.get(f"many-{i:04d}") for i in range(0, 1000, 97)]  # 11 adapters > 4 slots

    async def solo():
        return [(await _finish_time(runtime, a, 8))[1] for a in picked]

    async def mixed():
        return [tokens for _, tokens in await asyncio.gather(*(_finish_time(runtime, a, 8) for a in picked))]

    loads_before = runtime.adapter_slots.loads
    alone = asyncio.run(solo())
    together = asyncio.run(mixed())
    assert together == alone
    assert len({tuple(t) for t in alone}) > 1, "the adapters should not all produce the same tokens"
    assert runtime.adapter_slots.loads - loads_before >= len(picked)  # evicted and reloaded through 4 slots
    assert len(runtime.adapter_slots.resident()) <= 4


@pytest.fixture
def fresh_runtime(tmp_path):
    rt = Runtime(Settings(store_dir=tmp_path, max_batch=4, lora_slots=4, lora_mode="unmerged", max_seq_len=256))
    yield rt
    rt.stop()


def test_a_deleted_adapter_gives_its_device_slot_back(fresh_runtime):
    runtime = fresh_runtime
    kept, deleted, busy = (random_adapter(n, SHAPES, rank=2, targets=("q_proj",), seed=s, init_std=0.02)
                           for n, s in (("slot-kept", 7), ("slot-deleted", 8), ("slot-busy", 9)))
    for adapter in (kept, deleted, busy):
        runtime.registry.add(adapter, persist=False)

    async def one(adapter, tokens=4):
        return (await _finish_time(runtime, adapter, tokens))[1]

    asyncio.run(one(kept))
    asyncio.run(one(deleted))
    assert {"slot-kept", "slot-deleted"} <= set(runtime.adapter_slots.resident())
    runtime.registry.remove("slot-deleted")
    asyncio.run(one(kept))  # the next scheduling step frees the deleted adapter's slot, not the LRU's
    assert "slot-deleted" not in runtime.adapter_slots.resident()
    assert "slot-kept" in runtime.adapter_slots.resident()

    async def delete_while_running():
        running = asyncio.create_task(_finish_time(runtime, busy, 40))
        while "slot-busy" not in runtime.adapter_slots.resident():
            await asyncio.sleep(0.01)
        runtime.registry.remove("slot-busy")
        await one(kept)  # a step runs prune while the busy adapter still serves its request
        assert "slot-busy" in runtime.adapter_slots.resident()
        return (await running)[1]

    tokens = asyncio.run(delete_while_running())
    assert len(tokens) == 40  # the request that started with it finished with it
    assert "slot-busy" not in runtime.adapter_slots.resident()
