"""Runtime tables for request routers: TTL cache, sticky sessions, rate limits, idempotency keys, delivery attempts.

Everything shared lives in the Store and changes only through ``commit`` with checks, so the same
code is correct on one process with ``memory://`` and on many processes sharing SQLite, PostgreSQL
or Redis. Namespaces: ``cache.<name>`` (shared caches only), ``sessions``, ``limits.<name>``,
``idempotency.<kind>`` and ``deliveries``. What a process keeps for itself (a process-local cache's
entries, what rate limiters last saw) is a fast path whose limits each class documents.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Generic, ParamSpec, TypeVar, cast

import orjson

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, Unavailable
from stateline.store.protocol import MAX_TTL_SECONDS, PreparedCommit, PreparedIncr, PreparedPut, Store
from stateline.types import (
    Absent,
    Check,
    Delete,
    Exists,
    Incr,
    Put,
    VersionIs,
    check_key,
    check_namespace,
    check_number,
    check_tenant,
)

__all__ = [
    "Cache",
    "CacheStats",
    "Deliveries",
    "FingerprintMismatch",
    "Idempotency",
    "InProgress",
    "Once",
    "PreviousFailure",
    "RateLimitResult",
    "RateLimiter",
    "Session",
    "Sessions",
    "Slot",
]

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger("stateline.runtime")

_US = 1_000_000
_DAY = 86400.0
_MISS: Final = object()
_HINTS_MAX = 100_000  # local per-key hints are dropped wholesale beyond this many keys


# ---------------------------------------------------------------- validation helpers


def _seconds(value: object, field: str, *, allow_none: bool = False, allow_zero: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    return check_number(value, field, 0, MAX_TTL_SECONDS, above=not allow_zero, unit="seconds")


def _positive_int(value: object, field: str, maximum: int = 2**62) -> int:
    if type(value) is not int or not 1 <= value <= maximum:
        raise InvalidArgument(field, f"must be an integer from 1 to {maximum}, got {value!r}")
    return value


def _name(value: object, field: str) -> str:
    if type(value) is not str or not value or "." in value:
        raise InvalidArgument(field, f"must be a non-empty name without dots, got {value!r}")
    return value


def _namespace(prefix: str, name: object, field: str) -> str:
    n = _name(name, field)
    try:
        return check_namespace(f"{prefix}.{n}")
    except InvalidArgument:
        raise InvalidArgument(field, f"{n[:80]!r} is not allowed: use letters, digits and _:/-") from None


def _text(value: object, field: str, max_len: int = 1024) -> str:
    if type(value) is not str or not value:
        raise InvalidArgument(field, f"must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters")
    return value


# ================================================================= cache


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one cache in this process: ``size`` entries held here, ``evictions`` by the size bound."""

    hits: int
    misses: int
    size: int
    evictions: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class Cache:
    """A TTL cache with an optional LRU size bound and single-flight ``get_or_compute``.

    Two modes, chosen at construction:

    * **process-local** (``shared=False``, the default): entries live in this process only and may be
      any Python object (for example compiled routing policies). Nothing is written to the Store; the
      Store's clock decides expiry. This is the fast path: a hit costs a dict lookup.
    * **shared** (``shared=True``): entries are JSON values stored in namespace ``cache.<name>`` with
      their TTL, so every process on the same Store sees the same values, and ``invalidate`` /
      ``clear`` take effect everywhere at once. With ``local_ttl`` > 0 a process also keeps a local
      copy of what it read for up to ``local_ttl`` seconds (reads may then be that stale).

    ``max_size`` bounds the entries held in this process (in shared mode: the local copies); the
    least recently used entry is evicted first. Shared entries in the Store are bounded by their TTL.
    ``get_or_compute`` runs ``fn`` once per key at a time in one process: concurrent callers for the
    same key wait for the first one's result (or its exception). Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        tenant: str,
        name: str,
        *,
        ttl: float | None = None,
        max_size: int | None = None,
        shared: bool = False,
        local_ttl: float = 0.0,
    ) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)
        self.name = _name(name, "name")
        self.namespace = _namespace("cache", name, "name")
        self._ttl_us = None if ttl is None else round(cast(float, _seconds(ttl, "ttl")) * _US)
        self.ttl = ttl
        self.max_size = None if max_size is None else _positive_int(max_size, "max_size")
        if type(shared) is not bool:
            raise InvalidArgument("shared", "must be a bool")
        self.shared = shared
        self._local_ttl_us = round(cast(float, _seconds(local_ttl, "local_ttl", allow_zero=True)) * _US)
        self._local = shared is False or self._local_ttl_us > 0
        # key -> (value, expires_at µs or None)
        self._entries: OrderedDict[str, tuple[Any, int | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[Any]] = {}
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._purge_at = 1024

    # ---- internals

    def _now(self) -> int:
        return self._store.clock.now_us()

    def _ttl_arg(self, ttl: object) -> int | None:
        if ttl is _MISS:
            return self._ttl_us
        return None if ttl is None else round(cast(float, _seconds(ttl, "ttl")) * _US)

    def _local_get(self, key: str, now: int) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return _MISS
            if entry[1] is not None and entry[1] <= now:
                del self._entries[key]
                return _MISS
            self._entries.move_to_end(key)
            return entry[0]

    def _local_put(self, key: str, value: Any, expires_at: int | None, now: int) -> None:
        with self._lock:
            self._entries[key] = (value, expires_at)
            self._entries.move_to_end(key)
            if self.max_size is not None:
                while len(self._entries) > self.max_size:
                    self._entries.popitem(last=False)
                    self._evictions += 1
            elif len(self._entries) >= self._purge_at:
                dead = [k for k, (_, exp) in self._entries.items() if exp is not None and exp <= now]
                for k in dead:
                    del self._entries[k]
                self._purge_at = max(1024, 2 * len(self._entries))

    def _lookup(self, key: str) -> Any:
        now = self._now()
        if self._local:
            value = self._local_get(key, now)
            if value is not _MISS or not self.shared:
                return value
        item = self._store.get(self.tenant, self.namespace, key)
        if item is None:
            return _MISS
        if self._local_ttl_us > 0:
            exp = now + self._local_ttl_us
            if item.expires_at is not None:
                exp = min(exp, item.expires_at)
            self._local_put(key, item.value, exp, now)
        return item.value

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    # ---- public API

    def get(self, key: str, default: Any = None) -> Any:
        """The live value at ``key``, or ``default``. Counts a hit or a miss."""
        check_key(key)
        value = self._lookup(key)
        self._count(value is not _MISS)
        return default if value is _MISS else value

    def __contains__(self, key: object) -> bool:
        return self._lookup(check_key(key)) is not _MISS

    def set(self, key: str, value: Any, ttl: float | None = cast(float, _MISS)) -> None:
        """Store ``value`` at ``key`` for ``ttl`` seconds (default: the cache's TTL; ``None``: no expiry).

        In shared mode ``value`` must be JSON; a non-JSON value raises ``InvalidArgument``.
        """
        check_key(key)
        ttl_us = self._ttl_arg(ttl)
        now = self._now()
        if self.shared:
            self._store.commit(
                self.tenant, (), [Put(self.namespace, key, value, None if ttl_us is None else ttl_us / _US)]
            )
            if self._local_ttl_us > 0:
                exp = now + self._local_ttl_us
                self._local_put(key, value, exp if ttl_us is None else min(exp, now + ttl_us), now)
            return
        self._local_put(key, value, None if ttl_us is None else now + ttl_us, now)

    def get_or_compute(self, key: str, fn: Callable[[], T], ttl: float | None = cast(float, _MISS)) -> T:
        """The value at ``key``; on a miss, ``fn()`` computes it and it is stored with ``ttl``.

        Concurrent callers for one key in this process share one call of ``fn``: the others wait
        and get its result, or the exception it raised (nothing is stored then).
        """
        check_key(key)
        if not callable(fn):
            raise InvalidArgument("fn", "must be callable")
        ttl_us = self._ttl_arg(ttl)
        value = self._lookup(key)
        self._count(value is not _MISS)
        if value is not _MISS:
            return cast(T, value)
        with self._lock:
            fut = self._inflight.get(key)
            leader = fut is None
            if fut is None:
                fut = self._inflight[key] = Future()
        if not leader:
            return cast(T, fut.result())
        try:
            value = self._lookup(key)  # a previous leader may have finished in between
            if value is _MISS:
                value = fn()
                self.set(key, value, None if ttl_us is None else ttl_us / _US)
            fut.set_result(value)
            return cast(T, value)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def invalidate(self, key: str) -> None:
        """Drop ``key`` (in shared mode, for every process)."""
        check_key(key)
        if self.shared:
            self._store.commit(self.tenant, (), [Delete(self.namespace, key)])
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> int:
        """Drop every entry; returns how many were dropped (in shared mode: from the Store)."""
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
        if not self.shared:
            return n
        removed = 0
        while True:
            page = self._store.scan(self.tenant, self.namespace, limit=1000)
            if not page:
                return removed
            self._store.commit(self.tenant, (), [Delete(self.namespace, i.key) for i in page])
            removed += len(page)

    def stats(self) -> CacheStats:
        """Hits, misses, evictions and local size since this cache object was made."""
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._entries), self._evictions)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# ================================================================= sessions


@dataclass(frozen=True, slots=True)
class Session:
    """A sticky session: the provider it is bound to, when it was bound, and when it expires (µs)."""

    session_id: str
    provider: str
    ttl: float
    bound_at: int
    expires_at: int | None


class Sessions:
    """Sticky sessions: a session id bound to one provider with a TTL that use keeps alive.

    Stored in namespace ``sessions``. ``lookup`` extends the session to ``ttl`` from now; to keep
    lookups cheap, it writes only when the session has aged by at least a tenth of its TTL since the
    last write, so a session lives at least ``0.9 × ttl`` after any use. Thread- and process-safe.
    """

    NAMESPACE = "sessions"
    REFRESH_FRACTION = 0.1

    def __init__(self, store: Store, tenant: str, *, default_ttl: float = 1800.0) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)
        self.default_ttl = cast(float, _seconds(default_ttl, "default_ttl"))

    def _session(self, session_id: str, value: dict[str, Any], expires_at: int | None) -> Session:
        return Session(session_id, value["provider"], value["ttl"], value["at"], expires_at)

    def _ttl(self, ttl: object) -> float:
        return self.default_ttl if ttl is None else cast(float, _seconds(ttl, "ttl"))

    def _write(self, session_id: str, checks: list[Check], value: dict[str, Any]) -> Session:
        ttl_s = value["ttl"]
        c = self._store.commit(self.tenant, checks, [Put(self.NAMESPACE, session_id, value, ttl_s)])
        return self._session(session_id, value, c.committed_at + max(1, round(ttl_s * _US)))

    def bind(self, session_id: str, provider: str, ttl: float | None = None) -> Session:
        """Bind ``session_id`` to ``provider`` for ``ttl`` seconds (replacing any binding)."""
        check_key(session_id, "session_id")
        _text(provider, "provider")
        ttl_s = self._ttl(ttl)
        value = {"provider": provider, "ttl": ttl_s, "at": self._store.clock.now_us()}
        return self._write(session_id, [], value)

    def lookup(self, session_id: str) -> Session | None:
        """The live binding of ``session_id`` (refreshing its TTL), or ``None``."""
        check_key(session_id, "session_id")
        for _ in range(100):
            item = self._store.get(self.tenant, self.NAMESPACE, session_id)
            if item is None:
                return None
            value = item.value
            if self._store.clock.now_us() - item.updated_at < value["ttl"] * _US * self.REFRESH_FRACTION:
                return self._session(session_id, value, item.expires_at)
            try:
                return self._write(session_id, [VersionIs(self.NAMESPACE, session_id, item.version)], value)
            except Conflict:
                continue  # another caller wrote it just now: read what it wrote
        raise Unavailable(f"lookup of session {session_id!r} kept conflicting")

    def provider(self, session_id: str) -> str | None:
        """Shorthand: the provider ``lookup`` finds, or ``None``."""
        s = self.lookup(session_id)
        return None if s is None else s.provider

    def unbind(self, session_id: str) -> bool:
        """Remove the binding; returns whether one was live."""
        check_key(session_id, "session_id")
        for _ in range(100):
            item = self._store.get(self.tenant, self.NAMESPACE, session_id)
            if item is None:
                return False
            try:
                self._store.commit(
                    self.tenant,
                    [VersionIs(self.NAMESPACE, session_id, item.version)],
                    [Delete(self.NAMESPACE, session_id)],
                )
            except Conflict:
                continue
            return True
        raise Unavailable(f"unbind of session {session_id!r} kept conflicting")

    def rebind(
        self, session_id: str, provider: str, *, expected: str | None = None, ttl: float | None = None
    ) -> Session:
        """Move ``session_id`` to ``provider`` (for example when its provider went away).

        With ``expected``, the move happens only if the session is still bound to ``expected``
        (so two nodes noticing the same outage do not flip it twice); otherwise the current binding
        is returned unchanged. A session that is not bound is bound. ``ttl`` defaults to the
        session's current TTL. Returns the binding in effect.
        """
        check_key(session_id, "session_id")
        _text(provider, "provider")
        if expected is not None:
            _text(expected, "expected")
        ttl_arg = None if ttl is None else self._ttl(ttl)
        for _ in range(100):
            item = self._store.get(self.tenant, self.NAMESPACE, session_id)
            if item is not None and expected is not None and item.value["provider"] != expected:
                return self._session(session_id, item.value, item.expires_at)
            if ttl_arg is not None:
                ttl_s = ttl_arg
            else:
                ttl_s = self.default_ttl if item is None else item.value["ttl"]
            check: Check = (
                Absent(self.NAMESPACE, session_id)
                if item is None
                else VersionIs(self.NAMESPACE, session_id, item.version)
            )
            value = {"provider": provider, "ttl": ttl_s, "at": self._store.clock.now_us()}
            try:
                return self._write(session_id, [check], value)
            except Conflict:
                continue
        raise Unavailable(f"rebind of session {session_id!r} kept conflicting")


# ================================================================= rate limits


@dataclass(slots=True)  # not frozen: it is made on every hit, and a frozen one costs three times as much
class RateLimitResult:
    """The outcome of one ``hit`` (read-only by convention).

    ``remaining``: hits of cost 1 still admitted now; ``reset_at``: µs time at which the full limit is
    available again if no more hits come; ``retry_after``: seconds to wait before this hit would be
    admitted (0.0 when allowed).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_at: int
    retry_after: float

    def __bool__(self) -> bool:
        return self.allowed


_ALGORITHMS = ("sliding_window", "token_bucket", "fixed_window")


@dataclass(slots=True)
class _Seen:
    state: dict[tuple[str, int], tuple[int, int]]  # (key, window) -> (version, count)
    deny: dict[tuple[str, int], tuple[int, int, int]]  # (key, cost) -> (refused until, reset_at, remaining)
    tb: dict[str, tuple[int, int, int]]  # key -> (version, tat scaled, trusted until µs)
    lease: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (window, unused permits held)
    lock: threading.Lock = field(default_factory=threading.Lock)


_SEEN: weakref.WeakKeyDictionary[Store, dict[tuple[Any, ...], _Seen]] = weakref.WeakKeyDictionary()
_SEEN_LOCK = threading.Lock()


class RateLimiter:
    """Admit at most ``rate`` hits per ``per`` seconds per key, in namespace ``limits.<name>``.

    Algorithms (windows are aligned to the epoch, in the Store clock's µs):

    * ``fixed_window``: one counter per key and window; a hit is admitted while the window's count,
      including it, is at most ``rate``. Exact per window; up to ``2 × rate`` can pass in any
      ``per``-long span that straddles a window boundary.
    * ``sliding_window`` (default): the sliding-window *counter* (two fixed buckets, weighted, as in
      the ``limits`` library): a hit is admitted when
      ``floor(previous × (per − elapsed) / per) + current ≤ rate``, ``current`` including the hit.
      Error: each fixed window still admits at most ``rate``; because it assumes the previous window's
      hits were spread evenly, an adversarial burst at the end of one window followed by steady
      traffic can let up to ``2 × rate`` through in one ``per``-long span (typical traffic: close to
      the exact log).
    * ``token_bucket``: capacity ``rate`` tokens, refilled continuously at ``rate / per`` per second
      (kept as GCRA's theoretical arrival time, in exact integer arithmetic).

    Concurrency: a hit is admitted by one commit that increments the window's counter (or moves the
    bucket) under ``VersionIs`` / ``Absent`` checks on the state it decided from (for the sliding
    window, the previous window's counter too); a conflict re-reads and decides again. So concurrent
    callers in any number of threads and processes never over-admit, and counters hold admitted hits
    only: concurrency adds no error to the algorithm's own. The limiters of one store and settings
    in a process remember what they last saw: a hot key costs one commit per admitted hit, and a
    refusal is answered from memory until the time it computed (other callers can only have added
    hits since, so the Store would refuse as well). ``reset`` is seen at once by the process that
    calls it; another process that is refusing the key from memory sees it when that refusal period
    ends. All callers must agree on the clock (one machine, or NTP-synchronised hosts).

    ``batch`` (window algorithms only; default 1): a process takes up to ``batch`` permits of a key's
    window from the Store in one commit and admits that key's next hits from them without a round
    trip. It still never over-admits (a permit is counted in the Store before it is used), and one
    process alone gets exactly the algorithm's answers. Across processes, permits a process holds but
    has not used yet count as used, so another process may be refused up to ``batch − 1`` hits per
    holding process early (the sliding window gives held permits back at the next window; a process
    that exits loses its own for that window).

    A hit costs ``cost`` (1 to ``rate``; more raises ``InvalidArgument``). Keys are stored as
    ``<key>|<algorithm tag><window>``, so a key may use up to about 1,000 of the 1,024 key bytes.
    """

    def __init__(
        self,
        store: Store,
        tenant: str,
        name: str,
        rate: int,
        per: float,
        algorithm: str = "sliding_window",
        *,
        batch: int = 1,
    ) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)
        self.name = _name(name, "name")
        self.namespace = _namespace("limits", name, "name")
        self.rate = _positive_int(rate, "rate", 2**40)
        self.per = cast(float, _seconds(per, "per"))
        self._per_us = max(1, round(self.per * _US))
        if algorithm not in _ALGORITHMS:
            raise InvalidArgument("algorithm", f"must be one of {', '.join(_ALGORITHMS)}, got {algorithm!r}")
        self.algorithm = algorithm
        self._tag = {"sliding_window": "s", "fixed_window": "f", "token_bucket": "t"}[algorithm]
        self.batch = _positive_int(batch, "batch", self.rate)
        if batch > 1 and algorithm == "token_bucket":
            raise InvalidArgument("batch", "applies to fixed_window and sliding_window only")
        # What this process last saw, shared by every limiter object of the same store and settings (so
        # ``t.limits(...)`` per request stays fast). Stale entries only cost a Conflict and a re-read,
        # or a refusal the Store would give as well (counters only grow, except by reset).
        ident = (self.tenant, self.name, self.rate, self._per_us, algorithm, self.batch)
        with _SEEN_LOCK:
            per_store = _SEEN.setdefault(store, {})
            seen = per_store.get(ident)
            if seen is None:
                seen = per_store[ident] = _Seen({}, {}, {})
        self._state = seen.state
        self._deny = seen.deny
        self._tb = seen.tb
        self._seen = seen

    # ---- helpers

    def _check(self, key: object, cost: object) -> tuple[str, int]:
        check_key(key)
        c = _positive_int(cost, "cost")
        if c > self.rate:
            raise InvalidArgument("cost", f"must be at most the rate ({self.rate}), got {c}")
        return cast(str, key), c

    def _wkey(self, key: str, window: int) -> str:
        # the algorithm is part of the stored key, so limiters sharing a name never read each other's state
        return check_key(f"{key}|{self._tag}{window}", "key")

    # ---- public API

    def hit(self, key: str, cost: int = 1) -> RateLimitResult:
        """Consume ``cost`` from ``key``'s limit if it fits; the result says whether it did.

        Raises ``Unavailable`` when the Store cannot be reached: whether to fail open or closed is
        the caller's choice.
        """
        key, cost = self._check(key, cost)
        if self.algorithm == "token_bucket":
            return self._token_bucket(key, cost, consume=True)
        return self._window(key, cost, consume=True)

    def peek(self, key: str, cost: int = 1) -> RateLimitResult:
        """What ``hit(key, cost)`` would answer now, without consuming anything."""
        key, cost = self._check(key, cost)
        if self.algorithm == "token_bucket":
            return self._token_bucket(key, cost, consume=False)
        return self._window(key, cost, consume=False)

    def reset(self, key: str) -> None:
        """Forget ``key``'s usage: its full limit is available again."""
        check_key(key)
        now = self._store.clock.now_us()
        w = now // self._per_us
        if self.algorithm == "token_bucket":
            self._tb.pop(key, None)
            skey = self._wkey(key, 0)
            for _ in range(1000):
                item = self._store.get(self.tenant, self.namespace, skey)
                if item is None:
                    return
                # overwrite rather than delete, so the version keeps growing (no ABA for cached versions)
                try:
                    self._store.commit(
                        self.tenant,
                        [VersionIs(self.namespace, skey, item.version)],
                        [Put(self.namespace, skey, [0, 0], self._tb_ttl())],
                    )
                    return
                except Conflict:
                    continue
            raise Unavailable(f"reset of {key!r} kept conflicting")
        # zero rather than delete, so versions keep growing (no ABA for versions cached elsewhere)
        ttl = 3 * self._per_us / _US
        self._store.commit(
            self.tenant,
            (),
            [Put(self.namespace, self._wkey(key, w), 0, ttl), Put(self.namespace, self._wkey(key, w - 1), 0, ttl)],
        )
        for k in [k for k in self._deny if k[0] == key]:
            del self._deny[k]
        with self._seen.lock:
            self._seen.lease.pop(key, None)
        self._state.pop((key, w), None)
        self._state.pop((key, w - 1), None)

    # ---- windows

    def _read(self, key: str, w: int) -> tuple[int, int]:
        """(version, count) of ``key``'s counter for window ``w``, read now (version 0: absent)."""
        item = self._store.get(self.tenant, self.namespace, self._wkey(key, w))
        state = (0, 0) if item is None else (item.version, cast(int, item.value))
        if len(self._state) > _HINTS_MAX:
            self._state.clear()
        self._state[(key, w)] = state
        return state

    def _take_lease(self, key: str, w: int, sliding: bool, cost: int, consume: bool) -> tuple[int, int]:
        """Permits of this process's pool for ``key`` in window ``w``: ``(taken, left in the pool)``.

        If the pool covers ``cost``, exactly ``cost`` is taken; otherwise all of it (less than ``cost``)
        is, to be topped up from the Store. ``consume=False`` only looks.
        """
        seen = self._seen
        if key not in seen.lease:  # the common refusal case: nothing held, no lock needed
            return 0, 0
        with seen.lock:
            held = seen.lease.get(key)
            if held is None:
                return 0, 0
            if held[0] == w:
                if not consume:
                    return held[1], held[1]
                if held[1] >= cost:
                    left = held[1] - cost
                    if left:
                        seen.lease[key] = (w, left)
                    else:
                        del seen.lease[key]
                    return cost, left
                del seen.lease[key]
                return held[1], 0
            if not consume:
                return 0, 0
            del seen.lease[key]
        if sliding and held[0] == w - 1:
            self._give_back(key, held[0], held[1])
        return 0, 0  # permits of an older window are worthless now (and weigh nothing)

    def _put_lease(self, key: str, w: int, unused: int, sliding: bool) -> None:
        if unused <= 0:
            return
        seen = self._seen
        with seen.lock:
            held = seen.lease.get(key)
            if held is not None and held[0] == w:
                unused += held[1]
            seen.lease[key] = (w, unused)
        if held is not None and held[0] == w - 1 and sliding:
            self._give_back(key, held[0], held[1])

    def _give_back(self, key: str, w: int, unused: int) -> None:
        # unused permits of the previous window would weigh on this one: take them out of its counter
        ns, wkey = self.namespace, self._wkey(key, w)
        try:
            c = self._store.commit(self.tenant, [Exists(ns, wkey)], [Incr(ns, wkey, -unused)])
        except Conflict:
            return
        self._state[(key, w)] = (c.versions[(ns, wkey)], c.counters[(ns, wkey)])

    def _window(self, key: str, cost: int, consume: bool) -> RateLimitResult:
        per = self._per_us
        rate = self.rate
        now = self._store.clock.now_us()
        w = now // per
        start = w * per
        sliding = self.algorithm == "sliding_window"
        state = self._state
        held, left = self._take_lease(key, w, sliding, cost, consume) if self.batch > 1 else (0, 0)
        if consume and held >= cost:
            # admitted from permits this process already took from the Store for this window
            seen_cur = state.get((key, w), (0, held + left))
            seen_prv = state.get((key, w - 1), (0, 0)) if sliding else (0, 0)
            weighted = seen_prv[1] * (per - (now - start)) // per
            return self._window_result(True, w, now, seen_prv[1], weighted, seen_cur[1] - held - left, cost)[0]
        if consume:
            deny = self._deny.get((key, cost))
            if deny is not None and deny[0] > now:
                # refused from what this process saw: others could only have added hits since
                self._put_lease(key, w, held, sliding)
                return RateLimitResult(False, rate, deny[2], deny[1], (deny[0] - now) / _US)
        ns = self.namespace
        wkey = self._wkey(key, w)
        pkey = self._wkey(key, w - 1) if sliding else ""
        for _ in range(10_000):
            cur = state.get((key, w)) if consume else None
            if cur is None:
                cur = self._read(key, w)
            prv = (0, 0)
            if sliding:
                cached = state.get((key, w - 1)) if consume else None
                prv = cached if cached is not None else self._read(key, w - 1)
            weighted = prv[1] * (per - (now - start)) // per
            need = max(0, cost - held)  # permits to take from the Store (held ones are already counted)
            room = rate - weighted - cur[1]
            if need > room or not consume:
                allowed = need <= room
                result, until = self._window_result(allowed, w, now, prv[1], weighted, cur[1] - held, cost)
                if consume:  # (a look took nothing from the pool)
                    self._put_lease(key, w, held, sliding)
                    if len(self._deny) > _HINTS_MAX:
                        self._deny.clear()
                    self._deny[(key, cost)] = (until, result.reset_at, result.remaining)
                return result
            take = min(max(need, self.batch), room)
            # admit only if neither counter moved since we looked (a late hit of the previous window
            # changes the weight, so it is checked too); the Store's checks make this exact
            checks: list[Check] = [VersionIs(ns, wkey, cur[0]) if cur[0] else Absent(ns, wkey)]
            if sliding:
                checks.append(VersionIs(ns, pkey, prv[0]) if prv[0] else Absent(ns, pkey))
            ttl_us = (3 if sliding else 2) * per
            # names were validated above and the op is an integer increment: this is what prepare() builds
            prepared = PreparedCommit(self.tenant, tuple(checks), (PreparedIncr(ns, wkey, take, ttl_us),), b"{}")
            try:
                c = self._store.commit_prepared(prepared)
            except Conflict:
                state.pop((key, w), None)
                state.pop((key, w - 1), None)
                continue
            count = c.counters[(ns, wkey)]
            state[(key, w)] = (c.versions[(ns, wkey)], count)
            unused = held + take - cost
            self._put_lease(key, w, unused, sliding)
            return self._window_result(True, w, now, prv[1], weighted, count - unused - cost, cost)[0]
        self._put_lease(key, w, held, sliding)
        raise Unavailable(f"rate limit {self.name!r} for {key!r} kept conflicting")

    def _window_result(
        self, allowed: bool, w: int, now: int, prev: int, weighted_prev: int, before: int, cost: int
    ) -> tuple[RateLimitResult, int]:
        """The result, and (when refused) the µs time before which the same hit stays refused."""
        per = self._per_us
        rate = self.rate
        used = weighted_prev + before + (cost if allowed else 0)
        remaining = max(0, rate - used)
        start = w * per
        if self.algorithm == "fixed_window":
            if allowed:
                return RateLimitResult(True, rate, remaining, start + per, 0.0), now
            return RateLimitResult(False, rate, remaining, start + per, (start + per - now) / _US), start + per
        current = before + (cost if allowed else 0)
        reset_at = start + 2 * per if current else (start + per if prev else now)
        if allowed:
            return RateLimitResult(True, rate, remaining, reset_at, 0.0), now
        if before + cost <= rate:
            # wait in this window until floor(prev × (per − e) / per) <= rate − before − cost
            at = start + self._elapsed_needed(prev, rate - before - cost)
        else:
            # wait for the next window, where this window's count becomes the weighted one
            at = start + per + self._elapsed_needed(before, rate - cost)
        return RateLimitResult(False, rate, remaining, reset_at, max(0, at - now) / _US), at

    def _elapsed_needed(self, prev: int, room: int) -> int:
        """Smallest elapsed µs ``e`` in a window with ``floor(prev × (per − e) / per) <= room``."""
        per = self._per_us
        if prev <= room:
            return 0
        # prev × (per − e) < (room + 1) × per  <=>  e > per − (room + 1) × per / prev
        x = per * prev - (room + 1) * per
        return x // prev + 1

    # ---- token bucket (GCRA in units of 1/rate µs, so that every quantity is an exact integer)

    def _tb_ttl(self) -> float:
        return 2 * self._per_us / _US + 1.0

    def _token_bucket(self, key: str, cost: int, consume: bool) -> RateLimitResult:
        rate = self.rate
        per = self._per_us
        skey = self._wkey(key, 0)
        cap = per * rate  # the most debt the bucket can hold (scaled)
        for _ in range(10_000):
            now = self._store.clock.now_us()
            now_s = now * rate
            cached = self._tb.get(key)
            if cached is not None and cached[2] > now:
                version, tat = cached[0], cached[1]
            else:
                item = self._store.get(self.tenant, self.namespace, skey)
                if item is None:
                    version, tat = 0, 0
                else:
                    version, tat = item.version, item.value[0] * rate + item.value[1]
                    self._tb_cache(key, version, tat, now, item.expires_at)
            new_tat = max(tat, now_s) + cost * per
            allowed = new_tat - now_s <= cap
            if not allowed or not consume:
                # refusing from a cached state is safe: other callers only ever push tat later
                base = new_tat if allowed else max(tat, now_s)
                remaining = max(0, (cap - (base - now_s)) // per)
                retry = 0 if allowed else -(-(new_tat - now_s - cap) // rate)
                return RateLimitResult(allowed, rate, remaining, self._ceil_us(max(base, now_s)), retry / _US)
            value = [new_tat // rate, new_tat % rate]
            check = Absent(self.namespace, skey) if version == 0 else VersionIs(self.namespace, skey, version)
            try:
                # validated names and two integers: what prepare() would build, without its cost
                put = PreparedPut(self.namespace, skey, orjson.dumps(value), round(self._tb_ttl() * _US))
                c = self._store.commit_prepared(PreparedCommit(self.tenant, (check,), (put,), b"{}"))
            except Conflict:
                self._tb.pop(key, None)
                continue
            self._tb_cache(key, c.versions[(self.namespace, skey)], new_tat, now, now + round(self._tb_ttl() * _US))
            remaining = max(0, (cap - (new_tat - now_s)) // per)
            return RateLimitResult(True, rate, remaining, self._ceil_us(new_tat), 0.0)
        raise Unavailable(f"rate limit {self.name!r} for {key!r} kept conflicting")

    def _tb_cache(self, key: str, version: int, tat: int, now: int, expires_at: int | None) -> None:
        # A cached version is trusted only while the item cannot have expired and come back as a new
        # item with the same version number: until its expiry, less one period of clock skew margin.
        until = now + self._per_us if expires_at is None else min(expires_at - self._per_us - _US, now + self._per_us)
        if len(self._tb) > _HINTS_MAX:
            self._tb.clear()
        self._tb[key] = (version, tat, until)

    def _ceil_us(self, scaled: int) -> int:
        return -(-scaled // self.rate)


# ================================================================= idempotency


class InProgress(Conflict):
    """The key's first caller is still running (and this caller did not ask to wait, or gave up)."""


class FingerprintMismatch(Conflict):
    """The key was first used with a different request fingerprint."""


class PreviousFailure(Conflict):
    """The key's first run failed and failures are remembered; ``details['error']`` says how."""


_RUNNING, _DONE, _FAILED = "running", "done", "failed"


class Slot:
    """What ``with idem.once(key) as slot`` gives the block.

    If ``slot.done`` is true, the key already has a stored result in ``slot.result``: the block
    must not redo the work (return ``slot.result``). Otherwise this caller holds the key: do the work
    and call ``slot.set(result)`` with a JSON value; leaving the block without ``set`` stores
    ``None``, and leaving it with an exception releases the key (or, with ``remember_failures``,
    stores the failure).
    """

    __slots__ = ("_finished", "_idem", "_once", "_version", "done", "key", "kind", "result")

    def __init__(self, idem: Idempotency, once: Once[Any], version: int, done: bool, result: Any) -> None:
        self._idem = idem
        self._once = once
        self._version = version
        self._finished = done
        self.key = once.key_str
        self.kind = once.kind
        self.done = done
        self.result = result

    @property
    def owner(self) -> bool:
        """Whether this caller holds the key (and should run the work)."""
        return not self.done

    def set(self, result: Any) -> None:
        """Store ``result`` (a JSON value) as the key's result; repeats will get it."""
        if self.done or self._finished:
            raise Conflict(f"idempotency key {self.key!r} already has a result; check slot.done before working")
        codec.encode(result, "result")
        try:
            self._idem._finish(self._once, self._version, {"s": _DONE, "fp": self._once.fp, "r": result})
        except Conflict:
            self._finished = True  # the claim is lost: there is nothing left to store or release
            raise
        self._finished = True
        self.result = result

    def _fail(self, exc: BaseException) -> None:
        if self._finished:
            return
        self._finished = True
        o = self._once
        if o.remember_failures and isinstance(exc, Exception):
            error = {"type": type(exc).__name__, "message": str(exc)[:2000]}
            self._idem._finish(o, self._version, {"s": _FAILED, "fp": o.fp, "e": error})
        else:
            self._idem._release(o, self._version)


class Once(Generic[T]):
    """``idem.once(...)``: a context manager giving a ``Slot``, and a decorator.

    As a decorator, the wrapped function runs once per key; repeats return the stored result.
    ``key`` (and ``fingerprint``) may then be callables that receive the function's arguments.
    """

    def __init__(
        self,
        idem: Idempotency,
        key: str | Callable[..., str],
        ttl: float,
        kind: str,
        fingerprint: str | Callable[..., str] | None,
        wait: bool | float,
        remember_failures: bool,
        lease: float | None,
    ) -> None:
        self._idem = idem
        self.key = key
        self.key_str = key if isinstance(key, str) else ""
        self.ttl = ttl
        self.kind = kind
        self.namespace = idem._namespace(kind)
        self.fingerprint = fingerprint
        self.fp: str | None = fingerprint if isinstance(fingerprint, str) else None
        self.wait = wait
        self.remember_failures = remember_failures
        self.lease = ttl if lease is None else min(lease, ttl)
        self._stacks: dict[int, list[Slot]] = {}  # thread id -> slots entered (one Once may be entered by many)

    def __enter__(self) -> Slot:
        if not isinstance(self.key, str):
            raise InvalidArgument("key", "a callable key works only when once() decorates a function")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise InvalidArgument("fingerprint", "a callable fingerprint works only when once() decorates a function")
        slot = self._idem._claim(self)
        self._stacks.setdefault(threading.get_ident(), []).append(slot)
        return slot

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        ident = threading.get_ident()
        stack = self._stacks[ident]
        slot = stack.pop()
        if not stack:
            del self._stacks[ident]
        if slot.done:
            return
        if exc is None:
            if not slot._finished:
                slot.set(None)
            return
        try:
            slot._fail(exc)
        except Exception:
            log.exception("could not release idempotency key %r after a failure", slot.key)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Once[T]:
        key = self.key(*args, **kwargs) if callable(self.key) else self.key
        fp = self.fingerprint(*args, **kwargs) if callable(self.fingerprint) else self.fingerprint
        check_key(key)
        if fp is not None:
            _text(fp, "fingerprint")
        return Once(self._idem, key, self.ttl, self.kind, fp, self.wait, self.remember_failures, self.lease)

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        if not callable(fn):
            raise InvalidArgument("fn", "once() decorates a function")

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            bound = self._bind(args, kwargs)
            with bound as slot:
                if slot.done:
                    return cast(T, slot.result)
                result = fn(*args, **kwargs)
                slot.set(result)
                return result

        return wrapper


class Idempotency:
    """Execute-once keys: the first caller runs, its JSON result is stored, repeats get the result.

    Each key kind (``request``, ``message``, ``business``, ...) has its own namespace
    ``idempotency.<kind>``. Three ways to use it::

        with t.idempotency.once("req-42") as slot:      # context manager
            if slot.done:
                return slot.result                       # a repeat: the stored result, nothing ran
            result = do_work()
            slot.set(result)

        result = t.idempotency.run("req-42", do_work)    # helper

        @t.idempotency.once(lambda order_id: f"order:{order_id}", kind="business")
        def charge(order_id: str) -> dict: ...           # decorator, key from the arguments

    A repeat while the first caller is still running raises ``InProgress`` (a ``Conflict``), or
    with ``wait=True`` (or a number of seconds) waits for the result. A failure releases the key,
    unless ``remember_failures=True``: repeats then raise ``PreviousFailure``. A repeat with a
    different ``fingerprint`` (say, a hash of the request body: ``Idempotency.fingerprint_of``)
    raises ``FingerprintMismatch``; a caller that gives no fingerprint is not compared.
    The claim of a running first caller lasts ``lease`` seconds (default: the whole ``ttl``), so a
    caller that crashed blocks the key at most that long. Results are kept ``ttl`` seconds.
    """

    def __init__(self, store: Store, tenant: str) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)
        self._namespaces: dict[str, str] = {}  # kind -> validated namespace

    def _namespace(self, kind: object) -> str:
        ns = self._namespaces.get(kind) if type(kind) is str else None
        if ns is None:
            ns = _namespace("idempotency", kind, "kind")
            if len(self._namespaces) < 1000:
                self._namespaces[cast(str, kind)] = ns
        return ns

    @staticmethod
    def fingerprint_of(value: Any) -> str:
        """A stable fingerprint of a JSON value: sha256 of its canonical (sorted-keys) encoding."""
        codec.encode(value, "value")
        return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def once(
        self,
        key: str | Callable[..., str],
        *,
        ttl: float = _DAY,
        kind: str = "request",
        fingerprint: str | Callable[..., str] | None = None,
        wait: bool | float = False,
        remember_failures: bool = False,
        lease: float | None = None,
    ) -> Once[Any]:
        """A context manager (giving a ``Slot``) and decorator that runs work once per key; see the class."""
        if not callable(key):
            check_key(key)
        ttl_s = cast(float, _seconds(ttl, "ttl"))
        if fingerprint is not None and not callable(fingerprint):
            _text(fingerprint, "fingerprint")
        if type(wait) is not bool:
            _seconds(wait, "wait")
        if type(remember_failures) is not bool:
            raise InvalidArgument("remember_failures", "must be a bool")
        lease_s = _seconds(lease, "lease", allow_none=True)
        return Once(self, key, ttl_s, kind, fingerprint, wait, remember_failures, lease_s)

    def run(
        self,
        key: str,
        fn: Callable[[], T],
        *,
        ttl: float = _DAY,
        kind: str = "request",
        fingerprint: str | None = None,
        wait: bool | float = False,
        remember_failures: bool = False,
        lease: float | None = None,
    ) -> T:
        """Run ``fn`` once for ``key`` and return its result; a repeat returns the stored result."""
        if not callable(fn):
            raise InvalidArgument("fn", "must be callable")
        # the repeat of a finished key, the hot path: one read (arguments validated as once() does)
        ns = self._namespaces.get(kind) if type(kind) is str else None
        if (
            ns is not None
            and type(ttl) is float
            and 0 < ttl <= MAX_TTL_SECONDS
            and wait is False
            and remember_failures is False
            and lease is None
            and (fingerprint is None or (type(fingerprint) is str and 0 < len(fingerprint) <= 1024))
        ):
            item = self._store.get(self.tenant, ns, key)
            if item is not None:
                v = item.value
                if v["s"] == _DONE and (fingerprint is None or v.get("fp") is None or v["fp"] == fingerprint):
                    return cast(T, v.get("r"))
        with self.once(
            key,
            ttl=ttl,
            kind=kind,
            fingerprint=fingerprint,
            wait=wait,
            remember_failures=remember_failures,
            lease=lease,
        ) as slot:
            if slot.done:
                return cast(T, slot.result)
            result = fn()
            slot.set(result)
            return result

    def status(self, key: str, kind: str = "request") -> str | None:
        """``"running"``, ``"done"``, ``"failed"``, or ``None`` when the key is free."""
        check_key(key)
        item = self._store.get(self.tenant, self._namespace(kind), key)
        return None if item is None else cast(str, item.value["s"])

    def forget(self, key: str, kind: str = "request") -> None:
        """Free ``key`` whatever its state (an operator's tool: the next caller runs again)."""
        check_key(key)
        self._store.commit(self.tenant, (), [Delete(self._namespace(kind), key)])

    # ---- internals

    def _claim(self, o: Once[Any]) -> Slot:
        ns, key, fp = o.namespace, o.key_str, o.fp
        store, tenant = self._store, self.tenant
        deadline: float | None = None
        delay = 0.001
        while True:
            item = store.get(tenant, ns, key)
            if item is None:
                record = {"s": _RUNNING, "fp": fp, "at": store.clock.now_us()}
                try:
                    c = store.commit(tenant, [Absent(ns, key)], [Put(ns, key, record, o.lease)])
                except Conflict:
                    continue
                return Slot(self, o, c.versions[(ns, key)], False, None)
            v = item.value
            if fp is not None and v.get("fp") is not None and v["fp"] != fp:
                raise FingerprintMismatch(
                    f"idempotency key {key!r} was used with a different request",
                    details={"key": key, "kind": o.kind},
                )
            state = v["s"]
            if state == _DONE:
                return Slot(self, o, item.version, True, v.get("r"))
            if state == _FAILED:
                raise PreviousFailure(
                    f"the first run for idempotency key {key!r} failed: {v['e']['type']}: {v['e']['message']}",
                    details={"key": key, "kind": o.kind, "error": v["e"]},
                )
            if o.wait is False:
                raise InProgress(f"idempotency key {key!r} is in progress", details={"key": key, "kind": o.kind})
            if deadline is None:
                deadline = time.monotonic() + (o.lease if o.wait is True else float(o.wait))
            if time.monotonic() >= deadline:
                raise InProgress(
                    f"idempotency key {key!r} is still in progress after waiting", details={"key": key, "kind": o.kind}
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _finish(self, o: Once[Any], version: int, record: dict[str, Any]) -> None:
        ns, key = o.namespace, o.key_str
        ops = [Put(ns, key, record, o.ttl)]
        try:
            self._store.commit(self.tenant, [VersionIs(ns, key, version)], ops)
            return
        except Conflict:
            pass
        try:  # our claim expired; store the outcome if nobody has claimed the key since
            self._store.commit(self.tenant, [Absent(ns, key)], ops)
        except Conflict:
            raise Conflict(
                f"the claim on idempotency key {key!r} expired and another caller took it",
                details={"key": key, "kind": o.kind},
            ) from None

    def _release(self, o: Once[Any], version: int) -> None:
        with contextlib.suppress(Conflict):  # on a conflict the claim had expired: nothing of ours to release
            self._store.commit(
                self.tenant, [VersionIs(o.namespace, o.key_str, version)], [Delete(o.namespace, o.key_str)]
            )


# ================================================================= deliveries


class Deliveries:
    """Delivery attempts per message id, in namespace ``deliveries``, for retry budgets.

    ``attempt`` counts one more delivery atomically (safe across processes); the count expires
    ``ttl`` seconds after the first attempt. A message may be delivered ``max`` times:
    ``exceeded(id, max)`` is true once more than ``max`` attempts were counted.
    """

    NAMESPACE = "deliveries"

    def __init__(self, store: Store, tenant: str) -> None:
        self._store = store
        self.tenant = check_tenant(tenant)

    def attempt(self, message_id: str, ttl: float = _DAY) -> int:
        """Count one more delivery of ``message_id``; returns the attempt number (1 for the first)."""
        check_key(message_id, "message_id")
        ttl_s = _seconds(ttl, "ttl")
        c = self._store.commit(self.tenant, (), [Incr(self.NAMESPACE, message_id, 1, ttl_s)])
        return c.counters[(self.NAMESPACE, message_id)]

    def count(self, message_id: str) -> int:
        """Attempts counted for ``message_id`` (0 if none, or expired)."""
        check_key(message_id, "message_id")
        item = self._store.get(self.tenant, self.NAMESPACE, message_id)
        return 0 if item is None else cast(int, item.value)

    def exceeded(self, message_id: str, max: int) -> bool:  # noqa: A002 - the issue names it `max`
        """Whether more than ``max`` attempts were counted for ``message_id``."""
        limit = max
        if type(limit) is not int or limit < 0:
            raise InvalidArgument("max", f"must be a non-negative integer, got {limit!r}")
        return self.count(message_id) > limit

    def reset(self, message_id: str) -> None:
        """Forget the attempts of ``message_id``."""
        check_key(message_id, "message_id")
        self._store.commit(self.tenant, (), [Delete(self.NAMESPACE, message_id)])
