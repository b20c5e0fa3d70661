"""The one place where errors become HTTP responses: {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    AdapterExists, AdapterInvalid, AdapterNotFound, AdapterTooLarge, AdapterUnreadable, InvalidRequest, LoraplexError,
)
from server.errors import DeadlineExceeded, EngineUnavailable, Forbidden, GenerationFailed, Overloaded, Unauthorized

log = logging.getLogger(__name__)

STATUS = {
    AdapterNotFound: 404,
    AdapterExists: 409,
    AdapterTooLarge: 413,
    AdapterInvalid: 422,
    InvalidRequest: 422,
    AdapterUnreadable: 500,
    EngineUnavailable: 503,
    Unauthorized: 401,
    Forbidden: 403,
    Overloaded: 429,
    DeadlineExceeded: 408,
    GenerationFailed: 500,
}


def _headers(exc: LoraplexError) -> dict[str, str]:
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(exc.retry_after_s)}
    return {}


def error_json(status: int, code: str, message: str, request: Request | None = None,
               headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    if request is not None and request.url.path.startswith("/v1/"):
        # OpenAI's error shape and statuses (invalid parameters are 400, as OpenAI and vLLM answer), which
        # its client libraries parse into typed exceptions (BadRequestError)
        status = 400 if status == 422 else status
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def refusal(exc: LoraplexError, request: Request) -> JSONResponse:
    """An error answered before the body was read (server.gate). The connection closes: the unread body may
    still be on its way, and a proxy in front would go on reading it."""
    headers = {"Connection": "close"} | _headers(exc)
    return error_json(status_of(exc), exc.code, exc.message, request, headers)


def status_of(exc: LoraplexError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def install(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def _loraplex(request: Request, exc: LoraplexError):
        return error_json(status_of(exc), exc.code, exc.message, request, _headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts, fields = [], []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
            fields.append(where)
        return error_json(422, "invalid_request", "; ".join(parts) or "invalid request", request,
                          param=next((f for f in fields if f), None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return error_json(exc.status_code, code, str(exc.detail), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error")
        return error_json(500, "internal_error", "internal server error", request)
