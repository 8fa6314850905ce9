"""Sync: clock algebra, resolvers, read repair, conflict storms, shared hot state and route health."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stateline import FakeClock, InvalidArgument
from stateline.sync import (
    CausalResolver,
    ConflictHistory,
    CustomResolver,
    InMemoryHub,
    LamportClock,
    LastWriteWins,
    Ordering,
    RedisProvider,
    RouteHealthModel,
    SharedState,
    StoreProvider,
    VectorClock,
    Versioned,
    VersionResolver,
    read_repair,
)
from tests.conftest import Backend, require_service

NODES = st.sampled_from(["a", "b", "c", "d"])
CLOCKS = st.dictionaries(NODES, st.integers(0, 5)).map(VectorClock)

# ------------------------------------------------------------------ clocks


def test_lamport_clock() -> None:
    c = LamportClock()
    assert c.tick() == 1
    assert c.observe(10) == 11
    assert c.observe(3) == 12
    with pytest.raises(InvalidArgument):
        c.observe(-1)


@given(st.integers(0, 100), st.lists(st.integers(0, 1000), max_size=10))
def test_lamport_observe_is_after_both(start: int, remotes: list[int]) -> None:
    c = LamportClock(start)
    for r in remotes:
        before = c.value
        assert c.observe(r) > max(before, r)


@settings(max_examples=200)
@given(CLOCKS, CLOCKS, CLOCKS)
def test_vector_clock_algebra(a: VectorClock, b: VectorClock, c: VectorClock) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    assert a.merge(b).compare(a) in (Ordering.AFTER, Ordering.EQUAL)
    flipped = {Ordering.BEFORE: Ordering.AFTER, Ordering.AFTER: Ordering.BEFORE}
    assert b.compare(a) == flipped.get(a.compare(b), a.compare(b))
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)
    assert a.increment("a").compare(a) is Ordering.AFTER


def test_vector_clock_concurrency() -> None:
    base = VectorClock()
    x, y = base.increment("a"), base.increment("b")
    assert x.compare(y) is Ordering.CONCURRENT
    assert x.merge(y).compare(x) is Ordering.AFTER
    with pytest.raises(InvalidArgument):
        VectorClock({"a": -1})


# ------------------------------------------------------------------ resolvers


def test_last_write_wins_breaks_ties_by_node() -> None:
    lww = LastWriteWins()
    old, new = Versioned("old", 1, "z"), Versioned("new", 2, "a")
    assert lww.resolve(old, new).value == "new"
    assert lww.resolve(new, old).value == "new"
    assert lww.resolve(Versioned("x", 5, "a"), Versioned("y", 5, "b")).value == "y"


def test_version_and_causal_resolvers() -> None:
    assert VersionResolver().resolve(Versioned("v2", 0, "a", 2), Versioned("v1", 9, "b", 1)).value == "v2"
    assert VersionResolver().resolve(Versioned("x", 1, "a", 1), Versioned("y", 2, "b", 1)).value == "y"
    base = VectorClock({"a": 1})
    later = base.increment("b")
    causal = CausalResolver()
    got = causal.resolve(Versioned("later", 0, "b", clock=later), Versioned("early", 99, "a", clock=base))
    assert got.value == "later"  # causality beats a newer wall clock
    concurrent = causal.resolve(
        Versioned("left", 5, "a", clock=base.increment("a")), Versioned("right", 7, "b", clock=later)
    )
    assert concurrent.value == "right"  # concurrent: fallback (last write wins)
    assert concurrent.clock == base.increment("a").merge(later)
    custom = CustomResolver(lambda a, b: Versioned(a.value + b.value))
    assert custom.resolve(Versioned(1), Versioned(2)).value == 3
    with pytest.raises(InvalidArgument):
        CustomResolver(lambda a, b: "nope").resolve(Versioned(1), Versioned(2))  # type: ignore[arg-type,return-value]


def test_read_repair_writes_back_to_diverged_replicas() -> None:
    clock = FakeClock()
    history = ConflictHistory(storm_threshold=2, storm_window=10, clock=clock)
    written: dict[str, Versioned] = {}
    replicas = {"r1": Versioned("a", 1, "n1"), "r2": Versioned("b", 3, "n2"), "r3": Versioned("b", 3, "n2")}
    got = read_repair("doc", replicas, LastWriteWins(), written.__setitem__, history)
    assert got.value == "b"
    assert written == {"r1": got}
    assert len(history.history("doc")) == 1
    assert not history.storm("doc")
    read_repair("doc", replicas, LastWriteWins(), written.__setitem__, history)
    read_repair("doc", replicas, LastWriteWins(), written.__setitem__, history)
    assert history.storm("doc")
    clock.advance(11)
    assert not history.storm("doc")
    with pytest.raises(InvalidArgument):
        read_repair("doc", {}, LastWriteWins(), written.__setitem__)


# ------------------------------------------------------------------ shared state


def _nodes(n: int, hub: InMemoryHub, gamma: float = 0.3) -> list[SharedState]:
    return [SharedState(hub.provider(), gamma=gamma, node_id=f"n{i}", start=False) for i in range(n)]


def _round(nodes: list[SharedState]) -> None:
    for node in nodes:
        node.sync_once()
    for node in nodes:
        node.sync_once()


def test_two_nodes_blend_remote_updates() -> None:
    a, b = _nodes(2, InMemoryHub())
    _round([a, b])
    a.update("route", {"latency": 10.0, "errors": 1})
    b.update("route", {"latency": 20.0})
    b.update("only-b", {"x": 5})
    _round([a, b])
    assert a.get("route") == pytest.approx({"latency": 0.3 * 20 + 0.7 * 10, "errors": 1.0})
    assert b.get("route") == pytest.approx({"latency": 0.3 * 10 + 0.7 * 20, "errors": 1.0})
    assert a.get("only-b") == {"x": 5.0}
    _round([a, b])  # merges are not echoed back
    assert a.get("route") == pytest.approx({"latency": 13.0, "errors": 1.0})


def test_three_nodes_converge_on_blended_values() -> None:
    nodes = _nodes(3, InMemoryHub(), gamma=0.5)
    _round(nodes)
    nodes[0].update("k", {"v": 0.0})
    _round(nodes)
    nodes[1].update("k", {"v": 8.0})
    _round(nodes)
    # n0 and n2 blend n1's 8 into their 0 at gamma 0.5
    assert [n.get("k") for n in nodes] == [{"v": 4.0}, {"v": 8.0}, {"v": 4.0}]


def test_degrades_while_provider_is_down_and_catches_up() -> None:
    hub = InMemoryHub()
    a, b = _nodes(2, hub)
    _round([a, b])
    hub.down = True
    a.update("k", {"v": 10.0})
    assert not a.sync_once()
    assert a.degraded
    assert a.get("k") == {"v": 10.0}  # local reads and writes keep working
    a.update("k", {"v": 20.0})
    assert b.get("k") is None
    hub.down = False
    _round([a, b])
    assert not a.degraded
    assert b.get("k") == {"v": 20.0}


def test_background_thread_pushes_and_merges() -> None:
    hub = InMemoryHub()
    a = SharedState(hub.provider(), push_interval=0.01, node_id="a")
    b = SharedState(hub.provider(), push_interval=0.01, node_id="b")
    try:
        a.update("k", {"v": 1.0})
        for _ in range(500):
            if b.get("k") is not None:
                break
            b._stop.wait(0.01)
        assert b.get("k") == {"v": 1.0}
    finally:
        a.close()
        b.close()


def test_bad_updates_are_refused() -> None:
    (a,) = _nodes(1, InMemoryHub())
    for bad in ({}, {"v": "x"}, {"v": float("nan")}, {"": 1}, "nope"):
        with pytest.raises(InvalidArgument):
            a.update("k", bad)  # type: ignore[arg-type]
    assert a.get("k") is None
    with pytest.raises(InvalidArgument):
        SharedState(InMemoryHub().provider(), gamma=1.5, start=False)


def test_bad_settings_are_refused_by_name() -> None:
    shared = SharedState(InMemoryHub().provider(), start=False)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: SharedState(InMemoryHub().provider(), node_id="", start=False), "node_id"),
        (lambda: ConflictHistory(keep=0), "keep"),
        (lambda: ConflictHistory(storm_threshold="10"), "storm_threshold"),  # type: ignore[arg-type]
        (lambda: ConflictHistory(storm_window=float("nan")), "storm_window"),
        (lambda: ConflictHistory(clock=5), "clock"),  # type: ignore[arg-type]
        (lambda: RouteHealthModel(shared, alpha="0.2"), "alpha"),  # type: ignore[arg-type]
        (lambda: RouteHealthModel(shared, half_life=0), "half_life"),
        (lambda: RouteHealthModel(shared, clock=object()), "clock"),  # type: ignore[arg-type]
        (lambda: RouteHealthModel("shared"), "shared"),  # type: ignore[arg-type]
        (lambda: Versioned(1, timestamp=1.5), "timestamp"),  # type: ignore[arg-type]
        (lambda: Versioned(1, clock={"n": 1}), "clock"),  # type: ignore[arg-type]
        (lambda: VectorClock({"n": 1}).merge({"n": 2}), "other"),  # type: ignore[arg-type]
        (lambda: VectorClock().get(""), "node"),
    ]
    for make, field in cases:
        with pytest.raises(InvalidArgument) as err:
            make()
        assert err.value.field == field


def test_store_provider_shares_through_the_change_feed(backend: Backend) -> None:
    store = backend.open()
    a = SharedState(StoreProvider(store, "sync-test"), node_id="a", start=False)
    b = SharedState(StoreProvider(backend.open(), "sync-test"), node_id="b", start=False)
    a.update("route", {"latency": 10.0})
    b.update("route", {"latency": 30.0})
    _round([a, b])
    assert a.get("route") == pytest.approx({"latency": 16.0})
    assert b.get("route") == pytest.approx({"latency": 24.0})


def test_store_provider_catches_up_from_the_items_when_the_feed_was_trimmed(backend: Backend) -> None:
    store = backend.open()
    writer = StoreProvider(store, "sync-test")
    for i in range(5):
        writer.publish("w", {"route": {"latency": float(i)}, f"other{i}": {"n": 1.0}})
    writer.publish("r", {"route": {"latency": 99.0}})  # the reader's own, which it skips
    store.trim_changes("sync-test", 4)
    reader = StoreProvider(backend.open(), "sync-test")
    got = sorted(reader.poll("r"))
    expected = [("w", "other0", {"n": 1.0}), ("w", "other1", {"n": 1.0}), ("w", "other2", {"n": 1.0})]
    expected += [("w", "other3", {"n": 1.0}), ("w", "other4", {"n": 1.0}), ("w", "route", {"latency": 4.0})]
    assert got == expected  # the latest vector of every (node, key), from the items
    writer.publish("w", {"route": {"latency": 5.0}})
    assert reader.poll("r") == [("w", "route", {"latency": 5.0})]  # then the feed again


@pytest.fixture
def redis_channel() -> Iterator[str]:
    require_service("redis")
    channel = f"sl-sync-{uuid.uuid4().hex[:10]}"
    yield channel
    import redis  # noqa: PLC0415 - only these tests need the client

    r = redis.Redis(host="127.0.0.1", port=6379)
    r.delete(f"{channel}:state")
    r.close()


def _until(nodes: list[SharedState], done: Callable[[], bool]) -> None:
    """Pub/sub delivery is asynchronous: run sync rounds until ``done()`` (bounded)."""
    for _ in range(200):
        _round(nodes)
        if done():
            return
        time.sleep(0.02)


def test_redis_provider_converges_and_recovers_from_an_outage(redis_channel: str) -> None:
    from tests.faultproxy import FaultProxy  # noqa: PLC0415 - proxy only for this test

    with FaultProxy("127.0.0.1", 6379) as proxy:
        url = f"redis://{proxy.host}:{proxy.port}/0"
        a = SharedState(RedisProvider(url, redis_channel), node_id="a", start=False)
        b = SharedState(RedisProvider(url, redis_channel), node_id="b", start=False)
        try:
            _round([a, b])
            a.update("r", {"v": 10.0})
            b.update("r", {"v": 20.0})
            _until([a, b], lambda: a.get("r") != {"v": 10.0} and b.get("r") != {"v": 20.0})
            assert a.get("r") == pytest.approx({"v": 13.0})
            assert b.get("r") == pytest.approx({"v": 17.0})
            proxy.refuse()
            a.update("r", {"v": 100.0})
            assert not a.sync_once()
            assert not b.sync_once()
            assert a.degraded
            assert b.degraded
            assert a.get("r") == {"v": 100.0}
            proxy.restore()
            _until([a, b], lambda: b.get("r") != pytest.approx({"v": 17.0}))
            assert not a.degraded
            assert not b.degraded
            assert b.get("r") == pytest.approx({"v": 0.3 * 100 + 0.7 * 17})
        finally:
            a.close()
            b.close()


# ------------------------------------------------------------------ route health


def test_route_health_opens_on_failures_and_heals() -> None:
    clock = FakeClock()
    (node,) = _nodes(1, InMemoryHub())
    model = RouteHealthModel(node, half_life=10, open_scar=3, half_open_scar=1, clock=clock)
    h = model.observe("r1", 100)
    assert (h.resistance, h.momentum, h.state) == (100, 0, "closed")
    h = model.observe("r1", 200)
    assert h.resistance == pytest.approx(120)
    assert h.momentum == pytest.approx(0.2 * 20)
    for _ in range(3):
        h = model.observe("r1", 100, failed=True)
    assert h.state == "open"
    assert not model.allow("r1")
    clock.advance(10)  # one half-life: scar 3 -> 1.5
    assert model.health("r1").state == "half_open"
    assert model.allow("r1")
    clock.advance(20)
    assert model.health("r1").state == "closed"
    with pytest.raises(InvalidArgument):
        model.observe("r1", -1)


def test_route_health_is_shared_across_nodes() -> None:
    clock = FakeClock()
    a, b = _nodes(2, InMemoryHub(), gamma=1.0)
    _round([a, b])
    RouteHealthModel(a, clock=clock).observe("r", 50, failed=True)
    _round([a, b])
    assert RouteHealthModel(b, clock=clock).health("r").scar == pytest.approx(1.0)
