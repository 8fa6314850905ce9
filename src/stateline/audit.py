"""The per-tenant audit log: append-only, hash-chained entries with filtered queries and retention cleanup."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import orjson

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, PayloadTooLarge, Unavailable
from stateline.store.protocol import PreparedAppend, PreparedCommit, PreparedEvent, PreparedPut, Store
from stateline.types import Absent, Event, Put, StreamAt, Trim, VersionIs, check_list, check_number, check_tenant

__all__ = ["GENESIS", "MAX_BATCH", "MAX_MANY", "AuditEntry", "AuditLog", "AuditPage", "AuditVerification"]

STREAM = "audit:log"
NAMESPACE = "audit"
EVENT_TYPE = "audit.entry"
GENESIS = "0" * 64
_PAGE = 500
_MAX_LIMIT = 1000
#: group commit merges the entries of waiting callers into one commit up to this many entries (a
#: single ``log_many`` call is never split)
MAX_BATCH = 256
#: the most entries one ``log_many`` call takes
MAX_MANY = 1000
_ARGS = frozenset({"user", "action", "resource_type", "resource_id", "details", "ip", "trace_id"})


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
_STORED = frozenset((*_FIELDS, "prev", "hash"))  # the keys of a stored entry, no more, no less


def _is_link(value: object) -> bool:
    """Whether ``value`` is a well-formed chain head or checkpoint: ``{"seq": int, "hash": str, "ts": int}``."""
    return (
        type(value) is dict
        and type(value.get("seq")) is int
        and type(value.get("hash")) is str
        and type(value.get("ts")) is int
    )


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


@functools.lru_cache(maxsize=4096)
def _ip_text(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _ip(value: str) -> str:
    """``value`` as a normalised IP address; ``InvalidArgument`` if it is not one."""
    out = _ip_text(value)
    if out is None:
        raise InvalidArgument("ip", f"not an IP address: {value!r}")
    return out


class _Body(dict[str, Any]):
    """The fields of one entry as ``entry_body`` validated them: what ``append_bodies`` takes."""

    __slots__ = ()


@dataclass(slots=True)
class _Pending:
    """Entries of one caller waiting for a group commit: ``result`` or ``error`` once the leader is done."""

    bodies: Sequence[dict[str, Any]]
    want_entries: bool = True
    result: list[AuditEntry] | None = None
    error: BaseException | None = None


_NO_META = b"{}"
#: what the chain adds to an entry's fields when it is stored: ts, prev, hash and their keys
_CHAIN_BYTES = 200
#: the most the fields other than details can take once encoded (6 bytes a character at worst), plus the chain
_MAX_FIELDS_BYTES = 6 * (3 * 256 + 1024 + 64 + 256) + 256 + _CHAIN_BYTES


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

    Appends from several threads through one ``AuditLog`` are group-committed: while one commit is
    under way the others queue, and the next caller to find no commit under way (the leader) appends
    everything queued in one commit, running the hash chain through the batch in queue order. Every
    caller returns only once its own entries are committed (or raises what failed the commit, in which
    case none of its entries was written). Appends from other processes, or other ``AuditLog``
    objects, are linearised by the ``StreamAt`` check: a loser re-reads the head and rehashes.
    """

    def __init__(self, store: Store, tenant: str) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)
        self._head: tuple[int, str, int] | None = None  # (seq, hash, ts) of the last entry we know
        # group commit: entries wait in _queue; one caller at a time (the leader) appends a batch
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Pending] = []
        self._leading = False

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
        """Append one entry and return it (with its seq, µs timestamp and hash).

        Entries logged at the same time by several threads are appended together, in one commit
        (group commit): each call returns once its own entry is committed."""
        body = self.entry_body(user, action, resource_type, resource_id, details, ip, trace_id)
        return self.append_bodies([body])[0]

    def log_many(self, entries: Iterable[Mapping[str, Any]]) -> list[AuditEntry]:
        """Append several entries (at most ``MAX_MANY``), in order, all in one commit; each is a mapping
        with the arguments of ``log`` (``user``, ``action``, ``resource_type`` and optionally
        ``resource_id``, ``details``, ``ip``, ``trace_id``). Nothing is written if any is invalid."""
        entries = check_list(entries, "entries")
        if len(entries) > MAX_MANY:
            raise InvalidArgument("entries", f"at most {MAX_MANY} entries a call")
        bodies = []
        for i, e in enumerate(entries):
            if not isinstance(e, Mapping):
                raise InvalidArgument(f"entries[{i}]", f"must be a mapping, got {type(e).__name__}")
            unknown = set(e) - _ARGS
            if unknown:
                raise InvalidArgument(f"entries[{i}]", f"unknown fields {sorted(unknown)}")
            try:
                bodies.append(
                    self.entry_body(
                        e.get("user"),  # type: ignore[arg-type]
                        e.get("action"),  # type: ignore[arg-type]
                        e.get("resource_type"),  # type: ignore[arg-type]
                        e.get("resource_id"),
                        e.get("details"),
                        e.get("ip"),
                        e.get("trace_id"),
                    )
                )
            except InvalidArgument as exc:
                raise InvalidArgument(f"entries[{i}].{exc.field}", exc.problem, details=exc.details) from None
        return self.append_bodies(bodies) if bodies else []

    def entry_body(
        self,
        user: str,
        action: str,
        resource_type: str,
        resource_id: str | None = None,
        details: dict[str, Any] | None = None,
        ip: str | None = None,
        trace_id: str | None = None,
    ) -> dict[str, Any]:
        """Validate the fields of one entry; the result is what ``append_bodies`` takes.

        Raises ``InvalidArgument`` (or ``PayloadTooLarge``) naming the bad field; writes nothing."""
        size = [0]
        body = _Body(
            user=_text(user, "user"),
            action=_text(action, "action"),
            resource_type=_text(resource_type, "resource_type"),
            resource_id=_opt_text(resource_id, "resource_id", 1024),
            details=self._details(details, size),
            ip=None if ip is None else _ip(_text(ip, "ip", 64)),
            trace_id=_opt_text(trace_id, "trace_id", 256),
        )
        limit = self._store.max_value_bytes
        if size[0] + _MAX_FIELDS_BYTES > limit:
            # the stored entry may not fit: measure it now, so that it fails alone, not in a batch
            size[0] = len(orjson.dumps(body)) + _CHAIN_BYTES
            if size[0] > limit:
                raise PayloadTooLarge(
                    f"entry: about {size[0]} bytes is over the limit of {limit}",
                    details={"field": "entry", "size": size[0], "limit": limit},
                )
        return body

    def _details(self, details: object, size: list[int]) -> dict[str, Any]:
        if details is None:
            return {}
        if type(details) is not dict:
            raise InvalidArgument("details", f"must be an object, got {type(details).__name__}")
        if details:
            size[0] = len(codec.encode(details, "details", self._store.max_value_bytes // 2))
        return details

    def append_bodies(self, bodies: Sequence[dict[str, Any]], *, entries: bool = True) -> list[AuditEntry]:
        """Append entries made by ``entry_body``, in order, and return them once committed (with
        ``entries=False`` the same append, returning an empty list: no entry objects are built).

        Group commit: the caller whose entries find no append under way becomes the leader and
        appends everything queued by then in one commit (the hash chain runs through the batch in
        queue order); callers arriving meanwhile wait and are appended by the next leader. If that
        commit fails, every caller whose entries were in it gets the error (nothing of theirs was
        written)."""
        bodies = check_list(bodies, "bodies")
        if type(entries) is not bool:
            raise InvalidArgument("entries", f"must be true or false, got {entries!r:.80}")
        if not bodies:
            return []
        for i, body in enumerate(bodies):
            if type(body) is not _Body:
                raise InvalidArgument(f"bodies[{i}]", f"must be made by entry_body, got {type(body).__name__}")
        pending = _Pending(bodies, entries)
        with self._cond:
            self._queue.append(pending)
            while self._leading and pending.result is None and pending.error is None:
                self._cond.wait()
            if pending.result is None and pending.error is None:
                self._leading = True
                batch, self._queue = self._queue, []
            else:
                batch = []
        if batch:
            try:
                self._append_batch(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _append_batch(self, batch: list[_Pending]) -> None:
        """Commit ``batch`` (the leader only): callers' entries are merged into one commit up to
        ``MAX_BATCH`` entries, one caller's are never split; sets each pending's result or error."""
        try:
            group: list[_Pending] = []
            size = 0
            for p in batch:
                if group and size + len(p.bodies) > MAX_BATCH:
                    self._commit_group(group)
                    group, size = [], 0
                group.append(p)
                size += len(p.bodies)
            if group:
                self._commit_group(group)
        except BaseException:
            # interrupted (KeyboardInterrupt, ...): no caller may wait for an append that will not come
            for p in batch:
                if p.result is None and p.error is None:
                    p.error = Unavailable("the audit append was interrupted")
            raise

    def _commit_group(self, group: list[_Pending]) -> None:
        bodies = [b for p in group for b in p.bodies]
        try:
            links = self._commit_bodies(bodies)
        except Exception as exc:  # noqa: BLE001  # every caller in the group gets it
            for p in group:
                p.error = exc
            return
        tenant = self.tenant
        i = 0
        for p in group:
            n = len(p.bodies)
            if p.want_entries:
                p.result = [
                    AuditEntry(seq, ts, tenant, prev=prev, hash=h, **body)
                    for body, (seq, ts, prev, h) in zip(p.bodies, links[i : i + n], strict=True)
                ]
            else:
                p.result = []
            i += n

    def _commit_bodies(self, bodies: list[dict[str, Any]]) -> list[tuple[int, int, str, str]]:
        """Commit ``bodies`` at the end of the chain; returns each one's (seq, ts, prev, hash)."""
        # Every body was validated by ``entry_body`` (its details by the codec), so the entries are
        # encoded once, here, and handed to ``Store.commit_prepared`` (as the cases layer does).
        tenant = self.tenant
        store = self._store
        first = bodies[0]
        if len(bodies) == 1:
            meta = orjson.dumps({"actor": first["user"], "reason": first["action"]})
        else:
            meta = orjson.dumps({"actor": "audit", "reason": f"{len(bodies)} audit entries"})
        for _ in range(10_000):
            head = self._head if self._head is not None else self._read_head()
            seq0, prev, last_ts = head
            ts = max(store.clock.now_us(), last_ts)
            events: list[PreparedEvent] = []
            links: list[tuple[int, int, str, str]] = []
            seq, h = seq0, prev
            for body in bodies:
                seq += 1
                entry_body = {"ts": ts, **body}
                link = h
                h = _hash(tenant, seq, entry_body, link)
                entry_body["prev"] = link
                entry_body["hash"] = h
                data = codec.sized(orjson.dumps(entry_body), "entry", store.max_value_bytes)
                events.append(PreparedEvent(EVENT_TYPE, data, _NO_META))
                links.append((seq, ts, link, h))
            prepared = PreparedCommit(
                tenant,
                (StreamAt(STREAM, seq0),),
                (
                    PreparedAppend(STREAM, tuple(events)),
                    PreparedPut(NAMESPACE, "head", orjson.dumps({"seq": seq, "hash": h, "ts": ts}), None),
                ),
                meta,
            )
            try:
                store.commit_prepared(prepared)
            except Conflict:
                self._head = None  # another writer appended: learn the new head
                continue
            self._head = (seq, h, ts)
            return links
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
        retention_days = check_number(retention_days, "retention_days", 0, math.inf, unit="days")
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
        """Check the whole kept chain; the result names the first bad seq and why, if any. Never raises
        for a damaged log, whatever was edited in the backend."""
        info = self._store.stream_info(self.tenant, STREAM)
        first, last = info.first_seq, info.last_seq
        cp = self._store.get(self.tenant, NAMESPACE, "checkpoint")
        head = self._store.get(self.tenant, NAMESPACE, "head")
        if first == 1:
            prev, prev_ts = GENESIS, 0
        elif cp is None or not _is_link(cp.value) or cp.value["seq"] != first - 1:
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
                if not isinstance(d, dict) or e.type != EVENT_TYPE or d.keys() != _STORED or type(d["ts"]) is not int:
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
        if last > 0 and (
            head is None
            or not _is_link(head.value)
            or (head.value["seq"], head.value["hash"], head.value["ts"]) != (last, prev, prev_ts)
        ):
            seq = last + 1 if head is not None and _is_link(head.value) and head.value["seq"] > last else last
            return AuditVerification(False, checked, seq, "the chain head does not match the newest entry")
        return AuditVerification(True, checked)
