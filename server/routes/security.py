"""Who is calling: FastAPI dependencies that turn a Bearer key into a Principal, or refuse."""

from __future__ import annotations

from fastapi import Depends, Request

from server.auth import DEV_PRINCIPAL, Principal
from server.errors import AdapterNotFound, Forbidden, Unauthorized


async def caller(request: Request) -> Principal:
    # async although nothing here awaits: a sync dependency runs in FastAPI's thread pool, a thread hop
    # per request that under load waits for the GIL behind the engine thread.
    if not request.app.state.keyring.enabled:
        return DEV_PRINCIPAL
    principal = getattr(request.state, "principal", None)  # server.edge admitted it from the headers
    if principal is None:  # the gate lets only its public routes through without a key
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
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
