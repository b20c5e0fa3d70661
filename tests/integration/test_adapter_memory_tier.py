"""Memory as a tier over the adapter store (--max-resident-adapters): adapters keep their stored dtype in
memory, only the most recently used keep their weights there, and one read back from the store serves the
same tokens as while it was resident."""

import os
import re
import tempfile
import time

import pytest
import torch

from adapters import (
    AdapterLimits, AdapterRegistry, AdapterStore, llama_base_shapes, peft_folder_files, random_adapter,
)
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_models import tiny_llama

pytestmark = pytest.mark.integration

TINY = llama_base_shapes(num_layers=2, hidden=64, intermediate=128, kv_dim=32)  # tiny_llama's projections
SMOLLM2 = llama_base_shapes(num_layers=30, hidden=576, intermediate=1536, kv_dim=192)  # the default model's


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_ten_thousand_registered_with_64_in_memory_grow_memory_by_those_64_only():
    # On tmpfs when there is one: the test measures memory, and 50,000 fsyncs on a disk would take minutes.
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as root:
        registry = AdapterRegistry(AdapterStore(root), SMOLLM2, AdapterLimits(max_adapters=10_000, max_resident=64))
        layer0 = {k: v for k, v in SMOLLM2.items() if k.startswith("layers.0.")}  # 30 KB each in float16
        before = rss_bytes()
        for i in range(10_000):
            registry.add(random_adapter(f"a{i}", layer0, rank=8, seed=i, dtype=torch.float16))
        for i in range(0, 10_000, 50):  # read 200 evicted ones back, each evicting another
            registry.get(f"a{i}")
        grown = rss_bytes() - before
        count, held = registry.memory()
        assert len(registry) == 10_000 and count == 64 and held == 64 * 2 * 15_360
        assert grown <= 1.1 * held + 100 * 2**20, f"RSS grew {grown >> 20} MiB for {held >> 20} MiB of weights"


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_folder):
    root = tmp_path_factory.mktemp("tier")
    folder = tiny_llama(root / "model", default_model_folder.path)
    proc = ServerProcess(root / "store", "--model", str(folder), "--max-resident-adapters", "1")
    proc.start()
    yield proc
    proc.stop()


def upload(c, name: str, seed: int):
    adapter = random_adapter(name, TINY, seed=seed, init_std=0.5, dtype=torch.float16)
    files = [("files", (f, data)) for f, data in peft_folder_files(adapter).items()]
    assert c.post("/adapters", data={"name": name}, files=files).status_code == 201
    return adapter


def greedy_tokens(c, adapter: str) -> list[str]:
    r = c.post("/v1/completions", json={"model": adapter, "prompt": "Once upon a time", "max_tokens": 12,
                                         "temperature": 0, "logprobs": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def metric(c, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", c.get("/metrics").text, re.M)[1])


def test_an_adapter_read_back_from_the_store_serves_the_tokens_it_served_in_memory(server):
    with server.client() as c:
        first = upload(c, "first", seed=1)
        resident = greedy_tokens(c, "first")
        upload(c, "second", seed=2)
        assert metric(c, "loraplex_memory_adapters") == 1
        assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["first", "second"]
        assert c.get("/adapters/first").json()["size_bytes"] == first.size_bytes
        started = time.monotonic()
        assert greedy_tokens(c, "first") == resident, "read back from the store"
        assert time.monotonic() - started < 30
        assert greedy_tokens(c, "second") != resident
        assert greedy_tokens(c, "first") == resident, "read back again, after second evicted it"


def test_a_half_precision_adapter_takes_two_bytes_a_parameter_in_memory(server):
    with server.client() as c:
        adapter = upload(c, "half", seed=3)
        params = sum(t.numel() for w in adapter.weights.values() for t in (w.A, w.B))
        assert metric(c, "loraplex_memory_adapters") == 1
        assert metric(c, "loraplex_memory_adapter_bytes") == 2 * params


def test_deleting_an_evicted_adapter_deletes_it(server):
    with server.client() as c:
        upload(c, "gone", seed=4)
        upload(c, "evicts-it", seed=5)
        assert c.delete("/adapters/gone").status_code == 204
        assert c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "adapter": "gone"}).status_code == 404
        assert "gone" not in [a["name"] for a in c.get("/adapters").json()["adapters"]]
