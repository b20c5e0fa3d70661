"""The edge of the single-process server: what a request may cost before the app does any work for it.

Runs before routing. The gate (server/gate.py, shared with the cluster's ingress) admits the caller from
the request's head alone, so a request without a key reads no body; a development-mode request must come
from this machine's own pages. Then the edge reads the body itself, cut at the route's size and at
`body_timeout_s`, and hands the app the bytes, so a huge or slow body never reaches a parser, a temp file
or a route.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import Forbidden, LoraplexError
from server.gate import ANONYMOUS, Gate
from server.routes.errors import refusal

BODYLESS = ("GET", "HEAD", "DELETE", "OPTIONS")


class EdgeGuard:
    """Pure ASGI, so a refusal is sent before the body is read and streamed responses pass untouched."""

    def __init__(self, app: ASGIApp, gate: Gate):
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        method, path, headers = scope["method"], scope["path"], request.headers
        try:
            principal = self.gate.admit(method, path, headers.get("authorization", ""))
            if not self.gate.keys.enabled:
                check_same_origin(method, headers)
            if principal is not ANONYMOUS:  # the routes' `caller` takes it from here
                scope.setdefault("state", {})["principal"] = principal
                scope["state"]["key_id"] = principal.key_id
            if method in BODYLESS and "content-length" not in headers and "transfer-encoding" not in headers:
                await self.app(scope, receive, send)
                return
            body = await self.gate.read_body(method, path, headers.get("content-length", ""), request.stream())
        except LoraplexError as e:
            await refusal(e, request)(scope, receive, send)
            return
        except ClientDisconnect:
            return
        await self.app(scope, _replay(body, receive), send)


def check_same_origin(method: str, headers) -> None:
    """Development mode has no keys, so it trusts only this machine: a loopback Host (a DNS-rebound name is
    not one) and, for anything but reads, no other site's page as the sender."""
    host = urlsplit("//" + headers.get("host", "")).hostname or ""
    if not is_loopback_name(host):
        raise Forbidden("development mode (no API keys) serves only loopback Host names; configure API keys "
                        "to serve other names")
    if method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != headers.get("host", ""):
        raise Forbidden("cross-origin requests are refused in development mode")
    if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        raise Forbidden("cross-site requests are refused in development mode")


def is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the real channel (so a route still hears the client disconnect)."""
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
