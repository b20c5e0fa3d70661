"""Typed httpx clients of the native loraplex API: `LoraplexClient` (sync) and `AsyncLoraplexClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack
from urllib.parse import quote

import httpx

from clients.python.errors import error_from_response
from clients.python.schemas import AdapterInfo, GenerateResult, GenerationParams, Health, Message, StreamChunk
from clients.python.stream import AsyncGenerateStream, GenerateStream, SSEDecoder

DEFAULT_URL = "http://127.0.0.1:8000"
# Generation can queue behind a full batch, so reads wait long; a dead address should fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

# a registered adapter's name, {name: weight} for a weighted mix (one entry: a scale), or None for the base
Adapter = str | Mapping[str, float] | None

PEFT_CONFIG = "adapter_config.json"
COMPANIONS = ("README.md", "chat_template.jinja", "tokenizer_config.json")
PEFT_WEIGHTS = "adapter_model.safetensors"


def generate_body(prompt: str | None, messages: Sequence[Message] | None, adapter: Adapter,
                  params: GenerationParams, stream: bool) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of `prompt` or `messages`")
    body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    if prompt is not None:
        body["prompt"] = prompt
    else:
        body["messages"] = [dict(m) for m in messages]
    if isinstance(adapter, Mapping):
        body["adapters"] = [{"name": name, "weight": weight} for name, weight in adapter.items()]
    else:
        body["adapter"] = adapter
    return {**body, "stream": stream}


def upload_parts(path: str | Path, name: str, rank: int | None, alpha: float | None,
                 replace: bool) -> dict[str, Any]:
    """Multipart fields for POST /adapters: a PEFT folder's two files (and its card, README.md, and chat template,
    chat_template.jinja or tokenizer_config.json's, if there), or one raw .safetensors with rank and alpha."""
    path = Path(path)
    data: dict[str, Any] = {"name": name, **({"replace": "true"} if replace else {})}
    if path.is_dir():
        missing = [f for f in (PEFT_CONFIG, PEFT_WEIGHTS) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a PEFT adapter folder: missing {', '.join(missing)}")
        # its card and its own chat template (as tokenizer.save_pretrained leaves it) go along where present
        sent = (PEFT_CONFIG, PEFT_WEIGHTS, *(f for f in COMPANIONS if (path / f).is_file()))
        files = [("files", (f, (path / f).read_bytes(), _content_type(f))) for f in sent]
    elif path.is_file() and path.suffix == ".safetensors":
        if rank is None or alpha is None:
            raise ValueError("a raw .safetensors upload needs `rank` and `alpha`")
        data.update(rank=str(rank), alpha=str(alpha))
        files = [("files", (path.name, path.read_bytes(), _content_type(path.name)))]
    else:
        raise FileNotFoundError(f"{path}: expected a PEFT adapter folder or a .safetensors file")
    return {"data": data, "files": files}


def _content_type(file_name: str) -> str:
    return "application/json" if file_name.endswith(".json") else "application/octet-stream"


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _adapter_path(name: str) -> str:
    return f"/adapters/{quote(name, safe='')}"


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise error_from_response(response.status_code, response.content)
    return response


class LoraplexClient:
    """`with LoraplexClient(url) as c: c.generate("Ahoy", adapter="pirate")`; errors raise `LoraplexError`s."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
                 api_key: str | None = None, transport: httpx.BaseTransport | None = None):
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport,
                                  headers=_auth_headers(api_key))

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def generate(self, prompt: str | None = None, messages: Sequence[Message] | None = None,
                 adapter: Adapter = None, **params: Unpack[GenerationParams]) -> GenerateResult:
        body = generate_body(prompt, messages, adapter, params, stream=False)
        return GenerateResult.from_json(_checked(self._http.post("/generate", json=body)).json())

    def chat(self, messages: Sequence[Message], adapter: Adapter = None,
             **params: Unpack[GenerationParams]) -> GenerateResult:
        return self.generate(messages=messages, adapter=adapter, **params)

    def stream(self, prompt: str | None = None, messages: Sequence[Message] | None = None,
               adapter: Adapter = None, **params: Unpack[GenerationParams]) -> GenerateStream:
        """The request is sent when iteration starts; errors raise from the first step."""
        body = generate_body(prompt, messages, adapter, params, stream=True)
        return GenerateStream(self._chunks(body), body.get("n", 1))

    def _chunks(self, body: dict[str, Any]) -> Iterator[StreamChunk]:
        with self._http.stream("POST", "/generate", json=body) as response:
            if response.is_error:
                response.read()
                _checked(response)
            decoder = SSEDecoder()
            for line in response.iter_lines():
                if (chunk := decoder.feed(line)) is not None:
                    yield chunk
            if (chunk := decoder.close()) is not None:
                yield chunk

    def list_adapters(self) -> list[AdapterInfo]:
        body = _checked(self._http.get("/adapters")).json()
        return [AdapterInfo.from_json(a) for a in body["adapters"]]

    def get_adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo.from_json(_checked(self._http.get(_adapter_path(name))).json())

    def upload_adapter(self, path: str | Path, name: str, *, rank: int | None = None,
                       alpha: float | None = None, replace: bool = False) -> AdapterInfo:
        """`replace=True` swaps an existing adapter of this name atomically; running requests keep the old one."""
        parts = upload_parts(path, name, rank, alpha, replace)
        return AdapterInfo.from_json(_checked(self._http.post("/adapters", **parts)).json())

    def delete_adapter(self, name: str) -> None:
        _checked(self._http.delete(_adapter_path(name)))

    def health(self) -> Health:
        return Health.from_json(_checked(self._http.get("/health")).json())


class AsyncLoraplexClient:
    """`async with AsyncLoraplexClient(url) as c: await c.generate(...)`; the same methods as `LoraplexClient`."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
                 api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport,
                                       headers=_auth_headers(api_key))

    async def __aenter__(self) -> AsyncLoraplexClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, prompt: str | None = None, messages: Sequence[Message] | None = None,
                       adapter: Adapter = None, **params: Unpack[GenerationParams]) -> GenerateResult:
        body = generate_body(prompt, messages, adapter, params, stream=False)
        return GenerateResult.from_json(_checked(await self._http.post("/generate", json=body)).json())

    async def chat(self, messages: Sequence[Message], adapter: Adapter = None,
                   **params: Unpack[GenerationParams]) -> GenerateResult:
        return await self.generate(messages=messages, adapter=adapter, **params)

    def stream(self, prompt: str | None = None, messages: Sequence[Message] | None = None,
               adapter: Adapter = None, **params: Unpack[GenerationParams]) -> AsyncGenerateStream:
        """`async for chunk in client.stream(...)`; the request is sent when iteration starts."""
        body = generate_body(prompt, messages, adapter, params, stream=True)
        return AsyncGenerateStream(self._chunks(body), body.get("n", 1))

    async def _chunks(self, body: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        async with self._http.stream("POST", "/generate", json=body) as response:
            if response.is_error:
                await response.aread()
                _checked(response)
            decoder = SSEDecoder()
            async for line in response.aiter_lines():
                if (chunk := decoder.feed(line)) is not None:
                    yield chunk
            if (chunk := decoder.close()) is not None:
                yield chunk

    async def list_adapters(self) -> list[AdapterInfo]:
        body = _checked(await self._http.get("/adapters")).json()
        return [AdapterInfo.from_json(a) for a in body["adapters"]]

    async def get_adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo.from_json(_checked(await self._http.get(_adapter_path(name))).json())

    async def upload_adapter(self, path: str | Path, name: str, *, rank: int | None = None,
                             alpha: float | None = None, replace: bool = False) -> AdapterInfo:
        """`replace=True` swaps an existing adapter of this name atomically; running requests keep the old one."""
        parts = upload_parts(path, name, rank, alpha, replace)
        return AdapterInfo.from_json(_checked(await self._http.post("/adapters", **parts)).json())

    async def delete_adapter(self, name: str) -> None:
        _checked(await self._http.delete(_adapter_path(name)))

    async def health(self) -> Health:
        return Health.from_json(_checked(await self._http.get("/health")).json())
