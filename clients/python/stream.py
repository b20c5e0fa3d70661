"""Server-sent events of POST /generate (`data: {json}` per event) and the streams that collect them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from clients.python.errors import LoraplexError
from clients.python.schemas import Choice, GenerateResult, StreamChunk, Usage


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
    """Gathers each choice's chunks; the result is whole once all `n` choices have sent their final chunk."""

    def __init__(self, n: int = 1) -> None:
        self.parts: list[list[str]] = [[] for _ in range(n)]
        self.finals: dict[int, StreamChunk] = {}
        self.result: GenerateResult | None = None

    def add(self, chunk: StreamChunk) -> None:
        self.parts[chunk.index].append(chunk.text)
        if not chunk.is_final:
            return
        self.finals[chunk.index] = chunk
        if len(self.finals) < len(self.parts):
            return
        choices = tuple(Choice("".join(self.parts[i]), self.finals[i].finish_reason,
                               self.finals[i].usage.completion_tokens) for i in range(len(self.parts)))
        usage = Usage(prompt_tokens=chunk.usage.prompt_tokens,
                      completion_tokens=sum(c.completion_tokens for c in choices))
        self.result = GenerateResult(text=choices[0].text, adapter=chunk.adapter,
                                     finish_reason=choices[0].finish_reason, usage=usage,
                                     choices=choices if len(choices) > 1 else ())

    def check_complete(self) -> None:
        if self.result is None:
            raise LoraplexError(200, "incomplete_stream", "the stream ended before its final event")


class GenerateStream:
    """Iterate for the chunks as they arrive; once the final chunk has passed, `result` holds the whole reply."""

    def __init__(self, chunks: Iterator[StreamChunk], n: int = 1):
        self._chunks = chunks
        self._collector = _Collector(n)

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

    def __init__(self, chunks: AsyncIterator[StreamChunk], n: int = 1):
        self._chunks = chunks
        self._collector = _Collector(n)

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
