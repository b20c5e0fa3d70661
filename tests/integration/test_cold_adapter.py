"""A request for an adapter whose weights were evicted to the store (--max-resident-adapters) waits for its
read alone: on a real HTTP server whose store reads wait until the test lets them go, other requests are
served to their end while the read is held, the cold request then answers with the adapter's own tokens,
and a read that fails leaves nothing behind (queue, memory tier, the name's read lock).

Deterministic: the store read is held on an event, not raced against a clock. The pace the other streams
keep while cold adapters are read is measured by `python -m bench.cold_adapter`, not here."""

import asyncio
import re
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from adapters import AdapterRegistry, AdapterStore, llama_base_shapes, peft_folder_files, random_adapter
from server.app import create_app
from server.runtime import Runtime
from server.settings import Settings
from tests.integration.server_process import free_port
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration

TINY = llama_base_shapes(num_layers=2, hidden=64, intermediate=128, kv_dim=32)  # tiny_llama's projections
STREAMS = 16


class HeldStore(AdapterStore):
    """A store whose reads, while `held`, wait until `release` is set, then fail if `fail` is set."""

    def __init__(self, root):
        super().__init__(root)
        self.held, self.reading, self.release = threading.Event(), threading.Event(), threading.Event()
        self.fail = False

    def read(self, name, read_folder):
        if self.held.is_set():
            self.reading.set()
            assert self.release.wait(60)
            if self.fail:
                raise OSError(5, "Input/output error (the test's store)")
        return super().read(name, read_folder)

    def hold(self, fail: bool = False) -> None:
        self.reading.clear()
        self.release.clear()
        self.fail = fail
        self.held.set()

    def let_go(self) -> None:
        self.held.clear()
        self.release.set()


class HeldStoreRegistry(AdapterRegistry):
    def __init__(self, store, base, limits):
        super().__init__(HeldStore(store.root), base, limits)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    """The app on uvicorn on 127.0.0.1, its runtime built with the held store (as the cluster's replica hands
    its app a runtime of its own), at most one adapter's weights in memory."""
    root = tmp_path_factory.mktemp("cold")
    settings = Settings(model_path=str(tiny_llama(root / "model", default_model_folder.path)),
                        store_dir=root / "store", max_batch=STREAMS + 1, max_seq_len=256, max_resident_adapters=1)
    app = create_app(settings)
    app.state.runtime = runtime = Runtime(settings, registry_type=HeldStoreRegistry)
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="off", log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    web.url, web.store = f"http://127.0.0.1:{web.config.port}", runtime.registry.store
    yield web
    web.store.let_go()
    web.should_exit = True
    thread.join(30)
    runtime.stop()


def upload(url: str, name: str, seed: int) -> None:
    adapter = random_adapter(name, TINY, seed=seed, init_std=0.5, dtype=torch.float16)
    files = [("files", (f, data)) for f, data in peft_folder_files(adapter).items()]
    assert httpx.post(f"{url}/adapters", data={"name": name}, files=files, timeout=60).status_code == 201


def body(adapter: str | None, tokens: int = 8) -> dict:
    return {"prompt": "Once upon a time", "adapter": adapter, "max_new_tokens": tokens, "temperature": 0,
            "ignore_eos": True}


def metric(url: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)[1])


async def stream_tokens(client: httpx.AsyncClient, adapter: str | None) -> int:
    """The text events of one streamed request, read to its final event."""
    texts = 0
    async with client.stream("POST", "/generate", json={**body(adapter, 12), "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:") and '"finish_reason"' in line:
                return texts
            texts += line.startswith("data:")
    raise AssertionError("the stream ended without a final event")


async def while_the_read_is_held(server, cold: str, warm: str, fail: bool = False):
    """A request for `cold` sent while its store read is held; STREAMS other requests (base and the resident
    `warm`) run from start to end meanwhile. Returns the cold response and the others' token counts."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        server.store.hold(fail)
        waiting = asyncio.ensure_future(client.post("/generate", json=body(cold)))
        assert await asyncio.to_thread(server.store.reading.wait, 30), "the cold request never read the store"
        others = await asyncio.gather(*(stream_tokens(client, warm if i % 2 else None) for i in range(STREAMS)))
        assert not waiting.done(), "the cold request answered before its read was let go"
        server.store.let_go()
        return await waiting, others


def evicted_pair(url: str, prefix: str) -> tuple[str, str, str]:
    """Adapters `<prefix>-cold` (whose greedy text is returned, read while it was in memory) and `<prefix>-warm`,
    uploaded after it: with one adapter in memory, cold's weights are in the store only."""
    cold, warm = f"{prefix}-cold", f"{prefix}-warm"
    upload(url, cold, seed=1)
    text = httpx.post(f"{url}/generate", json=body(cold), timeout=60).json()["text"]
    upload(url, warm, seed=2)
    assert metric(url, "loraplex_memory_adapters") == 1
    return cold, warm, text


def test_other_streams_are_served_to_their_end_while_a_cold_adapter_is_read(server):
    cold, warm, resident = evicted_pair(server.url, "served")
    answer, others = asyncio.run(while_the_read_is_held(server, cold, warm))
    assert others == [12] * STREAMS, "every other stream got all its tokens while the read was held"
    assert answer.status_code == 200 and answer.json()["text"] == resident


def test_a_failed_read_fails_only_its_request_and_leaves_nothing_held(server):
    cold, warm, resident = evicted_pair(server.url, "failed")
    answer, others = asyncio.run(while_the_read_is_held(server, cold, warm, fail=True))
    assert answer.status_code == 500 and others == [12] * STREAMS
    health = httpx.get(f"{server.url}/health").json()
    assert health["running"] == 0 and health["waiting"] == 0
    assert metric(server.url, "loraplex_memory_adapters") == 1
    assert {cold, warm} <= {a["name"] for a in httpx.get(f"{server.url}/adapters").json()["adapters"]}
    again = httpx.post(f"{server.url}/generate", json=body(cold), timeout=60)  # the name's read lock was let go
    assert again.status_code == 200 and again.json()["text"] == resident
