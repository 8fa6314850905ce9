"""The in-process Store adapter: thread-safe, for tests, one process, and the fast path."""

from __future__ import annotations

import heapq
import threading
from bisect import bisect_left
from typing import Any, Self
from urllib.parse import urlsplit

import orjson
from sortedcontainers import SortedList

from stateline.clock import Clock
from stateline.errors import Conflict, InvalidArgument
from stateline.store.protocol import (
    LARGEST_MAX_VALUE_BYTES,
    MAX_INT,
    ChangeRecorder,
    PreparedAppend,
    PreparedCommit,
    PreparedDelete,
    PreparedEvent,
    PreparedIncr,
    PreparedPut,
    PreparedTrim,
    Store,
    decode_change,
    int_option,
    url_options,
)
from stateline.types import (
    Absent,
    Change,
    CheckFailure,
    Commit,
    Event,
    Exists,
    Item,
    NamespaceStats,
    StreamAt,
    StreamInfo,
    TenantStats,
    VersionIs,
)

__all__ = ["MemoryStore"]


class _Rec:
    __slots__ = ("created_at", "expires_at", "revision", "updated_at", "value", "version")

    def __init__(
        self, value: bytes, version: int, revision: int, created_at: int, updated_at: int, expires_at: int | None
    ) -> None:
        self.value = value
        self.version = version
        self.revision = revision
        self.created_at = created_at
        self.updated_at = updated_at
        self.expires_at = expires_at


class _Space:
    __slots__ = ("keys", "recs")

    def __init__(self) -> None:
        self.recs: dict[str, _Rec] = {}
        # sorted, for scans; a plain list made inserting a key in the middle of a namespace of a
        # million keys cost 240 µs (it moves half the list), a SortedList costs O(log n)
        self.keys: SortedList = SortedList()


class _Stream:
    __slots__ = ("events", "last_seq")

    def __init__(self) -> None:
        self.events: list[tuple[int, str, bytes, bytes, int, int]] = []
        self.last_seq = 0


class _Tenant:
    __slots__ = ("changes", "spaces", "streams", "trimmed")

    def __init__(self) -> None:
        self.spaces: dict[str, _Space] = {}
        self.streams: dict[str, _Stream] = {}
        self.changes: list[tuple[Any, ...]] = []  # of revisions trimmed + 1, trimmed + 2, ...
        self.trimmed = 0

    @property
    def revision(self) -> int:
        return self.trimmed + len(self.changes)


_PUT, _DELETE, _INCR, _APPEND, _TRIM = range(5)
_EMPTY = b"{}"


def _fit(data: bytes) -> bytes:
    # orjson returns its output buffer without shrinking it (4 KB for a small value); what is kept
    # for the life of the store is copied to its own size, or memory grows about 4 KB per value.
    return _EMPTY if data == _EMPTY else memoryview(data).tobytes()


def _record(at: int, meta: bytes, *done: Any) -> bytes:
    """The change record of a commit, built when it is read rather than on the commit path.

    ``done`` is the commit's ops flattened into one tuple of plain values (see ``_commit``).
    """
    rec = ChangeRecorder()
    i, n = 0, len(done)
    while i < n:
        kind = done[i]
        if kind == _PUT:
            rec.put(*done[i + 1 : i + 6])
            i += 6
        elif kind == _DELETE:
            rec.delete(*done[i + 1 : i + 4])
            i += 4
        elif kind == _INCR:
            rec.incr(*done[i + 1 : i + 6])
            i += 6
        elif kind == _APPEND:
            stream, count, first = done[i + 1 : i + 4]
            j = i + 4
            rec.append(stream, first, [PreparedEvent(*done[k : k + 3]) for k in range(j, j + 3 * count, 3)])
            i = j + 3 * count
        else:
            rec.trim(done[i + 1], done[i + 2])
            i += 3
    return rec.body(at, meta)


def _live(rec: _Rec | None, now: int) -> _Rec | None:
    if rec is None or (rec.expires_at is not None and rec.expires_at <= now):
        return None
    return rec


