"""Redis-specific behaviour: key layout and hash tags, the Lua commit's exactness, expiry backstop, faults."""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from stateline import (
    Absent,
    Append,
    Conflict,
    Delete,
    FakeClock,
    Incr,
    InvalidArgument,
    NewEvent,
    Put,
    StreamAt,
    Trim,
    Unavailable,
    VersionIs,
    open_store,
)
from stateline.store.memory import MemoryStore
from stateline.store.protocol import (
    MAX_INT,
    ChangeRecorder,
    PreparedAppend,
    PreparedDelete,
    PreparedIncr,
    PreparedPut,
    PreparedTrim,
)
from stateline.store.redis import RedisStore
from tests.conftest import IN_CI, require_service
from tests.faultproxy import FaultProxy

T = "acme"


@pytest.fixture
def prefix() -> Iterator[str]:
    require_service("redis")
    name = f"sl-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10)
    try:
        # also the keys of prefixes derived from this one (``<name>-<suffix>``, one per Hypothesis example)
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def opened() -> Iterator[Callable[..., RedisStore]]:
    stores: list[RedisStore] = []

    def open_(url: str, **options: Any) -> RedisStore:
        s = open_store(url, **options)
        assert isinstance(s, RedisStore)
        stores.append(s)
        return s

    yield open_
    for s in stores:
        s.close()


@pytest.fixture
def rstore(prefix: str, clock: FakeClock, opened: Callable[..., RedisStore]) -> RedisStore:
    return opened(f"redis://127.0.0.1:6379/0?prefix={prefix}", clock=clock)


def _keys(raw: redis.Redis, prefix: str) -> list[str]:
    return sorted(k.decode() for k in raw.scan_iter(match=f"{prefix}:*", count=1000))


# ------------------------------------------------------------------ layout


