"""A typed Python client of the loraplex native API, sync and async, on httpx."""

from clients.python.client import DEFAULT_URL, AsyncLoraplexClient, LoraplexClient
from clients.python.errors import (
    AdapterExistsError, AdapterNotFoundError, AuthenticationError, InvalidRequestError, LoraplexError,
    PermissionDeniedError, TooLargeError,
)
from clients.python.schemas import (
    AdapterInfo, Choice, GenerateResult, GenerationParams, Health, Message, StreamChunk, Usage,
)
from clients.python.stream import AsyncGenerateStream, GenerateStream

__all__ = [
    "AdapterExistsError", "AdapterInfo", "AdapterNotFoundError", "AsyncGenerateStream", "AsyncLoraplexClient",
    "AuthenticationError", "Choice", "DEFAULT_URL", "GenerateResult", "GenerateStream", "GenerationParams", "Health",
    "InvalidRequestError", "LoraplexClient", "LoraplexError", "Message", "PermissionDeniedError", "StreamChunk",
    "TooLargeError", "Usage",
]
