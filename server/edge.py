"""The edge: what a request may cost before the app does any work for it.

Runs before routing, on the headers alone: who is calling (no key, no body read), whether a
development-mode request comes from this machine's own pages, and how large the body may be. Then it reads
the body itself, cut at that size and at `body_timeout_s`, and hands the app the bytes, so a slow or huge
body is answered 413/408 and never reaches a parser, a temp file or a route.
"""

from __future__ import annotations

import asyncio
import ipaddress
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import KeyRing, Principal
from server.routes.errors import error_json
from server.settings import Settings

PUBLIC_PATHS = {"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
ADMIN_POSTS = {"/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
MULTIPART_SLACK = 1 << 20  # form boundaries, the config JSON and the safetensors header on top of the tensors


def route_kind(method: str, path: str) -> str:
    """public (no key needed), metrics, admin (changes adapters) or user."""
    if method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith("/web/")):
        return "public"
    if path == "/metrics":
        return "metrics"
    if (method == "POST" and path in ADMIN_POSTS) or (method == "DELETE" and path.startswith("/adapters/")):
        return "admin"
    return "user"


def is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class EdgeGuard:
    """Pure ASGI, so a refusal is sent before the body is read and streamed responses pass untouched."""

    def __init__(self, app: ASGIApp, settings: Settings, keyring: KeyRing):
        self.app = app
        self.settings = settings
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _answer(scope, send, *refusal)
            return
        limit = self._body_limit(scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(scope, send, 413, "too_large", f"the request body is over the limit of {limit} bytes")
            return
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS") and not declared and \
                "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                body = await _read_body(receive, limit)
        except TimeoutError:
            await _answer(scope, send, 408, "body_timeout",
                          f"the request body did not arrive within {self.settings.body_timeout_s:g} s")
            return
        except _TooLarge:
            await _answer(scope, send, 413, "too_large", f"the request body is over the limit of {limit} bytes")
            return
        except _Disconnected:
            return
        await self.app(scope, _replay(body, receive), send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        kind = route_kind(scope["method"], scope["path"])
        if not self.keyring.enabled:
            return self._cross_site(scope, headers)
        principal = self._principal(headers)
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
            scope["state"]["key_id"] = principal.key_id
        if kind == "public":
            return None
        if principal is None:
            has_key = headers.get("authorization", "").lower().startswith("bearer ")
            return (401, "unauthorized", "invalid API key" if has_key else
                    "send an API key as 'Authorization: Bearer <key>'")
        if principal.role == "metrics" and kind != "metrics":
            return 403, "forbidden", "this API key may only read /metrics"
        if kind == "admin" and not principal.is_admin:
            return 403, "forbidden", "this API key may not change adapters (admin role required)"
        if kind == "metrics" and principal.role == "user":
            return 403, "forbidden", "this API key may not read /metrics (admin or metrics key required)"
        return None

    def _principal(self, headers: dict[str, str]) -> Principal | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.keyring.authenticate(token.strip())

    def _cross_site(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """Development mode has no keys, so it trusts only this machine: a loopback Host (a DNS-rebound
        name is not one) and, for anything but reads, no other site's page as the sender."""
        host = urlsplit("//" + headers.get("host", "")).hostname or ""
        if not is_loopback_name(host):
            return 403, "forbidden", ("development mode (no API keys) serves only loopback Host names; "
                                      "configure API keys to serve other names")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return None
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != headers.get("host", ""):
            return 403, "forbidden", "cross-origin requests are refused in development mode"
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return 403, "forbidden", "cross-site requests are refused in development mode"
        return None

    def _body_limit(self, scope: Scope) -> int:
        if scope["method"] == "POST" and scope["path"] == "/adapters":
            return self.settings.max_adapter_bytes + MULTIPART_SLACK
        return self.settings.max_json_bytes


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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


async def _answer(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    # the connection closes: an unread body may still be on its way
    headers = {"Connection": "close"} | ({"WWW-Authenticate": "Bearer"} if status == 401 else {})
    response = error_json(status, code, message, Request(scope), headers)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
