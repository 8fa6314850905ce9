"""Cluster sync: logical clocks, conflict resolvers, and the shared hot-state manager with its route-health model."""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from stateline.clock import Clock, checked_clock
from stateline.errors import ChangesTrimmed, InvalidArgument
from stateline.store.protocol import Store
from stateline.types import Put, check_key, check_list, check_namespace, check_number, check_tenant

__all__ = [
    "CausalResolver",
    "ConflictHistory",
    "CustomResolver",
    "InMemoryHub",
    "LamportClock",
    "LastWriteWins",
    "Ordering",
    "RedisProvider",
    "Resolver",
    "RouteHealth",
    "RouteHealthModel",
    "SharedState",
    "StateProvider",
    "StoreProvider",
    "VectorClock",
    "VersionResolver",
    "Versioned",
    "read_repair",
]

log = logging.getLogger("stateline.sync")


# ---------------------------------------------------------------- clocks


class LamportClock:
    """A Lamport clock: ``tick()`` before a local event or send, ``observe(t)`` on receipt. Thread-safe."""

    def __init__(self, start: int = 0) -> None:
        if type(start) is not int or start < 0:
            raise InvalidArgument("start", "must be a non-negative integer")
        self._value = start
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    def tick(self) -> int:
        """Advance for a local event; returns the new time."""
        with self._lock:
            self._value += 1
            return self._value

    def observe(self, remote: int) -> int:
        """Merge a received timestamp: ``max(local, remote) + 1``; returns the new time."""
        if type(remote) is not int or remote < 0:
            raise InvalidArgument("remote", "must be a non-negative integer")
        with self._lock:
            self._value = max(self._value, remote) + 1
            return self._value


class Ordering(enum.Enum):
    """How two vector clocks relate."""

    BEFORE = "before"
    AFTER = "after"
    EQUAL = "equal"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class VectorClock:
    """An immutable vector clock: node id -> counter (absent nodes count 0)."""

    counters: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.counters, Mapping):
            raise InvalidArgument(
                "counters", f"must be a mapping of node -> counter, got {type(self.counters).__name__}"
            )
        clean = {}
        for node, n in self.counters.items():
            _check_node(node)
            if type(n) is not int or n < 0:
                raise InvalidArgument("counter", f"must be a non-negative integer, got {n!r}")
            if n:
                clean[node] = n
        object.__setattr__(self, "counters", clean)

    def get(self, node: str) -> int:
        return self.counters.get(_check_node(node), 0)

    def increment(self, node: str) -> VectorClock:
        """This clock with ``node``'s counter one higher."""
        return VectorClock({**self.counters, node: self.get(node) + 1})

    def merge(self, other: VectorClock) -> VectorClock:
        """The element-wise maximum (the least clock after both)."""
        nodes = self.counters.keys() | _check_clock(other, "other").counters.keys()
        return VectorClock({n: max(self.get(n), other.get(n)) for n in nodes})

    def compare(self, other: VectorClock) -> Ordering:
        """``BEFORE`` if this clock happened before ``other``, ``AFTER``, ``EQUAL`` or ``CONCURRENT``."""
        nodes = self.counters.keys() | _check_clock(other, "other").counters.keys()
        less = any(self.get(n) < other.get(n) for n in nodes)
        more = any(self.get(n) > other.get(n) for n in nodes)
        if less and more:
            return Ordering.CONCURRENT
        if less:
            return Ordering.BEFORE
        if more:
            return Ordering.AFTER
        return Ordering.EQUAL

    def to_dict(self) -> dict[str, int]:
        return dict(self.counters)


def _check_node(node: object) -> str:
    if type(node) is not str or not node:
        raise InvalidArgument("node", f"must be a non-empty string, got {node!r:.80}")
    return node


def _check_clock(clock: object, field_name: str) -> VectorClock:
    if not isinstance(clock, VectorClock):
        raise InvalidArgument(field_name, f"must be a VectorClock, got {type(clock).__name__}")
    return clock


# ---------------------------------------------------------------- resolvers


