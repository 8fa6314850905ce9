"""Locks: leases with a TTL, fencing tokens that only ever increase, and deadlock detection on the wait-for graph."""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from stateline.errors import Conflict, InvalidArgument, NotFound
from stateline.store.protocol import Store
from stateline.types import Absent, Delete, Item, LastWritten, Put, VersionIs, check_key, check_tenant, same_secret

__all__ = ["Lease", "LockState", "Locks", "WaitFor"]

# locks        <name>    {name, held, owner, token, fencing_token, expires_at, acquired_at}
#                        the document is kept after release so the fencing token never goes back
# locks.waits  <owner>   {owner, lock, since, expires_at}: owner is waiting for lock (item TTL)
NS_LOCKS = "locks"
NS_WAITS = "locks.waits"

MAX_TTL_SECONDS = 7 * 86400.0
MAX_WAIT_SECONDS = 3600.0
_MAX_DEPTH = 10_000
_KNOWN_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lock. ``token`` (secret) proves ownership to ``release``/``extend``; ``fencing_token``
    (public) is strictly greater than every earlier holder's, so a protected resource can refuse a
    write carrying an older one (see ``Locks.check_fence``). ``expires_at`` is µs since the epoch."""

    name: str
    owner: str
    token: str
    fencing_token: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class LockState:
    """What is known of a lock without its secret: ``held`` is false once released or expired."""

    name: str
    held: bool
    owner: str | None
    fencing_token: int
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class WaitFor:
    """One edge of the wait-for graph: ``waiter`` waits for ``lock``, which ``holder`` holds."""

    waiter: str
    lock: str
    holder: str


def _seconds(value: object, field: str, maximum: float, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field, f"must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or v > maximum or (positive and v == 0):
        raise InvalidArgument(field, f"must be {'positive' if positive else 'non-negative'} and at most {maximum:g}")
    return v


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _describe(cycle: list[WaitFor]) -> str:
    return ", ".join(f"{e.waiter} waits for {e.lock} held by {e.holder}" for e in cycle)


class Locks:
    """Named locks of one tenant, each a Store item changed only by guarded commits.

    A lock is free when it was never taken, was released, or its lease expired (by the store's
    clock). Acquiring takes the next fencing token of that name; tokens survive release and expiry,
    so they strictly increase for the lifetime of the tenant.
    """

    def __init__(self, store: Store, tenant: str) -> None:
        self.store = store
        self.tenant = check_tenant(tenant)
        # lock name -> (document, version) as this handle last wrote it: the next acquire, release or
        # extend of that lock commits against that version without reading it first (a stale entry
        # only costs a refused commit, then the lock is read as usual)
        self._known = LastWritten(_KNOWN_MAX)

    def _remember(self, name: str, doc: dict[str, Any], version: int) -> None:
        self._known.put(name, doc, version)

    def _recall(self, name: str) -> tuple[dict[str, Any], int] | None:
        return self._known.get(name)

    def _forget(self, name: str) -> None:
        self._known.drop(name)

    # ------------------------------------------------------------ reads

    def _live_holder(self, item: Item | None, now: int) -> str | None:
        if item is None:
            return None
        v = item.value
        if not v["held"] or v["expires_at"] <= now:
            return None
        owner: str = v["owner"]
        return owner

    def state(self, name: str) -> LockState:
        """The lock's current state (a never-taken lock is free with fencing token 0)."""
        name = check_key(name, "name")
        item = self.store.get(self.tenant, NS_LOCKS, name)
        if item is None:
            return LockState(name, False, None, 0, None)
        v = item.value
        now = self.store.clock.now_us()
        held = self._live_holder(item, now) is not None
        return LockState(
            name, held, v["owner"] if held else None, v["fencing_token"], v["expires_at"] if held else None
        )

    # ------------------------------------------------------------ acquire

    def acquire(self, name: str, owner: str | None = None, ttl: float = 30.0, wait: float = 0.0) -> Lease:
        """Take lock ``name`` for ``owner`` for ``ttl`` seconds, waiting up to ``wait`` seconds for it.

        Raises ``Conflict`` if the lock is still held when the wait is over, if ``owner`` already
        holds it, or at once if waiting would close a cycle in the wait-for graph (a deadlock; the
        error names the cycle). While waiting, the wait is recorded so others can see it.
        """
        name = check_key(name, "name")
        owner = check_key(owner if owner is not None else _default_owner(), "owner")
        ttl = _seconds(ttl, "ttl", MAX_TTL_SECONDS, positive=True)
        wait = _seconds(wait, "wait", MAX_WAIT_SECONDS, positive=False)
        deadline = time.monotonic() + wait
        recorded: str | None = None
        checked_holder: str | None = None
        pause = 0.002
        known = self._recall(name)
        if known is not None:
            doc, version = known
            now = self.store.clock.now_us()
            if not doc["held"] or doc["expires_at"] <= now:
                lease = self._take(name, owner, ttl, doc, version, now, False)
                if lease is not None:
                    return lease
        try:
            while True:
                now = self.store.clock.now_us()
                item = self.store.get(self.tenant, NS_LOCKS, name)
                holder = self._live_holder(item, now)
                if holder is None:
                    lease = self._take(
                        name,
                        owner,
                        ttl,
                        None if item is None else item.value,
                        None if item is None else item.version,
                        now,
                        recorded is not None,
                    )
                    if lease is not None:
                        recorded = None  # the wait entry went with the acquiring commit
                        return lease
                    continue
                if holder == owner:
                    raise Conflict(
                        f"lock {name}: {owner} already holds it",
                        details={"reason": "already_held", "lock": name, "owner": owner},
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    assert item is not None
                    raise Conflict(
                        f"lock {name} is held by {holder}",
                        details={
                            "reason": "held",
                            "lock": name,
                            "holder": holder,
                            "expires_at": item.value["expires_at"],
                        },
                    )
                if recorded != name:
                    # record first, then look for a cycle: of two parties closing one concurrently,
                    # the later to record always sees the earlier one's edge
                    self.store.commit(
                        self.tenant,
                        [],
                        [
                            Put(
                                NS_WAITS,
                                owner,
                                {
                                    "owner": owner,
                                    "lock": name,
                                    "since": now,
                                    "expires_at": now + round(remaining * 1e6),
                                },
                                ttl=remaining + 60.0,
                            )
                        ],
                        {"layer": "locks"},
                    )
                    recorded = name
                # Look once per new edge: a cycle closed later is found by whoever closes it, so
                # parties already waiting do not abort because of a refused newcomer.
                cycle = self._cycle(owner, name, holder) if holder != checked_holder else []
                checked_holder = holder
                if cycle:
                    raise Conflict(
                        f"deadlock: {_describe(cycle)}",
                        details={
                            "reason": "deadlock",
                            "cycle": [{"waiter": e.waiter, "lock": e.lock, "holder": e.holder} for e in cycle],
                        },
                    )
                time.sleep(min(pause, max(remaining, 0.0)))
                pause = min(pause * 2, 0.05)
        finally:
            if recorded is not None:
                self._forget_wait(owner, recorded)

    def _take(
        self,
        name: str,
        owner: str,
        ttl: float,
        old: dict[str, Any] | None,
        version: int | None,
        now: int,
        waited: bool,
    ) -> Lease | None:
        """Commit the lock to ``owner`` if it is still at ``version`` (``None``: never taken); ``None`` if not."""
        fencing = (old["fencing_token"] if old is not None else 0) + 1
        token = secrets.token_hex(16)
        expires = now + round(ttl * 1_000_000)
        doc = {
            "name": name,
            "held": True,
            "owner": owner,
            "token": token,
            "fencing_token": fencing,
            "expires_at": expires,
            "acquired_at": now,
        }
        check = Absent(NS_LOCKS, name) if version is None else VersionIs(NS_LOCKS, name, version)
        ops: list[Any] = [Put(NS_LOCKS, name, doc)]
        if waited:
            ops.append(Delete(NS_WAITS, owner))
        try:
            commit = self.store.commit(self.tenant, [check], ops, {"layer": "locks", "owner": owner})
        except Conflict:
            self._forget(name)
            return None
        self._remember(name, doc, commit.versions[(NS_LOCKS, name)])
        return Lease(name, owner, token, fencing, expires)

    def _forget_wait(self, owner: str, lock: str) -> None:
        item = self.store.get(self.tenant, NS_WAITS, owner)
        if item is None or item.value["lock"] != lock:
            return
        # on Conflict the owner started another wait meanwhile; that entry is its own
        with contextlib.suppress(Conflict):
            self.store.commit(
                self.tenant, [VersionIs(NS_WAITS, owner, item.version)], [Delete(NS_WAITS, owner)], {"layer": "locks"}
            )

    def _cycle(self, owner: str, lock: str, holder: str) -> list[WaitFor]:
        """The wait-for path from ``owner`` back to itself through ``lock``, or ``[]``."""
        path = [WaitFor(owner, lock, holder)]
        seen = {owner}
        current = holder
        for _ in range(_MAX_DEPTH):
            if current == owner:
                return path
            if current in seen:
                return []  # a cycle not through owner: deadlocks() reports it
            seen.add(current)
            w = self.store.get(self.tenant, NS_WAITS, current)
            if w is None:
                return []
            lk = w.value["lock"]
            nxt = self._live_holder(self.store.get(self.tenant, NS_LOCKS, lk), self.store.clock.now_us())
            if nxt is None:
                return []
            path.append(WaitFor(current, lk, nxt))
            current = nxt
        return []

    # ------------------------------------------------------------ holding

    @staticmethod
    def _lease_ref(lease: Lease | str, token: str | None) -> tuple[str, str]:
        if isinstance(lease, Lease):
            return lease.name, lease.token
        name = check_key(lease, "name")
        if type(token) is not str or not token:
            raise InvalidArgument("token", "the lease token is required")
        return name, token

    def _held(self, name: str, token: str, cached: bool) -> tuple[dict[str, Any], int, int]:
        """The lock's document and version if ``token`` holds it now (from this handle's memory when
        ``cached``, else read), and the time; raises ``Conflict`` if it does not."""
        now = self.store.clock.now_us()
        known = self._recall(name) if cached else None
        if known is not None:
            doc, version = known
        else:
            item = self.store.get(self.tenant, NS_LOCKS, name)
            doc, version = ({}, 0) if item is None else (item.value, item.version)
        if not doc.get("held") or not same_secret(doc["token"] or "", token):
            raise Conflict(
                f"lock {name}: the lease token is not current (released, or taken over after expiry)",
                details={"reason": "stale_lease", "lock": name},
            )
        if doc["expires_at"] <= now:
            raise Conflict(f"lock {name}: the lease expired", details={"reason": "lease_expired", "lock": name})
        return dict(doc), version, now

    def _rewrite(self, name: str, token: str, change: Callable[[dict[str, Any], int], None]) -> dict[str, Any]:
        """Apply ``change(doc, now)`` to the lock ``token`` holds, in one commit guarded by its version.

        The version this handle wrote last is tried first, without a read; if the lock changed since
        (or this handle never wrote it), it is read and the token checked against what is stored.
        """
        for cached in (True, False):
            try:
                doc, version, now = self._held(name, token, cached)
            except Conflict:
                if cached:
                    continue
                raise
            change(doc, now)
            try:
                commit = self.store.commit(
                    self.tenant, [VersionIs(NS_LOCKS, name, version)], [Put(NS_LOCKS, name, doc)], {"layer": "locks"}
                )
            except Conflict as exc:
                self._forget(name)
                if cached:
                    continue
                raise Conflict(f"lock {name}: changed concurrently", details={"reason": "stale_lease"}) from exc
            self._remember(name, doc, commit.versions[(NS_LOCKS, name)])
            return doc
        raise AssertionError("unreachable")

    def release(self, lease: Lease | str, token: str | None = None) -> None:
        """Release a lease (a ``Lease``, or the lock name and its token). A token that is no longer
        current (released, expired, or the lock was taken over) raises ``Conflict``."""
        name, tok = self._lease_ref(lease, token)

        def change(doc: dict[str, Any], now: int) -> None:
            doc.update(held=False, token=None, expires_at=now, released_at=now)

        self._rewrite(name, tok, change)

    def extend(self, lease: Lease | str, ttl: float, token: str | None = None) -> Lease:
        """Extend a current lease to ``ttl`` seconds from now; returns it with the new expiry (same
        token and fencing token). A stale or expired lease raises ``Conflict``."""
        ttl = _seconds(ttl, "ttl", MAX_TTL_SECONDS, positive=True)
        name, tok = self._lease_ref(lease, token)

        def change(doc: dict[str, Any], now: int) -> None:
            doc["expires_at"] = now + round(ttl * 1_000_000)

        doc = self._rewrite(name, tok, change)
        return Lease(name, doc["owner"], tok, doc["fencing_token"], doc["expires_at"])

    @contextmanager
    def hold(self, name: str, ttl: float = 30.0, owner: str | None = None, wait: float = 0.0) -> Iterator[Lease]:
        """``with locks.hold(name, ttl) as lease:`` acquire, run the block, release.

        If the lease was lost meanwhile, leaving the block raises ``Conflict`` (the block was not
        protected to its end), unless the block is already raising.
        """
        lease = self.acquire(name, owner, ttl, wait)
        ok = False
        try:
            yield lease
            ok = True
        finally:
            try:
                self.release(lease)
            except Conflict:
                if ok:
                    raise

    def check_fence(self, name: str, fencing_token: int) -> None:
        """Raise ``Conflict`` unless ``fencing_token`` is the newest one issued for ``name``: a resource
        guarded by the lock calls this to refuse writes from a holder that was paused past its lease."""
        name = check_key(name, "name")
        if type(fencing_token) is not int or fencing_token < 1:
            raise InvalidArgument("fencing_token", "must be a positive integer from a Lease")
        item = self.store.get(self.tenant, NS_LOCKS, name)
        if item is None:
            raise NotFound(f"lock {name} was never taken")
        newest = item.value["fencing_token"]
        if fencing_token != newest:
            raise Conflict(
                f"lock {name}: fencing token {fencing_token} is stale (newest is {newest})",
                details={"reason": "stale_fencing_token", "lock": name, "newest": newest, "given": fencing_token},
            )

    # ------------------------------------------------------------ the wait-for graph

    def waits(self) -> list[WaitFor]:
        """Every current edge of the wait-for graph (waiters whose lock is held by someone)."""
        entries: list[Item] = []
        while True:
            page = self.store.scan(self.tenant, NS_WAITS, after=entries[-1].key if entries else None, limit=1000)
            entries.extend(page)
            if len(page) < 1000:
                break
        if not entries:
            return []
        now = self.store.clock.now_us()
        lock_names = sorted({e.value["lock"] for e in entries})
        holders: dict[str, str | None] = {}
        for i in range(0, len(lock_names), 1000):
            chunk = lock_names[i : i + 1000]
            for n, it in zip(chunk, self.store.get_many(self.tenant, [(NS_LOCKS, n) for n in chunk]), strict=True):
                holders[n] = self._live_holder(it, now)
        out = []
        for e in entries:
            h = holders.get(e.value["lock"])
            if h is not None:
                out.append(WaitFor(e.key, e.value["lock"], h))
        return out

    def deadlocks(self) -> list[list[WaitFor]]:
        """Every cycle of the wait-for graph, each once, as the list of its edges."""
        edges = {e.waiter: e for e in self.waits()}
        cycles: list[list[WaitFor]] = []
        done: set[str] = set()
        for start in sorted(edges):
            if start in done:
                continue
            path: list[str] = []
            index: dict[str, int] = {}
            node: str | None = start
            while node is not None and node in edges and node not in done and node not in index:
                index[node] = len(path)
                path.append(node)
                node = edges[node].holder
            if node is not None and node in index:
                members = path[index[node] :]
                first = members.index(min(members))
                members = members[first:] + members[:first]
                cycles.append([edges[m] for m in members])
            done.update(path)
        return cycles

    def cleanup_expired(self) -> int:
        """Mark every lock whose lease expired as released; returns how many. (Expired locks are free
        to acquire even before this runs; this keeps ``state`` and listings tidy.)"""
        freed = 0
        after: str | None = None
        while True:
            page = self.store.scan(self.tenant, NS_LOCKS, after=after, limit=1000)
            now = self.store.clock.now_us()
            for item in page:
                v = item.value
                if v["held"] and v["expires_at"] <= now:
                    doc = dict(v)
                    doc.update(held=False, token=None)
                    try:
                        self.store.commit(
                            self.tenant,
                            [VersionIs(NS_LOCKS, item.key, item.version)],
                            [Put(NS_LOCKS, item.key, doc)],
                            {"layer": "locks"},
                        )
                        freed += 1
                    except Conflict:
                        pass  # taken or extended meanwhile
            if len(page) < 1000:
                return freed
            after = page[-1].key
