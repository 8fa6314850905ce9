"""Wakes asyncio waiters when a tenant's revision moves: one watching thread per tenant, however many clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field

from stateline.errors import ChangesTrimmed, StatelineError
from stateline.store.protocol import Store

__all__ = ["ChangeHub"]

_log = logging.getLogger("stateline.api.hub")


@dataclass
class _Waiter:
    after: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int]


@dataclass
class _TenantWatch:
    known: int
    waiters: list[_Waiter] = field(default_factory=list)
    thread: threading.Thread | None = None


class ChangeHub:
    """Lets many SSE and long-poll clients wait on a tenant's change feed without a thread each.

    ``wait`` only says that the revision has moved past ``after``; clients then read the change feed
    themselves with ``Store.changes``, so a client never skips a change whatever the hub does.
    A tenant's watching thread exits once it has had no waiter for ``idle_seconds``.
    """

    def __init__(self, store: Store, *, poll_seconds: float = 1.0, idle_seconds: float = 5.0) -> None:
        self.store = store
        self.poll_seconds = poll_seconds
        self.idle_seconds = idle_seconds
        self._tenants: dict[str, _TenantWatch] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called (streams should end)."""
        return self._closed.is_set()

    async def wait(self, tenant: str, after: int, timeout: float) -> int:
        """Wait until the tenant's revision exceeds ``after`` or ``timeout`` seconds pass.

        Returns the latest revision the hub knows (``<= after`` on timeout or close).
        """
        if self.closed:
            return after
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        waiter = _Waiter(after, loop, fut)
        with self._lock:
            tw = self._tenants.get(tenant)
            if tw is not None and tw.known > after:
                return tw.known
            if tw is None:
                tw = self._tenants[tenant] = _TenantWatch(known=after)
            tw.waiters.append(waiter)
            if tw.thread is None or not tw.thread.is_alive():
                tw.thread = threading.Thread(target=self._run, args=(tenant, tw), name=f"watch-{tenant}", daemon=True)
                tw.thread.start()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return after
        finally:
            with self._lock, contextlib.suppress(ValueError):
                tw.waiters.remove(waiter)

    def _run(self, tenant: str, tw: _TenantWatch) -> None:
        idle = 0.0
        try:
            known = self.store.revision(tenant)
        except StatelineError:
            known = tw.known
        with self._lock:
            tw.known = max(tw.known, known)
            known = tw.known
        while not self.closed:
            with self._lock:
                if not tw.waiters:
                    idle += self.poll_seconds
                    if idle >= self.idle_seconds:
                        tw.thread = None
                        return
                else:
                    idle = 0.0
                self._wake(tw)
            try:
                got = self.store.watch(tenant, known, self.poll_seconds, 1)
                if got:
                    known = max(known, self.store.revision(tenant), got[-1].revision)
            except ChangesTrimmed as exc:  # only the latest revision matters here
                known = max(known, exc.first_available - 1)
                continue
            except StatelineError as exc:
                if self.store.closed:  # for good: release the waiters and end
                    break
                _log.warning("change watch failed", extra={"tenant": tenant, "code": exc.code})
                self._closed.wait(self.poll_seconds)
                continue
            with self._lock:
                tw.known = max(tw.known, known)
                self._wake(tw)
        with self._lock:
            for w in tw.waiters:
                _post(w, w.after)

    @staticmethod
    def _wake(tw: _TenantWatch) -> None:
        for w in tw.waiters:
            if tw.known > w.after and not w.future.done():
                _post(w, tw.known)

    def close(self) -> None:
        """Stop every watching thread (within ``poll_seconds``) and release every waiter."""
        self._closed.set()
        with self._lock:
            threads = [tw.thread for tw in self._tenants.values() if tw.thread is not None]
        for t in threads:
            t.join(timeout=self.poll_seconds + 2)


def _post(w: _Waiter, value: int) -> None:
    with contextlib.suppress(RuntimeError):  # the waiter's loop has closed
        w.loop.call_soon_threadsafe(_resolve, w.future, value)


def _resolve(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)