@dataclass(frozen=True, slots=True)
class Versioned:
    """A replica's value with what resolvers compare: wall ``timestamp`` (µs), ``node``, ``version``, ``clock``."""

    value: Any
    timestamp: int = 0
    node: str = ""
    version: int = 0
    clock: VectorClock = field(default_factory=VectorClock)

    def __post_init__(self) -> None:
        for name in ("timestamp", "version"):
            if type(getattr(self, name)) is not int:
                raise InvalidArgument(name, f"must be an integer, got {getattr(self, name)!r:.80}")
        if type(self.node) is not str:
            raise InvalidArgument("node", f"must be a string, got {self.node!r:.80}")
        _check_clock(self.clock, "clock")


class Resolver(Protocol):
    """Chooses (or builds) the value that wins between two diverged replicas. Must be deterministic."""

    def resolve(self, a: Versioned, b: Versioned) -> Versioned: ...


class LastWriteWins:
    """The later ``timestamp`` wins; equal timestamps are broken by the larger ``node`` id."""

    def resolve(self, a: Versioned, b: Versioned) -> Versioned:
        return a if (a.timestamp, a.node) >= (b.timestamp, b.node) else b


class VersionResolver:
    """The higher ``version`` wins; equal versions go to ``fallback`` (last-write-wins by default)."""

    def __init__(self, fallback: Resolver | None = None) -> None:
        self.fallback: Resolver = fallback or LastWriteWins()

    def resolve(self, a: Versioned, b: Versioned) -> Versioned:
        if a.version != b.version:
            return a if a.version > b.version else b
        return self.fallback.resolve(a, b)


class CausalResolver:
    """The causally later value wins (vector clocks); concurrent values go to ``fallback``.

    The result carries the merged clock, so it dominates both inputs.
    """

    def __init__(self, fallback: Resolver | None = None) -> None:
        self.fallback: Resolver = fallback or LastWriteWins()

    def resolve(self, a: Versioned, b: Versioned) -> Versioned:
        order = a.clock.compare(b.clock)
        if order is Ordering.AFTER or order is Ordering.EQUAL:
            winner = a
        elif order is Ordering.BEFORE:
            winner = b
        else:
            winner = self.fallback.resolve(a, b)
        merged = a.clock.merge(b.clock)
        return Versioned(winner.value, winner.timestamp, winner.node, winner.version, merged)


class CustomResolver:
    """Wraps a user function ``fn(a, b) -> Versioned``."""

    def __init__(self, fn: Callable[[Versioned, Versioned], Versioned]) -> None:
        if not callable(fn):
            raise InvalidArgument("fn", "must be callable")
        self.fn = fn

    def resolve(self, a: Versioned, b: Versioned) -> Versioned:
        out = self.fn(a, b)
        if not isinstance(out, Versioned):
            raise InvalidArgument("resolver", f"must return a Versioned, got {type(out).__name__}")
        return out


@dataclass(frozen=True, slots=True)
class ConflictRecord:
    """One resolved conflict of an entity."""

    entity: str
    at: int
    winner: Versioned
    losers: tuple[Versioned, ...]


class ConflictHistory:
    """Conflicts per entity (the newest ``keep`` of each), with a storm signal.

    ``storm(entity)`` is true when more than ``storm_threshold`` conflicts of that entity were
    recorded within the last ``storm_window`` seconds.
    """

    def __init__(
        self, *, keep: int = 100, storm_threshold: int = 10, storm_window: float = 60.0, clock: Clock | None = None
    ) -> None:
        for name, n in (("keep", keep), ("storm_threshold", storm_threshold)):
            if type(n) is not int or n < 1:
                raise InvalidArgument(name, f"must be an integer >= 1, got {n!r:.80}")
        self.keep = keep
        self.storm_threshold = storm_threshold
        window = check_number(storm_window, "storm_window", 0, 365 * 86400, above=True, unit="seconds")
        self.storm_window_us = int(window * 1_000_000)
        self.clock = checked_clock(clock)
        self._records: dict[str, deque[ConflictRecord]] = {}
        self._lock = threading.Lock()

    def record(self, entity: str, winner: Versioned, losers: Iterable[Versioned]) -> ConflictRecord:
        entity = check_key(entity, "entity")
        if not isinstance(winner, Versioned):
            raise InvalidArgument("winner", f"must be a Versioned, got {type(winner).__name__}")
        lost = check_list(losers, "losers")
        for i, v in enumerate(lost):
            if not isinstance(v, Versioned):
                raise InvalidArgument(f"losers[{i}]", f"must be a Versioned, got {type(v).__name__}")
        rec = ConflictRecord(entity, self.clock.now_us(), winner, lost)
        with self._lock:
            self._records.setdefault(entity, deque(maxlen=self.keep)).append(rec)
        return rec

    def history(self, entity: str) -> list[ConflictRecord]:
        entity = check_key(entity, "entity")
        with self._lock:
            return list(self._records.get(entity, ()))

    def storm(self, entity: str) -> bool:
        entity = check_key(entity, "entity")
        since = self.clock.now_us() - self.storm_window_us
        with self._lock:
            recent = sum(1 for r in self._records.get(entity, ()) if r.at > since)
        return recent > self.storm_threshold


