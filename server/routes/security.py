"""Who is calling: FastAPI dependencies that turn a Bearer key into a Principal, or refuse."""

from __future__ import annotations

from fastapi import Depends, Request

from server.auth import DEV_PRINCIPAL, Principal
from server.errors import AdapterNotFound, Forbidden, Unauthorized


async def caller(request: Request) -> Principal:
    # async although nothing here awaits: a sync dependency runs in FastAPI's thread pool, a thread hop
    # per request that under load waits for the GIL behind the engine thread.
    ring = request.app.state.keyring
    if not ring.enabled:
        return DEV_PRINCIPAL
    checked = getattr(request.state, "principal", None)  # server.edge authenticated it from the headers
    if checked is not None:
        return checked
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


def check_may_see(principal: Principal, adapter: str) -> None:
    """A tenant's private adapter looks absent to other keys, to every route."""
    if not principal.may_use(adapter):
        raise AdapterNotFound(f"adapter {adapter!r} is not registered")


def check_may_manage(principal: Principal, adapter: str) -> None:
    """Creating or replacing an adapter of a name outside the key's allow-list."""
    if not principal.may_use(adapter):
        raise Forbidden(f"this API key may not manage an adapter named {adapter!r}")
