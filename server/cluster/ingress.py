"""The cluster's HTTP ingress: the same API as `python -m server`, every request forwarded to an engine replica.

Generation requests carry their adapter to Ray Serve as the multiplexed model id (the `adapter` field of
`/generate`, the `model` field of the OpenAI routes), so they reach a replica that already holds that
adapter. Everything else goes to any replica: adapters live in a store every replica shares. This process
never loads torch or the model.
"""
# No `from __future__ import annotations`: FastAPI must see `Request` itself in the rewritten route signature.

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.cluster.forwarding import BASE_MODEL_ID, ForwardedRequest
from server.routes.errors import error_json

log = logging.getLogger(__name__)

ADAPTER_FIELD = {"/generate": "adapter", "/v1/completions": "model", "/v1/chat/completions": "model"}
_DROPPED_HEADERS = {b"content-length", b"transfer-encoding", b"x-request-id"}  # Serve sets X-Request-ID itself

api = FastAPI(title="loraplex (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


def multiplexed_model_id(method: str, path: str, body: bytes) -> str | None:
    """The adapter a generation request names, BASE_MODEL_ID for none; None for requests of any other kind.
    A body that does not parse still goes to a replica, whose validation answers it."""
    field = ADAPTER_FIELD.get(path) if method == "POST" else None
    if field is None:
        return None
    try:
        name = json.loads(body).get(field)
    except (ValueError, AttributeError):
        return BASE_MODEL_ID
    return name if isinstance(name, str) and name else BASE_MODEL_ID


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
    def __init__(self, engine: DeploymentHandle):
        self.engine = engine

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query.encode(),
                                     request.headers.raw, body)
        model_id = multiplexed_model_id(request.method, request.url.path, body)
        handle = self.engine.options(stream=True, **({"multiplexed_model_id": model_id} if model_id else {}))
        chunks = handle.forward.remote(forwarded)
        try:
            status, raw_headers = await chunks.__anext__()
        except Exception as e:  # a replica died or none is up
            log.warning("no engine replica answered %s %s: %s", request.method, request.url.path, e)
            chunks.cancel()
            return error_json(503, "engine_unavailable", "no engine replica could take the request", request)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers if k.lower() not in _DROPPED_HEADERS}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(chunks), status_code=status, headers=headers)
        return Response(b"".join([chunk async for chunk in chunks]), status_code=status, headers=headers)