def read_repair(
    entity: str,
    replicas: Mapping[str, Versioned],
    resolver: Resolver,
    write_back: Callable[[str, Versioned], None],
    history: ConflictHistory | None = None,
) -> Versioned:
    """Resolve the replicas' values of ``entity``; every replica whose value differs from the
    result gets it written back through ``write_back(replica_name, resolved)``.

    Replicas are folded in name order, so the result does not depend on the mapping's order
    for any associative resolver.
    """
    if not replicas:
        raise InvalidArgument("replicas", "at least one replica is needed")
    names = sorted(replicas)
    resolved = replicas[names[0]]
    for name in names[1:]:
        resolved = resolver.resolve(resolved, replicas[name])
    diverged = [n for n in names if replicas[n] != resolved]
    if diverged and history is not None:
        history.record(entity, resolved, [replicas[n] for n in diverged])
    for name in diverged:
        write_back(name, resolved)
    return resolved


# ---------------------------------------------------------------- shared hot state


class StateProvider(Protocol):
    """Carries batched updates between nodes. Calls may raise; ``SharedState`` then degrades to local-only."""

    def publish(self, node: str, updates: Mapping[str, Mapping[str, float]]) -> None:
        """Send this node's updated vectors to the other nodes."""
        ...

    def poll(self, node: str) -> list[tuple[str, str, dict[str, float]]]:
        """Updates from other nodes since the last poll, as ``(node, key, vector)``."""
        ...

    def close(self) -> None: ...


