"""The Ray Serve cluster (`python -m server.cluster`): two engine replicas behind one HTTP API on 127.0.0.1.

Each adapter must answer exactly as the single-process server answers it, its requests must stay on the
replica holding it, and uploads, replaces and deletes made through one replica must reach the other through
the shared store. The ingress must refuse what a key may not do before any replica sees the request. The last
tests drive the shared-store registry directly on tiny tensors.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from adapters import AdapterLimits, AdapterStore, llama_base_shapes, peft_folder_files, random_adapter
from server.cluster.shared_registry import SharedStoreRegistry
from server.errors import AdapterExists, AdapterInvalid, AdapterNotFound, AdapterTooLarge
from tests.integration.server_process import ServerProcess, free_port, wait_healthy

pytestmark = pytest.mark.integration

SMOLLM2_SHAPES = llama_base_shapes(num_layers=30, hidden=576, intermediate=1536, kv_dim=192)
ADAPTER_SEEDS = {"red": 1, "green": 2, "blue": 3, "gold": 4}
PROMPT = "The sea is"
REPLICA = "x-loraplex-replica"
ADMIN_KEY = "cluster-test-admin-key-0123"
USER_KEY = "cluster-test-user-key-0123"
TENANT_KEY = "cluster-test-tenant-key-0123"  # may use "red" and nothing else


class ClusterProcess:
    """`python -m server.cluster` in its own session, with Ray's files under a private temp dir, so the
    whole Ray cluster it started can be found and stopped afterwards."""

    def __init__(self, store_dir: Path, log_path: Path, *extra_args: str):
        self.store_dir = store_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_dir = tempfile.mkdtemp(prefix="lpx-ray-", dir="/tmp")  # short: Ray's socket paths live here
        self.cmd = [sys.executable, "-m", "server.cluster", "--replicas", "2", "--host", "127.0.0.1",
                    "--port", str(self.port), "--store-dir", str(store_dir), "--max-batch", "16",
                    "--max-seq-len", "1024", *extra_args]
        self.log_path = log_path
        self.keys_file = store_dir.parent / "keys.json"
        self.keys_file.write_text(json.dumps([{"key": TENANT_KEY, "role": "user", "adapters": ["red"]}]))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        env = {**os.environ, "RAY_TMPDIR": self.ray_dir, "RAY_USAGE_STATS_ENABLED": "0", "LORAPLEX_ADMIN_KEYS": ADMIN_KEY,
               "LORAPLEX_USER_KEYS": USER_KEY, "LORAPLEX_KEYS_FILE": str(self.keys_file),
               # Serve's router gives up on an adapter's replica once routing took 1-2 s, which a busy 2-core
               # machine can reach: the affinity checks below would then depend on the machine's load
               "RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "30"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        try:
            wait_healthy(self.proc, self.url, self.log_path, timeout, interval=1)
        except RuntimeError:
            self.stop()
            raise

    def client(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {key}"})

    def stop(self) -> list[str]:
        """SIGTERM (serve.shutdown, ray.shutdown), then SIGKILL for whatever is left; returns what was left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(2)  # Ray's workers exit shortly after the raylet
        left = self._ray_processes()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for pid, _ in self._ray_processes():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        return [cmd for _, cmd in left]

    def _ray_processes(self) -> list[tuple[int, str]]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[4])
            except (OSError, ValueError, IndexError):
                continue
            if self.ray_dir in cmd or (self.proc is not None and session == self.proc.pid):
                found.append((int(entry.name), cmd[:120]))
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, default_model_folder):
    pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -e '.[ray]'")
    root = tmp_path_factory.mktemp("cluster")
    proc = ClusterProcess(root / "store", root / "cluster.log", "--adapters-per-replica", "4")
    proc.start()
    yield proc
    left = proc.stop()
    assert not left, f"processes outlived the cluster: {left}"


def upload(client: httpx.Client, name: str, seed: int, **form) -> httpx.Response:
    files = peft_folder_files(random_adapter(name, SMOLLM2_SHAPES, seed=seed, init_std=0.05))
    return client.post("/adapters", data={"name": name, **form},
                       files=[("files", (file_name, data)) for file_name, data in files.items()])


def generate(client: httpx.Client, adapter: str | None) -> httpx.Response:
    return client.post("/generate", json={"prompt": PROMPT, "adapter": adapter, "max_new_tokens": 8, "temperature": 0})


def answer(client: httpx.Client, adapter: str | None) -> tuple[str, str | None]:
    """The generated text and the replica that wrote it."""
    response = generate(client, adapter)
    assert response.status_code == 200, response.text
    return response.json()["text"], response.headers.get(REPLICA)


