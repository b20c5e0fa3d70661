"""The native HTTP API on a real server process and the real default model, over loopback."""

import json
import math

import httpx
import pytest
import torch
from safetensors.torch import save

from adapters import llama_base_shapes, peft_folder_files, random_adapter
from tests.integration.server_process import ServerProcess
from tests.unit.test_heap import kernel_collapses_on_request

pytestmark = pytest.mark.integration

SMOLLM2_SHAPES = llama_base_shapes(num_layers=30, hidden=576, intermediate=1536, kv_dim=192)
CHAT = [{"role": "user", "content": "Say hello to the crew."}]


def adapter_files(seed: int = 1, **kwargs) -> dict[str, bytes]:
    kwargs.setdefault("init_std", 0.05)
    return peft_folder_files(random_adapter("tmp", SMOLLM2_SHAPES, seed=seed, **kwargs))


def upload(client: httpx.Client, name: str, files: dict[str, bytes], **form):
    parts = [("files", (fname, data)) for fname, data in files.items()]
    return client.post("/adapters", data={"name": name, **form}, files=parts)


def generate(client: httpx.Client, adapter=None, **body) -> httpx.Response:
    body = {"messages": CHAT, "max_new_tokens": 12, "temperature": 0, **body}
    return client.post("/generate", json={**body, "adapter": adapter})


def test_health(server):
    with server.client() as c:
        body = c.get("/health").json()
    assert body["status"] == "ok" and body["model"] == "SmolLM2-135M-Instruct" and body["device"] == "cpu"


@pytest.mark.skipif(not kernel_collapses_on_request(),
                    reason="needs Linux 6.1+ with transparent huge pages on (elsewhere khugepaged moves them later)")
def test_the_weights_sit_in_huge_pages(server):
    smaps = open(f"/proc/{server.proc.pid}/smaps_rollup").read().splitlines()
    huge_kb = next(int(line.split()[1]) for line in smaps if line.startswith("AnonHugePages:"))
    with server.client() as c:
        health = c.get("/health").json()
    assert huge_kb * 1024 >= 0.9 * health["base_weight_bytes"]  # every base weight the decode step streams
    test_health(server)  # and it serves


def test_upload_generate_delete(server):
    with server.client() as c:
        created = upload(c, "crew", adapter_files(seed=1))
        assert created.status_code == 201, created.text
        info = created.json()
        assert info["name"] == "crew" and info["rank"] == 8 and info["target_modules"] == ["q_proj", "v_proj"]
        assert info["size_bytes"] > 0
        assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["crew"]
        assert c.get("/adapters/crew").json() == {**info, "card": None, "chat_template": None}  # neither was uploaded

        base = generate(c).json()
        tuned = generate(c, "crew").json()
        assert tuned["adapter"] == "crew" and tuned["finish_reason"] in ("length", "stop")
        assert tuned["usage"]["completion_tokens"] >= 1 and tuned["usage"]["prompt_tokens"] == base["usage"]["prompt_tokens"]
        assert tuned["text"] != base["text"], "the adapter should change the output"

        assert c.delete("/adapters/crew").status_code == 204
        gone = generate(c, "crew")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"
        assert c.get("/adapters/crew").status_code == 404
        assert c.delete("/adapters/crew").status_code == 404


