"""The cluster ingress's gate: who passes on a request's head alone, and how much body each route may send."""

import json

import pytest

from server.cluster.gate import BodyTimeout, BodyTooLarge, Gate
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
                                       max_json_bytes=4096, max_adapter_bytes=1000))


def bearer(key: str) -> str:
    return f"Bearer {key}"


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/"), ("GET", "/web/app.js"), ("HEAD", "/health")])
def test_public_routes_need_no_key_and_may_use_no_adapter(gate, method, path):
    caller = gate.admit(method, path, "")
    assert not caller.is_admin and not caller.may_use("red")


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
    assert not gate.admit("GET", "/metrics", bearer(METRICS)).may_use("red")
    for method, path in (("GET", "/adapters"), ("POST", "/generate"), ("DELETE", "/adapters/red")):
        with pytest.raises(Forbidden, match="only read /metrics"):
            gate.admit(method, path, bearer(METRICS))


def test_without_keys_everyone_is_admin():
    gate = Gate.from_settings(Settings())
    assert gate.admit("DELETE", "/adapters/red", "").is_admin


def test_uploads_get_their_adapter_limit_and_everything_else_the_json_limit(gate):
    assert gate.body_limit("POST", "/adapters") == 1000 + (1 << 20)
    assert gate.body_limit("POST", "/generate") == gate.body_limit("POST", "/v1/load_lora_adapter") == 4096


def test_body_refusals_map_to_the_single_process_servers_statuses_and_codes():
    assert (status_of(BodyTooLarge("x")), BodyTooLarge.code) == (413, "too_large")
    assert (status_of(BodyTimeout("x")), BodyTimeout.code) == (408, "body_timeout")
