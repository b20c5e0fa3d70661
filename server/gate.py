"""Who may do what, and how much body a route may send, read from a request's head alone.

Shared by the single-process server's edge (server/edge.py) and the cluster's ingress, so both ends agree:
a request refused here costs no body read, no parsing, no adapter load. No torch and no Settings import:
the cluster's ingress process never loads the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.auth import DEV_PRINCIPAL, KeyRing, Principal
from server.errors import AdapterTooLarge, DeadlineExceeded, Forbidden, Unauthorized

PUBLIC_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIX = "/web/"
METRICS_PATH = "/metrics"
UPLOAD_PATH = "/adapters"
ADMIN_POSTS = frozenset({UPLOAD_PATH, "/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
UPLOAD_SLACK_BYTES = 1 << 20  # form boundaries, the config JSON and the safetensors header on top of the tensors
ANONYMOUS = Principal("user", frozenset(), "anonymous")  # a public route's caller: may use no adapter


class BodyTooLarge(AdapterTooLarge):  # 413, as an oversized upload
    code = "too_large"


class BodyTimeout(DeadlineExceeded):  # 408
    code = "body_timeout"


@dataclass(frozen=True)
class Gate:
    keys: KeyRing
    max_json_bytes: int
    max_upload_bytes: int
    body_timeout_s: float

    @classmethod
    def from_settings(cls, settings) -> Gate:
        return cls(keys=KeyRing.from_settings(settings.admin_keys, settings.user_keys, settings.keys_file,
                                              settings.metrics_keys),
                   max_json_bytes=settings.max_json_bytes,
                   max_upload_bytes=settings.max_adapter_bytes + UPLOAD_SLACK_BYTES,
                   body_timeout_s=settings.body_timeout_s)

    def admit(self, method: str, path: str, authorization: str) -> Principal:
        """The caller of a request, from its head alone (ANONYMOUS on a public route without a valid key);
        raises Unauthorized or Forbidden."""
        if not self.keys.enabled:
            return DEV_PRINCIPAL
        token = bearer_token(authorization)
        principal = self.keys.authenticate(token) if token else None
        if is_public(method, path):
            return principal or ANONYMOUS
        if principal is None:
            raise Unauthorized("invalid API key" if token else "send an API key as 'Authorization: Bearer <key>'")
        if principal.role == "metrics" and path != METRICS_PATH:
            raise Forbidden("this API key may only read /metrics")
        if path == METRICS_PATH and principal.role == "user":
            raise Forbidden("this API key may not read /metrics (admin or metrics key required)")
        if is_admin_route(method, path) and not principal.is_admin:
            raise Forbidden("this API key may not change adapters (admin role required)")
        return principal

    def body_limit(self, method: str, path: str) -> int:
        return self.max_upload_bytes if (method, path) == ("POST", UPLOAD_PATH) else self.max_json_bytes

    async def read_body(self, method: str, path: str, declared_length: str, chunks: AsyncIterator[bytes]) -> bytes:
        """The body, refused once it is known to pass the route's limit (from Content-Length before reading,
        or at the limit for a chunked body) or when it takes longer than `body_timeout_s` to arrive."""
        limit = self.body_limit(method, path)
        if declared_length.isdigit() and int(declared_length) > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
        received, size = [], 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
                    received.append(chunk)
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        return b"".join(received)


def bearer_token(authorization: str) -> str:
    """The key of an `Authorization: Bearer <key>` header, "" for none."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def is_public(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX))


def is_admin_route(method: str, path: str) -> bool:
    """The routes that change adapters."""
    return (method == "POST" and path in ADMIN_POSTS) or (method == "DELETE" and path.startswith(f"{UPLOAD_PATH}/"))
