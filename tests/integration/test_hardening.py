"""Who may do what, limits, metrics and request ids, on real server processes over loopback."""

import concurrent.futures as cf
import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.server_process import ServerProcess
from tests.integration.test_http_api import adapter_files, upload

pytestmark = pytest.mark.integration

ADMIN = "admin-key-0123456789abcdef"
USER = "user-key-0123456789abcdef"
TENANT = "tenant-key-0123456789abcdef"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps([{"key": TENANT, "role": "user", "adapters": ["private"]}]))
    proc = ServerProcess(root / "store", "--max-batch", "4",
                         env={"LORAPLEX_ADMIN_KEYS": ADMIN, "LORAPLEX_USER_KEYS": USER,
                              "LORAPLEX_KEYS_FILE": str(keys_file), "LORAPLEX_MAX_PENDING": "3",
                              "LORAPLEX_MAX_PROMPT_TOKENS": "64"})
    proc.start()
    yield proc
    proc.stop()


def test_keys_and_roles(secured):
    body = {"prompt": "Hi", "max_new_tokens": 2}
    with secured.client() as c:
        missing = c.post("/generate", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert c.post("/generate", json=body, headers=bearer("wrong-key-0123456789")).status_code == 401
        assert c.post("/generate", json=body, headers=bearer(USER)).status_code == 200
        assert c.get("/adapters", headers=bearer(USER)).status_code == 200
        files = [("files", (n, d)) for n, d in adapter_files(seed=21).items()]
        denied = c.post("/adapters", data={"name": "private"}, files=files, headers=bearer(USER))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        assert c.post("/adapters", data={"name": "private"}, files=files, headers=bearer(ADMIN)).status_code == 201
        assert c.post("/adapters", data={"name": "other"}, files=files, headers=bearer(ADMIN)).status_code == 201
        assert c.delete("/adapters/other", headers=bearer(USER)).status_code == 403
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "other"}, headers=bearer(USER)).status_code == 403
        assert c.get("/health").status_code == 200  # liveness needs no key


def metric(client, series: str) -> float:
    """The value of one series on /metrics, 0 while it has not appeared."""
    text = client.get("/metrics", headers=bearer(ADMIN)).text  # a dev-mode server ignores the key
    lines = [line for line in text.splitlines() if line.startswith(series + " ")]
    return float(lines[0].removeprefix(series + " ")) if lines else 0.0


def prefix_hit_tokens(client) -> float:
    return metric(client, "loraplex_prefix_cache_hit_tokens_total")


def test_keys_never_share_prefix_cache_entries(secured):
    """A cache hit shows as a faster first token: one key must not learn what another key asked."""
    body = {"prompt": "The lighthouse keeper wrote in her log every night about the ships she had seen "
                      "and the storms", "max_new_tokens": 2}
    with secured.client() as c:
        assert c.post("/generate", json=body, headers=bearer(USER)).status_code == 200
        before = prefix_hit_tokens(c)
        assert c.post("/generate", json=body, headers=bearer(TENANT)).status_code == 200
        assert prefix_hit_tokens(c) == before
        assert c.post("/generate", json=body, headers=bearer(USER)).status_code == 200
        assert prefix_hit_tokens(c) > before, "the same key's repeated prompt should hit"


def test_tenant_sees_and_uses_only_its_adapters(secured):
    with secured.client() as c:
        names = [a["name"] for a in c.get("/adapters", headers=bearer(TENANT)).json()["adapters"]]
        assert names == ["private"]
        ok = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "adapter": "private"}, headers=bearer(TENANT))
        assert ok.status_code == 200
        hidden = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2, "adapter": "other"}, headers=bearer(TENANT))
        assert hidden.status_code == 404
        models = c.get("/v1/models", headers=bearer(TENANT)).json()["data"]
        assert "other" not in {m["id"] for m in models}


def test_keys_never_reach_the_log(secured):
    with secured.client() as c:
        c.get("/adapters", headers=bearer(USER))
    log = secured.log_path.read_text()
    assert USER not in log and ADMIN not in log and TENANT not in log
    assert '"key": "key-' in log  # requests are attributed by a short hash


