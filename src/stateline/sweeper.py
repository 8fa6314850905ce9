"""The sweeper: a background thread that removes expired items, old change records and old audit entries."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from stateline.audit import AuditLog
from stateline.errors import InvalidArgument, NotFound, StatelineError
from stateline.store.protocol import MAX_INT, MAX_OPS, Store
from stateline.types import RELAY_CURSORS, SYSTEM_TENANT, Delete, check_number

__all__ = ["Sweeper", "Swept", "forget_relay", "relay_positions"]

log = logging.getLogger("stateline.sweeper")

MAX_BATCH = 10_000


@dataclass(frozen=True)
class Swept:
    """What one run removed: expired ``items``, ``changes`` records of the change feed and ``audit``
    entries past their retention."""

    items: int
    changes: int
    audit: int = 0


class Sweeper:
    """Every ``interval`` seconds, removes the expired items of ``store`` and (with ``keep_changes``)
    the change records that retention lets go, ``batch`` at a time.

    Expired items are invisible from the moment they expire; sweeping only gives their space back.
    Without it, every TTL write (cache entries, sessions, rate-limit windows, idempotency keys) stays
    on disk after it expires. Likewise the change feed keeps a record of every commit until it is
    trimmed: with ``keep_changes=N`` each tenant keeps its last N records, and never one that a
    relay of this store has not published yet (the relays' cursors are read at each run; a relay
    registers when it starts, and a tenant it has not started on keeps everything; a run logs a
    warning for each relay that holds records back, and ``forget_relay`` lets go of a relay you
    retire). Readers further behind get ``ChangesTrimmed``. With
    ``audit_retention_days=D`` each tenant's audit log drops entries older than D days
    (``AuditLog.cleanup``: the chain stays verifiable from the oldest kept entry).

    Each ``Store.sweep`` / ``Store.trim_changes`` call is one short write, so writers wait at most
    one batch; a run ends when nothing is left or it removed ``max_per_run`` items and as many
    records, and the rest waits for the next run. Retention reads the revisions of all tenants at
    each run (one store call per 1,000 tenants) and trims the tenants whose feed has records to let
    go since its last run (one call or more each), audit retention one call or a few per tenant.

    ``start()`` runs it on a daemon thread; ``stop()`` ends it, and so does closing its store. Any
    number of sweepers may run on one store, in one process or several: removing something twice
    removes it once. A failing run (the store unavailable, say) is logged, counted in ``failures``
    and tried again at the next interval; the thread never dies of it. ``on_swept(n)`` and
    ``on_trimmed(n)`` are called after each run that removed ``n > 0`` items or records (metrics).
    ``run_once()`` runs now, on the calling thread.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 60.0,
        batch: int = 1000,
        max_per_run: int = 1_000_000,
        keep_changes: int | None = None,
        audit_retention_days: float | None = None,
        on_swept: Callable[[int], object] | None = None,
        on_trimmed: Callable[[int], object] | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise InvalidArgument("store", f"must be a Store, got {type(store).__name__}")
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not math.isfinite(interval):
            raise InvalidArgument("interval", f"must be a number of seconds, got {interval!r}")
        if not 0 < interval <= 86_400:
            raise InvalidArgument("interval", f"must be above 0 and at most 86400 seconds, got {interval!r}")
        if type(batch) is not int or not 1 <= batch <= MAX_BATCH:
            raise InvalidArgument("batch", f"must be an integer from 1 to {MAX_BATCH}, got {batch!r}")
        if type(max_per_run) is not int or max_per_run < batch:
            raise InvalidArgument("max_per_run", f"must be an integer of at least batch ({batch}), got {max_per_run!r}")
        if keep_changes is not None and (type(keep_changes) is not int or not 1 <= keep_changes <= MAX_INT):
            raise InvalidArgument("keep_changes", f"must be a positive integer or None, got {keep_changes!r}")
        if audit_retention_days is not None:
            check_number(audit_retention_days, "audit_retention_days", 0, 100 * 365, above=True, unit="days")
        for name, fn in (("on_swept", on_swept), ("on_trimmed", on_trimmed)):
            if fn is not None and not callable(fn):
                raise InvalidArgument(name, "must be callable")
        self.store = store
        self.interval = float(interval)
        self.batch = batch
        self.max_per_run = max_per_run
        self.keep_changes = keep_changes
        self.audit_retention_days = audit_retention_days
        self.on_swept = on_swept
        self.on_trimmed = on_trimmed
        #: items, change records and audit entries removed, runs ended (with or without failure), runs that failed,
        #: the last failure
        self.swept = 0
        self.trimmed = 0
        self.audit_removed = 0
        self.runs = 0
        self.failures = 0
        self.last_error: str | None = None
        self._trimmed_below: dict[str, int] = {}  # tenant -> the revision below which its feed is trimmed
        self._lock = threading.Lock()  # one run at a time (the thread and run_once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> Swept:
        """Run now: remove expired items, then (if asked) old change records and old audit entries.

        Returns what was removed. Raises what the store raises (``Unavailable``...), after counting
        the failure; what the failed run removed before it stays removed and counted.
        """
        return self._sweep(stoppable=False)

    def _sweep(self, *, stoppable: bool) -> Swept:
        with self._lock:
            removed = [0, 0, 0]
            try:
                self._drain(self.store.sweep, removed, 0, stoppable)
                if self.keep_changes is not None or self.audit_retention_days is not None:
                    revisions = self.store.all_revisions()
                    if self.keep_changes is not None:
                        self._trim_feeds(revisions, self.keep_changes, removed, stoppable)
                    if self.audit_retention_days is not None:
                        self._clean_audit(list(revisions), self.audit_retention_days, removed, stoppable)
            except BaseException as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self.swept += removed[0]
                self.trimmed += removed[1]
                self.audit_removed += removed[2]
                self.runs += 1
                self._report(self.on_swept, removed[0])
                self._report(self.on_trimmed, removed[1])
            return Swept(removed[0], removed[1], removed[2])

    def _stopped(self, stoppable: bool) -> bool:
        return stoppable and self._stop.is_set()

    def _drain(self, remove: Callable[[int], int], removed: list[int], slot: int, stoppable: bool) -> bool:
        """Call ``remove(n)`` a batch at a time until it removes less than a batch; count into
        ``removed[slot]``. False if the run's budget is spent or it was stopped."""
        while True:
            if removed[slot] >= self.max_per_run or self._stopped(stoppable):
                return False
            n = remove(min(self.batch, self.max_per_run - removed[slot]))
            removed[slot] += n
            if n < self.batch:
                return True

    def _trim_feeds(self, revisions: dict[str, int], keep: int, removed: list[int], stoppable: bool) -> None:
        positions = relay_positions(self.store)
        held: dict[str, list[int]] = {}  # relay -> [tenants it holds back, most records kept for it]
        try:
            for tenant, head in revisions.items():
                keep_from = head - keep + 1
                if tenant != SYSTEM_TENANT:  # relays skip the system tenant
                    for relay, published in positions.items():
                        # a relay with no cursor for the tenant yet has published none of it
                        start = published.get(tenant, 0) + 1
                        if start < keep_from:
                            h = held.setdefault(relay, [0, 0])
                            h[0] += 1
                            h[1] = max(h[1], keep_from - start)
                            keep_from = start
                if keep_from <= self._trimmed_below.get(tenant, 1):
                    continue  # nothing below keep_from is left: this sweeper removed it, or it never was
                trim = functools.partial(self.store.trim_changes, tenant, keep_from)
                if not self._drain(trim, removed, 1, stoppable):
                    return
                self._trimmed_below[tenant] = keep_from
        finally:
            for relay, (n, most) in held.items():
                log.warning(
                    "sweeper: change-feed retention keeps up to %d more records in %d tenant(s) for relay %r, "
                    "which has not published them; if that relay is retired: stateline relays forget %s",
                    most,
                    n,
                    relay,
                    relay,
                )

    def _clean_audit(self, tenants: list[str], days: float, removed: list[int], stoppable: bool) -> None:
        for tenant in tenants:
            if self._stopped(stoppable):
                return
            removed[2] += AuditLog(self.store, tenant).cleanup(days)

    @staticmethod
    def _report(fn: Callable[[int], object] | None, n: int) -> None:
        if n and fn is not None:
            try:
                fn(n)
            except Exception:
                log.exception("sweeper: a metrics callback failed")

    def start(self) -> Self:
        """Start the background thread (its first run is one ``interval`` from now). Returns ``self``."""
        if self.running:
            raise InvalidArgument("sweeper", "is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stateline-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread: a run in progress ends after its current batch. Stopping twice is allowed."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                done = self._sweep(stoppable=True)
            except StatelineError as exc:
                if self._stop.is_set():
                    return
                if self.store.closed:  # for good: nothing to try again
                    log.info("sweeper ended: its store was closed")
                    return
                log.warning("sweeper: %s; trying again in %g s", exc, self.interval)
                continue
            except Exception:
                log.exception("sweeper: a run failed; trying again in %g s", self.interval)
                continue
            if done.items or done.changes or done.audit:
                log.debug(
                    "sweeper: removed %d expired item(s), %d change record(s) and %d audit entries in %.3f s",
                    done.items,
                    done.changes,
                    done.audit,
                    time.perf_counter() - started,
                )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def relay_positions(store: Store) -> dict[str, dict[str, int]]:
    """The relays of ``store``, by JetStream stream, each with the last revision of every tenant that
    JetStream acknowledged (tenants it has not published any of are absent). Change-feed retention
    keeps every record after these, and every record of a tenant a relay has not started on."""
    if not isinstance(store, Store):
        raise InvalidArgument("store", f"must be a Store, got {type(store).__name__}")
    positions: dict[str, dict[str, int]] = {}
    for item in store.scan_all(SYSTEM_TENANT, RELAY_CURSORS):
        stream, slash, tenant = item.key.partition("/")
        if slash:  # "<stream>/" alone: a relay that has published nothing yet
            published = positions.setdefault(stream, {})
            if tenant and type(item.value) is int:
                published[tenant] = item.value
    return positions


def forget_relay(store: Store, stream: str) -> int:
    """Let go of the relay of JetStream stream ``stream``, retired: remove its cursors, so that
    change-feed retention no longer keeps records it has not published. Returns how many cursors
    were removed; raises ``NotFound`` if ``store`` has no relay of that stream.

    Forget only a relay that will not run again: started again, it registers anew and publishes each
    tenant from its oldest kept record (counting what retention removed meanwhile as ``lost``), so
    JetStream gets again what it had published before, outside its duplicate window.
    """
    if not isinstance(store, Store):
        raise InvalidArgument("store", f"must be a Store, got {type(store).__name__}")
    if type(stream) is not str or not stream or "/" in stream:
        raise InvalidArgument("stream", f"must be the name of a relay's JetStream stream, got {stream!r}")
    keys = [item.key for item in store.scan_all(SYSTEM_TENANT, RELAY_CURSORS, stream + "/")]
    if not keys:
        raise NotFound(f"no relay of stream {stream!r} in this store")
    for i in range(0, len(keys), MAX_OPS):
        store.commit(SYSTEM_TENANT, ops=[Delete(RELAY_CURSORS, key) for key in keys[i : i + MAX_OPS]])
    return len(keys)