def streamed(client: httpx.Client, adapter: str) -> tuple[str, str]:
    body = {"prompt": PROMPT, "adapter": adapter, "max_new_tokens": 8, "temperature": 0, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 2 and events[-1]["finish_reason"] in ("length", "stop")
    return "".join(e["text"] for e in events), response.headers[REPLICA]


def reference_answers(store_copy: Path, log_path: Path, names: list[str | None]) -> dict:
    """The same requests answered by one `python -m server` process over a copy of the store."""
    server = ServerProcess(store_copy, log_path=log_path)
    server.start()
    try:
        with server.client() as c:
            return {name: answer(c, name)[0] for name in names}
    finally:
        server.stop()


def test_each_adapter_answers_like_one_process_from_the_replica_holding_it(cluster, tmp_path):
    names = [*ADAPTER_SEEDS, None]
    assert httpx.post(f"{cluster.url}/generate", json={"prompt": PROMPT}).status_code == 401, "replicas check keys"
    with cluster.client() as c:
        for name, seed in ADAPTER_SEEDS.items():
            assert upload(c, name, seed).status_code == 201
        for _ in range(2):  # any replica lists every adapter of the shared store
            assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == sorted(ADAPTER_SEEDS)
        first = {name: answer(c, name) for name in names}  # one at a time: each adapter settles on a replica

        mixed = [name for name in names for _ in range(5)][:24]
        random.Random(0).shuffle(mixed)
        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda name: (name, *answer(c, name)), mixed))
        assert streamed(c, "red") == first["red"], "a streamed answer comes from the same replica, token by token"

    served_by = defaultdict(Counter)
    for name, text, replica in served:
        assert text == first[name][0], f"{name or 'base'} answered differently on {replica}"
        served_by[name][replica] += 1
    assert len({text for text, _ in first.values()}) == len(names), "every adapter should change the answer"
    for name in ADAPTER_SEEDS:
        home = first[name][1]
        assert served_by[name][home] >= 0.8 * sum(served_by[name].values()), (name, home, served_by[name])
    assert len({replica for _, _, replica in served}) == 2, "both replicas should take traffic"

    shutil.copytree(cluster.store_dir, tmp_path / "store")
    assert reference_answers(tmp_path / "store", tmp_path / "reference.log", names) == \
        {name: text for name, (text, _) in first.items()}


def test_replace_and_delete_through_one_replica_reach_the_other(cluster, tmp_path):
    with cluster.client() as c:
        for name, seed in ADAPTER_SEEDS.items():
            if name not in [a["name"] for a in c.get("/adapters").json()["adapters"]]:
                assert upload(c, name, seed).status_code == 201
        before = {name: answer(c, name)[0] for name in ("blue", "gold")}  # both now held by some replica

        assert upload(c, "blue", 99).status_code == 409
        assert upload(c, "blue", 99, replace="true").status_code == 201
        assert c.delete("/adapters/gold").status_code == 204

        after = {answer(c, "blue")[0] for _ in range(3)}
        assert len(after) == 1 and after != {before["blue"]}, "the replaced adapter should answer as its new version"
        for _ in range(3):
            gone = generate(c, "gold")
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"
        assert c.get("/adapters/gold").status_code == 404
        assert "gold" not in [a["name"] for a in c.get("/adapters").json()["adapters"]]

    shutil.copytree(cluster.store_dir, tmp_path / "store")
    assert reference_answers(tmp_path / "store", tmp_path / "reference.log", ["blue"]) == {"blue": after.pop()}


