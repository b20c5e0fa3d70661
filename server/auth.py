"""API keys and what each may do.

Three roles: `admin` may upload, load, unload and delete adapters (and everything a user may); `user` may
generate and list; `metrics` may only read /metrics. A key may carry an allow-list of adapters (a tenant's
private personas): it may use, manage and see in /metrics only those. With no keys
configured the server runs in local development mode: everyone is admin, and it only binds to loopback.
Keys are compared in constant time against every configured key, and never logged: log lines name a key
by a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("admin", "user", "metrics")


@dataclass(frozen=True)
class Principal:
    role: str
    adapters: frozenset[str] | None = None   # None: every adapter
    key_id: str = "dev"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, adapter: str | None) -> bool:
        return adapter is None or self.adapters is None or adapter in self.adapters


DEV_PRINCIPAL = Principal("admin")


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


class KeyRing:
    def __init__(self, entries: list[tuple[str, Principal]]):
        for key, p in entries:
            if p.role not in ROLES:
                raise ValueError(f"unknown role {p.role!r} for {p.key_id}; roles: {ROLES}")
            if len(key) < 16:
                raise ValueError(f"API key {p.key_id} is shorter than 16 characters")
        self._entries = [(key.encode(), p) for key, p in entries]

    @classmethod
    def from_settings(cls, admin_keys: str, user_keys: str, keys_file: Path | None,
                      metrics_keys: str = "") -> "KeyRing":
        entries = [(k, Principal("admin", None, key_id(k))) for k in _split(admin_keys)]
        entries += [(k, Principal("user", None, key_id(k))) for k in _split(user_keys)]
        entries += [(k, Principal("metrics", None, key_id(k))) for k in _split(metrics_keys)]
        if keys_file is not None:
            for item in json.loads(Path(keys_file).read_text()):
                allowed = item.get("adapters")
                entries.append((item["key"], Principal(item.get("role", "user"),
                                                       frozenset(allowed) if allowed is not None else None,
                                                       key_id(item["key"]))))
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, presented: str) -> Principal | None:
        """Constant time in which key matched: every key is compared, with no early exit."""
        found = None
        candidate = presented.encode()
        for key, principal in self._entries:
            if hmac.compare_digest(key, candidate):
                found = principal
        return found


def _split(keys: str) -> list[str]:
    return [k.strip() for k in keys.split(",") if k.strip()]
