"""Errors as values with stable codes.

Raised deep (adapter validation, the engine, the store) and mapped to HTTP status in one place
(`server/routes/errors.py`), so no inner layer knows about HTTP. The adapters package's own errors live in
`adapters/errors.py`, which imports nothing from the server; they are re-exported here.
"""

from adapters.errors import (  # noqa: F401  (re-exported: the server raises and maps them too)
    AdapterExists, AdapterInvalid, AdapterNotFound, AdapterTooLarge, AdapterUnreadable, InvalidRequest, LoraplexError,
)


class EngineUnavailable(LoraplexError):
    code = "engine_unavailable"


class Unauthorized(LoraplexError):
    code = "unauthorized"


class Forbidden(LoraplexError):
    code = "forbidden"


class Overloaded(LoraplexError):
    code = "overloaded"
    retry_after_s = 1


class DeadlineExceeded(LoraplexError):
    code = "deadline_exceeded"


class GenerationFailed(LoraplexError):
    code = "generation_failed"
