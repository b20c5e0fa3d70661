"""Issue 23's findings, each tried again as the attacker did, against real server processes on loopback.

A keyed server with admin, user, tenant-admin and metrics keys; the shared development-mode server
(`server`, no keys) for the checks that only apply there.
"""

import concurrent.futures as cf
import json
import socket
import threading
import time

import httpx
import pytest

from tests.integration.server_process import ServerProcess
from tests.integration.test_hardening import ADMIN, USER, bearer
from tests.integration.test_http_api import adapter_files

pytestmark = pytest.mark.integration

RED = "red-tenant-admin-0123456789"     # an admin of its own adapters only
BLUE = "blue-tenant-admin-0123456789"
METRICS = "metrics-key-0123456789abcdef"
BODY_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps([{"key": RED, "role": "admin", "adapters": ["red"]},
                                     {"key": BLUE, "role": "admin", "adapters": ["blue"]}]))
    (root / "adapter-root").mkdir()
    proc = ServerProcess(root / "store", "--max-batch", "2", "--body-timeout-s", str(BODY_TIMEOUT_S),
                         "--max-messages", "256", "--adapter-root", str(root / "adapter-root"),
                         env={"LORAPLEX_ADMIN_KEYS": ADMIN, "LORAPLEX_USER_KEYS": USER,
                              "LORAPLEX_METRICS_KEYS": METRICS, "LORAPLEX_KEYS_FILE": str(keys_file),
                              "LORAPLEX_MAX_PENDING": "8"})
    proc.adapter_root = root / "adapter-root"
    proc.start()
    with proc.client() as c:
        for name, key in (("red", RED), ("blue", BLUE)):
            files = [("files", (n, d)) for n, d in adapter_files(seed=31).items()]
            assert c.post("/adapters", data={"name": name}, files=files, headers=bearer(key)).status_code == 201
    yield proc
    proc.stop()


