"""What a connection may cost before its request reaches the app: how long it may take to send a request head
(--header-timeout-s), how many may be open at once (--max-connections), how long one may sit idle between
requests. The body's deadline (--body-timeout-s) is the edge's (server/edge.py), which reads bodies."""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.settings import Settings

# uvicorn's own default, named: an idle keep-alive connection holds one of --max-connections
KEEP_ALIVE_S = 5

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"content-length: 15\r\nconnection: close\r\n\r\nRequest Timeout")


class HeadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline on each request head: a connection must deliver a whole
    head within `header_timeout_s` of connecting, or of its previous response ending, or it is closed (with a
    408 if part of a head came). uvicorn alone times only idle keep-alive connections, stops that timer at the
    first byte and never times a new connection, so half a head held a connection for as long as the client
    liked."""

    header_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.head_begun = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_begun = True

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        self.head_begun = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # a pipelined request whose head is already in is not waited on (uvicorn's own idle test, as in shutdown)
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._await_head()

    def _await_head(self) -> None:
        self._stop_waiting()
        self.head_deadline = asyncio.get_running_loop().call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_timed_out(self) -> None:
        self.head_deadline = None
        if self.transport.is_closing():
            return
        if self.head_begun:
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def head_deadline_protocol(header_timeout_s: float) -> type[HeadDeadlineProtocol]:
    """The protocol class with --header-timeout-s bound in: uvicorn builds one per connection from its own
    Config, which has no place for it."""
    return type(HeadDeadlineProtocol.__name__, (HeadDeadlineProtocol,), {"header_timeout_s": header_timeout_s})


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    # limit_concurrency counts open connections and running requests together, and answers 503 over it
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                          http=head_deadline_protocol(settings.header_timeout_s),
                          limit_concurrency=settings.max_connections, timeout_keep_alive=KEEP_ALIVE_S)