class MemoryStore(Store):
    scheme = "memory"

    def __init__(self, *, clock: Clock | None = None, **options: Any) -> None:
        super().__init__(clock=clock, **options)
        # every method takes the lock itself (Condition.__enter__ is Python code); the condition only where
        # a caller waits or wakes waiters
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._data: dict[str, _Tenant] = {}
        self._watchers = 0
        # Expiries for sweep, so that a sweep reads only what it removes: a heap of (expires_at, tenant,
        # ns, key), and for each key in it the time of the entry it counts on (never later than the
        # item's expiry). A later write leaves older entries in the heap; they are skipped when popped.
        self._expiries: list[tuple[int, str, str, str]] = []
        self._queued: dict[tuple[str, str, str], int] = {}

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **options: Any) -> Self:
        if type(url) is not str or not url.startswith("memory:"):
            raise InvalidArgument("url", f"not a memory:// URL: {url!r}")
        parts = urlsplit(url)
        if parts.netloc or parts.path or parts.fragment:
            raise InvalidArgument("url", f"memory:// names nothing (each open is a new, empty store): {url!r}")
        merged: dict[str, Any] = {}
        for name, value in url_options(parts.query).items():
            if name != "max_value_bytes":
                raise InvalidArgument(name, "unknown memory option; the one option is max_value_bytes")
            merged[name] = int_option(name, value, 1, LARGEST_MAX_VALUE_BYTES)
        return cls(clock=clock, **{**merged, **options})

    def _item(self, ns: str, key: str, rec: _Rec) -> Item:
        return Item(
            ns, key, orjson.loads(rec.value), rec.version, rec.revision, rec.created_at, rec.updated_at, rec.expires_at
        )

    def _rec(self, t: _Tenant | None, ns: str, key: str, now: int) -> _Rec | None:
        if t is None:
            return None
        space = t.spaces.get(ns)
        return None if space is None else _live(space.recs.get(key), now)

    def _commit(self, c: PreparedCommit) -> Commit:
        with self._lock:
            now = self.clock.now_us()
            t = self._data.get(c.tenant)
            failures = []
            for check in c.checks:
                if type(check) is StreamAt:
                    s = None if t is None else t.streams.get(check.stream)
                    seq = 0 if s is None else s.last_seq
                    if seq != check.seq:
                        failures.append(CheckFailure(check, seq))
                    continue
                rec = self._rec(t, check.namespace, check.key, now)  # type: ignore[union-attr]
                found = None if rec is None else rec.version
                if (
                    (type(check) is VersionIs and found != check.version)
                    or (type(check) is Absent and found is not None)
                    or (type(check) is Exists and found is None)
                ):
                    failures.append(CheckFailure(check, found))
            if failures:
                raise Conflict(f"{len(failures)} check(s) failed", failures=failures)
            if len(c.ops) == 1 and type(c.ops[0]) is PreparedPut and t is not None:
                return self._put_one(c, t, c.ops[0], now)

            revision = (0 if t is None else t.revision) + 1
            done: list[Any] = []
            staged: dict[tuple[str, str], _Rec | None] = {}
            appended: dict[str, list[tuple[int, str, bytes, bytes, int, int]]] = {}
            last_seqs: dict[str, int] = {}
            trims: dict[str, int] = {}
            versions: dict[tuple[str, str], int] = {}
            counters: dict[tuple[str, str], int] = {}

            for op in c.ops:
                if type(op) is PreparedPut:
                    old = (
                        staged[k]
                        if (k := (op.namespace, op.key)) in staged
                        else self._rec(t, op.namespace, op.key, now)
                    )
                    exp = None if op.ttl_us is None else now + op.ttl_us
                    version = 1 if old is None else old.version + 1
                    value = _fit(op.value)
                    staged[k] = _Rec(value, version, revision, now if old is None else old.created_at, now, exp)
                    versions[k] = version
                    done += (_PUT, op.namespace, op.key, version, value, exp)
                elif type(op) is PreparedDelete:
                    old = (
                        staged[k]
                        if (k := (op.namespace, op.key)) in staged
                        else self._rec(t, op.namespace, op.key, now)
                    )
                    staged[k] = None
                    versions[k] = 0
                    done += (_DELETE, op.namespace, op.key, 0 if old is None else old.version)
                elif type(op) is PreparedIncr:
                    old = (
                        staged[k]
                        if (k := (op.namespace, op.key)) in staged
                        else self._rec(t, op.namespace, op.key, now)
                    )
                    if old is None:
                        base, version, created, exp = 0, 1, now, (None if op.ttl_us is None else now + op.ttl_us)
                    else:
                        base = orjson.loads(old.value)
                        if type(base) is not int:
                            raise InvalidArgument("incr", f"{op.namespace}/{op.key} holds a non-integer value")
                        version, created, exp = old.version + 1, old.created_at, old.expires_at
                    total = base + op.by
                    if not -MAX_INT <= total <= MAX_INT:
                        raise InvalidArgument("incr", f"{op.namespace}/{op.key} would overflow 64 bits")
                    staged[k] = _Rec(str(total).encode(), version, revision, created, now, exp)
                    versions[k] = version
                    counters[k] = total
                    done += (_INCR, op.namespace, op.key, version, total, exp)
                elif type(op) is PreparedAppend:
                    if op.stream not in last_seqs:
                        s = None if t is None else t.streams.get(op.stream)
                        last_seqs[op.stream] = 0 if s is None else s.last_seq
                    first = last_seqs[op.stream] + 1
                    rows = [
                        (first + i, e.type, _fit(e.data), _fit(e.meta), revision, now) for i, e in enumerate(op.events)
                    ]
                    appended.setdefault(op.stream, []).extend(rows)
                    last_seqs[op.stream] = first + len(rows) - 1
                    done += (_APPEND, op.stream, len(rows), first)
                    for r in rows:
                        done += r[1:4]
                else:
                    assert type(op) is PreparedTrim
                    trims[op.stream] = max(trims.get(op.stream, 0), op.before_seq)
                    done += (_TRIM, op.stream, op.before_seq)

            # every op validated: install the staged state
            if t is None:
                t = self._data[c.tenant] = _Tenant()
            for (ns, key), rec in staged.items():
                space = t.spaces.get(ns)
                if space is None:
                    space = t.spaces[ns] = _Space()
                if rec is None:
                    if space.recs.pop(key, None) is not None:
                        space.keys.remove(key)
                else:
                    if key not in space.recs:
                        space.keys.add(key)
                    space.recs[key] = rec
                    if rec.expires_at is not None:
                        self._expire_at(rec.expires_at, c.tenant, ns, key)
            for name, events in appended.items():
                s = t.streams.get(name)
                if s is None:
                    s = t.streams[name] = _Stream()
                s.events.extend(events)
                s.last_seq = events[-1][0]
            for name, before in trims.items():
                s = t.streams.get(name)
                if s is not None and s.events:
                    cut = bisect_left(s.events, before, key=lambda e: e[0])
                    del s.events[:cut]
            # One flat tuple of plain values per commit: the garbage collector stops tracking such a
            # tuple at the first collection that sees it. A tuple of tuples stays tracked until a
            # later one (the outer tuple is examined before its members are untracked), and a long
            # feed of those made every full collection slower: case commits lost a third of their
            # rate over 160,000 commits.
            t.changes.append((now, _fit(c.meta), *done))
            if self._watchers:
                self._cond.notify_all()
            return Commit(revision, now, versions, counters, last_seqs)

    def _put_one(self, c: PreparedCommit, t: _Tenant, op: PreparedPut, now: int) -> Commit:
        # The commonest commit, a single put, cannot fail once its checks held: write it directly.
        revision = t.revision + 1
        space = t.spaces.get(op.namespace)
        if space is None:
            space = t.spaces[op.namespace] = _Space()
        old = _live(space.recs.get(op.key), now)
        exp = None if op.ttl_us is None else now + op.ttl_us
        version = 1 if old is None else old.version + 1
        if op.key not in space.recs:
            space.keys.add(op.key)
        value = _fit(op.value)
        space.recs[op.key] = _Rec(value, version, revision, now if old is None else old.created_at, now, exp)
        if exp is not None:
            self._expire_at(exp, c.tenant, op.namespace, op.key)
        t.changes.append((now, _fit(c.meta), _PUT, op.namespace, op.key, version, value, exp))
        if self._watchers:
            self._cond.notify_all()
        return Commit(revision, now, {(op.namespace, op.key): version}, {}, {})

    def _expire_at(self, at: int, tenant: str, ns: str, key: str) -> None:
        k = (tenant, ns, key)
        queued = self._queued.get(k)
        if queued is None or at < queued:
            heapq.heappush(self._expiries, (at, tenant, ns, key))
            self._queued[k] = at

    def _get(self, tenant: str, namespace: str, key: str) -> Item | None:
        with self._lock:
            rec = self._rec(self._data.get(tenant), namespace, key, self.clock.now_us())
            return None if rec is None else self._item(namespace, key, rec)

    def _get_many(self, tenant: str, keys: list[tuple[str, str]]) -> list[Item | None]:
        with self._lock:
            t = self._data.get(tenant)
            now = self.clock.now_us()
            out: list[Item | None] = []
            for ns, key in keys:
                rec = self._rec(t, ns, key, now)
                out.append(None if rec is None else self._item(ns, key, rec))
            return out

    def _scan(self, tenant: str, namespace: str, prefix: str, after: str | None, limit: int) -> list[Item]:
        with self._lock:
            t = self._data.get(tenant)
            space = None if t is None else t.spaces.get(namespace)
            if space is None:
                return []
            now = self.clock.now_us()
            keys = space.keys
            candidates = (
                keys.irange(after, inclusive=(False, True))
                if after is not None and after >= prefix
                else keys.irange(prefix)
            )
            out: list[Item] = []
            for key in candidates:
                if len(out) >= limit or not key.startswith(prefix):
                    break
                rec = _live(space.recs[key], now)
                if rec is not None:
                    out.append(self._item(namespace, key, rec))
            return out

    def _read_stream(self, tenant: str, stream: str, from_seq: int, to_seq: int, limit: int) -> list[Event]:
        with self._lock:
            t = self._data.get(tenant)
            s = None if t is None else t.streams.get(stream)
            if s is None:
                return []
            i = bisect_left(s.events, from_seq, key=lambda e: e[0])
            rows = s.events[i : i + limit]
        return [
            Event(stream, seq, typ, orjson.loads(data), orjson.loads(meta), rev, at)
            for seq, typ, data, meta, rev, at in rows
            if seq <= to_seq
        ]

    def _stream_info(self, tenant: str, stream: str) -> StreamInfo:
        with self._lock:
            t = self._data.get(tenant)
            s = None if t is None else t.streams.get(stream)
            if s is None:
                return StreamInfo(stream, 1, 0)
            return StreamInfo(stream, s.events[0][0] if s.events else s.last_seq + 1, s.last_seq)

    def _list_streams(self, tenant: str, prefix: str, after: str | None, limit: int) -> list[StreamInfo]:
        with self._lock:
            t = self._data.get(tenant)
            if t is None:
                return []
            names = sorted(n for n in t.streams if n.startswith(prefix) and (after is None or n > after))[:limit]
            out = []
            for n in names:
                s = t.streams[n]
                out.append(StreamInfo(n, s.events[0][0] if s.events else s.last_seq + 1, s.last_seq))
            return out

    def _revision(self, tenant: str) -> int:
        with self._lock:
            t = self._data.get(tenant)
            return 0 if t is None else t.revision

    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]:
        with self._lock:
            t = self._data.get(tenant)
            if t is None:
                return []
            start = max(after_revision, t.trimmed)
            done = t.changes[start - t.trimmed : start - t.trimmed + limit]
        return [decode_change(tenant, start + 1 + i, _record(*d)) for i, d in enumerate(done)]

    def _first_change(self, tenant: str) -> int:
        with self._lock:
            t = self._data.get(tenant)
            return 1 if t is None else t.trimmed + 1

    def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int:
        with self._lock:
            t = self._data.get(tenant)
            if t is None:
                return 0
            n = max(0, min(before_revision - 1 - t.trimmed, len(t.changes), limit))
            del t.changes[:n]
            t.trimmed += n
            return n

    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]:
        with self._cond:
            self._watchers += 1
            try:
                self._cond.wait_for(lambda: self._revision_locked(tenant) > after_revision or self._closed, timeout)
            finally:
                self._watchers -= 1
        return self._changes(tenant, after_revision, limit)

    def _revision_locked(self, tenant: str) -> int:
        t = self._data.get(tenant)
        return 0 if t is None else t.revision

    def _tenant_revisions(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        with self._lock:
            return sorted((n, t.revision) for n, t in self._data.items() if after is None or n > after)[:limit]

    def _stats(self, tenant: str) -> TenantStats:
        with self._lock:
            t = self._data.get(tenant)
            if t is None:
                return TenantStats(0, {}, 0, 0)
            now = self.clock.now_us()
            spaces = {}
            for ns, space in t.spaces.items():
                live = [r for r in space.recs.values() if _live(r, now) is not None]
                if live:
                    spaces[ns] = NamespaceStats(len(live), sum(len(r.value) for r in live))
            return TenantStats(t.revision, spaces, len(t.streams), sum(len(s.events) for s in t.streams.values()))

    def _sweep(self, limit: int) -> int:
        removed = 0
        with self._lock:
            now = self.clock.now_us()
            heap, queued = self._expiries, self._queued
            while heap and heap[0][0] <= now and removed < limit:
                at, tenant, ns, key = heapq.heappop(heap)
                k = (tenant, ns, key)
                if queued.get(k) != at:
                    continue  # superseded by an earlier entry of the same key
                space = self._data[tenant].spaces[ns]  # spaces are never removed
                rec = space.recs.get(key)
                if rec is not None and rec.expires_at is not None and rec.expires_at > now:
                    heapq.heappush(heap, (rec.expires_at, tenant, ns, key))  # written again since
                    queued[k] = rec.expires_at
                    continue
                del queued[k]
                if rec is not None and rec.expires_at is not None:
                    del space.recs[key]
                    space.keys.remove(key)
                    removed += 1
        return removed

    def _ping(self) -> None:
        return None

    def _close(self) -> None:
        with self._cond:
            self._cond.notify_all()
