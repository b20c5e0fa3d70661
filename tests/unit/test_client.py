"""The Python client against a mock transport: request bodies, error mapping, SSE parsing, uploads."""

import asyncio
import json

import httpx
import pytest

from clients.python import (
    AdapterExistsError, AdapterInfo, AdapterNotFoundError, AsyncLoraplexClient, AuthenticationError,
    InvalidRequestError, LoraplexClient, LoraplexError, StreamChunk, TooLargeError, Usage,
)
from clients.python.stream import SSEDecoder

RESULT = {"text": "Ahoy!", "adapter": "pirate", "finish_reason": "stop",
          "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
INFO = {"name": "pirate", "rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "size_bytes": 1024}


def sse(*events: dict, tail: str = "\n\n") -> bytes:
    return "".join(f"data: {json.dumps(e)}{tail}" for e in events).encode()


STREAM = sse({"text": "Ah", "adapter": "pirate"}, {"text": "oy!", "adapter": "pirate"},
             {"text": "", "adapter": "pirate", "finish_reason": "stop", "usage": RESULT["usage"]})


class Recorder:
    """A mock server: answers with `reply(request)` and keeps every request it saw."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.reply(request)

    def client(self, **kwargs) -> LoraplexClient:
        return LoraplexClient("http://loraplex.test", transport=httpx.MockTransport(self), **kwargs)

    @property
    def body(self) -> dict:
        return json.loads(self.requests[-1].content)


def json_reply(payload, status=200):
    return lambda request: httpx.Response(status, json=payload)


def test_generate_sends_prompt_adapter_and_only_given_params():
    server = Recorder(json_reply(RESULT))
    with server.client() as client:
        result = client.generate("Ahoy", adapter="pirate", max_new_tokens=8, temperature=0.0, seed=None)
    request = server.requests[-1]
    assert request.method == "POST" and request.url.path == "/generate"
    assert server.body == {"prompt": "Ahoy", "adapter": "pirate", "max_new_tokens": 8, "temperature": 0.0,
                           "stream": False}
    assert result.text == "Ahoy!" and result.adapter == "pirate" and result.finish_reason == "stop"
    assert result.usage == Usage(prompt_tokens=7, completion_tokens=3)


def test_chat_sends_messages_and_null_adapter_for_base():
    server = Recorder(json_reply({**RESULT, "adapter": None}))
    messages = [{"role": "user", "content": "hi"}]
    with server.client() as client:
        assert client.chat(messages, top_k=5).adapter is None
    assert server.body == {"messages": messages, "adapter": None, "top_k": 5, "stream": False}


def test_a_mapping_of_weights_is_sent_as_a_mix():
    server = Recorder(json_reply({**RESULT, "adapter": None}))
    with server.client() as client:
        client.generate("Ahoy", adapter={"pirate": 0.7, "butler": 0.3})
    assert server.body == {"prompt": "Ahoy", "adapters": [{"name": "pirate", "weight": 0.7},
                                                          {"name": "butler", "weight": 0.3}], "stream": False}


def test_prompt_and_messages_are_exclusive():
    with Recorder(json_reply(RESULT)).client() as client:
        with pytest.raises(ValueError):
            client.generate()
        with pytest.raises(ValueError):
            client.generate("hi", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("status, code, cls", [
    (404, "adapter_not_found", AdapterNotFoundError),
    (409, "adapter_exists", AdapterExistsError),
    (413, "adapter_too_large", TooLargeError),
    (422, "invalid_request", InvalidRequestError),
    (401, "unauthorized", AuthenticationError),
    (503, "engine_unavailable", LoraplexError),
])
def test_error_bodies_become_typed_exceptions(status, code, cls):
    server = Recorder(json_reply({"error": {"code": code, "message": "it went wrong"}}, status))
    with server.client() as client, pytest.raises(cls) as caught:
        client.generate("hi", adapter="ghost")
    assert type(caught.value) is cls
    assert (caught.value.status, caught.value.code, caught.value.message) == (status, code, "it went wrong")
    assert code in str(caught.value)


def test_an_error_page_that_is_not_json_still_raises_with_its_text():
    server = Recorder(lambda request: httpx.Response(502, text="Bad Gateway"))
    with server.client() as client, pytest.raises(LoraplexError) as caught:
        client.list_adapters()
    assert (caught.value.status, caught.value.code, caught.value.message) == (502, "http_error", "Bad Gateway")


def test_stream_yields_chunks_and_collects_the_result():
    server = Recorder(lambda request: httpx.Response(200, content=STREAM,
                                                     headers={"content-type": "text/event-stream"}))
    with server.client() as client:
        stream = client.stream(messages=[{"role": "user", "content": "hi"}], adapter="pirate", max_new_tokens=4)
        assert stream.result is None
        chunks = list(stream)
    assert server.body["stream"] is True and server.body["max_new_tokens"] == 4
    assert [c.text for c in chunks] == ["Ah", "oy!", ""]
    assert [c.is_final for c in chunks] == [False, False, True]
    assert chunks[-1].usage == Usage(7, 3)
    assert stream.result.text == "Ahoy!" and stream.result.finish_reason == "stop"
    assert stream.result.adapter == "pirate"


def test_stream_text_skips_the_empty_final_chunk():
    server = Recorder(lambda request: httpx.Response(200, content=STREAM))
    with server.client() as client:
        stream = client.stream("hi")
        assert list(stream.text()) == ["Ah", "oy!"]
    assert stream.result.usage.completion_tokens == 3


def test_stream_error_status_raises_on_first_step():
    server = Recorder(json_reply({"error": {"code": "adapter_not_found", "message": "no adapter 'x'"}}, 404))
    with server.client() as client:
        stream = client.stream("hi", adapter="x")
        with pytest.raises(AdapterNotFoundError, match="no adapter"):
            next(iter(stream))


def test_stream_cut_short_raises_incomplete():
    server = Recorder(lambda request: httpx.Response(200, content=sse({"text": "Ah", "adapter": None})))
    with server.client() as client, pytest.raises(LoraplexError) as caught:
        list(client.stream("hi"))
    assert caught.value.code == "incomplete_stream"


def test_sse_decoder_handles_crlf_comments_multiline_data_and_a_missing_last_blank_line():
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "event: token", 'data: {"text":', 'data: "a"}\r', "\r", "data: [DONE]", "",
             'data: {"text": "", "finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}']
    chunks = [c for line in lines if (c := decoder.feed(line)) is not None]
    assert chunks == [StreamChunk(text="a")]
    assert decoder.close() == StreamChunk(text="", finish_reason="length", usage=Usage(1, 2))
    assert decoder.close() is None


def test_adapter_routes_parse_and_quote_names():
    def reply(request):
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.url.path == "/adapters":
            return httpx.Response(200, json={"adapters": [INFO, {**INFO, "name": "butler", "extra": 1}]})
        return httpx.Response(200, json=INFO)

    server = Recorder(reply)
    with server.client() as client:
        assert [a.name for a in client.list_adapters()] == ["pirate", "butler"]
        assert client.get_adapter("pirate") == AdapterInfo(**INFO)
        assert client.delete_adapter("a/b") is None
    assert server.requests[-1].url.raw_path == b"/adapters/a%2Fb"


def test_upload_sends_the_peft_folder_as_multipart(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"WEIGHTS")
    (tmp_path / "README.md").write_text("the card")
    (tmp_path / "training_args.bin").write_bytes(b"not sent")
    server = Recorder(json_reply(INFO, 201))
    with server.client() as client:
        assert client.upload_adapter(tmp_path, "pirate") == AdapterInfo(**INFO)
    request = server.requests[-1]
    assert request.url.path == "/adapters" and request.headers["content-type"].startswith("multipart/form-data")
    body = request.content
    assert b'name="name"\r\n\r\npirate' in body
    assert b'name="files"; filename="adapter_config.json"' in body and b'{"r": 8}' in body
    assert b'name="files"; filename="adapter_model.safetensors"' in body and b"WEIGHTS" in body
    assert b'name="files"; filename="README.md"' in body and b"the card" in body
    assert b"not sent" not in body
    assert b'name="replace"' not in body


def test_upload_with_replace_sends_the_flag(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"W")
    server = Recorder(json_reply(INFO, 201))
    with server.client() as client:
        client.upload_adapter(tmp_path, "pirate", replace=True)
    assert b'name="replace"\r\n\r\ntrue' in server.requests[-1].content


def test_upload_raw_safetensors_needs_rank_and_alpha(tmp_path):
    raw = tmp_path / "sql.safetensors"
    raw.write_bytes(b"RAW")
    server = Recorder(json_reply(INFO, 201))
    with server.client() as client:
        with pytest.raises(ValueError):
            client.upload_adapter(raw, "sql")
        client.upload_adapter(raw, "sql", rank=4, alpha=8)
    body = server.requests[-1].content
    assert b'name="rank"\r\n\r\n4' in body and b'name="alpha"\r\n\r\n8' in body
    assert b'filename="sql.safetensors"' in body


def test_upload_of_a_folder_without_weights_fails_before_sending(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    server = Recorder(json_reply(INFO, 201))
    with server.client() as client, pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.upload_adapter(tmp_path, "pirate")
    assert server.requests == []


def test_api_key_is_sent_as_bearer():
    server = Recorder(json_reply({"adapters": []}))
    with server.client(api_key="k" * 20) as client:
        client.list_adapters()
    assert server.requests[-1].headers["authorization"] == "Bearer " + "k" * 20


def test_async_client_generates_and_streams():
    server = Recorder(lambda request: httpx.Response(200, content=STREAM) if json.loads(request.content)["stream"]
                      else httpx.Response(200, json=RESULT))

    async def handler(request):
        return server(request)

    async def run():
        async with AsyncLoraplexClient("http://loraplex.test", transport=httpx.MockTransport(handler)) as client:
            result = await client.generate("Ahoy", adapter="pirate")
            stream = client.stream("Ahoy", adapter="pirate")
            pieces = [piece async for piece in stream.text()]
            return result, pieces, stream.result

    result, pieces, streamed = asyncio.run(run())
    assert result.text == "Ahoy!" and pieces == ["Ah", "oy!"] and streamed == result


def test_async_client_maps_errors():
    async def handler(request):
        return httpx.Response(409, json={"error": {"code": "adapter_exists", "message": "taken"}})

    async def run():
        async with AsyncLoraplexClient("http://loraplex.test", transport=httpx.MockTransport(handler)) as client:
            await client.delete_adapter("pirate")

    with pytest.raises(AdapterExistsError, match="taken"):
        asyncio.run(run())
