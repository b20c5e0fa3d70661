"""Faults and abuse, bounded in count and time, on 127.0.0.1 only: storms, SIGKILL mid-upload, a corrupted
store, and property-based fuzzing of the whole HTTP API from its own OpenAPI schema."""

import concurrent.futures as cf
import os
import random
import signal
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.server_process import ServerProcess
from tests.integration.test_http_api import adapter_files, upload

pytestmark = pytest.mark.integration

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def _text(c: httpx.Client, adapter: str | None) -> httpx.Response:
    return c.post("/generate", json={"prompt": "Ahoy, tell me", "adapter": adapter, **GREEDY})


def test_storm_of_generate_upload_delete_gives_no_5xx_and_no_wrong_adapter(server):
    with server.client() as c:
        for name, seed in (("storm-a", 31), ("storm-b", 32)):
            assert upload(c, name, adapter_files(seed=seed, rank=8)).status_code == 201
        expected = {name: _text(c, name).json()["text"] for name in (None, "storm-a", "storm-b")}
    assert len(set(expected.values())) == 3, "the storm adapters must be told apart by their outputs"

    rng = random.Random(7)
    churn_files = adapter_files(seed=33)

    def one_call(i: int):
        with server.client(timeout=120) as c:
            kind = rng.choice(["gen", "gen", "gen", "upload", "delete"])
            if kind == "gen":
                name = rng.choice([None, "storm-a", "storm-b"])
                resp = _text(c, name)
                return kind, name, resp.status_code, resp.json().get("text")
            if kind == "upload":
                return kind, None, upload(c, f"churn-{i % 3}", churn_files).status_code, None
            return kind, None, c.delete(f"/adapters/churn-{i % 3}").status_code, None

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one_call, range(48)))
    assert all(status < 500 for _, _, status, _ in results), results
    for kind, name, status, text in results:
        if kind == "gen":
            assert status == 200 and text == expected[name], (name, text)
        elif kind == "upload":
            assert status in (201, 409)
        else:
            assert status in (204, 404)


def test_sigkill_during_uploads_keeps_every_acknowledged_adapter(tmp_path):
    store = tmp_path / "store"
    proc = ServerProcess(store)
    proc.start()
    acknowledged: list[str] = []
    stop = threading.Event()

    def uploader():
        files = adapter_files(seed=41)
        i = 0
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    if upload(c, f"kept-{i}", files).status_code == 201:
                        acknowledged.append(f"kept-{i}")
                except httpx.HTTPError:
                    return
                i += 1

    thread = threading.Thread(target=uploader)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # land the kill in the middle of a later upload
    proc.stop(signal.SIGKILL)
    stop.set()
    thread.join(timeout=30)
    assert len(acknowledged) >= 3

    again = ServerProcess(store)
    again.start()
    try:
        with again.client() as c:
            listed = {a["name"] for a in c.get("/adapters").json()["adapters"]}
            assert set(acknowledged) <= listed
            assert all(_text(c, name).status_code == 200 for name in acknowledged[:2])
        assert not [p for p in store.iterdir() if p.name.startswith((".tmp-", ".trash-", ".old-"))]
    finally:
        again.stop()


def test_corrupted_store_entry_is_quarantined_not_fatal(tmp_path):
    store = tmp_path / "store"
    first = ServerProcess(store)
    first.start()
    with first.client() as c:
        assert upload(c, "good", adapter_files(seed=51)).status_code == 201
        assert upload(c, "broken", adapter_files(seed=52)).status_code == 201
    first.stop()
    weights = store / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])

    second = ServerProcess(store)
    second.start()
    try:
        with second.client() as c:
            assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["good"]
            assert _text(c, "good").status_code == 200
        assert (store / ".quarantine" / "broken").is_dir()
        assert "broken" in second.log_path.read_text() and "quarantine" in second.log_path.read_text()
    finally:
        second.stop()


# ---- property-based fuzzing of every route, from the server's own OpenAPI schema

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz") / "store", "--max-seq-len", "256",
                         env={"LORAPLEX_MAX_NEW_TOKENS": "4", "LORAPLEX_MAX_PROMPT_TOKENS": "128"})
    proc.start()
    yield proc
    proc.stop()


def test_fuzzed_requests_never_get_a_server_error(fuzz_server):
    """Every operation in /openapi.json, a bounded number of generated requests each (schemathesis's
    pytest plugin does not load under pytest 9, so the operations are driven with hypothesis directly)."""
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    failures, statuses = [], []
    for operation in operations:
        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(base_url=fuzz_server.url, timeout=60)
            statuses.append((case.method, case.path, response.status_code))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                f"{response.status_code}: {response.text[:200]}")
        fuzz()
    with httpx.Client(base_url=fuzz_server.url, timeout=10) as c:
        assert c.get("/health").status_code == 200
    assert not failures, "\n".join(failures)
    assert len(statuses) >= 3 * len(operations)
    assert any(code < 300 for _, _, code in statuses)  # the fuzzer reached past validation somewhere