def test_pending_limit_answers_429_with_retry_after(secured):
    body = {"prompt": "Count slowly", "max_new_tokens": 48, "ignore_eos": True}
    with cf.ThreadPoolExecutor(3) as pool, secured.client() as c:
        busy = [pool.submit(c.post, "/generate", json=body, headers=bearer(USER)) for _ in range(3)]  # max_pending=3
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = c.get("/health", headers=bearer(USER)).json()
            if health["running"] + health["waiting"] == 3:
                break
            time.sleep(0.05)
        plain = c.post("/generate", json=body, headers=bearer(USER))
        streamed = c.post("/generate", json={**body, "stream": True}, headers=bearer(USER))
        assert [f.result().status_code for f in busy] == [200, 200, 200]
    for refused in (plain, streamed):  # a stream is refused before it starts, not cut off after a 200
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"


def test_prompt_token_limit(secured):
    with secured.client() as c:
        resp = c.post("/generate", json={"prompt": "word " * 200, "max_new_tokens": 2}, headers=bearer(USER))
    assert resp.status_code == 422 and "limit" in resp.json()["error"]["message"]


def test_dev_mode_refuses_to_bind_beyond_loopback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "server", "--host", "0.0.0.0", "--store-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "loopback" in done.stderr


def test_request_id_header_and_metrics(server):
    with server.client() as c:
        mine = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 3}, headers={"X-Request-ID": "trace-42"})
        assert mine.headers["x-request-id"] == "trace-42"
        assert len(c.get("/health").headers["x-request-id"]) == 32
        text = c.get("/metrics").text
    assert 'loraplex_requests_total{adapter="__base__",finish_reason="length"}' in text
    assert "loraplex_ttft_seconds_bucket" in text and "loraplex_batch_size_bucket" in text
    assert "loraplex_queue_waiting" in text and "loraplex_merges_total" in text
    assert "loraplex_lora_cover_builds_total" in text and "loraplex_prefix_cache_hit_tokens_total" in text
    # three tokens: the prompt's step samples the first, two decode steps the rest
    steps = {kind: float(n) for kind, n in re.findall(r'loraplex_step_seconds_count\{kind="(\w+)"\} (\S+)', text)}
    assert steps["prefill"] >= 1 and steps["decode"] >= 2
    assert "loraplex_gc_pause_seconds_bucket" in text


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"prompt": "Tell a very long story", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
    with server.client() as c:
        with c.stream("POST", "/generate", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    break
        # the stream is closed here, after one event of 400
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/health").json()["running"]:
            time.sleep(0.1)
        assert c.get("/health").json()["running"] == 0
        assert 'finish_reason="abort"' in c.get("/metrics").text


@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": "Tell a very long story", "max_new_tokens": 400, "ignore_eos": True}),
    ("/v1/chat/completions", {"max_tokens": 400, "ignore_eos": True,
                              "messages": [{"role": "user", "content": "Tell a very long story"}]}),
])
def test_a_client_giving_up_on_a_non_streaming_request_frees_the_slot(server, path, body):
    with server.client() as c:
        if path.startswith("/v1/"):
            body = {**body, "model": c.get("/v1/models").json()["data"][0]["id"]}  # the base model
        aborted_before = aborted_requests(c)
        with pytest.raises(httpx.ReadTimeout):  # 400 tokens take seconds; the client stops waiting at once
            httpx.post(server.url + path, json=body, timeout=httpx.Timeout(10, read=0.5))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/health").json()["running"]:
            time.sleep(0.1)
        assert c.get("/health").json()["running"] == 0, "the engine kept generating for nobody"
        assert aborted_requests(c) == aborted_before + 1


def aborted_requests(client) -> float:
    return metric(client, 'loraplex_requests_total{adapter="__base__",finish_reason="abort"}')


def test_deadline_answers_408(tmp_path):
    proc = ServerProcess(tmp_path / "store", env={"LORAPLEX_REQUEST_TIMEOUT_S": "0.5"})
    proc.start()
    try:
        with proc.client() as c:
            resp = c.post("/generate", json={"prompt": "Go on", "max_new_tokens": 1000, "ignore_eos": True})
            assert resp.status_code == 408 and resp.json()["error"]["code"] == "deadline_exceeded"
            assert c.get("/health").json()["running"] == 0
    finally:
        proc.stop()
