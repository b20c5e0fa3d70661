"""The errors the adapters package raises, as values with stable codes.

The server maps them to HTTP status in one place (`server/routes/errors.py`); nothing here knows about
HTTP. `LoraplexError` is the root of every loraplex error, the server's own included.
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


class AdapterUnreadable(LoraplexError):
    """A registered adapter whose stored copy cannot be read back (a disk fault, a file changed under the
    server): the server's failure, not the request's."""

    code = "adapter_unreadable"


class InvalidRequest(LoraplexError):
    """A request's parameters break a limit (an adapter mix's, among others the server checks)."""

    code = "invalid_request"