def test_every_tenant_key_carries_the_prefix_and_one_hash_tag(
    rstore: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    rstore.commit(
        T,
        ops=[
            Put("docs", "a:b|c", 1, ttl=60),
            Incr("ctr", "n"),
            Append("runs:r1", [NewEvent("x")]),
            Append("runs:r2", [NewEvent("y")]),
        ],
    )
    rstore.commit("other", ops=[Put("docs", "a", 1)])
    keys = _keys(raw, prefix)
    assert f"{prefix}:tenants" in keys
    tenant_keys = [k for k in keys if k != f"{prefix}:tenants"]
    acme = [k for k in tenant_keys if k.startswith(f"{prefix}:{{acme}}:")]
    other = [k for k in tenant_keys if k.startswith(f"{prefix}:{{other}}:")]
    assert len(acme) + len(other) == len(tenant_keys)
    assert len(acme) >= 10  # rev, changes, feed, seqs, streams, nss, exp, items, indexes, streams
    assert {key_slot(k.encode()) for k in acme} == {key_slot(b"{acme}")}
    assert {key_slot(k.encode()) for k in other} == {key_slot(b"{other}")}


def test_default_prefix_and_url_options(opened: Callable[..., RedisStore]) -> None:
    require_service("redis")
    s = opened("redis://127.0.0.1:6379/0")
    assert s._t("acme") == "stateline:{acme}:"
    with pytest.raises(InvalidArgument) as e:
        open_store("redis://127.0.0.1:6379/0?prefix=a{b}")
    assert e.value.field == "prefix"
    with pytest.raises(InvalidArgument) as e:
        open_store("redis://127.0.0.1:6379/0?nonsense=1")
    assert e.value.field == "url"
    with pytest.raises(InvalidArgument) as e:
        open_store("redis://127.0.0.1:6379/0?socket_timeout=-1")
    assert e.value.field == "socket_timeout"
    with pytest.raises(InvalidArgument) as e:
        open_store("redis://127.0.0.1:6379/0?watch=carrier-pigeon")
    assert e.value.field == "watch"
    beyond = opened("redis://127.0.0.1:6379/999")  # a database the server does not have: found at the first call
    with pytest.raises(InvalidArgument, match="no such database") as e:
        beyond.commit("acme", ops=[Put("ns", "k", 1)])
    assert e.value.field == "url"
    tls = opened("rediss://127.0.0.1:6390/0?prefix=x&ssl_cert_reqs=none&max_value_bytes=10")
    assert tls.max_value_bytes == 10  # nothing connects until the first call


def test_change_record_is_byte_identical_to_the_shared_recorder(
    rstore: RedisStore, raw: redis.Redis, prefix: str, clock: FakeClock
) -> None:
    rstore.commit(T, ops=[Put("docs", "old", {"v": 1}), Append("s", [NewEvent("e")])])
    prepared = rstore.prepare(
        T,
        ops=[
            Put("docs", 'quote"back\\slash é 𝄞', {"z": [1.5, None, True, "ü"]}, ttl=3),
            Put("docs", "old", 7),
            Delete("docs", "old"),
            Delete("docs", "never"),
            Incr("ctr", "n", -3, ttl=5),
            Incr("ctr", "n", 10),
            Append("s", [NewEvent("a.b:c/d-e", {"k": "v"}, {"m": 1}), NewEvent("f")]),
            Trim("s", 2),
        ],
        meta={"actor": "ann", "reason": "ünïcode"},
    )
    commit = rstore.commit_prepared(prepared)
    assert commit.revision == 2
    now = clock.now_us()
    rec = ChangeRecorder()
    rec.put("docs", 'quote"back\\slash é 𝄞', 1, orjson.dumps({"z": [1.5, None, True, "ü"]}), now + 3_000_000)
    rec.put("docs", "old", 2, b"7", None)
    rec.delete("docs", "old", 2)
    rec.delete("docs", "never", 0)
    rec.incr("ctr", "n", 1, -3, now + 5_000_000)
    rec.incr("ctr", "n", 2, 7, now + 5_000_000)
    ops = prepared.ops
    assert isinstance(ops[6], PreparedAppend)
    rec.append("s", 2, ops[6].events)
    rec.trim("s", 2)
    stored = raw.hget(f"{prefix}:{{{T}}}:c", "2")
    assert stored == rec.body(now, prepared.meta)
    assert [type(o) for o in ops] == [PreparedPut] * 2 + [PreparedDelete] * 2 + [PreparedIncr] * 2 + [
        PreparedAppend,
        PreparedTrim,
    ]
    assert commit.versions == {("docs", 'quote"back\\slash é 𝄞'): 1, ("docs", "old"): 0, ("docs", "never"): 0,
                               ("ctr", "n"): 2}  # fmt: skip
    assert commit.counters == {("ctr", "n"): 7}
    assert commit.seqs == {"s": 3}


# ------------------------------------------------------------------ exact integers and semantics vs memory

BIG = st.one_of(
    st.integers(min_value=-MAX_INT, max_value=MAX_INT),
    st.integers(min_value=2**53 - 5, max_value=2**53 + 5),
    st.integers(min_value=MAX_INT - 5, max_value=MAX_INT),
    st.integers(min_value=-MAX_INT, max_value=-MAX_INT + 5),
    st.integers(min_value=-20, max_value=20),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=BIG, steps=st.lists(BIG, min_size=1, max_size=4))
def test_incr_is_exact_64_bit_arithmetic(rstore: RedisStore, start: int, steps: list[int]) -> None:
    key = uuid.uuid4().hex
    rstore.commit(T, ops=[Put("n", key, start)])
    expected = start
    version = 1
    for by in steps:
        if -MAX_INT <= expected + by <= MAX_INT:
            c = rstore.commit(T, ops=[Incr("n", key, by)])
            expected += by
            version += 1
            assert c.counters[("n", key)] == expected
        else:
            with pytest.raises(InvalidArgument, match="overflow"):
                rstore.commit(T, ops=[Incr("n", key, by)])
        item = rstore.get(T, "n", key)
        assert item is not None
        assert (item.value, item.version) == (expected, version)


def test_incr_accepts_a_stored_value_just_above_the_64_bit_range(rstore: RedisStore) -> None:
    rstore.commit(T, ops=[Put("n", "k", 2**63)])  # JSON allows it; only the result must fit
    with pytest.raises(InvalidArgument, match="overflow"):
        rstore.commit(T, ops=[Incr("n", "k", 0)])
    assert rstore.commit(T, ops=[Incr("n", "k", -1)]).counters[("n", "k")] == MAX_INT
    for value in (1.0, "1", [1], None, True):
        rstore.commit(T, ops=[Put("n", "bad", value)])
        with pytest.raises(InvalidArgument, match="non-integer"):
            rstore.commit(T, ops=[Incr("n", "bad")])


OPS = st.lists(
    st.one_of(
        st.builds(Put, st.just("ns"), st.sampled_from("abc"), st.integers(-3, 3), st.sampled_from([None, 1, 2])),
        st.builds(Delete, st.just("ns"), st.sampled_from("abc")),
        st.builds(Incr, st.just("ns"), st.sampled_from("abc"), st.integers(-2, 2), st.sampled_from([None, 1, 2])),
        st.builds(Append, st.sampled_from(["s1", "s2"]), st.lists(st.builds(NewEvent, st.just("t")), min_size=1,
                                                                     max_size=2)),
        st.builds(Trim, st.sampled_from(["s1", "s2"]), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=5,
)  # fmt: skip
CHECKS = st.lists(
    st.one_of(
        st.builds(VersionIs, st.just("ns"), st.sampled_from("abc"), st.integers(1, 3)),
        st.builds(Absent, st.just("ns"), st.sampled_from("abc")),
        st.builds(StreamAt, st.sampled_from(["s1", "s2"]), st.integers(0, 3)),
    ),
    max_size=2,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(CHECKS, OPS, st.sampled_from([0, 0, 1.5])), min_size=1, max_size=8))
def test_same_results_and_feed_as_the_memory_adapter(
    prefix: str, opened: Callable[..., RedisStore], steps: list[Any]
) -> None:
    clock = FakeClock()
    mem = MemoryStore(clock=clock)
    red = opened(f"redis://127.0.0.1:6379/0?prefix={prefix}-{uuid.uuid4().hex[:6]}", clock=clock)
    for checks, ops, advance in steps:
        outcomes = []
        for s in (mem, red):
            try:
                outcomes.append(s.commit(T, checks, ops))
            except (Conflict, InvalidArgument) as exc:
                outcomes.append((type(exc), getattr(exc, "failures", None), str(exc)))
        assert outcomes[0] == outcomes[1]
        clock.advance(advance)
        assert mem.scan(T, "ns") == red.scan(T, "ns")
        assert mem.get_many(T, [("ns", k) for k in "abc"]) == red.get_many(T, [("ns", k) for k in "abc"])
        for name in ("s1", "s2"):
            assert mem.stream_info(T, name) == red.stream_info(T, name)
            assert mem.read_stream(T, name) == red.read_stream(T, name)
    assert mem.changes(T) == red.changes(T)
    assert mem.list_streams(T) == red.list_streams(T)
    assert mem.stats(T) == red.stats(T)
    assert mem.sweep() == red.sweep()
    red.close()


# ------------------------------------------------------------------ expiry backstop


def test_redis_expiry_is_a_generous_backstop_behind_the_logical_one(
    rstore: RedisStore, raw: redis.Redis, prefix: str, clock: FakeClock
) -> None:
    item_key = f"{prefix}:{{{T}}}:i:c|k"
    rstore.commit(T, ops=[Put("c", "k", 1, ttl=2)])
    pttl = raw.pttl(item_key)
    assert 2000 + 300_000 - 60_000 < pttl <= 2000 + 300_000  # TTL plus the default 300 s grace
    rstore.commit(T, ops=[Incr("c", "k")])  # an existing counter keeps its expiry
    assert 0 < raw.pttl(item_key) <= pttl
    rstore.commit(T, ops=[Put("c", "k", 1)])  # a put without TTL removes it
    assert raw.pttl(item_key) == -1
    assert raw.zscore(f"{prefix}:{{{T}}}:exp", "c|k") is None
    rstore.commit(T, ops=[Put("c", "k", 1, ttl=1)])
    clock.advance(1)
    rstore.commit(T, ops=[Incr("c", "k", 5)])  # expired: recreated, without a TTL this time
    assert raw.pttl(item_key) == -1
    item = rstore.get(T, "c", "k")
    assert item is not None
    assert (item.value, item.version, item.expires_at) == (5, 1, None)


def test_backstop_expiry_and_sweep_leave_no_garbage(
    prefix: str, raw: redis.Redis, clock: FakeClock, opened: Callable[..., RedisStore]
) -> None:
    s = opened(f"redis://127.0.0.1:6379/0?prefix={prefix}&expiry_grace=0.001", clock=clock)
    s.commit(T, ops=[Put("c", "gone", 1, ttl=0.01), Put("c", "swept", 2, ttl=0.01), Put("c", "kept", 3)])
    clock.advance(1)
    base = f"{prefix}:{{{T}}}:"
    deadline = time.monotonic() + 30
    while raw.exists(base + "i:c|gone") and time.monotonic() < deadline:  # Redis' own expiry fires...
        time.sleep(0.02)
    assert not raw.exists(base + "i:c|gone")
    assert [i.key for i in s.scan(T, "c")] == ["kept"]  # ...and reads never noticed the difference
    assert s.sweep() == 2  # the swept one, and the index entries of the one Redis removed
    assert raw.zrange(base + "z:c", 0, -1) == [b"kept"]
    assert raw.zcard(base + "exp") == 0
    assert s.commit(T, ops=[Put("c", "gone", 4)]).versions[("c", "gone")] == 1


# ------------------------------------------------------------------ watch, processes


def test_watch_by_polling_and_across_handles(
    rstore: RedisStore, prefix: str, opened: Callable[..., RedisStore]
) -> None:
    url = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    for mode in ("poll", "xread"):
        watcher = opened(f"{url}&watch={mode}&socket_timeout=1")
        after = rstore.revision(T)
        got: list[list[int]] = []

        def wait(w: RedisStore = watcher, a: int = after, out: list[list[int]] = got) -> None:
            out.append([c.revision for c in w.watch(T, a, 20)])

        th = threading.Thread(target=wait)
        th.start()
        rstore.commit(T, ops=[Put("ns", "k", mode)])
        th.join(30)
        assert got == [[after + 1]]


def _child_increments(url: str, n: int) -> None:
    s = open_store(url)
    for _ in range(n):
        while True:
            item = s.get(T, "ns", "k")
            check = VersionIs("ns", "k", item.version) if item else Absent("ns", "k")
            value = (item.value if item else 0) + 1
            try:
                s.commit(T, [check], [Put("ns", "k", value), Append("log", [NewEvent("inc")])])
                break
            except Conflict:
                continue
    s.close()


def test_processes_commit_concurrently_without_lost_updates_or_feed_gaps(prefix: str, rstore: RedisStore) -> None:
    url = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_child_increments, args=(url, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    seen: list[int] = []
    while len(seen) < 100:
        seen += [c.revision for c in rstore.watch(T, len(seen), timeout=30)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert seen == list(range(1, 101))
    item = rstore.get(T, "ns", "k")
    assert item is not None
    assert (item.value, item.version) == (100, 100)
    assert rstore.stream_info(T, "log").last_seq == 100


# ------------------------------------------------------------------ faults


def test_outage_through_a_proxy_raises_unavailable_then_the_same_store_recovers(
    prefix: str, opened: Callable[..., RedisStore]
) -> None:
    require_service("redis")
    with FaultProxy("127.0.0.1", 6379) as proxy:
        s = opened(f"redis://{proxy.host}:{proxy.port}/0?prefix={prefix}&socket_timeout=0.5&connect_timeout=0.5")
        s.commit(T, ops=[Put("ns", "k", 1)])

        proxy.cut()  # connections reset: the pool notices and reconnects, nothing fails
        assert s.get(T, "ns", "k") is not None

        proxy.blackhole()  # a partition: calls time out instead of hanging
        calls = {"get": lambda: s.get(T, "ns", "k"), "commit": lambda: s.commit(T, ops=[Put("ns", "k", 2)])}
        for name, call in {**calls, "ping": s.ping}.items():
            t0 = time.monotonic()
            with pytest.raises(Unavailable) as e:
                call()
            assert e.value.transient
            assert time.monotonic() - t0 < 30  # bounded by the socket timeout, not a hang
            # a commit cut off in flight may have applied: the error says so; a read has no outcome
            assert e.value.details.get("outcome") == ("unknown" if name == "commit" else None)
        proxy.refuse()  # the server is gone
        with pytest.raises(Unavailable):
            s.commit(T, ops=[Put("ns", "k", 3)])
        with pytest.raises(Unavailable):
            s.watch(T, 0, timeout=5)

        proxy.restore()
        item = s.get(T, "ns", "k")
        assert item is not None
        assert item.value in (1, 2)  # the blackholed commit's outcome is unknown to the client
        c = s.commit(T, [VersionIs("ns", "k", item.version)], [Put("ns", "k", 4)])
        assert c.revision == s.revision(T)
        assert [ch.revision for ch in s.changes(T)] == list(range(1, c.revision + 1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _private_redis(port: int) -> Iterator[subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    if binary is None:
        if IN_CI:
            pytest.fail("CI=true and redis-server is not installed", pytrace=False)
        pytest.skip("needs redis-server on PATH (Debian: apt-get install redis-server)")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.02)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_server_killed_and_restarted_under_an_open_store(opened: Callable[..., RedisStore]) -> None:
    require_service("redis")
    port = _free_port()
    s = opened(f"redis://127.0.0.1:{port}/0?socket_timeout=1&connect_timeout=1")
    with _private_redis(port) as server:
        s.commit(T, ops=[Put("ns", "k", 1)])
        server.kill()  # a crash: no persistence configured, so the data goes with it
        server.wait(10)
        for call in (lambda: s.get(T, "ns", "k"), lambda: s.commit(T, ops=[Put("ns", "k", 2)]), s.ping):
            with pytest.raises(Unavailable):
                call()
    with _private_redis(port):
        # same store object: fresh connections, and the scripts are loaded again (NOSCRIPT)
        assert s.get(T, "ns", "k") is None
        assert s.commit(T, [Absent("ns", "k")], [Put("ns", "k", 3)]).revision == 1
        assert s.tenants() == [T]  # the tenant list went with the old server; the first commit rebuilt it
        redis.Redis(port=port).script_flush()
        assert s.commit(T, [VersionIs("ns", "k", 1)], [Put("ns", "k", 4)]).revision == 2
        assert [c.revision for c in s.watch(T, 0, timeout=1)] == [1, 2]
