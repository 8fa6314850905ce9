"""The per-tenant audit log: append-only, hash-chained entries with filtered queries and retention cleanup."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, Unavailable
from stateline.store.protocol import Store
from stateline.types import Absent, Append, Event, NewEvent, Put, StreamAt, Trim, VersionIs, check_tenant

__all__ = ["GENESIS", "AuditEntry", "AuditLog", "AuditPage", "AuditVerification"]

STREAM = "audit:log"
NAMESPACE = "audit"
EVENT_TYPE = "audit.entry"
GENESIS = "0" * 64
_PAGE = 500
_MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit entry. ``ts`` is µs since the epoch; ``hash`` chains it to the entry before (``prev``)."""

    seq: int
    ts: int
    tenant: str
    user: str
    action: str
    resource_type: str
    resource_id: str | None
    details: dict[str, Any]
    ip: str | None
    trace_id: str | None
    prev: str
    hash: str


@dataclass(frozen=True, slots=True)
class AuditPage:
    """A page of a query; pass ``next_after`` as ``after`` for the next page (``None``: no more)."""

    entries: list[AuditEntry]
    next_after: int | None


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """The outcome of ``verify``: ``ok``, how many entries were checked, and the first bad seq and why."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def _hash(tenant: str, seq: int, body: dict[str, Any], prev: str) -> str:
    canonical = orjson.dumps({**body, "tenant": tenant, "seq": seq, "prev": prev}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


_FIELDS = ("ts", "user", "action", "resource_type", "resource_id", "details", "ip", "trace_id")


def _opt_text(value: object, field: str, max_len: int) -> str | None:
    if value is None:
        return None
    return _text(value, field, max_len)


def _text(value: object, field: str, max_len: int = 256) -> str:
    if type(value) is not str or not value:
        raise InvalidArgument(field, f"must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters")
    return value


def _opt_ts(value: object, field: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidArgument(field, f"must be µs since the epoch (a non-negative integer), got {value!r}")
    return value


class AuditLog:
    """The audit trail of one tenant, kept in stream ``audit:log``.

    Each entry carries the sha256 of its canonical JSON (tenant, seq, fields) together with the hash
    of the entry before it, so ``verify`` finds any entry that was edited, removed or inserted without
    recomputing every later hash. Appends are linearised with a ``StreamAt`` check; the head
    (``audit/head``: last seq and hash) is written in the same commit, so removing the newest entries
    is detected too. ``cleanup`` trims old entries and, in the same commit, records the hash of the
    last removed entry (``audit/checkpoint``), so the chain stays verifiable from the oldest kept
    entry. Timestamps never go backwards along the chain. Thread- and process-safe.
    """

    def __init__(self, store: Store, tenant: str) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)
        self._lock = threading.Lock()
        self._head: tuple[int, str, int] | None = None  # (seq, hash, ts) of the last entry we know

    # ------------------------------------------------------------ writing

    def log(
        self,
        user: str,
        action: str,
        resource_type: str,
        resource_id: str | None = None,
        details: dict[str, Any] | None = None,
        ip: str | None = None,
        trace_id: str | None = None,
    ) -> AuditEntry:
        """Append one entry and return it (with its seq, µs timestamp and hash)."""
        body: dict[str, Any] = {
            "user": _text(user, "user"),
            "action": _text(action, "action"),
            "resource_type": _text(resource_type, "resource_type"),
            "resource_id": _opt_text(resource_id, "resource_id", 1024),
            "details": {} if details is None else details,
            "ip": None,
            "trace_id": _opt_text(trace_id, "trace_id", 256),
        }
        if type(body["details"]) is not dict:
            raise InvalidArgument("details", f"must be an object, got {type(details).__name__}")
        codec.encode(body["details"], "details", self._store.max_value_bytes // 2)
        if ip is not None:
            try:
                body["ip"] = str(ipaddress.ip_address(_text(ip, "ip", 64)))
            except ValueError:
                raise InvalidArgument("ip", f"not an IP address: {ip!r}") from None
        with self._lock:
            for _ in range(10_000):
                head = self._head if self._head is not None else self._read_head()
                seq, prev, last_ts = head
                ts = max(self._store.clock.now_us(), last_ts)
                entry_body = {"ts": ts, **body}
                h = _hash(self.tenant, seq + 1, entry_body, prev)
                data = {**entry_body, "prev": prev, "hash": h}
                try:
                    self._store.commit(
                        self.tenant,
                        [StreamAt(STREAM, seq)],
                        [
                            Append(STREAM, [NewEvent(EVENT_TYPE, data)]),
                            Put(NAMESPACE, "head", {"seq": seq + 1, "hash": h, "ts": ts}),
                        ],
                        meta={"actor": body["user"], "reason": body["action"]},
                    )
                except Conflict:
                    self._head = None  # another writer appended: learn the new head
                    continue
                self._head = (seq + 1, h, ts)
                return AuditEntry(seq + 1, ts, self.tenant, prev=prev, hash=h, **body)
        raise Unavailable("audit log append kept conflicting")

    def _read_head(self) -> tuple[int, str, int]:
        info = self._store.stream_info(self.tenant, STREAM)
        if info.last_seq == 0:
            return (0, GENESIS, 0)
        head = self._store.get(self.tenant, NAMESPACE, "head")
        if head is not None and head.value.get("seq") == info.last_seq:
            return (info.last_seq, head.value["hash"], head.value["ts"])
        events = self._store.read_stream(self.tenant, STREAM, info.last_seq, info.last_seq, 1)
        if events:
            d = events[0].data
            return (info.last_seq, d["hash"], d["ts"])
        # every entry was trimmed and the head is unreadable: continue from the checkpoint
        cp = self._store.get(self.tenant, NAMESPACE, "checkpoint")
        if cp is not None and cp.value.get("seq") == info.last_seq:
            return (info.last_seq, cp.value["hash"], cp.value["ts"])
        return (info.last_seq, GENESIS, 0)

    # ------------------------------------------------------------ reading

    def _entry(self, e: Event) -> AuditEntry:
        d = e.data
        return AuditEntry(
            e.seq,
            d["ts"],
            self.tenant,
            d["user"],
            d["action"],
            d["resource_type"],
            d.get("resource_id"),
            d.get("details") or {},
            d.get("ip"),
            d.get("trace_id"),
            d["prev"],
            d["hash"],
        )

    def _ts_at(self, seq: int) -> int:
        events = self._store.read_stream(self.tenant, STREAM, seq, seq, 1)
        return cast(int, events[0].data["ts"]) if events else 0

    def _first_at_or_after(self, lo: int, hi: int, ts: int) -> int:
        """Smallest seq in [lo, hi] whose entry has a timestamp >= ts (hi + 1 if none)."""
        end = hi + 1
        while lo < end:
            mid = (lo + end) // 2
            if self._ts_at(mid) >= ts:
                end = mid
            else:
                lo = mid + 1
        return lo

    def get(self, seq: int) -> AuditEntry | None:
        """The entry with this seq, or ``None`` (never written, or removed by retention)."""
        if type(seq) is not int or seq < 1:
            raise InvalidArgument("seq", f"must be a positive integer, got {seq!r}")
        events = self._store.read_stream(self.tenant, STREAM, seq, seq, 1)
        return self._entry(events[0]) if events else None

    def query(
        self,
        *,
        user: str | None = None,
        action: str | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
        from_ts: int | None = None,
        to_ts: int | None = None,
        after: int | None = None,
        limit: int = 100,
        order: Literal["newest", "oldest"] = "newest",
    ) -> AuditPage:
        """Entries matching every given filter, newest first (or ``order="oldest"``), at most ``limit``.

        ``from_ts`` / ``to_ts`` bound the µs timestamp (inclusive). ``after`` is the paging cursor:
        the ``next_after`` of the previous page (the seq of its last entry). Time bounds cost a
        binary search; the other filters are applied while reading the time range in pages.
        """
        filters = {
            "user": _opt_text(user, "user", 256),
            "action": _opt_text(action, "action", 256),
            "resource_type": _opt_text(resource_type, "resource_type", 256),
            "resource_id": _opt_text(resource_id, "resource_id", 1024),
        }
        wanted = {k: v for k, v in filters.items() if v is not None}
        lo_ts = _opt_ts(from_ts, "from_ts")
        hi_ts = _opt_ts(to_ts, "to_ts")
        if after is not None and (type(after) is not int or after < 0):
            raise InvalidArgument("after", f"must be a seq (a non-negative integer), got {after!r}")
        if type(limit) is not int or not 1 <= limit <= _MAX_LIMIT:
            raise InvalidArgument("limit", f"must be an integer from 1 to {_MAX_LIMIT}, got {limit!r}")
        if order not in ("newest", "oldest"):
            raise InvalidArgument("order", f"must be 'newest' or 'oldest', got {order!r}")

        info = self._store.stream_info(self.tenant, STREAM)
        lo, hi = info.first_seq, info.last_seq
        if lo_ts is not None:
            lo = self._first_at_or_after(lo, hi, lo_ts)
        if hi_ts is not None:
            hi = self._first_at_or_after(lo, hi, hi_ts + 1) - 1
        if after is not None:
            if order == "oldest":
                lo = max(lo, after + 1)
            else:
                hi = min(hi, after - 1)
        out: list[AuditEntry] = []
        while lo <= hi and len(out) < limit:
            if order == "oldest":
                events = self._store.read_stream(self.tenant, STREAM, lo, min(hi, lo + _PAGE - 1), _PAGE)
                lo += _PAGE
            else:
                start = max(lo, hi - _PAGE + 1)
                events = self._store.read_stream(self.tenant, STREAM, start, hi, _PAGE)
                events.reverse()
                hi = start - 1
            for e in events:
                d = e.data
                if all(d.get(k) == v for k, v in wanted.items()):
                    out.append(self._entry(e))
                    if len(out) == limit:
                        break
        # a full page may have more after it (a last page that is exactly full leads to an empty one)
        return AuditPage(out, out[-1].seq if len(out) == limit else None)

    def count(self) -> int:
        """How many entries are kept."""
        info = self._store.stream_info(self.tenant, STREAM)
        return info.last_seq - info.first_seq + 1

    # ------------------------------------------------------------ retention

    def cleanup(self, retention_days: float) -> int:
        """Remove entries older than ``retention_days`` days; returns how many were removed.

        The hash of the last removed entry is recorded as the checkpoint in the same commit, so
        ``verify`` still checks the chain from the oldest kept entry.
        """
        if type(retention_days) not in (int, float) or math.isnan(retention_days) or retention_days < 0:
            raise InvalidArgument("retention_days", f"must be a non-negative number, got {retention_days!r}")
        cutoff = self._store.clock.now_us() - round(retention_days * 86400 * 1_000_000)
        for _ in range(1000):
            info = self._store.stream_info(self.tenant, STREAM)
            first, last = info.first_seq, info.last_seq
            if first > last:
                return 0
            cut = self._first_at_or_after(first, last, cutoff)
            if cut == first:
                return 0
            removed = self._store.read_stream(self.tenant, STREAM, cut - 1, cut - 1, 1)
            if not removed:
                continue  # trimmed meanwhile
            d = removed[0].data
            cp = self._store.get(self.tenant, NAMESPACE, "checkpoint")
            check = Absent(NAMESPACE, "checkpoint") if cp is None else VersionIs(NAMESPACE, "checkpoint", cp.version)
            try:
                self._store.commit(
                    self.tenant,
                    [check],
                    [
                        Trim(STREAM, cut),
                        Put(NAMESPACE, "checkpoint", {"seq": cut - 1, "hash": d["hash"], "ts": d["ts"]}),
                    ],
                    meta={"reason": "audit retention"},
                )
            except Conflict:
                continue
            return cut - first
        raise Unavailable("audit cleanup kept conflicting")

    # ------------------------------------------------------------ verification

    def verify(self) -> AuditVerification:
        """Check the whole kept chain; the result names the first bad seq and why, if any."""
        info = self._store.stream_info(self.tenant, STREAM)
        first, last = info.first_seq, info.last_seq
        cp = self._store.get(self.tenant, NAMESPACE, "checkpoint")
        head = self._store.get(self.tenant, NAMESPACE, "head")
        if first == 1:
            prev, prev_ts = GENESIS, 0
        elif cp is None or cp.value.get("seq") != first - 1:
            return AuditVerification(False, 0, first, f"entries before seq {first} were removed without a checkpoint")
        else:
            prev, prev_ts = cp.value["hash"], cp.value["ts"]
        expected = first
        checked = 0
        while expected <= last:
            events = self._store.read_stream(self.tenant, STREAM, expected, last, _PAGE)
            if not events:
                return AuditVerification(False, checked, expected, f"entry {expected} is missing")
            for e in events:
                if e.seq != expected:
                    return AuditVerification(False, checked, expected, f"entry {expected} is missing")
                d = e.data
                if not isinstance(d, dict) or e.type != EVENT_TYPE or any(f not in d for f in _FIELDS):
                    return AuditVerification(False, checked, e.seq, "entry is malformed")
                if d.get("prev") != prev:
                    return AuditVerification(
                        False, checked, e.seq, "entry does not link to the one before (removed or inserted)"
                    )
                body = {f: d[f] for f in _FIELDS}
                if _hash(self.tenant, e.seq, body, prev) != d.get("hash"):
                    return AuditVerification(False, checked, e.seq, "entry was edited (hash mismatch)")
                if d["ts"] < prev_ts:
                    return AuditVerification(False, checked, e.seq, "timestamp goes backwards")
                prev, prev_ts = d["hash"], d["ts"]
                expected += 1
                checked += 1
        if last > 0 and (head is None or head.value.get("seq") != last or head.value.get("hash") != prev):
            seq = last + 1 if head is not None and head.value.get("seq", 0) > last else last
            return AuditVerification(False, checked, seq, "the chain head does not match the newest entry")
        return AuditVerification(True, checked)
