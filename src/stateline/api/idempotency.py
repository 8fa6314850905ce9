"""``Idempotency-Key`` for POST: the first request runs, a repeat gets the stored response back."""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass

from stateline.errors import Conflict, InvalidArgument
from stateline.store.protocol import Store
from stateline.types import Absent, Delete, Put, VersionIs

__all__ = ["NAMESPACE", "HttpIdempotency", "Replay", "fingerprint"]

NAMESPACE = "api.idempotency"
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
_REPLAYED_HEADERS = ("content-type", "etag", "location")


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored response to send again."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> str:
    """What makes two requests with the same key "the same request"."""
    h = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


class HttpIdempotency:
    """Idempotency records of HTTP requests, per tenant, in the Store (namespace ``api.idempotency``).

    ``begin`` claims the key with an ``Absent`` check (one concurrent request wins; the others get
    409 while it runs), ``finish`` stores the response for ``ttl`` seconds, ``abandon`` frees the key
    after a server error so that a retry runs again. A claim whose request died is freed after
    ``lease`` seconds.
    """

    def __init__(self, store: Store, *, ttl: float = 86400.0, lease: float = 60.0) -> None:
        self.store = store
        self.ttl = ttl
        self.lease = lease

    @staticmethod
    def check_key(key: str) -> str:
        """Validate a presented key: 1..255 printable ASCII characters."""
        if _KEY_RE.fullmatch(key) is None:
            raise InvalidArgument("Idempotency-Key", "must be 1 to 255 printable ASCII characters without spaces")
        return key

    def begin(self, tenant: str, key: str, fp: str) -> Replay | int:
        """A stored response to replay, or the version of the claim this request now holds."""
        for _ in range(3):
            item = self.store.get(tenant, NAMESPACE, key)
            if item is not None:
                rec = item.value
                if rec.get("fp") != fp:
                    raise Conflict(
                        "this Idempotency-Key was used with a different request",
                        details={"reason": "idempotency_key_reused", "idempotency_key": key},
                    )
                if rec.get("state") == "done":
                    headers = [(str(k), str(v)) for k, v in rec.get("headers", [])]
                    return Replay(int(rec["status"]), headers, str(rec["body"]).encode())
                raise Conflict(
                    "a request with this Idempotency-Key is in progress; retry later",
                    details={"reason": "idempotency_in_progress", "idempotency_key": key},
                )
            try:
                c = self.store.commit(
                    tenant,
                    [Absent(NAMESPACE, key)],
                    [Put(NAMESPACE, key, {"state": "pending", "fp": fp}, ttl=self.lease)],
                    {"via": "api", "reason": "idempotency"},
                )
            except Conflict:
                continue
            return c.versions[(NAMESPACE, key)]
        raise Conflict(
            "a request with this Idempotency-Key is in progress; retry later",
            details={"reason": "idempotency_in_progress", "idempotency_key": key},
        )

    def finish(
        self, tenant: str, key: str, version: int, fp: str, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Store the response of the request holding the claim (a lost claim stores nothing)."""
        try:
            text = body.decode()
        except UnicodeDecodeError:
            self.abandon(tenant, key, version)
            return
        kept = [[k, v] for k, v in headers if k in _REPLAYED_HEADERS]
        record = {"state": "done", "fp": fp, "status": status, "headers": kept, "body": text}
        with contextlib.suppress(Conflict):
            self.store.commit(
                tenant,
                [VersionIs(NAMESPACE, key, version)],
                [Put(NAMESPACE, key, record, ttl=self.ttl)],
                {"via": "api", "reason": "idempotency"},
            )

    def abandon(self, tenant: str, key: str, version: int) -> None:
        """Free the claim so that a retry runs the request again."""
        with contextlib.suppress(Conflict):
            self.store.commit(tenant, [VersionIs(NAMESPACE, key, version)], [Delete(NAMESPACE, key)], {"via": "api"})
