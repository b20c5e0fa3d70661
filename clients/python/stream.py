"""Server-sent events of POST /generate (`data: {json}` per event) and the streams that collect them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from clients.python.errors import LoraplexError
from clients.python.schemas import GenerateResult, StreamChunk


class SSEDecoder:
    """Feed it the body line by line; it returns a chunk at each blank line that ends an event with data."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> StreamChunk | None:
        line = line.rstrip("\r")
        if line:
            if line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
            return None  # comments (":..."), event names and ids carry nothing the client needs
        payload, self._data = "\n".join(self._data), []
        if not payload or payload == "[DONE]":
            return None
        return StreamChunk.from_json(json.loads(payload))

    def close(self) -> StreamChunk | None:
        """A body may end without the blank line after its last event."""
        return self.feed("")


class _Collector:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.result: GenerateResult | None = None

    def add(self, chunk: StreamChunk) -> None:
        self.parts.append(chunk.text)
        if chunk.is_final:
            self.result = GenerateResult(text="".join(self.parts), adapter=chunk.adapter,
                                         finish_reason=chunk.finish_reason, usage=chunk.usage)

    def check_complete(self) -> None:
        if self.result is None:
            raise LoraplexError(200, "incomplete_stream", "the stream ended before its final event")


class GenerateStream:
    """Iterate for the chunks as they arrive; once the final chunk has passed, `result` holds the whole reply."""

    def __init__(self, chunks: Iterator[StreamChunk]):
        self._chunks = chunks
        self._collector = _Collector()

    @property
    def result(self) -> GenerateResult | None:
        return self._collector.result

    def __iter__(self) -> Iterator[StreamChunk]:
        for chunk in self._chunks:
            self._collector.add(chunk)
            yield chunk
        self._collector.check_complete()

    def text(self) -> Iterator[str]:
        """Only the non-empty text pieces."""
        return (chunk.text for chunk in self if chunk.text)


class AsyncGenerateStream:
    """The async twin of `GenerateStream`."""

    def __init__(self, chunks: AsyncIterator[StreamChunk]):
        self._chunks = chunks
        self._collector = _Collector()

    @property
    def result(self) -> GenerateResult | None:
        return self._collector.result

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        async for chunk in self._chunks:
            self._collector.add(chunk)
            yield chunk
        self._collector.check_complete()

    async def text(self) -> AsyncIterator[str]:
        async for chunk in self:
            if chunk.text:
                yield chunk.text