def test_streaming_matches_plain_response(server):
    with server.client() as c:
        plain = generate(c, max_new_tokens=10).json()
        events = []
        with c.stream("POST", "/generate", json={"messages": CHAT, "max_new_tokens": 10, "temperature": 0,
                                                 "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    assert len(events) >= 3
    assert events[-1]["finish_reason"] == plain["finish_reason"] and events[-1]["usage"] == plain["usage"]
    assert "".join(e["text"] for e in events) == plain["text"]


def _nan_adapter() -> dict[str, bytes]:
    files = adapter_files(seed=2)
    from safetensors.torch import load

    tensors = load(files["adapter_model.safetensors"])
    first = sorted(tensors)[0]
    tensors[first][0, 0] = math.nan
    return {**files, "adapter_model.safetensors": save(tensors)}


def _drop_b_tensor() -> dict[str, bytes]:
    from safetensors.torch import load

    files = adapter_files(seed=3)
    tensors = load(files["adapter_model.safetensors"])
    del tensors[next(k for k in sorted(tensors) if "lora_B" in k)]
    return {**files, "adapter_model.safetensors": save(tensors)}


def _wrong_shape() -> dict[str, bytes]:
    files = adapter_files(seed=4)
    from safetensors.torch import load

    tensors = load(files["adapter_model.safetensors"])
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = torch.zeros(8, 100)
    return {**files, "adapter_model.safetensors": save(tensors)}


MALFORMED = {
    "bad json": lambda: {**adapter_files(), "adapter_config.json": b"{not json"},
    "config not an object": lambda: {**adapter_files(), "adapter_config.json": b"[1, 2]"},
    "missing tensors": _drop_b_tensor,
    "wrong shapes": _wrong_shape,
    "nan": _nan_adapter,
    "huge rank": lambda: adapter_files(rank=512),
    "pickle file": lambda: {"adapter_config.json": adapter_files()["adapter_config.json"],
                            "adapter_model.bin": b"\x80\x04\x95pickle"},
    "truncated safetensors": lambda: {**adapter_files(), "adapter_model.safetensors": b"\x10\x00\x00"},
    "path traversal file name": lambda: {"../adapter_config.json": adapter_files()["adapter_config.json"]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_uploads_are_refused_and_nothing_is_stored(server, case):
    with server.client() as c:
        resp = upload(c, f"bad-{abs(hash(case)) % 1000}", MALFORMED[case]())
        assert 400 <= resp.status_code < 500, (case, resp.status_code, resp.text)
        assert resp.json()["error"]["message"]
        assert c.get("/adapters").json()["adapters"] == []
        assert c.get("/health").status_code == 200
    assert [p.name for p in server.store_dir.iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x" * 100])
def test_bad_adapter_names_are_refused(server, name):
    with server.client() as c:
        resp = upload(c, name, adapter_files())
        assert resp.status_code in (404, 422), resp.text
    assert not any(p.name == "evil" for p in server.store_dir.parent.rglob("evil"))


def test_name_taken_and_oversize(server):
    with server.client() as c:
        assert upload(c, "dup", adapter_files(seed=5)).status_code == 201
        taken = upload(c, "dup", adapter_files(seed=6))
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "adapter_exists"
        huge = upload(c, "huge", {"adapter_config.json": adapter_files()["adapter_config.json"],
                                  "adapter_model.safetensors": b"\0" * (66 * 1024 * 1024)})
        assert huge.status_code == 413
        assert c.delete("/adapters/dup").status_code == 204


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "messages": CHAT},
    {},
    {"prompt": "hi", "temperature": -1},
    {"prompt": "hi", "top_p": 0},
    {"prompt": "hi", "max_new_tokens": 0},
    {"prompt": "hi", "max_new_tokens": 10 ** 9},
    {"prompt": "hi", "stop": [""]},
    {"prompt": "hi", "unknown_field": 1},
    {"messages": [{"role": "wizard", "content": "x"}]},
])
def test_invalid_generate_parameters(server, body):
    with server.client() as c:
        resp = c.post("/generate", json=body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "invalid_request"
        assert c.post("/generate", content=b"{broken", headers={"content-type": "application/json"}).status_code == 422


def test_restart_keeps_uploaded_adapters(tmp_path):
    store = tmp_path / "store"
    first = ServerProcess(store)
    first.start()
    try:
        with first.client() as c:
            assert upload(c, "keeper", adapter_files(seed=7)).status_code == 201
            before = generate(c, "keeper").json()["text"]
    finally:
        first.stop()
    second = ServerProcess(store)
    second.start()
    try:
        with second.client() as c:
            assert [a["name"] for a in c.get("/adapters").json()["adapters"]] == ["keeper"]
            assert generate(c, "keeper").json()["text"] == before
    finally:
        second.stop()
