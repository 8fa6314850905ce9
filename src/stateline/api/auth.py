"""API keys: random, shown once, stored hashed under the reserved tenant ``system``; scopes per layer."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from stateline.errors import Conflict, Forbidden, InvalidArgument, NotFound, Unauthenticated
from stateline.store.protocol import Store
from stateline.types import Absent, Put, VersionIs, check_tenant

__all__ = [
    "KEYS_NAMESPACE",
    "LAYERS",
    "SYSTEM_TENANT",
    "ApiKey",
    "KeyStore",
    "Principal",
    "check_scopes",
]

SYSTEM_TENANT = "system"
KEYS_NAMESPACE = "api.keys"
LEVELS = {"read": 1, "write": 2, "admin": 3}
LAYERS = (
    "store",
    "changes",
    "docs",
    "streams",
    "cases",
    "runs",
    "runtime",
    "locks",
    "audit",
    "gates",
    "keys",
    "policies",
)
_PREFIX_RE = re.compile(r"[0-9a-f]{12}")
MAX_EXPIRY_SECONDS = 10 * 365 * 86400


def check_scopes(scopes: object) -> tuple[str, ...]:
    """Validate a list of scopes: ``read``, ``write``, ``admin`` or ``<layer>:<level>`` (e.g. ``docs:write``).

    ``write`` includes ``read`` and ``admin`` includes both; a layer scope applies to that layer only.
    """
    if isinstance(scopes, str) or not isinstance(scopes, list | tuple) or not scopes:
        raise InvalidArgument("scopes", "must be a non-empty list such as ['read', 'docs:write']")
    out: list[str] = []
    for i, s in enumerate(scopes):
        if type(s) is not str:
            raise InvalidArgument(f"scopes[{i}]", "must be a string")
        layer, _, level = s.rpartition(":")
        if level not in LEVELS or (layer and layer not in LAYERS) or (not layer and ":" in s):
            raise InvalidArgument(
                f"scopes[{i}]",
                f"{s[:40]!r} is not a scope: use read, write, admin or <layer>:<level> with a layer from "
                + ", ".join(LAYERS),
            )
        if s not in out:
            out.append(s)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id (its public prefix), its tenant and scopes."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    name: str = ""

    def allows(self, layer: str, level: str) -> bool:
        """Whether one of the scopes grants ``level`` (read/write/admin) on ``layer``."""
        need = LEVELS[level]
        for s in self.scopes:
            lay, _, lev = s.rpartition(":")
            if (not lay or lay == layer) and LEVELS.get(lev, 0) >= need:
                return True
        return False

    def require(self, layer: str, level: str) -> None:
        """Raise ``Forbidden`` unless the key grants ``level`` on ``layer``."""
        if not self.allows(layer, level):
            raise Forbidden(
                f"this key lacks the scope {layer}:{level}",
                details={"needed": [level, f"{layer}:{level}"], "key_id": self.key_id},
            )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """The public record of a key (never its secret or hash). Times are µs since the epoch."""

    id: str
    tenant: str
    scopes: tuple[str, ...]
    name: str
    created_at: int
    expires_at: int | None
    revoked: bool
    revoked_at: int | None

    def to_dict(self) -> dict[str, Any]:
        """The key as JSON."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "name": self.name,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
        }


