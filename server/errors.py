"""Errors as values with stable codes.

Raised deep (adapter validation, the engine, the store) and mapped to HTTP status in one place
(`server/routes/errors.py`), so no inner layer knows about HTTP.
"""


class LoraplexError(Exception):
    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class AdapterNotFound(LoraplexError):
    code = "adapter_not_found"


class AdapterExists(LoraplexError):
    code = "adapter_exists"


class AdapterInvalid(LoraplexError):
    code = "adapter_invalid"


class AdapterTooLarge(LoraplexError):
    code = "adapter_too_large"


class InvalidRequest(LoraplexError):
    code = "invalid_request"


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
