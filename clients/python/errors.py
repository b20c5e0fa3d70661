"""The server's `{"error": {"code", "message"}}` bodies as exceptions, one class per HTTP status."""

from __future__ import annotations

import json


class LoraplexError(Exception):
    """Any error the server answered with; `code` is the server's stable error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AuthenticationError(LoraplexError):
    """401: no API key, or one the server does not know."""


class PermissionDeniedError(LoraplexError):
    """403: the API key may not do this (change adapters, or use this adapter)."""


class AdapterNotFoundError(LoraplexError):
    """404: no adapter of that name (never uploaded, or deleted)."""


class AdapterExistsError(LoraplexError):
    """409: the adapter name is taken."""


class TooLargeError(LoraplexError):
    """413: the upload exceeds the server's size limit."""


class InvalidRequestError(LoraplexError):
    """422: invalid parameters or an invalid adapter."""


ERROR_FOR_STATUS: dict[int, type[LoraplexError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: AdapterNotFoundError,
    409: AdapterExistsError,
    413: TooLargeError,
    422: InvalidRequestError,
}


def error_from_response(status: int, body: bytes) -> LoraplexError:
    """Builds the exception for an error response, tolerating bodies that are not loraplex JSON (a proxy's page)."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return ERROR_FOR_STATUS.get(status, LoraplexError)(status, code, message)