def _public(record: dict[str, Any]) -> ApiKey:
    return ApiKey(
        record["id"],
        record["tenant"],
        tuple(record["scopes"]),
        record.get("name", ""),
        record["created_at"],
        record.get("expires_at"),
        bool(record.get("revoked")),
        record.get("revoked_at"),
    )


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """Creates, lists, revokes and checks API keys kept in the Store (tenant ``system``, namespace ``api.keys``).

    A key reads ``sl_<prefix>_<secret>``: the prefix is its public id, the secret is stored only as a
    SHA-256 hash and compared in constant time. Verified keys are cached for ``cache_seconds``; a revoke
    through this ``KeyStore`` takes effect at once, one made by another process within ``cache_seconds``.
    Expiry is always checked against the store's clock.
    """

    def __init__(self, store: Store, *, cache_seconds: float = 2.0) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        # key id -> (stored record, when it was read, its principal)
        self._cache: dict[str, tuple[dict[str, Any], float, Principal]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ management

    def create(
        self,
        tenant: str,
        scopes: Iterable[str] | object,
        *,
        name: str = "",
        expires_in: float | None = None,
    ) -> tuple[str, ApiKey]:
        """Create a key for ``tenant``; returns ``(token, record)``. The token is shown only here."""
        tenant = check_tenant(tenant)
        scope_t = check_scopes(list(scopes) if not isinstance(scopes, str) and isinstance(scopes, Iterable) else scopes)
        if type(name) is not str or len(name) > 200:
            raise InvalidArgument("name", "must be a string of at most 200 characters")
        now = self.store.clock.now_us()
        expires_at = None
        if expires_in is not None:
            if type(expires_in) not in (int, float) or not 0 < expires_in <= MAX_EXPIRY_SECONDS:
                raise InvalidArgument("expires_in", f"must be a number of seconds from 1 to {MAX_EXPIRY_SECONDS}")
            expires_at = now + round(expires_in * 1_000_000)
        for _ in range(5):
            prefix = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            record = {
                "id": prefix,
                "hash": _hash(secret),
                "tenant": tenant,
                "scopes": list(scope_t),
                "name": name,
                "created_at": now,
                "expires_at": expires_at,
                "revoked": False,
                "revoked_at": None,
            }
            try:
                self.store.commit(
                    SYSTEM_TENANT,
                    [Absent(KEYS_NAMESPACE, prefix)],
                    [Put(KEYS_NAMESPACE, prefix, record)],
                    {"actor": "keys", "reason": "create"},
                )
            except Conflict:
                continue  # 48 random bits collided: draw again
            return f"sl_{prefix}_{secret}", _public(record)
        raise Conflict("could not draw an unused key id")  # pragma: no cover - 2**48 space

    def get(self, key_id: str, *, tenant: str | None = None) -> ApiKey:
        """The record of one key; ``NotFound`` if unknown (or, with ``tenant``, of another tenant)."""
        item = self._item(key_id)
        if item is None or (tenant is not None and item.value["tenant"] != tenant):
            raise NotFound(f"no API key {key_id!r}", details={"key_id": key_id})
        return _public(item.value)

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (of ``tenant`` if given), revoked ones included, in id order."""
        if tenant is not None:
            tenant = check_tenant(tenant)
        items = self.store.scan_all(SYSTEM_TENANT, KEYS_NAMESPACE)
        return [_public(i.value) for i in items if tenant is None or i.value["tenant"] == tenant]

    def revoke(self, key_id: str, *, tenant: str | None = None) -> ApiKey:
        """Revoke a key (idempotent). With ``tenant``, a key of another tenant is ``NotFound``."""
        while True:
            item = self._item(key_id)
            if item is None or (tenant is not None and item.value["tenant"] != tenant):
                raise NotFound(f"no API key {key_id!r}", details={"key_id": key_id})
            record = dict(item.value)
            if record.get("revoked"):
                break
            record["revoked"] = True
            record["revoked_at"] = self.store.clock.now_us()
            try:
                self.store.commit(
                    SYSTEM_TENANT,
                    [VersionIs(KEYS_NAMESPACE, key_id, item.version)],
                    [Put(KEYS_NAMESPACE, key_id, record)],
                    {"actor": "keys", "reason": "revoke"},
                )
            except Conflict:
                continue
            break
        with self._lock:
            self._cache.pop(key_id, None)
        return _public(record)

    def has_keys(self, tenant: str | None = None) -> bool:
        """Whether any key that is not revoked exists (for ``tenant`` if given)."""
        return any(not k.revoked for k in self.list(tenant))

    def _item(self, key_id: object) -> Any:
        if type(key_id) is not str or _PREFIX_RE.fullmatch(key_id) is None:
            return None
        return self.store.get(SYSTEM_TENANT, KEYS_NAMESPACE, key_id)

    # ------------------------------------------------------------ verification

    def is_cached(self, token: str | None) -> bool:
        """Whether ``authenticate(token)`` would be answered from the cache (no store call)."""
        if not token or not token.startswith("sl_"):
            return True  # refused without a store call
        cached = self._cache.get(token[3:15])
        return cached is not None and time.monotonic() - cached[1] < self.cache_seconds

    def authenticate(self, token: str | None) -> Principal:
        """The principal a presented token stands for; ``Unauthenticated`` if missing, unknown,
        malformed, expired or revoked (the message does not say which part was wrong)."""
        if not token:
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer sl_...' or 'X-API-Key'")
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "sl" or _PREFIX_RE.fullmatch(parts[1]) is None or not parts[2]:
            raise Unauthenticated("invalid API key")
        key_id, secret = parts[1], parts[2]
        now_mono = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is None or now_mono - cached[1] >= self.cache_seconds:
            item = self.store.get(SYSTEM_TENANT, KEYS_NAMESPACE, key_id)
            if item is None:
                raise Unauthenticated("invalid API key")
            record = item.value
            principal = Principal(key_id, record["tenant"], frozenset(record["scopes"]), record.get("name", ""))
            cached = (record, now_mono, principal)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[key_id] = cached
        record = cached[0]
        if not hmac.compare_digest(record["hash"], _hash(secret)):
            raise Unauthenticated("invalid API key")
        if record.get("revoked"):
            raise Unauthenticated("this API key was revoked", details={"key_id": key_id})
        expires_at = record.get("expires_at")
        if expires_at is not None and self.store.clock.now_us() >= expires_at:
            raise Unauthenticated("this API key has expired", details={"key_id": key_id})
        return cached[2]


def require_tenant_data(principal: Principal) -> str:
    """The tenant whose data a principal may touch; the reserved ``system`` tenant is refused."""
    if principal.tenant == SYSTEM_TENANT:
        raise Forbidden("keys of the reserved tenant 'system' manage keys only; they read and write no data")
    return principal.tenant
