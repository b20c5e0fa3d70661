"""Who is calling: FastAPI dependencies that turn a Bearer key into a Principal, or refuse."""

from __future__ import annotations

from fastapi import Depends, Request

from server.auth import DEV_PRINCIPAL, Principal
from server.errors import Forbidden, Unauthorized


async def caller(request: Request) -> Principal:
    # async although nothing here awaits: a sync dependency runs in FastAPI's thread pool, a thread hop
    # per request that under load waits for the GIL behind the engine thread.
    ring = request.app.state.keyring
    if not ring.enabled:
        return DEV_PRINCIPAL
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    principal = ring.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("invalid API key")
    request.state.key_id = principal.key_id
    return principal


async def admin(principal: Principal = Depends(caller)) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this API key may not change adapters (admin role required)")
    return principal
