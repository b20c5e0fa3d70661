"""What the cluster's ingress checks before it reads a body or picks a replica: the caller's key, the
route's role, the body's size and pace.

Replicas check keys too, but a request reaches one only after its body was read and its adapter loaded
from the store; a request that fails here costs neither. The keys come from the Settings the replicas get,
and the routes' roles and limits are the single-process server's, so both ends agree on who may do what.
Built by the launcher, so the ingress never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.auth import DEV_PRINCIPAL, KeyRing, Principal, key_id
from server.errors import AdapterTooLarge, DeadlineExceeded, Forbidden, Unauthorized

PUBLIC_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIX = "/web/"
METRICS_PATH = "/metrics"
UPLOAD_PATH = "/adapters"
ADMIN_POSTS = frozenset({UPLOAD_PATH, "/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
UPLOAD_SLACK_BYTES = 1 << 20  # form boundaries, the config JSON and the safetensors header on top of the tensors
ANONYMOUS = Principal("user", frozenset(), "anonymous")  # a public route's caller: may use no adapter


class BodyTooLarge(AdapterTooLarge):  # 413, as an oversized upload
    code = "too_large"


class BodyTimeout(DeadlineExceeded):  # 408
    code = "body_timeout"


@dataclass(frozen=True)
class Gate:
    keys: KeyRing
    metrics_keys: KeyRing  # may read /metrics and nothing else
    max_json_bytes: int
    max_upload_bytes: int
    body_timeout_s: float

    @classmethod
    def from_settings(cls, settings) -> Gate:
        return cls(keys=KeyRing.from_settings(settings.admin_keys, settings.user_keys, settings.keys_file),
                   metrics_keys=KeyRing.from_settings("", settings.metrics_keys, None),
                   max_json_bytes=settings.max_json_bytes,
                   max_upload_bytes=settings.max_adapter_bytes + UPLOAD_SLACK_BYTES,
                   body_timeout_s=settings.body_timeout_s)

    def admit(self, method: str, path: str, authorization: str) -> Principal:
        """The caller of a request, from its head alone; raises Unauthorized or Forbidden."""
        if is_public(method, path):
            return ANONYMOUS
        if not self.keys.enabled:
            return DEV_PRINCIPAL
        principal = self.authenticate(bearer_token(authorization))
        if principal is None:
            raise Unauthorized("invalid API key")
        if principal.role not in ("admin", "user") and path != METRICS_PATH:
            raise Forbidden("this API key may only read /metrics")
        if is_admin_route(method, path) and not principal.is_admin:
            raise Forbidden("this API key may not change adapters (admin role required)")
        return principal

    def authenticate(self, token: str) -> Principal | None:
        # both rings, always: which one knew the key must not show in the time taken
        principal, metrics = self.keys.authenticate(token), self.metrics_keys.authenticate(token)
        if principal is None and metrics is not None:
            return Principal("metrics", frozenset(), key_id(token))
        return principal

    def body_limit(self, method: str, path: str) -> int:
        return self.max_upload_bytes if (method, path) == ("POST", UPLOAD_PATH) else self.max_json_bytes


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    return token.strip()


def is_public(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX))


def is_admin_route(method: str, path: str) -> bool:
    """The routes that change adapters."""
    return (method == "POST" and path in ADMIN_POSTS) or (method == "DELETE" and path.startswith(f"{UPLOAD_PATH}/"))