def status_before_body(port: int, path: str, length: int, key: str | None = None) -> int:
    """The status a POST gets after sending only its head, which declares a body of `length` bytes. The
    answer must come, and the connection close (so no proxy goes on reading a body), within the timeout."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def refused_by_ingress(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert REPLICA not in response.headers, "answered by the ingress: no replica saw the request"


def test_the_ingress_refuses_a_request_without_a_key_before_reading_it_or_routing_it(cluster):
    anonymous = httpx.post(f"{cluster.url}/generate", json={"prompt": PROMPT, "adapter": "red"}, timeout=30)
    refused_by_ingress(anonymous, 401, "unauthorized")
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{cluster.url}/metrics", timeout=30).status_code == 401
    assert httpx.get(f"{cluster.url}/health", timeout=30).status_code == 200, "liveness stays public"

    started = time.monotonic()
    assert status_before_body(cluster.port, "/generate", 300 << 20) == 401
    assert status_before_body(cluster.port, "/generate", 300 << 20, ADMIN_KEY) == 413
    assert status_before_body(cluster.port, "/adapters", 300 << 20, ADMIN_KEY) == 413
    assert time.monotonic() - started < 10, "a declared size is judged before any of the body is read"

    with cluster.client() as c:  # a chunked body declares no size: it is cut at the limit
        cut = c.post("/generate", content=(b" " * (1 << 20) for _ in range(3)),
                     headers={"Content-Type": "application/json"})
        refused_by_ingress(cut, 413, "too_large")


def test_a_user_key_cannot_delete_and_a_tenant_key_finds_no_other_tenants_adapter(cluster):
    with cluster.client() as admin:
        stored = [a["name"] for a in admin.get("/adapters").json()["adapters"]]
        for name in ("red", "green"):
            if name not in stored:
                assert upload(admin, name, ADAPTER_SEEDS[name]).status_code == 201
    with cluster.client(USER_KEY) as user:
        refused_by_ingress(user.delete("/adapters/red"), 403, "forbidden")
        refused_by_ingress(upload(user, "violet", 5), 403, "forbidden")
        assert "red" in [a["name"] for a in user.get("/adapters").json()["adapters"]]
    with cluster.client(TENANT_KEY) as tenant:
        other = generate(tenant, "green")
        refused_by_ingress(other, 404, "adapter_not_found")
        assert other.json()["error"]["message"] == "adapter 'green' is not registered"
        openai = tenant.post("/v1/completions", json={"model": "green", "prompt": PROMPT, "max_tokens": 4})
        refused_by_ingress(openai, 404, "adapter_not_found")
        own = generate(tenant, "red")
        assert own.status_code == 200 and REPLICA in own.headers, own.text


# ---- the shared-store registry on tiny tensors: two registries over one folder stand for two replicas

TINY = llama_base_shapes(2, 16, 32, 8)


def tiny_files(name: str, seed: int) -> dict[str, bytes]:
    return peft_folder_files(random_adapter(name, TINY, seed=seed))


@pytest.fixture
def two_replicas(tmp_path):
    return [SharedStoreRegistry(AdapterStore(tmp_path), TINY, AdapterLimits(max_adapters=3)) for _ in range(2)]


def test_a_replica_holds_only_what_it_is_asked_to_hold(two_replicas):
    a, b = two_replicas
    a.register_upload("one", tiny_files("one", 1))
    assert "one" in b and len(b) == 1 and [e.name for e in b.list()] == ["one"]
    assert b.list()[0].weights == {}, "listings carry metadata only"
    assert b.get("one") is not b.get("one"), "not held: read for the request, not kept"
    b.hold("one")
    assert b.get("one") is b.get("one")
    b.release("one")
    assert b.get("one") is not b.get("one")


def test_replace_and_delete_by_one_replica_are_seen_by_the_other(two_replicas):
    a, b = two_replicas
    a.register_upload("one", tiny_files("one", 1))
    b.hold("one")
    old = b.get("one")
    b.register_upload("one", tiny_files("one", 2), replace=True)  # a never held it, b swaps it in the store
    with pytest.raises(AdapterExists):
        a.register_upload("one", tiny_files("one", 3))
    a.register_upload("one", tiny_files("one", 3), replace=True)
    new = b.get("one")
    assert not torch.equal(new.weights["layers.0.q_proj"].A, old.weights["layers.0.q_proj"].A)
    assert b.get("one") is new
    a.remove("one")
    with pytest.raises(AdapterNotFound):
        b.get("one")
    a.register_upload("one", tiny_files("one", 4))
    assert b.get("one") is b.get("one"), "still held: the new version is kept"


def test_pinned_adapters_and_the_limit_count_across_replicas(two_replicas):
    a, b = two_replicas
    b.add(random_adapter("shipped", TINY, seed=9), persist=False)
    assert "shipped" in b and "shipped" not in a
    with pytest.raises(AdapterInvalid):
        b.remove("shipped")
    a.register_upload("one", tiny_files("one", 1))
    a.register_upload("two", tiny_files("two", 2))
    with pytest.raises(AdapterTooLarge):  # b: two stored + one pinned = max_adapters
        b.register_upload("three", tiny_files("three", 3))


def test_a_replica_never_misses_an_adapter_that_another_replaces(two_replicas):
    a, b = two_replicas
    a.register_upload("one", tiny_files("one", 1))
    b.hold("one")
    stop, misses = threading.Event(), []

    def look() -> None:
        while not stop.is_set():
            try:
                b.get("one")
            except AdapterNotFound as e:
                misses.append(e)

    reader = threading.Thread(target=look)
    reader.start()
    try:
        for seed in range(2, 40):
            a.register_upload("one", tiny_files("one", seed), replace=True)
    finally:
        stop.set()
        reader.join()
    assert not misses
    assert torch.equal(b.get("one").weights["layers.0.q_proj"].A,
                       a.get("one").weights["layers.0.q_proj"].A), "b holds the last version"
