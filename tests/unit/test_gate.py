"""The gate (server/gate.py) of the single-process edge and the cluster's ingress: who passes on a request's
head alone, and how much body each route may send, in what time."""

import asyncio
import json

import pytest

from server.gate import ANONYMOUS, BodyTimeout, BodyTooLarge, Gate
from server.errors import Forbidden, Unauthorized
from server.routes.errors import status_of
from server.settings import Settings

ADMIN, USER, TENANT, METRICS = "admin-key-0123456789", "user-key-0123456789", "tenant-key-0123456789", \
    "metrics-key-0123456789"


@pytest.fixture
def gate(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": TENANT, "role": "user", "adapters": ["red"]}]))
    return Gate.from_settings(Settings(admin_keys=ADMIN, user_keys=USER, keys_file=keys, metrics_keys=METRICS,
                                       max_json_bytes=4096, max_adapter_bytes=1000, body_timeout_s=0.2))


def bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/"), ("GET", "/web/app.js"), ("HEAD", "/health")])
def test_public_routes_need_no_key_and_may_use_no_adapter(gate, method, path):
    caller = gate.admit(method, path, "")
    assert caller is ANONYMOUS and not caller.is_admin and not caller.may_use("red")
    assert gate.admit(method, path, bearer("wrong-key-0123456789")) is ANONYMOUS
    assert gate.admit(method, path, bearer(USER)).role == "user"  # a known caller is told more (/health)


@pytest.mark.parametrize("authorization", ["", "Basic abc", "Bearer ", bearer("wrong-key-0123456789"), ADMIN])
@pytest.mark.parametrize("method,path", [("POST", "/generate"), ("GET", "/adapters"), ("GET", "/metrics"),
                                         ("POST", "/health"), ("GET", "/web")])
def test_anything_else_without_a_valid_key_is_unauthorized(gate, authorization, method, path):
    with pytest.raises(Unauthorized):
        gate.admit(method, path, authorization)


@pytest.mark.parametrize("method,path", [("POST", "/adapters"), ("DELETE", "/adapters/red"),
                                         ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter")])
def test_only_admin_keys_change_adapters(gate, method, path):
    assert gate.admit(method, path, bearer(ADMIN)).is_admin
    for key in (USER, TENANT):
        with pytest.raises(Forbidden):
            gate.admit(method, path, bearer(key))


def test_a_tenant_key_carries_its_allow_list(gate):
    tenant = gate.admit("POST", "/generate", bearer(TENANT))
    assert tenant.may_use("red") and not tenant.may_use("green") and tenant.may_use(None)
    assert gate.admit("POST", "/v1/chat/completions", bearer(USER)).may_use("green")


def test_a_metrics_key_reads_metrics_and_nothing_else(gate):
    assert gate.admit("GET", "/metrics", bearer(METRICS)).role == "metrics"
    for method, path in (("GET", "/adapters"), ("POST", "/generate"), ("DELETE", "/adapters/red")):
        with pytest.raises(Forbidden, match="only read /metrics"):
            gate.admit(method, path, bearer(METRICS))


def test_metrics_are_for_admin_and_metrics_keys_not_users(gate):
    assert gate.admit("GET", "/metrics", bearer(ADMIN)).is_admin
    with pytest.raises(Forbidden):
        gate.admit("GET", "/metrics", bearer(USER))


def test_without_keys_everyone_is_admin():
    gate = Gate.from_settings(Settings())
    assert gate.admit("DELETE", "/adapters/red", "").is_admin


def test_uploads_get_their_adapter_limit_and_everything_else_the_json_limit(gate):
    assert gate.body_limit("POST", "/adapters") == 1000 + (1 << 20)
    assert gate.body_limit("POST", "/generate") == gate.body_limit("POST", "/v1/load_lora_adapter") == 4096


def test_body_refusals_map_to_the_single_process_servers_statuses_and_codes():
    assert (status_of(BodyTooLarge("x")), BodyTooLarge.code) == (413, "too_large")
    assert (status_of(BodyTimeout("x")), BodyTimeout.code) == (408, "body_timeout")


async def chunks_of(parts: list[bytes], pause_s: float = 0.0):
    for part in parts:
        await asyncio.sleep(pause_s)
        yield part


def read(gate, declared: str, parts: list[bytes], pause_s: float = 0.0) -> bytes:
    return asyncio.run(gate.read_body("POST", "/generate", declared, chunks_of(parts, pause_s)))


def test_a_body_within_its_limit_and_time_is_read_whole(gate):
    assert read(gate, "6", [b"abc", b"def"]) == b"abcdef"


def test_a_declared_length_over_the_limit_is_refused_before_any_chunk_is_read(gate):
    async def never():
        raise AssertionError("the body was read")
        yield b""

    with pytest.raises(BodyTooLarge):
        asyncio.run(gate.read_body("POST", "/generate", "4097", never()))


def test_a_chunked_body_is_cut_at_the_limit(gate):
    with pytest.raises(BodyTooLarge):
        read(gate, "", [b"x" * 1000] * 5)


def test_a_slow_body_is_cut_at_the_timeout(gate):
    with pytest.raises(BodyTimeout):
        read(gate, "", [b"x"] * 100, pause_s=0.01)
