"""``stateline.open(url)``: pick the adapter a URL names and hand out per-tenant layer handles."""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from stateline.clock import Clock
from stateline.errors import InvalidArgument
from stateline.store.protocol import Store
from stateline.types import Change, Check, Commit, Event, Item, Op, StreamInfo, TenantStats, check_tenant

if TYPE_CHECKING:
    from stateline.audit import AuditLog
    from stateline.bus.subscribe import ChangeFilter, Subscription
    from stateline.cases import Cases
    from stateline.docs import Documents, Transaction
    from stateline.gates import Gates
    from stateline.locks import Locks
    from stateline.runs import Runs
    from stateline.runtime import Cache, Deliveries, Idempotency, RateLimiter, Sessions
    from stateline.streams import Streams
    from stateline.sweeper import Sweeper

__all__ = ["DEFAULT_URL", "Database", "Tenant", "open", "open_store"]

DEFAULT_URL = "sqlite:///./stateline.db"

_ADAPTERS = {
    "memory": "stateline.store.memory:MemoryStore",
    "sqlite": "stateline.store.sqlite:SQLiteStore",
    "postgresql": "stateline.store.postgres:PostgresStore",
    "postgres": "stateline.store.postgres:PostgresStore",
    "redis": "stateline.store.redis:RedisStore",
    "rediss": "stateline.store.redis:RedisStore",
}

T = TypeVar("T")


def open_store(url: str = DEFAULT_URL, *, clock: Clock | None = None, **options: Any) -> Store:
    """Open the bare Store adapter a URL names: ``memory://``, ``sqlite:///path.db``,
    ``postgresql://...`` or ``redis://...``. Options go to the adapter (they may also be URL query parameters)."""
    if not isinstance(url, str) or ":" not in url:
        raise InvalidArgument("url", f"expected a URL such as {DEFAULT_URL!r}, got {url!r}")
    scheme = url.split(":", 1)[0].lower()
    target = _ADAPTERS.get(scheme)
    if target is None:
        raise InvalidArgument("url", f"unknown scheme {scheme!r}; use one of {', '.join(sorted(_ADAPTERS))}")
    module, name = target.split(":")
    cls: type[Store] = getattr(importlib.import_module(module), name)
    return cls.from_url(url, clock=clock, **options)


def open(url: str = DEFAULT_URL, *, clock: Clock | None = None, **options: Any) -> Database:  # noqa: A001
    """Open a database. ``url`` defaults to ``sqlite:///./stateline.db``; ``clock`` is injectable
    for tests; other options go to the adapter (for example ``max_value_bytes``)."""
    return Database(open_store(url, clock=clock, **options))