class InMemoryHub:
    """A process-local message hub; ``provider()`` gives each node its endpoint. For tests and one process.

    Like the Redis provider, it keeps the latest vector of every (node, key), so a node that
    starts late catches up. ``down = True`` makes every endpoint raise, to exercise degradation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, list[tuple[str, str, dict[str, float]]]] = {}
        self._latest: dict[tuple[str, str], dict[str, float]] = {}
        self.down = False

    def provider(self) -> StateProvider:
        hub = self

        class _Endpoint:
            def publish(self, node: str, updates: Mapping[str, Mapping[str, float]]) -> None:
                hub._check()
                with hub._lock:
                    for k, v in updates.items():
                        hub._latest[(node, k)] = dict(v)
                    for other, queue in hub._queues.items():
                        if other != node:
                            queue.extend((node, k, dict(v)) for k, v in updates.items())

            def poll(self, node: str) -> list[tuple[str, str, dict[str, float]]]:
                hub._check()
                with hub._lock:
                    if node not in hub._queues:  # first poll: catch up on everything published so far
                        hub._queues[node] = []
                        return [(n, k, dict(v)) for (n, k), v in hub._latest.items() if n != node]
                    out = hub._queues[node]
                    hub._queues[node] = []
                    return out

            def close(self) -> None:
                return None

        return _Endpoint()

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("the in-memory hub is down")


class StoreProvider:
    """Shares state through a Store: each node writes its vectors as items, others follow the change feed.

    Works on every adapter (so a PostgreSQL deployment needs nothing else).
    """

    def __init__(self, store: Store, tenant: str = "system", namespace: str = "sync.shared") -> None:
        self.store = store
        self.tenant = check_tenant(tenant)
        self.namespace = check_namespace(namespace)
        self._cursor: int | None = None

    def publish(self, node: str, updates: Mapping[str, Mapping[str, float]]) -> None:
        ops = [Put(self.namespace, check_key(f"{key}@{node}"), dict(vec)) for key, vec in updates.items()]
        if ops:
            self.store.commit(self.tenant, ops=ops, meta={"sync_node": node})

    def poll(self, node: str) -> list[tuple[str, str, dict[str, float]]]:
        if self._cursor is None:
            self._cursor = 0
        out: list[tuple[str, str, dict[str, float]]] = []
        while True:
            try:
                changes = self.store.changes(self.tenant, self._cursor, 1000)
            except ChangesTrimmed:
                return out + self._catch_up(node)
            for change in changes:
                self._cursor = change.revision
                sender = change.meta.get("sync_node")
                if sender == node:
                    continue
                for op in change.ops:
                    if op.op == "put" and op.namespace == self.namespace and "@" in op.key:
                        key, origin = op.key.rsplit("@", 1)
                        out.append((origin, key, op.value))
            if len(changes) < 1000:
                return out

    def _catch_up(self, node: str) -> list[tuple[str, str, dict[str, float]]]:
        """Every other node's latest vectors, read from the items themselves (retention removed part
        of the feed this provider had not read); the feed is followed from before the read on."""
        self._cursor = self.store.revision(self.tenant)
        out: list[tuple[str, str, dict[str, float]]] = []
        for item in self.store.scan_all(self.tenant, self.namespace):
            key, _, origin = item.key.rpartition("@")
            if key and origin != node:
                out.append((origin, key, item.value))
        return out

    def close(self) -> None:
        return None


class RedisProvider:
    """Shares state through Redis: the latest vector of every (node, key) in one hash, updates on pub/sub.

    A node that (re)connects reads the hash to catch up, then follows the channel.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", channel: str = "stateline:sync", timeout: float = 0.5):
        import redis  # noqa: PLC0415 - optional provider; only its users need the client

        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.channel = check_key(channel, "channel")
        self.hash = f"{self.channel}:state"
        self._pubsub: Any = None

    def publish(self, node: str, updates: Mapping[str, Mapping[str, float]]) -> None:
        payload: dict[Any, Any] = {f"{key}@{node}": orjson.dumps(dict(vec)) for key, vec in updates.items()}
        if not payload:
            return
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.hash, mapping=payload)
        pipe.publish(self.channel, orjson.dumps({"node": node, "updates": {k: dict(v) for k, v in updates.items()}}))
        pipe.execute()

    def poll(self, node: str) -> list[tuple[str, str, dict[str, float]]]:
        out: list[tuple[str, str, dict[str, float]]] = []
        self._redis.ping()  # pub/sub reads can stay silent on a dead link; a round trip tells
        if self._pubsub is None:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8.2
            pubsub.subscribe(self.channel)
            self._pubsub = pubsub
            for field_name, raw in self._redis.hgetall(self.hash).items():
                name = field_name.decode() if isinstance(field_name, bytes) else str(field_name)
                key, origin = name.rsplit("@", 1)
                if origin != node:
                    out.append((origin, key, orjson.loads(raw)))
        try:
            while True:
                msg = self._pubsub.get_message(timeout=0.0)
                if msg is None:
                    return out
                body = orjson.loads(msg["data"])
                if body["node"] != node:
                    out.extend((body["node"], k, v) for k, v in body["updates"].items())
        except Exception:
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None  # resubscribe and catch up from the hash on the next poll
            raise

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
        self._redis.close()


def _check_vector(vector: object) -> dict[str, float]:
    if not isinstance(vector, Mapping) or not vector:
        raise InvalidArgument("vector", "must be a non-empty mapping of field -> number")
    out: dict[str, float] = {}
    for k, v in vector.items():
        if type(k) is not str or not k:
            raise InvalidArgument("vector", "field names must be non-empty strings")
        if type(v) not in (int, float) or not math.isfinite(v):
            raise InvalidArgument("vector", f"field {k!r} must be a finite number, got {v!r}")
        out[k] = float(v)
    return out


