"""The relay: follows every tenant's change feed and publishes each change to NATS JetStream, exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import nats
import orjson
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge

from stateline.bus.connection import NatsConnector
from stateline.bus.envelope import alias_messages, envelope_of, subject_of
from stateline.errors import ChangesTrimmed, InvalidArgument, StatelineError
from stateline.store.protocol import Store
from stateline.types import RELAY_CURSORS, SYSTEM_TENANT, Change, Put, check_key, check_number

__all__ = ["Relay"]

log = logging.getLogger("stateline.bus")

T = TypeVar("T")

CURSOR_NAMESPACE = RELAY_CURSORS
_RETENTION = {
    "limits": RetentionPolicy.LIMITS,
    "interest": RetentionPolicy.INTEREST,
    "workqueue": RetentionPolicy.WORK_QUEUE,
}


class Relay:
    """Publishes every committed change of every tenant to a JetStream stream.

    * Subject ``<prefix>.<tenant>.<layer>.<event>``; run events also go to their seed subjects
      (``caf.exec.assigned.v1``, ``caf.exec.result.v1``, ``beamline.usage.v1.metered``), each
      behind ``alias_prefix``.
    * ``Nats-Msg-Id`` is ``<tenant>:<revision>`` (aliases add ``:<seq>:<alias>``), so JetStream drops
      a message published twice within ``duplicate_window`` seconds.
    * The cursor of each tenant is an item of the ``system`` tenant, advanced only after JetStream
      acknowledged every message of a change. A crash re-publishes from the cursor; the duplicates
      are dropped, so each change is stored once, in revision order per tenant.
    * While NATS is unreachable, commits keep succeeding; the relay retries and catches up.
    * Change-feed retention (``Sweeper(keep_changes=...)``) keeps what the relay has not published
      (the relay registers its stream in the cursors' namespace as it starts, before connecting).
      Records trimmed by hand before it published them are skipped with an error in the log and
      counted in ``lost``: the other tenants are not held up by what cannot be recovered.

    Run one relay per stream: ``start()``/``stop()`` on a thread, or ``await run(stop_event)``.
    The ``system`` tenant itself is not relayed (it holds the cursors).
    """

    def __init__(
        self,
        store: Store,
        nats_url: str = "nats://127.0.0.1:4222",
        *,
        stream: str = "STATELINE",
        prefix: str = "stateline",
        aliases: bool = True,
        alias_prefix: str = "",
        retention: str = "limits",
        max_age: float | None = None,
        duplicate_window: float = 120.0,
        batch: int = 500,
        ack_timeout: float = 5.0,
        poll_interval: float = 0.005,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if retention not in _RETENTION:
            raise InvalidArgument("retention", f"must be one of {sorted(_RETENTION)}")
        if not stream.replace("_", "").replace("-", "").isalnum():
            raise InvalidArgument("stream", "use letters, digits, '_' and '-'")
        if not prefix or any(c in prefix for c in " *>"):
            raise InvalidArgument("prefix", "must be a NATS subject prefix without wildcards")
        if any(c in alias_prefix for c in " *>"):
            raise InvalidArgument("alias_prefix", "must be a NATS subject prefix without wildcards")
        if type(batch) is not int or not 1 <= batch <= 10_000:
            raise InvalidArgument("batch", "must be between 1 and 10000")
        seconds = {"duplicate_window": duplicate_window, "ack_timeout": ack_timeout, "poll_interval": poll_interval}
        if max_age is not None:
            seconds["max_age"] = max_age
        for name, value in seconds.items():
            check_number(value, name, 0, math.inf, above=True, unit="seconds")
        if max_age is not None:
            # JetStream refuses a duplicate window longer than the age it keeps messages; a message
            # older than that is gone anyway, so there is nothing to deduplicate it against
            duplicate_window = min(duplicate_window, max_age)
        self.store = store
        self.nats_url = nats_url
        self._nats = NatsConnector(nats_url, "relay")
        self._stream_warned: set[str] = set()
        self.stream = stream
        self.prefix = prefix
        self.aliases = aliases
        self.alias_prefix = alias_prefix
        self.retention = retention
        self.max_age = max_age
        self.duplicate_window = duplicate_window
        self.batch = batch
        self.ack_timeout = ack_timeout
        self.poll_interval = poll_interval
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lag = Gauge("stateline_relay_lag_revisions", "Revisions committed but not yet acknowledged by NATS",
                          ["tenant"], registry=self.registry)  # fmt: skip
        self._published = Counter("stateline_relay_published", "Changes acknowledged by JetStream",
                                  registry=self.registry)  # fmt: skip
        self._cursors: dict[str, int] = {}
        self.published = 0
        self.errors = 0
        self.lost = 0  # revisions trimmed from the feed before they were published
        self.connected = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    # ------------------------------------------------------------ cursors

    def _cursor_key(self, tenant: str) -> str:
        return check_key(f"{self.stream}/{tenant}")

    def cursor(self, tenant: str) -> int:
        """The last revision of ``tenant`` that JetStream acknowledged (0 if none)."""
        item = self.store.get(SYSTEM_TENANT, CURSOR_NAMESPACE, self._cursor_key(tenant))
        return 0 if item is None else int(item.value)

    def _register(self) -> None:
        """Record that this stream has a relay (an item without a tenant), so change-feed retention
        keeps the feed of every tenant the relay has not started on, even before its first publish."""
        key = check_key(f"{self.stream}/")
        if self.store.get(SYSTEM_TENANT, CURSOR_NAMESPACE, key) is None:
            self.store.commit(SYSTEM_TENANT, ops=[Put(CURSOR_NAMESPACE, key, 0)])

    def _save_cursor(self, tenant: str, revision: int) -> None:
        self.store.commit(SYSTEM_TENANT, ops=[Put(CURSOR_NAMESPACE, self._cursor_key(tenant), revision)])
        self._cursors[tenant] = revision

    def _pending(self) -> list[tuple[str, int, list[Change]]]:
        """Each tenant with changes after its cursor: ``(tenant, cursor, next batch)``. One call (one
        hop to a worker thread) reads them all, and only the tenants whose revision moved are read,
        so an idle relay polls with one read per 1,000 tenants."""
        out: list[tuple[str, int, list[Change]]] = []
        revisions = self._revisions()
        self._cursors.update(self._saved_cursors([t for t in revisions if t not in self._cursors]))
        for tenant, head in revisions.items():
            cursor = self._cursors[tenant]
            if head <= cursor:
                continue  # nothing new: no read
            try:
                changes = self.store.changes(tenant, cursor, self.batch)
            except ChangesTrimmed as exc:
                # Retention removed what this relay had not published (a Sweeper keeps it; a manual
                # trim may not). Blocking every tenant on it would not bring it back: say so, skip.
                cursor = exc.first_available - 1
                log.error(
                    "relay: revisions %d to %d of tenant %r were trimmed before they were published; "
                    "they are lost to NATS, relaying from revision %d",
                    exc.after_revision + 1,
                    cursor,
                    tenant,
                    exc.first_available,
                )
                self.lost += cursor - exc.after_revision
                self._save_cursor(tenant, cursor)
                changes = self.store.changes(tenant, cursor, self.batch)
            if changes:
                out.append((tenant, cursor, changes))
        return out

    def _saved_cursors(self, tenants: list[str]) -> dict[str, int]:
        """The saved cursors of ``tenants``, read 1,000 a call (a relay starting on many tenants)."""
        out: dict[str, int] = {}
        for i in range(0, len(tenants), 1000):
            chunk = tenants[i : i + 1000]
            items = self.store.get_many(SYSTEM_TENANT, [(CURSOR_NAMESPACE, self._cursor_key(t)) for t in chunk])
            for tenant, item in zip(chunk, items, strict=True):
                out[tenant] = 0 if item is None else int(item.value)
        return out

    def _revisions(self) -> dict[str, int]:
        """Every tenant's last revision (one read per 1,000 tenants), but the system tenant's."""
        revisions = self.store.all_revisions()
        revisions.pop(SYSTEM_TENANT, None)
        return revisions

    def lag(self) -> dict[str, int]:
        """Revisions behind, per tenant (also exported as the ``stateline_relay_lag_revisions`` gauge)."""
        out = {}
        revisions = self._revisions()
        # the relay's thread alone writes its cursors: read the missing ones without caching them
        saved = self._saved_cursors([t for t in revisions if t not in self._cursors])
        for tenant, head in revisions.items():
            behind = head - self._cursors.get(tenant, saved.get(tenant, 0))
            out[tenant] = behind
            self._lag.labels(tenant).set(behind)
        return out

    # ------------------------------------------------------------ NATS

    def _subjects(self) -> list[str]:
        subjects = [f"{self.prefix}.>"]
        if self.aliases:
            subjects += [f"{self.alias_prefix}caf.exec.>", f"{self.alias_prefix}beamline.usage.>"]
        return subjects

    async def _ensure_stream(self, js: Any) -> None:
        try:
            info = await js.stream_info(self.stream)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=self.stream,
                    subjects=self._subjects(),
                    retention=_RETENTION[self.retention],
                    max_age=self.max_age,
                    duplicate_window=self.duplicate_window,
                )
            )
            return
        self._compare_stream(info.config)

    def _compare_stream(self, config: StreamConfig) -> None:
        """Warn (once per setting) where an existing stream differs from what this relay asks for:
        JetStream keeps the stream's own settings, so a changed ``max_age`` or prefix has no effect."""
        have = {
            "subjects": sorted(config.subjects or []),
            "retention": config.retention,
            "max_age": config.max_age or None,
        }
        want = {"subjects": sorted(self._subjects()), "retention": _RETENTION[self.retention], "max_age": self.max_age}
        for name, value in want.items():
            if have[name] != value and name not in self._stream_warned:
                self._stream_warned.add(name)
                log.warning(
                    "relay: stream %s exists with %s %s, not %s as asked; it keeps its own (change it with "
                    "the nats CLI, or relay to another --stream)",
                    self.stream, name, have[name], value,
                )  # fmt: skip

    async def _connect(self) -> Any:
        return await self._nats.connect(ping_interval=5)

    async def pump(self, js: Any) -> int:
        """Publish what is pending for every tenant, one batch each; returns how many changes were acknowledged."""
        total = 0
        for tenant, cursor, changes in await asyncio.to_thread(self._pending):
            pending: list[tuple[int, list[asyncio.Future[Any]]]] = []
            acked = cursor
            try:
                for change in changes:
                    futures = [
                        await js.publish_async(
                            subject_of(change, self.prefix),
                            orjson.dumps(envelope_of(change)),
                            headers={"Nats-Msg-Id": f"{change.tenant}:{change.revision}"},
                        )
                    ]
                    if self.aliases:
                        for subject, msg_id, body in alias_messages(change, self.alias_prefix):
                            futures.append(
                                await js.publish_async(subject, orjson.dumps(body), headers={"Nats-Msg-Id": msg_id})
                            )
                    pending.append((change.revision, futures))
                for revision, futures in pending:
                    await asyncio.wait_for(asyncio.gather(*futures), self.ack_timeout)
                    acked = revision
            finally:
                for _, futures in pending:
                    for f in futures:
                        if not f.done():
                            f.cancel()
                        elif not f.cancelled():
                            f.exception()  # retrieved, so asyncio does not report it as lost
                if acked > cursor:
                    await asyncio.to_thread(self._save_cursor, tenant, acked)
                    self.published += acked - cursor
                    self._published.inc(acked - cursor)
            total += acked - cursor
        return total

    @staticmethod
    async def _until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
        """``await work``, or ``None`` as soon as ``stop`` is set (the first connection to a NATS that is
        down retries until it is up; stopping must not wait for that)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
        return None

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Relay until ``stop`` is set or its store is closed; reconnects and retries on every NATS or
        store failure."""
        stop = stop or asyncio.Event()
        backoff = 0.1
        while not stop.is_set():
            nc = None
            try:
                await asyncio.to_thread(self._register)
                nc = await self._until_stopped(self._connect(), stop)
                if nc is None:
                    return
                js = nc.jetstream(timeout=self.ack_timeout)
                await self._ensure_stream(js)
                self.connected = True
                backoff = 0.1
                while not stop.is_set():
                    if await self.pump(js) == 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), self.poll_interval)
            except (OSError, TimeoutError, nats.errors.Error, StatelineError) as exc:
                self.connected = False
                if self.store.closed:  # for good: nothing to retry
                    log.info("relay ended: its store was closed")
                    return
                self.errors += 1
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                log.warning("relay: %s; retrying in %.1fs", why, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self.connected = False
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()

    def start(self) -> None:
        """Run the relay on a background thread with its own event loop. It registers with the store
        first, here, so that change-feed retention started after this call keeps what it has not
        published (if the store is down, the thread registers once it is back)."""
        if self._thread is not None:
            raise InvalidArgument("relay", "already started")
        with contextlib.suppress(StatelineError):
            self._register()
        ready = threading.Event()

        def main() -> None:
            async def runner() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop_event = asyncio.Event()
                ready.set()
                await self.run(self._stop_event)

            asyncio.run(runner())

        self._thread = threading.Thread(target=main, name="stateline-relay", daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def running(self) -> bool:
        """Whether the background relay runs (started; not stopped; its store not closed)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background relay (after its current batch) and wait for it."""
        if self._thread is None or self._loop is None or self._stop_event is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(timeout)
        self._thread = None
