"""GET /metrics: Prometheus text format, for admin and metrics keys (open in development mode).

A key with an adapter allow-list sees only its own adapters' series (server.edge refuses user keys).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import Principal
from server.metrics import exposition
from server.routes.security import caller

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, principal: Principal = Depends(caller)) -> Response:
    body = exposition(request.app.state.runtime.metrics.registry, principal.adapters)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
