"""The cluster's HTTP ingress: the same API as `python -m server`, every request forwarded to an engine replica.

Generation requests carry their adapter to Ray Serve as the multiplexed model id (the `adapter` field of
`/generate`, the `model` field of the OpenAI routes), so they reach a replica that already holds that
adapter. Everything else goes to any replica: adapters live in a store every replica shares. This process
never loads torch or the model.

A request is admitted (`server/gate.py`, as the single-process server does) from its head alone, before its
body is read or a replica chosen; its body is read only up to the route's limit; and a generation request
naming an adapter its key may not use is answered here as a replica would answer it, so no replica loads
that adapter for it.
"""
# No `from __future__ import annotations`: FastAPI must see `Request` itself in the rewritten route signature.

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.cluster.forwarding import BASE_MODEL_ID, ForwardedRequest
from server.errors import EngineUnavailable, LoraplexError
from server.gate import Gate
from server.routes.errors import refusal
from server.routes.security import check_may_see

log = logging.getLogger(__name__)

ADAPTER_FIELD = {"/generate": "adapter", "/v1/completions": "model", "/v1/chat/completions": "model"}
_DROPPED_HEADERS = {b"content-length", b"transfer-encoding", b"x-request-id"}  # Serve sets X-Request-ID itself

api = FastAPI(title="loraplex (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


def named_adapter(field: str, body: bytes, base_names: list[str]) -> str | None:
    """The adapter a generation request's body names in `field`; None for the base model. A body that does
    not parse still goes to a replica, whose validation answers it."""
    try:
        name = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name or (field == "model" and name in base_names):
        return None
    return name


async def _relay(chunks):
    try:
        async for chunk in chunks:
            yield chunk
    finally:  # the client left: stop the replica's stream, which frees the generation's batch slot
        chunks.cancel()


# Serve pickles the ingress class when it is decorated: whatever it uses must be defined above it.
@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, engine: DeploymentHandle, gate: Gate, base_names: list[str]):
        self.engine = engine
        self.gate = gate
        self.base_names = base_names  # what the OpenAI routes' `model` names for no adapter

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        try:
            forwarded, routing = await self.forwarded_request(request)
            return await self.relay(forwarded, routing)
        except LoraplexError as e:
            return refusal(e, request)

    async def forwarded_request(self, request: Request) -> tuple[ForwardedRequest, dict]:
        """The request as a replica gets it, and how to route it; raises what the gate refused."""
        method, path = request.method, request.url.path
        principal = self.gate.admit(method, path, request.headers.get("authorization", ""))
        body = await self.gate.read_body(method, path, request.headers.get("content-length", ""), request.stream())
        field = ADAPTER_FIELD.get(path) if method == "POST" else None
        adapter = named_adapter(field, body, self.base_names) if field else None
        if adapter is not None:
            check_may_see(principal, adapter)
        forwarded = ForwardedRequest(method, path, request.url.query.encode(), request.headers.raw, body)
        return forwarded, ({"multiplexed_model_id": adapter or BASE_MODEL_ID} if field else {})

    async def relay(self, forwarded: ForwardedRequest, routing: dict) -> Response:
        chunks = self.engine.options(stream=True, **routing).forward.remote(forwarded)
        try:
            status, raw_headers = await chunks.__anext__()
        except Exception as e:  # a replica died or none is up
            log.warning("no engine replica answered %s %s: %s", forwarded.method, forwarded.path, e)
            chunks.cancel()
            raise EngineUnavailable("no engine replica could take the request") from e
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers
                   if k.lower() not in _DROPPED_HEADERS}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(chunks), status_code=status, headers=headers)
        return Response(b"".join([chunk async for chunk in chunks]), status_code=status, headers=headers)
