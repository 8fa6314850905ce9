"""In-process subscriptions to a tenant's change feed, for users without NATS."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stateline.errors import ChangesTrimmed, InvalidArgument, StatelineError
from stateline.store.protocol import Store
from stateline.types import Change, check_tenant

__all__ = ["ChangeFilter", "Subscription"]

log = logging.getLogger("stateline.bus")

ChangeFilter = str | Callable[[Change], bool] | None


def _matcher(flt: ChangeFilter) -> Callable[[Change], bool]:
    if flt is None:
        return lambda _c: True
    if isinstance(flt, str):
        prefix = flt
        return lambda c: any(
            (op.stream if op.op in ("append", "trim") else op.namespace).startswith(prefix) for op in c.ops
        )
    if callable(flt):
        return flt
    raise InvalidArgument("filter", "must be None, a namespace/stream prefix, or a function of a Change")


class Subscription:
    """Calls ``callback(change)`` on a background thread for every new change of ``tenant`` that matches.

    Changes arrive in revision order, each once, starting after ``after`` (default: the revision
    current when subscribing). ``filter`` is a namespace/stream prefix or a predicate. A callback
    that raises is logged and the next change is delivered. While the store is unavailable the
    subscription retries; it never skips a change: if retention (``Store.trim_changes``) removed
    changes it had not delivered, it stops, logs it and keeps the ``ChangesTrimmed`` in ``error``.
    ``close()`` stops it; so does closing its store (``Database.close`` closes the subscriptions
    made through it).
    """

    def __init__(
        self,
        store: Store,
        tenant: str,
        callback: Callable[[Change], object],
        filter: ChangeFilter = None,  # noqa: A002 - the public name of the argument
        *,
        after: int | None = None,
        poll_timeout: float = 1.0,
    ) -> None:
        if not callable(callback):
            raise InvalidArgument("callback", "must be callable")
        self.store = store
        self.tenant = check_tenant(tenant)
        self.callback = callback
        self._match = _matcher(filter)
        self.cursor = store.revision(self.tenant) if after is None else after
        if type(self.cursor) is not int or self.cursor < 0:
            raise InvalidArgument("after", "must be a non-negative revision")
        self.poll_timeout = poll_timeout
        self.delivered = 0
        self.error: ChangesTrimmed | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stateline-subscription-{tenant}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                changes = self.store.watch(self.tenant, self.cursor, self.poll_timeout)
            except ChangesTrimmed as exc:
                self.error = exc
                log.error("subscription to %s stopped: %s", self.tenant, exc.message)
                return
            except StatelineError as exc:
                if self._stop.is_set():
                    return
                if self.store.closed:  # for good: nothing to retry
                    log.info("subscription to %s ended: its store was closed", self.tenant)
                    return
                log.warning("subscription to %s: %s; retrying", self.tenant, exc)
                self._stop.wait(min(1.0, self.poll_timeout))
                continue
            for change in changes:
                if self._stop.is_set():
                    return
                if self._match(change):
                    try:
                        self.callback(change)
                        self.delivered += 1
                    except Exception:
                        log.exception("subscriber callback failed on %s:%d", change.tenant, change.revision)
                self.cursor = change.revision

    @property
    def running(self) -> bool:
        """Whether it still delivers (not closed, not stopped by ``error``)."""
        return self._thread.is_alive()

    def close(self, wait: bool = True) -> None:
        """Stop delivering; with ``wait``, return once the thread has ended (or after 10 s)."""
        self._stop.set()
        if wait:
            self._thread.join(10)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