class SharedState:
    """Hot numeric state shared across nodes without blocking on the network.

    * ``get(key)`` reads only the local cache (a plain dict look-up; the returned mapping is never
      mutated afterwards, so treat it as read-only).
    * ``update(key, vector)`` writes locally and queues the vector for the next push.
    * A background thread pushes queued updates every ``push_interval`` seconds and merges remote
      updates per numeric field as ``merged = gamma * remote + (1 - gamma) * local`` (a field the
      local node does not have is taken as is). Merges are not pushed back, so nothing echoes.
    * While the provider fails, ``get``/``update`` keep working on local state, a warning is
      logged once, and ``degraded`` is true. On recovery the node re-publishes its whole state and
      resumes merging.
    """

    def __init__(
        self,
        provider: StateProvider,
        gamma: float = 0.3,
        push_interval: float = 0.1,
        node_id: str | None = None,
        *,
        start: bool = True,
    ) -> None:
        self.provider = provider
        self.gamma = check_number(gamma, "gamma", 0, 1)
        self.push_interval = check_number(push_interval, "push_interval", 0, 60, above=True, unit="seconds")
        self.node_id = uuid.uuid4().hex[:12] if node_id is None else check_key(node_id, "node_id")
        self._local: dict[str, dict[str, float]] = {}
        self._pending: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.degraded = False
        self.pushes = 0
        self.merges = 0
        self.failures = 0
        if start:
            self.start()

    def get(self, key: str) -> Mapping[str, float] | None:
        """The local vector of ``key`` (or ``None``); never touches the network."""
        try:
            return self._local.get(key)
        except TypeError:  # unhashable: no key can be it
            raise InvalidArgument("key", f"must be a string, got {type(key).__name__}") from None

    def keys(self) -> list[str]:
        return list(self._local)

    def update(self, key: str, vector: Mapping[str, float]) -> None:
        """Set ``key`` locally and queue it for the next push."""
        check_key(key)
        vec = _check_vector(vector)
        with self._lock:
            self._local[key] = vec
            self._pending[key] = vec

    def sync_once(self) -> bool:
        """One push-and-merge round (the background thread calls this); returns False while degraded."""
        with self._lock:
            batch, self._pending = self._pending, {}
            if self.degraded:
                batch = {**self._local, **batch}  # recovering: re-publish everything
        try:
            if batch:
                self.provider.publish(self.node_id, batch)
                self.pushes += 1
            remote = self.provider.poll(self.node_id)
        except Exception as exc:  # noqa: BLE001 - any provider failure degrades to local-only, never raises
            with self._lock:
                for k, v in batch.items():
                    self._pending.setdefault(k, v)
            self.failures += 1
            if not self.degraded:
                log.warning("shared state provider unavailable, continuing on local state: %s", exc)
                self.degraded = True
            return False
        if self.degraded:
            log.warning("shared state provider is back; re-published local state")
            self.degraded = False
        if remote:
            self._merge(remote)
        return True

    def _merge(self, remote: list[tuple[str, str, dict[str, float]]]) -> None:
        g = self.gamma
        with self._lock:
            for _node, key, vec in remote:
                try:
                    clean = _check_vector(vec)
                except InvalidArgument:
                    continue
                local = self._local.get(key)
                if local is None:
                    merged = clean
                else:
                    merged = dict(local)
                    for f, rv in clean.items():
                        lv = local.get(f)
                        merged[f] = rv if lv is None else g * rv + (1.0 - g) * lv
                self._local[key] = merged
                self.merges += 1

    def start(self) -> None:
        """Start the background push/merge thread (done by the constructor unless ``start=False``)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"stateline-sync-{self.node_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.push_interval):
            self.sync_once()

    def close(self) -> None:
        """Stop the thread after one last push attempt, and close the provider."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(Exception):
            self.sync_once()
        with contextlib.suppress(Exception):
            self.provider.close()


# ---------------------------------------------------------------- route health