def rss_mb(proc: ServerProcess) -> float:
    for line in open(f"/proc/{proc.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_request(proc: ServerProcess, head: str, body: bytes = b"", timeout: float = 10) -> tuple[bytes, float]:
    """Sends a request head (and a body start) and returns the server's answer and how long it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"error"' in answer:
                break
    return answer, time.monotonic() - started


# 1. one request fails every tenant's batch

def test_poisoned_sampling_parameters_never_fail_the_victims_beside_them(keyed):
    victim = {"prompt": "Tell me about the sea.", "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    poisons = [{"prompt": "Hi", "max_new_tokens": 8, "temperature": 1e-39},
               {"prompt": "Hi", "max_new_tokens": 8, "temperature": 0.8, "top_p": 1e-46}]
    with keyed.client() as c, cf.ThreadPoolExecutor(6) as pool:
        alone = c.post("/generate", json=victim, headers=bearer(USER)).json()
        victims = [pool.submit(c.post, "/generate", json=victim, headers=bearer(USER)) for _ in range(3)]
        poisoned = [pool.submit(c.post, "/generate", json=p, headers=bearer(USER)) for p in poisons]
        for future in poisoned:
            assert future.result().status_code == 200
            assert future.result().json()["finish_reason"] != "error"
        for future in victims:
            got = future.result()
            assert got.status_code == 200 and got.json()["text"] == alone["text"]


def test_an_adapter_with_absurd_magnitudes_is_refused_at_upload(keyed):
    files = [("files", (n, d)) for n, d in adapter_files(seed=4, init_std=1e30).items()]
    with keyed.client() as c:
        refused = c.post("/adapters", data={"name": "huge"}, files=files, headers=bearer(ADMIN))
        assert refused.status_code == 422, refused.text
        assert c.get("/adapters/huge", headers=bearer(ADMIN)).status_code == 404


# 2. an out-of-range seed leaked a queue place for good

def test_out_of_range_seeds_are_refused_and_take_no_queue_place(keyed):
    with keyed.client() as c:
        for _ in range(12):  # more than max_pending
            refused = c.post("/generate", json={"prompt": "Hi", "seed": 2**64, "max_new_tokens": 2},
                             headers=bearer(USER))
            assert refused.status_code == 422 and "seed" in refused.json()["error"]["message"]
        ok = c.post("/generate", json={"prompt": "Hi", "seed": 2**64 - 1, "max_new_tokens": 2}, headers=bearer(USER))
        assert ok.status_code == 200


# 3. no key, still a cost

def test_a_huge_body_without_a_key_is_refused_before_it_is_read(keyed):
    before = rss_mb(keyed)
    for path in ("/generate", "/adapters", "/v1/chat/completions"):
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {300 * 2**20}\r\n")
        answer, took = raw_request(keyed, head, b"{" + b" " * 65536)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert took < 5
    assert rss_mb(keyed) - before < 100


def test_a_body_over_the_limit_is_refused_with_a_key_too_even_when_chunked(keyed):
    with keyed.client() as c:
        big = {"prompt": "x" * (2 << 20)}
        declared = c.post("/generate", json=big, headers=bearer(USER))
        assert declared.status_code == 413

        def chunks():
            for _ in range(40):
                yield b" " * 65536

        chunked = c.post("/generate", content=chunks(), headers={**bearer(USER), "Content-Type": "application/json"})
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]


def test_a_server_side_load_checks_the_size_before_reading(keyed):
    folder = keyed.adapter_root / "sparse"
    folder.mkdir()
    files = adapter_files(seed=3)
    (folder / "adapter_config.json").write_bytes(files["adapter_config.json"])
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.truncate(3 << 30)  # 3 GiB on paper, no blocks on disk
    before = rss_mb(keyed)
    with keyed.client() as c:
        refused = c.post("/v1/load_lora_adapter", json={"lora_name": "sparse", "lora_path": str(folder)},
                         headers=bearer(ADMIN))
    assert refused.status_code == 413
    assert rss_mb(keyed) - before < 100


# 4. cheap-to-send prompts froze the event loop

def test_many_empty_messages_are_refused_while_health_keeps_answering(keyed):
    worst = []
    stop = threading.Event()

    def watch_health():
        with keyed.client(timeout=10) as c:
            while not stop.is_set():
                started = time.monotonic()
                assert c.get("/health").status_code == 200
                worst.append(time.monotonic() - started)
                time.sleep(0.05)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        with keyed.client() as c:
            for count in (200_000, 20_000):  # over the byte limit; under it but over --max-messages
                messages = [{"role": "user", "content": ""}] * count
                refused = c.post("/generate", json={"messages": messages}, headers=bearer(USER))
                assert 400 <= refused.status_code < 500, refused.text[:200]
            long_stop = c.post("/generate", json={"prompt": "Hi", "stop": ["x" * 100_000]}, headers=bearer(USER))
            assert long_stop.status_code in (413, 422)
            assert c.post("/generate", json={"prompt": "Hi", "stop": ["y" * 1000]},
                          headers=bearer(USER)).status_code == 422
    finally:
        stop.set()
        watcher.join()
    assert worst and max(worst) < 1.0


# 5. tenants were not apart

def test_a_tenant_admin_manages_only_its_own_adapters(keyed):
    files = [("files", (n, d)) for n, d in adapter_files(seed=32).items()]
    with keyed.client() as c:
        assert c.delete("/adapters/blue", headers=bearer(RED)).status_code == 404
        replaced = c.post("/adapters", data={"name": "blue", "replace": "true"}, files=files, headers=bearer(RED))
        assert replaced.status_code == 403
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "blue"}, headers=bearer(RED)).status_code == 404
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "blue", "lora_path": "/nowhere"},
                      headers=bearer(RED)).status_code == 403
        assert c.get("/adapters/blue", headers=bearer(BLUE)).status_code == 200  # still there
        assert [a["name"] for a in c.get("/adapters", headers=bearer(RED)).json()["adapters"]] == ["red"]


def test_metrics_need_a_key_and_show_a_tenant_only_its_adapters(keyed):
    with keyed.client() as c:
        for key in (RED, BLUE):
            name = "red" if key == RED else "blue"
            assert c.post("/generate", json={"prompt": "Hi", "adapter": name, "max_new_tokens": 2},
                          headers=bearer(key)).status_code == 200
        anonymous = c.get("/metrics")
        assert anonymous.status_code == 401 and "red" not in anonymous.text and "blue" not in anonymous.text
        assert c.get("/metrics", headers=bearer(USER)).status_code == 403
        everything = c.get("/metrics", headers=bearer(METRICS)).text
        assert 'adapter="red"' in everything and 'adapter="blue"' in everything
        red = c.get("/metrics", headers=bearer(RED)).text
        assert 'adapter="red"' in red and 'adapter="blue"' not in red and "loraplex_queue_running" in red
        assert c.post("/generate", json={"prompt": "Hi"}, headers=bearer(METRICS)).status_code == 403


def test_health_tells_an_anonymous_caller_only_that_it_is_up(keyed):
    with keyed.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert "running" in c.get("/health", headers=bearer(USER)).json()


# 6. slow bodies (slow heads: test_slow_clients.py)

def test_a_body_sent_at_ten_bytes_a_second_is_cut(keyed):
    head = ("POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {USER}\r\nContent-Length: 1000\r\n")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=BODY_TIMEOUT_S + 10) as sock:
        sock.sendall(head.encode() + b"\r\n")
        sock.settimeout(0.1)
        answer = b""
        while time.monotonic() - started < BODY_TIMEOUT_S + 10:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took < BODY_TIMEOUT_S + 5


# 7. development mode trusted any web page

def test_dev_mode_refuses_other_host_names_and_cross_site_writes(server):
    files = [("files", (n, d)) for n, d in adapter_files(seed=33).items()]
    with server.client() as c:
        rebound = c.get("/adapters", headers={"Host": "attacker.example:8000"})
        assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]["message"]
        cross = c.post("/adapters", data={"name": "csrf"}, files=files,
                       headers={"Origin": "http://attacker.example", "Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        assert c.get("/adapters/csrf").status_code == 404
        same = c.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2},
                      headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200
        assert c.get("/", headers={"Host": f"localhost:{server.port}"}).status_code == 200


# 8. smaller ones: hostile adapter configs are refused quickly at upload, and the server stays up

@pytest.mark.parametrize("config_change", [
    {"rank_pattern": {"(?:.|.)*[0-9][0-9]": 4}},   # backtracks exponentially on a module path
    {"r": int("9" * 4000)},
    {"lora_alpha": 1e300},
], ids=["catastrophic-regex", "4000-digit-r", "huge-alpha"])
def test_hostile_adapter_configs_are_refused_quickly(keyed, config_change):
    files = adapter_files(seed=5)
    config = json.loads(files["adapter_config.json"]) | config_change
    files["adapter_config.json"] = json.dumps(config).encode()
    started = time.monotonic()
    with keyed.client() as c:
        refused = c.post("/adapters", data={"name": "hostile"}, files=[("files", (n, d)) for n, d in files.items()],
                         headers=bearer(ADMIN))
        assert refused.status_code == 422, refused.text[:300]
        assert len(refused.text) < 1000  # the config's values are not echoed at length
        assert c.get("/health").status_code == 200
    assert time.monotonic() - started < 10


def test_a_deeply_nested_config_is_refused(keyed):
    files = adapter_files(seed=6)
    files["adapter_config.json"] = b"[" * 30_000 + b"]" * 30_000  # under the size limit, past the recursion one
    with keyed.client() as c:
        refused = c.post("/adapters", data={"name": "nested"}, files=[("files", (n, d)) for n, d in files.items()],
                         headers=bearer(ADMIN))
        assert refused.status_code == 422, refused.text[:300]
