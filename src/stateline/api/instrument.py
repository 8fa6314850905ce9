"""A Store decorator that times every call, counts commits, conflicts and errors, and opens a span per call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self, TypeVar

from opentelemetry.trace import Tracer

from stateline.clock import Clock
from stateline.errors import Conflict, StatelineError
from stateline.observability import Metrics
from stateline.store.protocol import PreparedCommit, Store
from stateline.types import Change, Commit, Event, Item, StreamInfo, TenantStats

__all__ = ["InstrumentedStore"]

T = TypeVar("T")


class InstrumentedStore(Store):
    """Wraps another Store: same data, same contract, plus metrics and spans.

    The wrapper validates input itself (the public methods of ``Store``) and hands the adapter
    hooks of the inner store already-validated input, so nothing is validated twice on the hot path.
    Closing the wrapper does not close the inner store: its owner does that.
    """

    scheme = "instrumented"

    def __init__(self, inner: Store, metrics: Metrics, tracer: Tracer | None) -> None:
        super().__init__(clock=inner.clock, max_value_bytes=inner.max_value_bytes)
        self.inner = inner
        self.metrics = metrics
        self.tracer = tracer  # None: no spans (nothing would receive them)
        self._latency = {
            name: metrics.store_latency.labels(name)
            for name in (
                "commit",
                "get",
                "get_many",
                "scan",
                "read_stream",
                "stream_info",
                "list_streams",
                "revision",
                "changes",
                "watch",
                "tenants",
                "stats",
                "sweep",
                "first_change",
                "trim_changes",
                "ping",
            )
        }
        self._commit_latency = self._latency["commit"]
        self._get_latency = self._latency["get"]

    @property
    def closed(self) -> bool:
        """Whether this wrapper or the store it wraps was closed."""
        return self._closed or self.inner.closed

    @property
    def inner_scheme(self) -> str:
        """The scheme of the wrapped adapter (``memory``, ``sqlite``, ...)."""
        return self.inner.scheme

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **options: Any) -> Self:
        """Not supported: wrap an open store instead."""
        raise TypeError("InstrumentedStore wraps an open Store; it cannot be opened from a URL")

    def _call(self, name: str, fn: Callable[[], T], tenant: str | None = None) -> T:
        tracer = self.tracer
        if tracer is None:
            return self._timed(name, fn)
        with tracer.start_as_current_span(
            f"store.{name}", record_exception=False, set_status_on_exception=False
        ) as span:
            if tenant is not None:
                span.set_attribute("stateline.tenant", tenant)
            return self._timed(name, fn)

    def _timed(self, name: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return fn()
        except Conflict:
            raise
        except StatelineError as exc:
            self.metrics.store_errors.labels(name, exc.code).inc()
            raise
        except Exception:
            self.metrics.store_errors.labels(name, "internal").inc()
            raise
        finally:
            self._latency[name].observe(time.perf_counter() - started)

    def _commit(self, c: PreparedCommit) -> Commit:
        if self.tracer is not None:
            try:
                out = self._call("commit", lambda: self.inner._commit(c), c.tenant)
            except Conflict:
                self.metrics.conflicts.inc()
                raise
            self.metrics.commits.inc()
            return out
        # the hot path, without spans: the same accounting as _call/_timed, inline
        started = time.perf_counter()
        try:
            out = self.inner._commit(c)
        except Conflict:
            self.metrics.conflicts.inc()
            raise
        except StatelineError as exc:
            self.metrics.store_errors.labels("commit", exc.code).inc()
            raise
        except Exception:
            self.metrics.store_errors.labels("commit", "internal").inc()
            raise
        finally:
            self._commit_latency.observe(time.perf_counter() - started)
        self.metrics.commits.inc()
        return out

    def _get(self, tenant: str, namespace: str, key: str) -> Item | None:
        if self.tracer is not None:
            return self._call("get", lambda: self.inner._get(tenant, namespace, key), tenant)
        started = time.perf_counter()
        try:
            return self.inner._get(tenant, namespace, key)
        except StatelineError as exc:
            self.metrics.store_errors.labels("get", exc.code).inc()
            raise
        except Exception:
            self.metrics.store_errors.labels("get", "internal").inc()
            raise
        finally:
            self._get_latency.observe(time.perf_counter() - started)

    def _get_many(self, tenant: str, keys: list[tuple[str, str]]) -> list[Item | None]:
        return self._call("get_many", lambda: self.inner._get_many(tenant, keys), tenant)

    def _scan(self, tenant: str, namespace: str, prefix: str, after: str | None, limit: int) -> list[Item]:
        return self._call("scan", lambda: self.inner._scan(tenant, namespace, prefix, after, limit), tenant)

    def _read_stream(self, tenant: str, stream: str, from_seq: int, to_seq: int, limit: int) -> list[Event]:
        return self._call(
            "read_stream", lambda: self.inner._read_stream(tenant, stream, from_seq, to_seq, limit), tenant
        )

    def _stream_info(self, tenant: str, stream: str) -> StreamInfo:
        return self._call("stream_info", lambda: self.inner._stream_info(tenant, stream), tenant)

    def _list_streams(self, tenant: str, prefix: str, after: str | None, limit: int) -> list[StreamInfo]:
        return self._call("list_streams", lambda: self.inner._list_streams(tenant, prefix, after, limit), tenant)

    def _revision(self, tenant: str) -> int:
        return self._call("revision", lambda: self.inner._revision(tenant), tenant)

    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]:
        return self._call("changes", lambda: self.inner._changes(tenant, after_revision, limit), tenant)

    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]:
        # A watch mostly waits: no span, only the latency histogram and error counts.
        started = time.perf_counter()
        try:
            return self.inner._watch(tenant, after_revision, timeout, limit)
        except StatelineError as exc:
            self.metrics.store_errors.labels("watch", exc.code).inc()
            raise
        finally:
            self._latency["watch"].observe(time.perf_counter() - started)

    def _tenant_revisions(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        return self._call("tenants", lambda: self.inner._tenant_revisions(after, limit))

    def _stats(self, tenant: str) -> TenantStats:
        return self._call("stats", lambda: self.inner._stats(tenant), tenant)

    def _sweep(self, limit: int) -> int:
        return self._call("sweep", lambda: self.inner._sweep(limit))

    def _first_change(self, tenant: str) -> int:
        return self._call("first_change", lambda: self.inner._first_change(tenant), tenant)

    def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int:
        return self._call("trim_changes", lambda: self.inner._trim_changes(tenant, before_revision, limit), tenant)

    def _ping(self) -> None:
        self._call("ping", self.inner.ping)

    def _open(self) -> None:
        super()._open()
        self.inner._open()

    def _close(self) -> None:
        return None
