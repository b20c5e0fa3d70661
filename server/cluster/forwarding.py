"""An HTTP request passed from the cluster's ingress to an engine replica, and its in-process call.

The replica runs the single-process FastAPI app unchanged: routes, auth, errors and access logs all
apply as they do in `python -m server`. The request is played through the app's ASGI interface directly,
because httpx's ASGITransport waits for the whole body and so cannot stream server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

log = logging.getLogger(__name__)
_apps_running: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks

Head = tuple[int, list[tuple[bytes, bytes]]]  # status, raw headers
BASE_MODEL_ID = "__base__"  # the multiplexed model id of requests that name no adapter


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def scope(self) -> dict:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.method,
                "scheme": "http", "path": self.path, "raw_path": self.path.encode(), "root_path": "",
                "query_string": self.query, "headers": self.headers, "client": None, "server": None}


async def call_app(app, request: ForwardedRequest) -> AsyncIterator[Head | bytes]:
    """Yields the response head, then body chunks as the app sends them. Closing the iterator early tells
    the app the client went away, which cancels a streaming generation and frees its batch slot."""
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(request.scope(), receive, sent.put)
        except Exception:  # the app's own handlers answered already; this is only what they re-raised
            log.exception("forwarded request %s %s failed", request.method, request.path)
        finally:
            sent.put_nowait(None)

    task = asyncio.create_task(run())
    _apps_running.add(task)
    task.add_done_callback(_apps_running.discard)
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        gone.set()  # the app finishes on its own: it logs the request, or stops a cut-off stream