class Database:
    """A handle on one store, shared by every thread of a process. Use ``tenant(name)`` to work."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._tenants: dict[str, Tenant] = {}
        self._lock = threading.Lock()
        self._gates: Gates | None = None
        self._sweeper: Sweeper | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()

    def tenant(self, name: str) -> Tenant:
        """The handle of one tenant; every read and write through it stays inside that tenant."""
        name = check_tenant(name)
        t = self._tenants.get(name)
        if t is None:
            with self._lock:
                t = self._tenants.setdefault(name, Tenant(self, name))
        return t

    def tenants(self) -> list[str]:
        """Every tenant that has committed at least once."""
        return self.store.all_tenants()

    def subscribe(
        self,
        tenant: str,
        filter: ChangeFilter,  # noqa: A002 - the public name of the argument
        callback: Callable[[Change], object],
        *,
        after: int | None = None,
    ) -> Subscription:
        """Call ``callback(change)`` on a background thread for each new change of ``tenant`` matching
        ``filter`` (a namespace/stream prefix, a predicate, or ``None`` for all). See ``Subscription``."""
        from stateline.bus.subscribe import Subscription

        sub = Subscription(self.store, tenant, callback, filter, after=after)
        self._subscriptions.add(sub)
        return sub

    @property
    def gates(self) -> Gates:
        """Feature gates of this deployment (read-only)."""
        if self._gates is None:
            from stateline.gates import Gates

            self._gates = Gates(self.store)
        return self._gates

    def start_sweeper(
        self,
        interval: float = 60.0,
        *,
        batch: int = 1000,
        keep_changes: int | None = None,
        audit_retention_days: float | None = None,
    ) -> Sweeper:
        """Remove expired items (with ``keep_changes``, all but the last change records of each tenant;
        with ``audit_retention_days``, older audit entries) every ``interval`` seconds on a background
        thread (see ``Sweeper``); ``close()`` stops it. One per database: a second call while it runs
        raises ``InvalidArgument``."""
        from stateline.sweeper import Sweeper

        with self._lock:
            if self._sweeper is not None and self._sweeper.running:
                raise InvalidArgument("sweeper", "this database already runs one")
            self._sweeper = Sweeper(
                self.store,
                interval=interval,
                batch=batch,
                keep_changes=keep_changes,
                audit_retention_days=audit_retention_days,
            ).start()
            return self._sweeper

    def close(self) -> None:
        """Stop the sweeper and the subscriptions made here, then close the store; closing twice is allowed."""
        if self._sweeper is not None:
            self._sweeper.stop()
        subs = list(self._subscriptions)
        for sub in subs:
            sub.close(wait=False)
        self.store.close()
        for sub in subs:
            sub.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tenant:
    """One tenant of a database: the raw Store calls bound to the tenant, and the layers."""

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name
        self.store = db.store
        self._layers: dict[str, Any] = {}
        self._cache_options: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _layer(self, key: str, make: Callable[[], T]) -> T:
        layer = self._layers.get(key)
        if layer is None:
            with self._lock:
                layer = self._layers.get(key)
                if layer is None:
                    layer = self._layers[key] = make()
        return layer

    # ---- the raw primitive, bound to this tenant

    def commit(
        self, checks: Iterable[Check] = (), ops: Iterable[Op] = (), meta: Mapping[str, Any] | None = None
    ) -> Commit:
        """``Store.commit`` for this tenant."""
        return self.store.commit(self.name, checks, ops, meta)

    def get(self, namespace: str, key: str) -> Item | None:
        return self.store.get(self.name, namespace, key)

    def get_many(self, keys: Iterable[tuple[str, str]]) -> list[Item | None]:
        return self.store.get_many(self.name, keys)

    def scan(self, namespace: str, prefix: str = "", after: str | None = None, limit: int = 100) -> list[Item]:
        return self.store.scan(self.name, namespace, prefix, after, limit)

    def read_stream(
        self, stream: str, from_seq: int = 1, to_seq: int | None = None, limit: int = 10_000
    ) -> list[Event]:
        return self.store.read_stream(self.name, stream, from_seq, to_seq, limit)

    def stream_info(self, stream: str) -> StreamInfo:
        return self.store.stream_info(self.name, stream)

    def revision(self) -> int:
        return self.store.revision(self.name)

    def changes(self, after_revision: int = 0, limit: int = 1000) -> list[Change]:
        return self.store.changes(self.name, after_revision, limit)

    def first_change(self) -> int:
        """The lowest revision whose change record is kept (see ``Store.first_change``)."""
        return self.store.first_change(self.name)

    def trim_changes(self, before_revision: int, limit: int = 10_000) -> int:
        """Remove change records below ``before_revision`` (see ``Store.trim_changes``)."""
        return self.store.trim_changes(self.name, before_revision, limit)

    def watch(self, after_revision: int, timeout: float = 30.0, limit: int = 1000) -> list[Change]:
        return self.store.watch(self.name, after_revision, timeout, limit)

    def stats(self) -> TenantStats:
        return self.store.stats(self.name)

    # ---- layers

    @property
    def docs(self) -> Documents:
        """Versioned documents with optimistic locking."""
        from stateline.docs import Documents

        return self._layer("docs", lambda: Documents(self.store, self.name))

    def transaction(self, **options: Any) -> Transaction:
        """A multi-document transaction (context manager); options (actor, reason, trace_id, ...)
        as for ``Documents.transaction``."""
        return self.docs.transaction(**options)

    def run_transaction(self, fn: Callable[[Transaction], T], **options: Any) -> T:
        """Run ``fn`` in a transaction, retrying on conflict; see ``Documents.run_transaction``."""
        return self.docs.run_transaction(fn, **options)

    @property
    def streams(self) -> Streams:
        """Event streams with snapshots."""
        from stateline.streams import Streams

        return self._layer("streams", lambda: Streams(self.store, self.name))

    @property
    def cases(self) -> Cases:
        """Per-case workflow state with receipts."""
        from stateline.cases import Cases

        return self._layer("cases", lambda: Cases(self.store, self.name))

    @property
    def runs(self) -> Runs:
        """Workflow runs and steps leased to workers."""
        from stateline.runs import Runs

        return self._layer("runs", lambda: Runs(self.store, self.name))

    @property
    def locks(self) -> Locks:
        """Leases with fencing tokens."""
        from stateline.locks import Locks

        return self._layer("locks", lambda: Locks(self.store, self.name))

    def cache(self, name: str, **options: Any) -> Cache:
        """The TTL cache called ``name``: one instance per name in this process, so every caller
        shares it. Asking again for ``name`` with other options is refused."""
        from stateline.runtime import Cache

        cache = self._layer(f"cache:{name}", lambda: Cache(self.store, self.name, name, **options))
        if options and self._cache_options.setdefault(name, options) != options:
            raise InvalidArgument("options", f"cache {name!r} already exists here with other options")
        return cache

    @property
    def sessions(self) -> Sessions:
        """Sticky sessions."""
        from stateline.runtime import Sessions

        return self._layer("sessions", lambda: Sessions(self.store, self.name))

    def limits(
        self, name: str, rate: int, per: float, algorithm: str = "sliding_window", **options: Any
    ) -> RateLimiter:
        """A rate limiter admitting ``rate`` hits per ``per`` seconds per key (options as for ``RateLimiter``)."""
        from stateline.runtime import RateLimiter

        return RateLimiter(self.store, self.name, name, rate, per, algorithm, **options)

    @property
    def idempotency(self) -> Idempotency:
        """Execute-once keys."""
        from stateline.runtime import Idempotency

        return self._layer("idempotency", lambda: Idempotency(self.store, self.name))

    @property
    def deliveries(self) -> Deliveries:
        """Delivery attempts per message."""
        from stateline.runtime import Deliveries

        return self._layer("deliveries", lambda: Deliveries(self.store, self.name))

    @property
    def audit(self) -> AuditLog:
        """The tamper-evident audit log."""
        from stateline.audit import AuditLog

        return self._layer("audit", lambda: AuditLog(self.store, self.name))

    @property
    def gates(self) -> Gates:
        """Feature gates (the deployment's, shared by every tenant)."""
        return self.db.gates
