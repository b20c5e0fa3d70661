"""`python -m server`'s flags: every setting's help prints, and values reach the settings with their bounds;
and the uvicorn it runs, on a tiny app: a request head has a deadline and open connections a cap."""

import socket
import threading
import time

import pytest
import uvicorn
from pydantic import ValidationError

from server.__main__ import parse_settings
from server.connections import HeadDeadlineProtocol, uvicorn_config
from server.settings import Settings
from tests.integration.server_process import free_port


def test_help_prints_every_flag_and_a_percent_sign_as_written(capsys, monkeypatch):
    # a description with a percent sign once broke argparse's help formatting
    monkeypatch.setattr(Settings.model_fields["admission_wait_fraction"], "description", "at most 40% of a step")
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "--admission-wait-fraction" in out and "--max-resident-adapters" in out
    assert "at most 40% of a step" in out  # not "%%"


def test_the_admission_wait_fraction_is_a_bounded_setting():
    assert parse_settings([]).admission_wait_fraction == 0.4
    assert parse_settings(["--admission-wait-fraction", "0.2"]).admission_wait_fraction == 0.2
    with pytest.raises(ValidationError):
        parse_settings(["--admission-wait-fraction", "1.5"])


def test_the_edge_limits_reach_the_settings():
    settings = parse_settings(["--header-timeout-s", "2.5", "--body-timeout-s", "30", "--max-connections", "8",
                               "--max-json-bytes", "4096", "--max-messages", "16", "--max-prompt-chars", "1000",
                               "--max-stop-chars", "32", "--max-adapter-memory-mb", "512"])
    assert (settings.header_timeout_s, settings.body_timeout_s, settings.max_connections) == (2.5, 30, 8)
    assert (settings.max_json_bytes, settings.max_messages, settings.max_prompt_chars) == (4096, 16, 1000)
    assert (settings.max_stop_chars, settings.max_adapter_memory_mb) == (32, 512)
    with pytest.raises(ValidationError):
        parse_settings(["--header-timeout-s", "0"])
    with pytest.raises(ValidationError):
        parse_settings(["--max-connections", "0"])


def test_adapter_roots_take_the_flag_once_per_folder(tmp_path):
    assert parse_settings([]).adapter_roots == []
    settings = parse_settings(["--adapter-root", str(tmp_path / "a"), "--adapter-root", str(tmp_path / "b")])
    assert settings.adapter_roots == [tmp_path / "a", tmp_path / "b"]


def test_uvicorn_runs_with_the_header_deadline_and_the_connection_cap():
    config = uvicorn_config(object(), parse_settings(["--header-timeout-s", "3", "--max-connections", "8"]))
    assert config.limit_concurrency == 8
    assert issubclass(config.http, HeadDeadlineProtocol) and config.http.header_timeout_s == 3


async def ok_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def tiny_server():
    settings = parse_settings(["--port", str(free_port()), "--header-timeout-s", "0.5", "--max-connections", "3"])
    server = uvicorn.Server(uvicorn_config(ok_app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield settings.port
    server.should_exit = True
    thread.join(timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float = 5) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_half_a_head_is_cut_at_the_header_timeout_with_a_408(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server)) as half, \
         socket.create_connection(("127.0.0.1", tiny_server)) as silent:
        started = time.monotonic()
        half.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert read_until_closed(half).startswith(b"HTTP/1.1 408 ")
        assert read_until_closed(silent) == b""  # nothing was asked: closed without an answer
        assert 0.4 < time.monotonic() - started < 3


def test_the_deadline_restarts_after_each_response_on_a_kept_alive_connection(tiny_server):
    with socket.create_connection(("127.0.0.1", tiny_server)) as sock:
        for _ in range(2):  # pieces of a head within the deadline: answered
            sock.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(0.15)
            sock.sendall(b"Host: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)  # with the one before: more than the deadline since connecting, less since the answer
        sock.sendall(b"GET / HTTP/1.1\r\n")  # uvicorn's keep-alive timer stops at this byte; the deadline does not
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")


def test_over_max_connections_a_request_gets_503(tiny_server):
    held = [socket.create_connection(("127.0.0.1", tiny_server)) for _ in range(3)]
    with socket.create_connection(("127.0.0.1", tiny_server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 503 ")
    for s in held:
        s.close()
    time.sleep(0.1)
    with socket.create_connection(("127.0.0.1", tiny_server)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
