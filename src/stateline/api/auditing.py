"""The audit of writes made through the API: who (key id), what, which resource, from where, under which trace.

Entries of concurrent requests of one tenant are appended together (group commit): a request's entry
joins the tenant's queue and the request waits until a flush has committed it, so every successful
write is audited before its response completes. One flush per tenant runs at a time; entries arriving
meanwhile go into the next one. On the memory store a flush runs on the event loop right after the
requests that are ready to run (one commit for all of them); on other stores in the thread pool, while
the event loop goes on queueing. The tenant's ``AuditLog`` keeps the hash chain across flushes,
processes and API nodes (its appends are linearised by a check on the stream's last seq).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from stateline.audit import MAX_BATCH, AuditLog
from stateline.database import Database

__all__ = ["ApiAuditor", "AuditEntry"]

_log = logging.getLogger("stateline.audit")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited write."""

    key_id: str
    action: str
    resource_type: str
    resource_id: str
    method: str
    path: str
    status: int
    ip: str | None
    trace_id: str | None
    details: dict[str, Any] = field(default_factory=dict)


class _Queue:
    """The audit entries of one tenant waiting for a flush."""

    __slots__ = ("bodies", "flushing", "futures", "log", "task")

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.bodies: list[dict[str, Any]] = []
        self.futures: list[asyncio.Future[None]] = []
        self.flushing = False
        self.task: asyncio.Task[None] | None = None  # the flush under way (a reference keeps it alive)


class ApiAuditor:
    """Writes an ``AuditEntry`` for every successful write through the API, in the caller's tenant.

    Entries go to the tenant's audit log (the ``audit`` layer), and at DEBUG level to the
    ``stateline.audit`` logger. ``inline``: the store does not block (memory), so flushes run on the
    event loop instead of in the thread pool.
    """

    def __init__(self, db: Database, *, inline: bool = False) -> None:
        self.db = db
        self.inline = inline
        # per event loop (an app normally runs on one), per tenant: the entries waiting for a flush
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Queue]] = (
            weakref.WeakKeyDictionary()
        )
        #: the append of one flush (a measurement aid may replace it)
        self.append: Callable[[AuditLog, list[dict[str, Any]]], object] = _append

    def body(self, tenant: str, entry: AuditEntry) -> dict[str, Any]:
        """The validated body of ``entry`` for the tenant's audit log."""
        return self.fields_body(
            self.db.tenant(tenant).audit,
            tenant,
            entry.key_id,
            entry.action,
            entry.resource_type,
            entry.resource_id,
            entry.method,
            entry.path,
            entry.status,
            entry.ip,
            entry.trace_id,
            entry.details,
        )

    def fields_body(
        self,
        log: AuditLog,
        tenant: str,
        key_id: str,
        action: str,
        resource_type: str,
        resource_id: str,
        method: str,
        path: str,
        status: int,
        ip: str | None,
        trace_id: str | None,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The validated body of one entry (the fields of an ``AuditEntry``) for ``log``, the audit log
        of ``tenant``: what ``body`` makes, without building the ``AuditEntry`` first."""
        if _log.isEnabledFor(logging.DEBUG):
            fields = {
                "key_id": key_id,
                "action": action,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "method": method,
                "path": path,
                "status": status,
                "ip": ip,
                "trace_id": trace_id,
                "details": details or {},
            }
            _log.debug("audit", extra={"audit": fields, "tenant": tenant})
        info: dict[str, Any] = {"method": method, "path": path, "status": status}
        if details:
            info.update(details)
        if ip is not None and not _is_ip(ip):
            info["client"] = ip  # e.g. a unix socket peer: kept, but not as an IP
            ip = None
        return log.entry_body(f"key:{key_id}", action, resource_type, resource_id or None, info, ip, trace_id)

    def record(self, tenant: str, entry: AuditEntry) -> None:
        """Record ``entry`` for ``tenant`` now, from any thread; raises if the audit log cannot be written."""
        self.append(self.db.tenant(tenant).audit, [self.body(tenant, entry)])

    async def submit(self, tenant: str, entry: AuditEntry) -> None:
        """Record ``entry`` for ``tenant`` together with the entries of concurrent requests; returns once
        it is committed, raises if the audit log cannot be written (or the entry is invalid)."""
        q = self._queue(tenant)
        await self._enqueue(q, self.body(tenant, entry))

    async def submit_fields(
        self,
        tenant: str,
        key_id: str,
        action: str,
        resource_type: str,
        resource_id: str,
        method: str,
        path: str,
        status: int,
        ip: str | None,
        trace_id: str | None,
    ) -> None:
        """``submit`` of the entry with these fields (those of an ``AuditEntry`` without details), without
        building the ``AuditEntry``: the service's path for every audited write."""
        q = self._queue(tenant)
        body = self.fields_body(
            q.log, tenant, key_id, action, resource_type, resource_id, method, path, status, ip, trace_id
        )
        await self._enqueue(q, body)

    def _queue(self, tenant: str) -> _Queue:
        loop = asyncio.get_running_loop()
        queues = self._queues.get(loop)
        if queues is None:
            queues = self._queues[loop] = {}
        q = queues.get(tenant)
        if q is None:
            q = queues[tenant] = _Queue(self.db.tenant(tenant).audit)
        return q

    async def _enqueue(self, q: _Queue, body: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        q.bodies.append(body)
        q.futures.append(fut)
        if not q.flushing:
            q.flushing = True
            if self.inline:
                loop.call_soon(self._flush_inline, q)
            else:
                q.task = loop.create_task(self._flush(q))
        await fut

    def _take(self, q: _Queue) -> tuple[list[dict[str, Any]], list[asyncio.Future[None]]]:
        n = MAX_BATCH
        bodies, futures = q.bodies[:n], q.futures[:n]
        del q.bodies[:n], q.futures[:n]
        return bodies, futures

    def _flush_inline(self, q: _Queue) -> None:
        try:
            while q.bodies:
                bodies, futures = self._take(q)
                try:
                    self.append(q.log, bodies)
                except Exception as exc:  # noqa: BLE001  # every request of the batch reports it
                    _settle(futures, exc)
                else:
                    _settle(futures, None)
        finally:
            q.flushing = False

    async def _flush(self, q: _Queue) -> None:
        futures: list[asyncio.Future[None]] = []
        try:
            while q.bodies:
                bodies, futures = self._take(q)
                try:
                    await run_in_threadpool(self.append, q.log, bodies)
                except Exception as exc:  # noqa: BLE001  # every request of the batch reports it
                    _settle(futures, exc)
                else:
                    _settle(futures, None)
        except BaseException:  # cancelled (shutdown): no request may wait for a flush that will not come
            _settle(futures, RuntimeError("the audit flush was cancelled"))
            _settle(q.futures, RuntimeError("the audit flush was cancelled"))
            del q.bodies[:], q.futures[:]
            raise
        finally:
            q.flushing = False
            q.task = None


def _append(log: AuditLog, bodies: list[dict[str, Any]]) -> object:
    return log.append_bodies(bodies, entries=False)


def _settle(futures: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for f in futures:
        if not f.done():
            if exc is None:
                f.set_result(None)
            else:
                f.set_exception(exc)


@functools.lru_cache(maxsize=4096)
def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