@dataclass(frozen=True, slots=True)
class RouteHealth:
    """One route's health and the circuit-breaker decision taken from it."""

    route: str
    resistance: float
    momentum: float
    scar: float
    state: str  # "closed" (use it), "open" (avoid it) or "half_open" (probe it)


class RouteHealthModel:
    """Route health from latency and failures, shared across nodes through ``SharedState``.

    Per route, on each observation at time t (seconds) with latency L (ms):

    * resistance (smoothed latency):  R <- R + alpha * (L - R)             (R starts at the first L)
    * momentum (trend of resistance): M <- beta * M + (1 - beta) * (R_new - R_old)
    * scar tissue:                    S <- S * 2^(-(t - t_last) / half_life) (+ 1 on a failure)

    The circuit is ``open`` while S >= open_scar, or while R > max_latency and M > 0 (slow and
    getting slower); ``half_open`` while S >= half_open_scar; otherwise ``closed``. Scar decays
    between observations, so an open route heals by itself after a few half-lives without failures.
    """

    def __init__(
        self,
        shared: SharedState,
        *,
        alpha: float = 0.2,
        beta: float = 0.8,
        half_life: float = 30.0,
        open_scar: float = 3.0,
        half_open_scar: float = 1.0,
        max_latency: float = 1000.0,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(shared, SharedState):
            raise InvalidArgument("shared", f"must be a SharedState, got {type(shared).__name__}")
        alpha = check_number(alpha, "alpha", 0, 1, above=True)
        beta = check_number(beta, "beta", 0, 1)
        half_life = check_number(half_life, "half_life", 0, math.inf, above=True, unit="seconds")
        half_open_scar = check_number(half_open_scar, "half_open_scar", 0, math.inf, above=True)
        open_scar = check_number(open_scar, "open_scar", 0, math.inf, above=True)
        max_latency = check_number(max_latency, "max_latency", 0, math.inf)
        if beta == 1 or open_scar <= half_open_scar:
            raise InvalidArgument("route health", "need beta < 1 and open_scar > half_open_scar")
        self.shared = shared
        self.alpha, self.beta, self.half_life = alpha, beta, half_life
        self.open_scar, self.half_open_scar, self.max_latency = open_scar, half_open_scar, max_latency
        self.clock = checked_clock(clock)

    def _decayed_scar(self, vec: Mapping[str, float], now_s: float) -> float:
        scar = vec.get("scar", 0.0)
        last = vec.get("t", now_s)
        return scar * math.pow(2.0, -max(0.0, now_s - last) / self.half_life)

    def observe(self, route: str, latency_ms: float, *, failed: bool = False) -> RouteHealth:
        """Record one call's latency (and whether it failed) and return the new health."""
        route = check_key(route, "route")
        if type(failed) is not bool:
            raise InvalidArgument("failed", f"must be true or false, got {failed!r:.80}")
        latency_ms = check_number(latency_ms, "latency_ms", 0, math.inf)
        now_s = self.clock.now_us() / 1_000_000
        vec = self.shared.get(route) or {}
        old_r = vec.get("resistance", float(latency_ms))
        new_r = old_r + self.alpha * (latency_ms - old_r)
        momentum = self.beta * vec.get("momentum", 0.0) + (1 - self.beta) * (new_r - old_r)
        scar = self._decayed_scar(vec, now_s) + (1.0 if failed else 0.0)
        self.shared.update(route, {"resistance": new_r, "momentum": momentum, "scar": scar, "t": now_s})
        return self.health(route)

    def health(self, route: str) -> RouteHealth:
        """The route's current health (scar decayed to now) and circuit state."""
        vec = self.shared.get(check_key(route, "route")) or {}
        now_s = self.clock.now_us() / 1_000_000
        r, m, s = vec.get("resistance", 0.0), vec.get("momentum", 0.0), self._decayed_scar(vec, now_s)
        if s >= self.open_scar or (r > self.max_latency and m > 0):
            state = "open"
        elif s >= self.half_open_scar:
            state = "half_open"
        else:
            state = "closed"
        return RouteHealth(route, r, m, s, state)

    def allow(self, route: str) -> bool:
        """Whether to send traffic to ``route`` now (``half_open`` allows probes)."""
        return self.health(route).state != "open"
