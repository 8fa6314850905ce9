"""PostgreSQL adapter specifics: URL options, schema versions, group commit, the gap-free feed under
concurrent writer processes, and outages (connections cut through a proxy, or killed by the server)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from stateline.store import postgres as postgres_adapter
from stateline.store.memory import MemoryStore
from stateline.store.postgres import _MIGRATIONS, SCHEMA_VERSION, PostgresStore, _Slot
from stateline.types import Commit
from tests.conftest import require_service
from tests.faultproxy import FaultProxy

ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
T = "acme"
# Generous bound that only proves "does not hang"; the configured timeouts are 1-2 s.
OUTAGE_BOUND = 15.0


def _admin(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(ADMIN, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema name, dropped afterwards."""
    require_service("postgresql")
    name = f"sl_{uuid.uuid4().hex[:12]}"
    yield name
    _admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def opened() -> Iterator[list[PostgresStore]]:
    """Stores a test opens; all closed at the end."""
    stores: list[PostgresStore] = []
    yield stores
    for s in stores:
        with contextlib.suppress(Exception):
            s.close()


def _open(opened: list[PostgresStore], url: str, **options: Any) -> PostgresStore:
    store = open_store(url, **options)
    assert isinstance(store, PostgresStore)
    opened.append(store)
    return store


# ------------------------------------------------------------------ array parameters


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"))),
    blobs=st.lists(st.binary()),
    ints=st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    bools=st.lists(st.booleans()),
)
def test_array_parameters_reach_the_server_exactly(
    texts: list[str], blobs: list[bytes], ints: list[int | None], bools: list[bool]
) -> None:
    """The adapter encodes its array parameters itself; the server reads back exactly what was given
    (empty arrays, NULLs among integers, any Unicode text, any bytes)."""
    require_service("postgresql")
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT %b::text[], %b::bytea[], %b::bigint[], %b::bool[]",
            (
                postgres_adapter._texts(texts),
                postgres_adapter._blobs(blobs),
                postgres_adapter._int8s(ints),
                postgres_adapter._bools(bools),
            ),
        ).fetchone()
    assert row == (texts, blobs, ints, bools)


# ------------------------------------------------------------------ URL and options


def test_url_options_and_schema(schema: str, opened: list[PostgresStore]) -> None:
    store = _open(
        opened,
        f"postgres://postgres@127.0.0.1:5432/test?schema={schema}&pool_max=3&pool_timeout=2.5"
        "&application_name=sl%20url+test%2B1&group_commit=false"
        "&options=-c%20statement_timeout%3D54321%20-c%20lock_timeout%3D1234",
        clock=FakeClock(),
    )
    assert store.schema == schema
    assert store._pool.max_size == 3
    store.commit(T, ops=[Put("ns", "k", 1)])
    tables = {
        r[0] for r in _admin("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))
    }
    assert {"items", "tenants", "changes", "events", "streams", "schema_version"} <= tables
    # libpq parameters pass through untouched, spaces and reserved characters included
    names = _admin("SELECT application_name FROM pg_stat_activity WHERE application_name = 'sl url test+1'")
    assert names
    with store._connection() as conn:
        settings = conn.execute(
            "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
        ).fetchone()
    assert settings == ("54321ms", "1234ms")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("schema=Bad-Name", "schema"),
        ("schema=1abc", "schema"),
        ("pool_max=0", "pool_max"),
        ("pool_max=x", "pool_max"),
        ("pool_timeout=-1", "pool_timeout"),
        ("pool_timeout=soon", "pool_timeout"),
        ("group_commit=maybe", "group_commit"),
        ("op_timeout=0", "op_timeout"),
        ("no_such_libpq_option=1", "url"),
    ],
)
def test_bad_url_options_are_refused(query: str, field: str) -> None:
    require_service("postgresql")
    with pytest.raises(InvalidArgument) as info:
        open_store(f"postgresql://postgres@127.0.0.1:5432/test?{query}")
    assert info.value.field == field


def test_unreachable_server_raises_unavailable_quickly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    before = set(threading.enumerate())
    with FaultProxy("127.0.0.1", 5432) as proxy:
        proxy.refuse()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="cannot connect"):
            open_store(f"postgresql://postgres@127.0.0.1:{proxy.port}/test?pool_timeout=2&connect_timeout=2")
        assert time.monotonic() - started < OUTAGE_BOUND
        # one error, raised: no pool threads left retrying and logging each attempt
        assert [t.name for t in threading.enumerate() if t not in before and t.name.startswith("stateline")] == []
        assert [r.getMessage() for r in caplog.records if r.name.startswith(("psycopg", "stateline"))] == []


# ------------------------------------------------------------------ schema versions


def test_older_schema_is_migrated_with_its_data(schema: str, opened: list[PostgresStore]) -> None:
    s = f'"{schema}"'
    _admin(f"CREATE SCHEMA {s}")
    _admin(f"CREATE TABLE {s}.schema_version (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
    for statement in _MIGRATIONS[0]:
        _admin(statement.format(s=s))
    _admin(f"INSERT INTO {s}.schema_version VALUES (1, 1)")
    _admin(f"INSERT INTO {s}.tenants VALUES ('acme', 0)")  # a row left by nothing committed: not a tenant
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=FakeClock())
    assert _admin(f"SELECT version FROM {s}.schema_version") == [(SCHEMA_VERSION,)]
    assert _admin("SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = 'items_expiry'", (schema,))
    assert store.tenants() == []
    assert store.commit(T, ops=[Put("ns", "k", 1)]).revision == 1


def test_newer_schema_is_refused(schema: str) -> None:
    s = f'"{schema}"'
    _admin(f"CREATE SCHEMA {s}")
    _admin(f"CREATE TABLE {s}.schema_version (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
    _admin(f"INSERT INTO {s}.schema_version VALUES (1, %s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(InvalidArgument, match="newer"):
        open_store(f"{ADMIN}?schema={schema}")


def test_many_opening_at_once_create_the_schema_once(schema: str, opened: list[PostgresStore]) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def opener() -> None:
        try:
            barrier.wait()
            store = _open(opened, f"{ADMIN}?schema={schema}&pool_min=0")
            store.commit(T, ops=[Incr("ns", "opened")])
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _admin(f'SELECT version FROM "{schema}".schema_version') == [(SCHEMA_VERSION,)]
    item = opened[0].get(T, "ns", "opened")
    assert item is not None
    assert item.value == 6


def test_json_values_keep_key_order_and_exact_form(schema: str, opened: list[PostgresStore]) -> None:
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=FakeClock())
    value = {"zeta": 1, "alpha": {"b": 2, "a": [1.5, "\u0000x", None]}, "": True}
    store.commit(T, ops=[Put("ns", "k", value), Append("s", [NewEvent("t", value, {"z": 1, "a": 2})])])
    item = store.get(T, "ns", "k")
    assert item is not None
    assert list(item.value) == ["zeta", "alpha", ""]
    assert list(item.value["alpha"]) == ["b", "a"]
    assert item.value == value
    (event,) = store.read_stream(T, "s")
    assert list(event.meta) == ["z", "a"]
    (change,) = store.changes(T)
    assert list(change.ops[0].value) == ["zeta", "alpha", ""]


# ------------------------------------------------------------------ plans that do not grow with a tenant


def _reads(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads a relation (not the ones that write it)."""
    if "Relation Name" in plan and plan["Node Type"] != "ModifyTable":
        yield plan
    for child in plan.get("Plans", []):
        yield from _reads(child)


def _positional(statement: str) -> str:
    """``%s`` / ``%b`` placeholders numbered ``$1``, ``$2``, ... in order (named ones as ``_raw`` numbers them)."""
    raw = postgres_adapter._raw(statement)
    if raw is not None:
        return raw.query.decode()
    numbers = iter(range(1, 1000))
    return re.sub(r"%[sb]", lambda _: f"${next(numbers)}", statement)


def test_key_lookups_probe_the_index_whatever_the_tenant_size(schema: str, opened: list[PostgresStore]) -> None:
    """Every statement that finds rows by keys given in arrays reaches items, streams and events only by
    index (or by the row ids an index gave), even in a prepared statement's generic plan made from
    statistics of many small tenants: a join that read one whole tenant made each commit of a big
    tenant cost in proportion to its size (25 ms at 50,000 items)."""
    store = _open(opened, f"{ADMIN}?schema={schema}")
    for t in range(300):
        store.commit(
            f"small-{t}", ops=[op for i in range(5) for op in (Put("ns", f"k{i}", i), Append(f"s{i}", [NewEvent("e")]))]
        )
    for b in range(4):
        store.commit("big", ops=[Put("ns", f"k{b}-{i}", i) for i in range(500)] + [Append("s", [NewEvent("e")] * 50)])
    q = postgres_adapter._Queries(f'"{schema}"')
    statements = {"read_one": q.read_one, "read_items": q.read_items, "read_streams": q.read_streams}
    statements |= {"get_many": q.get_many, "write": q.write}
    for guard in ("", "next", "new"):
        statements[f"write_one({guard!r})"] = q.write_one(guard, True, True, True, True, True, True)
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        for table in ("items", "streams", "events"):
            conn.execute(f'ANALYZE "{schema}".{table}')
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for name, statement in statements.items():
            query = _positional(statement)
            n = max(int(x) for x in re.findall(r"\$(\d+)", query))
            conn.execute(f"PREPARE p AS {query}")
            ((plan,),) = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE p({', '.join(['NULL'] * n)})").fetchall()
            conn.execute("DEALLOCATE p")
            scans = [
                (node["Node Type"], node["Relation Name"])
                for node in _reads(plan[0]["Plan"])
                if node["Relation Name"] in ("items", "streams", "events")
            ]
            assert scans, name
            bad = [x for x in scans if x[0] not in ("Index Scan", "Index Only Scan", "Tid Scan")]
            assert bad == [], f"{name}: {bad}"


def test_repeated_statements_keep_their_generic_plan(schema: str, opened: list[PostgresStore]) -> None:
    """A statement run again and again with arrays of a few elements is planned once, not at each run:
    given the arrays themselves, PostgreSQL costed a custom plan below the generic one and planned every
    commit's write again (~0.2 ms of server time per commit)."""
    url = f"{ADMIN}?schema={schema}&pool_max=1"  # one connection: every statement prepared on it
    a = _open(opened, url)
    b = _open(opened, url)
    b.commit("other", ops=[Put("ns", "n", 0)])
    for i in range(30):  # a alone: the unlocked way (a guarded write; a read first of what it does not know)
        a.commit(T, checks=[Absent("ns", f"a{i}")], ops=[Put("ns", f"a{i}", i), Append("s", [NewEvent("e")])])
        a.commit(T, ops=[Delete("ns", f"a{i}"), Put("ns", "n", i), Append("s", [NewEvent("e")] * 2)])
        b.commit("other", checks=[VersionIs("ns", "n", i + 1)], ops=[Put("ns", "n", i)])
    for i in range(30):  # a and b taking turns: each finds the other's commit in between (the locking way)
        for store in (a, b):
            store.commit(T, ops=[Put("ns", "n", i), Append("s", [NewEvent("e")])])
    with a._connection() as conn:
        rows = conn.execute(
            "SELECT name, generic_plans, custom_plans, left(statement, 60) FROM pg_prepared_statements"
        ).fetchall()
    used = [r for r in rows if r[1] + r[2] >= 20]
    assert any(r[0].startswith("sl_write_") for r in used), rows
    assert [r for r in used if r[1] < r[2]] == [], rows


def test_a_sweep_reads_only_the_expired_rows_it_deletes(schema: str, opened: list[PostgresStore]) -> None:
    """Sweeping a backlog of expired items a batch at a time costs each batch its own size: a join
    read every expired row at each call (13.6 ms for a batch of 100 beside 30,000 expired, now 1.1)."""
    clock = FakeClock()
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=clock)
    for b in range(4):
        store.commit(f"t{b}", ops=[Put("ns", f"k{i}", i, ttl=1) for i in range(500)])
    clock.advance(10)
    now = clock.now_us()
    sweep = _positional(postgres_adapter._Queries(f'"{schema}"').sweep)
    with psycopg.connect(ADMIN) as conn:  # a transaction, rolled back at the end
        conn.execute(f'ANALYZE "{schema}".items')
        conn.execute("SET plan_cache_mode = force_generic_plan")  # what a statement prepared by psycopg gets
        conn.execute(f"PREPARE p AS {sweep}")
        ((plan,),) = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE p({now}, 10, {now})").fetchall()
        conn.rollback()
    read = [(n["Node Type"], n["Relation Name"], n["Actual Rows"] * n["Actual Loops"]) for n in _reads(plan[0]["Plan"])]
    assert read
    assert all(rows <= 10 for _, _, rows in read), read
    assert store._sweep(10) == 10
    assert store._sweep(10_000) == 1990
    assert _admin(f'SELECT count(*) FROM "{schema}".items') == [(0,)]


# ------------------------------------------------------------------ group commit


def _group(store: PostgresStore, commits: list[tuple[list[Any], list[Any]]]) -> list[Any]:
    slots = [_Slot(store.prepare(T, checks, ops)) for checks, ops in commits]
    return store._run_group(slots)


def test_group_commit_evaluates_each_commit_on_its_own(schema: str, opened: list[PostgresStore]) -> None:
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=FakeClock())
    store.commit(T, ops=[Put("ns", "text", "x"), Append("s", [NewEvent("a"), NewEvent("b")])])
    results = _group(
        store,
        [
            ([Absent("ns", "k")], [Put("ns", "k", 1)]),
            ([Absent("ns", "k")], [Put("ns", "k", 2)]),  # sees the first one: conflict
            ([VersionIs("ns", "k", 1)], [Put("ns", "k", 3), Incr("ns", "n", 2)]),
            ([], [Incr("ns", "text")]),  # not an integer: refused, nothing of it written
            ([StreamAt("s", 2)], [Trim("s", 10)]),  # removes only what exists: seqs 1 and 2
            ([StreamAt("s", 2)], [Append("s", [NewEvent("c")]), Delete("ns", "text")]),
        ],
    )
    assert isinstance(results[0], Commit)
    assert results[0].revision == 2
    assert isinstance(results[1], Conflict)
    assert isinstance(results[2], Commit)
    assert results[2].revision == 3
    assert results[2].versions[("ns", "k")] == 2
    assert isinstance(results[3], InvalidArgument)
    assert [r.revision for r in results if isinstance(r, Commit)] == [2, 3, 4, 5]
    assert results[5].seqs == {"s": 3}
    assert store.revision(T) == 5
    assert [c.revision for c in store.changes(T)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in store.read_stream(T, "s")] == [3]
    assert store.get(T, "ns", "text") is None
    k = store.get(T, "ns", "k")
    assert k is not None
    assert (k.value, k.version, k.revision) == (3, 2, 3)


class _Meddler(FakeClock):
    """A clock that, read once by the store between its read and its write, lets another store commit first."""

    __slots__ = ("meddle",)

    def __init__(self) -> None:
        super().__init__()
        self.meddle: list[Any] = []

    def now_us(self) -> int:
        while self.meddle:
            self.meddle.pop()()
        return super().now_us()


@pytest.mark.parametrize("tenant_exists", [True, False])
def test_a_commit_that_loses_a_race_after_its_read_is_evaluated_again(
    schema: str, opened: list[PostgresStore], tenant_exists: bool
) -> None:
    """Another process commits between this commit's read and its write: nothing stale is written, the
    checks are evaluated on the new state, and the feed stays gap-free."""
    clock = _Meddler()
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=clock)
    other = _open(opened, f"{ADMIN}?schema={schema}")
    if tenant_exists:
        store.commit(T, ops=[Put("ns", "k", "first")])
        clock.meddle.append(lambda: other.commit(T, ops=[Put("ns", "k", "other")]))
        with pytest.raises(Conflict) as exc:
            store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", "stale")])
        assert exc.value.failures[0].found == 2
        assert T in store._contended  # for a moment this tenant's commits take the lock first ...
        store._contended.clear()  # ... (the meddling commit would wait for this thread's lock: end that now)
        clock.meddle.append(lambda: other.commit(T, ops=[Put("ns", "j", "other")]))
        done = store.commit(T, checks=[VersionIs("ns", "k", 2)], ops=[Incr("ns", "n")])
        assert done.revision == 4
        assert [c.revision for c in store.changes(T)] == [1, 2, 3, 4]
    else:
        clock.meddle.append(lambda: other.commit(T, ops=[Put("ns", "k", "other")]))
        with pytest.raises(Conflict):
            store.commit(T, checks=[Absent("ns", "k")], ops=[Put("ns", "k", "mine")])
        assert [c.revision for c in store.changes(T)] == [1]
    item = store.get(T, "ns", "k")
    assert item is not None
    assert item.value == "other"


@pytest.mark.parametrize("locking", [False, True])
def test_a_commit_of_a_new_tenant_and_of_a_known_one_on_either_path(
    schema: str, opened: list[PostgresStore], locking: bool
) -> None:
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=FakeClock())
    if locking:
        store._contended[T] = float("inf")  # as after a lost race: every commit takes the lock first
    assert store.commit(T, ops=[Put("ns", "k", 1), Append("s", [NewEvent("a")])]).revision == 1
    assert store.commit(T, checks=[VersionIs("ns", "k", 1), StreamAt("s", 1)], ops=[Incr("ns", "k")]).revision == 2
    with pytest.raises(Conflict):
        store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Delete("ns", "k")])
    assert store.commit(T, ops=[Delete("ns", "k"), Trim("s", 2)]).revision == 3
    assert [c.revision for c in store.changes(T)] == [1, 2, 3]
    assert store.get(T, "ns", "k") is None
    assert store.read_stream(T, "s") == []
    assert store.tenants() == [T]


def test_a_handle_remembering_its_last_commit_still_sees_what_others_wrote(
    schema: str, opened: list[PostgresStore]
) -> None:
    """A handle skips the read when it made the tenant's last commit; whatever another handle commits in
    between, every check, version, counter and sequence number is still taken from what is stored."""
    a = _open(opened, f"{ADMIN}?schema={schema}")
    b = _open(opened, f"{ADMIN}?schema={schema}")
    a.commit(T, ops=[Put("ns", "k", 1), Incr("ns", "n", 1), Append("s", [NewEvent("a")])])
    assert a.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", 2), Incr("ns", "n", 1)]).revision == 2
    assert a._known[T].revision == 2  # what the next commit of these rows is planned on, without a read
    b.commit(T, ops=[Put("ns", "k", 3), Incr("ns", "n", 5), Append("s", [NewEvent("b")])])
    # refused on what a remembers (k at 2, s at 1), so judged again on what is stored: it holds
    c = a.commit(
        T, checks=[VersionIs("ns", "k", 3), StreamAt("s", 2)], ops=[Incr("ns", "n"), Append("s", [NewEvent("c")])]
    )
    assert (c.revision, c.counters, c.seqs) == (4, {("ns", "n"): 8}, {"s": 3})
    with pytest.raises(Conflict) as exc:
        a.commit(T, checks=[VersionIs("ns", "k", 2)], ops=[Put("ns", "k", "stale")])
    assert exc.value.failures[0].found == 3
    b.commit(T, ops=[Delete("ns", "k"), Incr("ns", "n", 10)])
    # no check to fail: a plans on what it remembers, the revision guard refuses, the lock path redoes it
    c = a.commit(T, ops=[Put("ns", "k", "again"), Incr("ns", "n")])
    assert (c.revision, c.versions[("ns", "k")], c.counters[("ns", "n")]) == (6, 1, 19)
    assert [ch.revision for ch in b.changes(T)] == [1, 2, 3, 4, 5, 6]
    item = b.get(T, "ns", "k")
    assert item is not None
    assert (item.value, item.version) == ("again", 1)
    assert [e.type for e in b.read_stream(T, "s")] == ["a", "b", "c"]


def test_keys_expected_absent_are_inserted_without_a_read_and_checked_by_the_insert(
    schema: str, opened: list[PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handle that remembers its tenant's last commit writes a key a commit expects absent (and that it
    has never seen) without reading it first; the insert itself refuses it if it exists after all (also
    when it has only expired), and the commit is then judged on what is stored."""
    clock = FakeClock()
    a = _open(opened, f"{ADMIN}?schema={schema}", clock=clock)
    b = _open(opened, f"{ADMIN}?schema={schema}", clock=clock)
    b.commit(T, ops=[Put("ns", "taken", "b's")])
    b.commit(T, ops=[Put("ns", "brief", "b's", ttl=1)])
    a.commit(T, ops=[Put("ns", "mine", 1), Append("s", [NewEvent("a")])])  # a now remembers revision 3

    def no_read(*_: Any) -> None:
        raise AssertionError("the commit read first")

    with monkeypatch.context() as m:
        m.setattr(postgres_adapter, "_read_one_params", no_read)
        c = a.commit(
            T,
            checks=[Absent("ns", "new"), VersionIs("ns", "mine", 1)],
            ops=[Put("ns", "new", 1), Put("ns", "mine", 2), Append("s", [NewEvent("b")])],
        )
    assert (c.revision, c.versions, c.seqs) == (4, {("ns", "new"): 1, ("ns", "mine"): 2}, {"s": 2})
    with pytest.raises(Conflict) as exc:  # it exists: the insert fails, the lock path reads and refuses
        a.commit(T, checks=[Absent("ns", "taken")], ops=[Put("ns", "taken", "a's"), Put("ns", "mine", 3)])
    assert [f.found for f in exc.value.failures] == [1]
    assert a.commit(T, ops=[Put("ns", "mine", 3)]).revision == 5
    assert a._known[T].revision == 5  # so the next commit takes "brief" for absent, unread
    clock.advance(2)
    c = a.commit(T, checks=[Absent("ns", "brief")], ops=[Put("ns", "brief", "a's")])  # expired: absent
    assert (c.revision, c.versions) == (6, {("ns", "brief"): 1})
    assert a.commit(T, ops=[Put("ns", "mine", 4)]).revision == 7
    with pytest.raises(Conflict) as exc:  # expected absent but not written: nothing would check it, so read
        a.commit(T, checks=[Absent("ns", "taken")], ops=[Put("ns", "mine", 5)])
    assert [f.found for f in exc.value.failures] == [1]
    for key, value, version in (("new", 1, 1), ("mine", 4, 4), ("taken", "b's", 1), ("brief", "a's", 1)):
        item = b.get(T, "ns", key)
        assert item is not None
        assert (item.value, item.version) == (value, version)
    assert [ch.revision for ch in b.changes(T)] == [1, 2, 3, 4, 5, 6, 7]


def test_the_unlocked_write_goes_to_libpq_directly_and_survives_its_statement_being_deallocated(
    schema: str, opened: list[PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guarded write of the unlocked path is prepared once per connection and run without a cursor;
    if the server forgets it (``DEALLOCATE ALL``, which psycopg itself may send), the next commit prepares
    it again instead of failing, and nothing is written twice."""
    store = _open(opened, f"{ADMIN}?schema={schema}&pool_min=1&pool_max=1")
    sent: list[str] = []
    real = postgres_adapter._Conn.run_kept

    def spy(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(query)
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(postgres_adapter._Conn, "run_kept", spy)
    for i in range(3):
        store.commit(T, checks=[Absent("ns", f"k{i}")], ops=[Put("ns", f"k{i}", i), Append("s", [NewEvent("e")])])
    assert not any("UPDATE" in q and "revision" in q for q in sent)  # no write went through a cursor
    with store._connection() as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements").fetchall()}
        assert any(n.startswith("sl_write_") for n in names), names
        conn.execute("DEALLOCATE ALL")
    # as after psycopg's own DEALLOCATE ALL: the connection learns of it only when it runs a lost
    # statement, and may have prepared others meanwhile, which it must not then forget
    assert store.commit(T, ops=[Delete("ns", "k1")]).revision == 4  # a new shape: prepared now
    c = store.commit(T, checks=[Absent("ns", "k3")], ops=[Put("ns", "k3", 3), Append("s", [NewEvent("e")])])
    assert (c.revision, c.versions, c.seqs) == (5, {("ns", "k3"): 1}, {"s": 4})  # lost: prepared again
    assert store.commit(T, ops=[Delete("ns", "k2")]).revision == 6  # still there: used
    c = store.commit(T, checks=[VersionIs("ns", "k0", 1)], ops=[Put("ns", "k0", "again"), Append("s", [NewEvent("e")])])
    assert (c.revision, c.versions, c.seqs) == (7, {("ns", "k0"): 2}, {"s": 5})
    assert [ch.revision for ch in store.changes(T)] == [1, 2, 3, 4, 5, 6, 7]
    assert store.get(T, "ns", "k1") is None
    item = store.get(T, "ns", "k0")
    assert item is not None
    assert (item.value, item.version) == ("again", 2)


def test_statements_in_libpq_form() -> None:
    """Named placeholders become ``$n`` in order of first use (a repeated name keeps its number); a
    statement with any other percent sign is left to psycopg."""
    raw = postgres_adapter._raw("SELECT %(a)s::text, %(b)b::bigint[], %(a)s::text WHERE x = %(c)s::bigint")
    assert raw is not None
    assert raw.query == b"SELECT $1::text, $2::bigint[], $1::text WHERE x = $3::bigint"
    assert raw.params == ("a", "b", "c")
    assert postgres_adapter._raw("SELECT %(a)s::text") is postgres_adapter._raw("SELECT %(a)s::text")
    assert postgres_adapter._raw("SELECT %s::text") is None
    assert postgres_adapter._raw("SELECT 'x%%' || %(a)s::text") is None


@pytest.mark.parametrize("server", ["finishes it", "is stopped"])
def test_a_write_whose_connection_is_lost_in_flight_is_applied_once(
    schema: str, opened: list[PostgresStore], server: str
) -> None:
    """The connection of a commit's write is cut while the server still runs the statement (the
    watchdog's doing, while a lock holds it up). The store waits for that server process to finish or
    end, then either reports the commit (it applied) or runs it again (it did not): never twice."""
    store = _open(opened, f"{ADMIN}?schema={schema}&op_timeout=2")
    store.commit(T, ops=[Incr("ns", "n")])
    store.commit(T, ops=[Incr("ns", "n")])  # the next commit writes at once, without a read
    assert store._known[T].revision == 2
    blocker = psycopg.connect(ADMIN)
    blocker.execute(f'SELECT revision FROM "{schema}".tenants WHERE tenant = %s FOR UPDATE', (T,))
    problems: list[str] = []

    def release() -> None:
        try:
            pid = None
            deadline = time.monotonic() + 30
            while pid is None and time.monotonic() < deadline:
                rows = _admin(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    (f'%"{schema}".tenants%',),
                )
                pid = rows[0][0] if rows else None
                time.sleep(0.02)
            if pid is None:
                problems.append("the write never waited on the lock")
                return
            time.sleep(3.0)  # the watchdog (op_timeout 2 s) has cut the client's side by now
            if server == "is stopped":
                _admin("SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            blocker.rollback()

    helper = threading.Thread(target=release)
    helper.start()
    try:
        c = store.commit(T, ops=[Incr("ns", "n")])
    finally:
        helper.join(60)
        blocker.close()
    assert problems == []
    assert (c.revision, c.counters[("ns", "n")]) == (3, 3)
    item = store.get(T, "ns", "n")
    assert item is not None
    assert item.value == 3
    assert [ch.revision for ch in store.changes(T)] == [1, 2, 3]


def test_a_group_with_only_failures_writes_nothing(schema: str, opened: list[PostgresStore]) -> None:
    store = _open(opened, f"{ADMIN}?schema={schema}", clock=FakeClock())
    results = _group(store, [([VersionIs("ns", "k", 1)], [Put("ns", "k", 1)]), ([], [Put("ns", "j", 1)])][:1])
    assert isinstance(results[0], Conflict)
    assert store.revision(T) == 0
    assert store.tenants() == []


_names = st.sampled_from(["a", "b", "c"])
_op = st.one_of(
    st.builds(Put, st.just("ns"), _names, st.integers(-5, 5) | st.text(max_size=3), st.none() | st.just(5.0)),
    st.builds(Delete, st.just("ns"), _names),
    st.builds(Incr, st.just("ns"), _names, st.integers(-3, 3), st.none() | st.just(5.0)),
    st.builds(
        Append, st.sampled_from(["s1", "s2"]), st.lists(st.builds(NewEvent, st.just("e")), min_size=1, max_size=3)
    ),
    st.builds(Trim, st.sampled_from(["s1", "s2"]), st.integers(1, 8)),
)
_check = st.one_of(
    st.builds(VersionIs, st.just("ns"), _names, st.integers(1, 3)),
    st.builds(Absent, st.just("ns"), _names),
    st.builds(StreamAt, st.sampled_from(["s1", "s2"]), st.integers(0, 4)),
)
_commit = st.tuples(st.lists(_check, max_size=2), st.lists(_op, min_size=1, max_size=4), st.sampled_from([0, 1]))


@pytest.fixture(scope="module")
def shared_store() -> Iterator[PostgresStore]:
    require_service("postgresql")
    name = f"sl_{uuid.uuid4().hex[:12]}"
    store = open_store(f"{ADMIN}?schema={name}", clock=FakeClock())
    assert isinstance(store, PostgresStore)
    yield store
    store.close()
    _admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commits=st.lists(_commit, min_size=1, max_size=8), cuts=st.lists(st.integers(1, 4), max_size=4))
def test_groups_give_the_same_result_as_one_commit_at_a_time(
    shared_store: PostgresStore, commits: list[tuple[list[Any], list[Any], int]], cuts: list[int]
) -> None:
    """Any split of a sequence of commits of two tenants into groups ends in the memory adapter's state and feed."""
    clock = FakeClock()
    shared_store.clock = clock
    run = uuid.uuid4().hex[:10]
    tenants = [f"t{run}", f"u{run}"]
    model = MemoryStore(clock=clock)
    expected: list[Any] = []
    for checks, ops, who in commits:
        try:
            expected.append(model.commit(tenants[who], checks, ops))
        except (Conflict, InvalidArgument) as exc:
            expected.append(type(exc))
    got: list[Any] = []
    i = 0
    for size in [*cuts, len(commits)]:
        chunk = commits[i : i + size]
        i += size
        if chunk:
            slots = [_Slot(shared_store.prepare(tenants[who], c, o)) for c, o, who in chunk]
            got.extend(r if isinstance(r, Commit) else type(r) for r in shared_store._run_group(slots))
        if i >= len(commits):
            break
    assert got == expected
    assert [t for t in shared_store.tenants(limit=10_000) if t in tenants] == model.tenants()
    for tenant in tenants:
        assert shared_store.revision(tenant) == model.revision(tenant)
        assert shared_store.changes(tenant) == model.changes(tenant)
        assert shared_store.scan(tenant, "ns") == model.scan(tenant, "ns")
        for s in ("s1", "s2"):
            assert shared_store.read_stream(tenant, s) == model.read_stream(tenant, s)
            assert shared_store.stream_info(tenant, s) == model.stream_info(tenant, s)
        assert shared_store.stats(tenant) == model.stats(tenant)


@pytest.fixture(scope="module")
def two_handles() -> Iterator[tuple[PostgresStore, PostgresStore]]:
    require_service("postgresql")
    name = f"sl_{uuid.uuid4().hex[:12]}"
    patch = pytest.MonkeyPatch()
    patch.setattr(postgres_adapter, "_CONTENDED_SECONDS", 0.0)  # a lost race never sends the next commits to the lock
    a = open_store(f"{ADMIN}?schema={name}", clock=FakeClock())
    b = open_store(f"{ADMIN}?schema={name}", clock=FakeClock())
    assert isinstance(a, PostgresStore)
    assert isinstance(b, PostgresStore)
    yield a, b
    a.close()
    b.close()
    patch.undo()
    _admin(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


_two = st.sampled_from(["a", "b"])
# one tenant, two keys, mostly Absent checks: what makes a handle take a key for absent
_turn_commit = st.tuples(
    st.lists(
        st.builds(Absent, st.just("ns"), _two) | st.builds(VersionIs, st.just("ns"), _two, st.just(1)),
        max_size=2,
    ),
    st.lists(
        st.builds(Put, st.just("ns"), _two, st.integers(0, 3), st.none() | st.just(5.0))
        | st.builds(Delete, st.just("ns"), _two)
        | st.builds(Append, st.just("s1"), st.lists(st.builds(NewEvent, st.just("e")), min_size=1, max_size=2)),
        min_size=1,
        max_size=3,
    ),
    st.just(0),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.one_of(_commit, _turn_commit), st.sampled_from([0, 1]), st.sampled_from([0, 0, 3])),
        min_size=1,
        max_size=12,
    )
)
def test_two_handles_taking_turns_give_the_memory_adapters_results(
    two_handles: tuple[PostgresStore, PostgresStore], steps: list[tuple[tuple[list[Any], list[Any], int], int, int]]
) -> None:
    """Two handles (as two processes) commit to the same tenants in any order while time passes (items
    expire): each skips reads on what it remembers, takes keys it expects absent for absent, and still
    gets exactly the memory adapter's outcome, state and feed."""
    clock = FakeClock()
    handles = two_handles
    for h in handles:
        h.clock = clock
    run = uuid.uuid4().hex[:10]
    tenants = [f"t{run}", f"u{run}"]
    model = MemoryStore(clock=clock)
    for (checks, ops, who), handle, wait in steps:
        clock.advance(wait)
        try:
            expected: Any = model.commit(tenants[who], checks, ops)
        except (Conflict, InvalidArgument) as exc:
            expected = type(exc)
        try:
            got: Any = handles[handle].commit(tenants[who], checks, ops)
        except (Conflict, InvalidArgument) as exc:
            got = type(exc)
        assert got == expected
    for tenant in tenants:
        assert handles[0].changes(tenant) == model.changes(tenant)
        assert handles[1].scan(tenant, "ns") == model.scan(tenant, "ns")


def test_threads_on_one_tenant_commit_in_groups_without_losing_anything(
    schema: str, opened: list[PostgresStore]
) -> None:
    store = _open(opened, f"{ADMIN}?schema={schema}&pool_max=4")
    n_threads, per_thread = 8, 40
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for i in range(per_thread):
                store.commit(T, ops=[Incr("ns", "n"), Append(f"w{w}", [NewEvent("e", i)])])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    total = n_threads * per_thread
    assert store.revision(T) == total
    changes = store.changes(T, limit=total)
    assert [c.revision for c in changes] == list(range(1, total + 1))
    # the counter value recorded in each change is its revision: commits applied in revision order
    assert all(c.ops[0].value == c.revision for c in changes)
    for w in range(n_threads):
        assert [e.data for e in store.read_stream(T, f"w{w}")] == list(range(per_thread))


# ------------------------------------------------------------------ the change feed never skips


def _writer(url: str, seconds: float, threads: int, out: Any) -> None:
    """Child process: commit as fast as possible for ``seconds`` from ``threads`` threads."""
    store = open_store(url)
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def run(i: int) -> None:
        while time.monotonic() < stop:
            store.commit(T, ops=[Incr("feed", "n"), Put("feed", f"last-{i}", counts[i])])
            counts[i] += 1
            if counts[i] % 10 == 0:  # a failing commit now and then must not leave a gap either
                with contextlib.suppress(Conflict):
                    store.commit(T, checks=[Absent("feed", "n")], ops=[Put("feed", "n", 0)])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    store.close()
    out.put(sum(counts))


def test_change_feed_never_skips_under_concurrent_writer_processes(schema: str, opened: list[PostgresStore]) -> None:
    url = f"{ADMIN}?schema={schema}"
    reader = _open(opened, url)
    reader.commit(T, ops=[Put("feed", "start", True)])  # revision 1, schema created before the writers start
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    writers = [
        ctx.Process(target=_writer, args=(f"{url}&group_commit={mode}", 3.0, 2, out))
        for mode in ("off", "tenant", "all", "tenant")
    ]
    for p in writers:
        p.start()

    polled: list[int] = []
    poll_errors: list[str] = []

    def poller() -> None:  # a second reader that pages through changes() while they are written
        after = 1
        while any(p.is_alive() for p in writers) or after < reader.revision(T):
            for c in reader.changes(T, after, limit=7):
                if c.revision != after + 1:
                    poll_errors.append(f"after {after} came {c.revision}")
                after = c.revision
                polled.append(after)
            time.sleep(0.01)

    pt = threading.Thread(target=poller)
    pt.start()
    seen = 1
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            batch = reader.watch(T, seen, timeout=1.0, limit=500)
            for c in batch:
                assert c.revision == seen + 1, f"after revision {seen} the feed gave {c.revision}"
                # every commit but the first increments n once: the value it wrote is its revision - 1
                assert c.ops[0].op == "incr"
                assert c.ops[0].value == c.revision - 1
                seen = c.revision
            if not batch and not any(p.is_alive() for p in writers) and seen == reader.revision(T):
                break
    finally:
        for p in writers:
            p.join(timeout=60)
        pt.join(timeout=60)
    assert all(p.exitcode == 0 for p in writers)
    committed = sum(out.get(timeout=10) for _ in writers)
    assert committed > 0
    assert seen == 1 + committed == reader.revision(T)
    assert poll_errors == []
    assert polled == list(range(2, seen + 1))


# ------------------------------------------------------------------ outages


def _proxied(opened: list[PostgresStore], proxy: FaultProxy, schema: str, clock: Any = None) -> PostgresStore:
    return _open(
        opened,
        f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"
        "&pool_timeout=1&connect_timeout=2&pool_max=4",
        clock=clock,
    )


def test_cut_connections_are_replaced_transparently(schema: str, opened: list[PostgresStore]) -> None:
    with FaultProxy("127.0.0.1", 5432) as proxy:
        store = _proxied(opened, proxy, schema)
        store.commit(T, ops=[Put("ns", "k", 1)])
        proxy.cut()  # the server is still there: stale pooled connections must not surface as errors
        assert store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", 2)]).revision == 2
        item = store.get(T, "ns", "k")
        assert item is not None
        assert item.value == 2


@pytest.mark.parametrize("fault", ["refuse", "blackhole"])
def test_outage_raises_unavailable_quickly_and_the_same_store_recovers(
    schema: str, opened: list[PostgresStore], fault: str
) -> None:
    clock = FakeClock()
    with FaultProxy("127.0.0.1", 5432) as proxy:
        store = _proxied(opened, proxy, schema, clock)
        store.commit(T, ops=[Put("ns", "k", 1)])
        proxy.cut()
        getattr(proxy, fault)()
        calls = [lambda: store.commit(T, ops=[Put("ns", "k", 2)]), lambda: store.get(T, "ns", "k"), store.ping]
        if fault == "blackhole":  # each call waits out the timeouts: keep the test short
            del calls[1]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                call()
            assert info.value.transient
            assert time.monotonic() - started < OUTAGE_BOUND
        proxy.restore()
        store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", 3)])
        item = store.get(T, "ns", "k")
        assert item is not None
        assert (item.value, item.version) == (3, 2)
        assert [c.revision for c in store.changes(T)] == [1, 2]


def test_a_silent_partition_does_not_hang_calls(schema: str, opened: list[PostgresStore]) -> None:
    with FaultProxy("127.0.0.1", 5432) as proxy:
        store = _open(
            opened,
            f"postgresql://postgres@127.0.0.1:{proxy.port}/test?schema={schema}"
            "&pool_timeout=1&connect_timeout=2&op_timeout=1.5",
        )
        store.commit(T, ops=[Put("ns", "k", 1)])
        proxy.blackhole()  # the pooled connection looks fine but nothing comes back
        for call in (lambda: store.commit(T, ops=[Put("ns", "k", 2)]), lambda: store.get(T, "ns", "k")):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                call()
            assert time.monotonic() - started < OUTAGE_BOUND
        proxy.restore()
        # the stalled transaction's lock on the tenant is gone: commits go through again
        store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", 3)])
        assert store.revision(T) == 2


def test_connections_killed_by_the_server_are_survived(schema: str, opened: list[PostgresStore]) -> None:
    app = f"sl-kill-{uuid.uuid4().hex[:8]}"
    store = _open(opened, f"{ADMIN}?schema={schema}&application_name={app}&pool_min=2", clock=FakeClock())
    store.commit(T, ops=[Put("ns", "k", 1)])
    done = threading.Event()
    seen: list[int] = []
    watcher = threading.Thread(target=lambda: (seen.extend(c.revision for c in store.watch(T, 1, 20)), done.set()))
    watcher.start()
    time.sleep(0.3)  # let the listener connect, so that it is killed too
    killed = _admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,))
    assert killed
    # what a server restart does to open connections: the same store carries on
    assert store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", 2)]).revision == 2
    assert done.wait(20)
    assert seen == [2]
    watcher.join()


def test_commits_wake_another_handles_watchers_even_if_closed_at_once(
    schema: str, opened: list[PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notifications go out from a thread of their own; every commit's still reaches the watchers of
    another handle, also when the committing handle is closed right after its commits."""
    monkeypatch.setattr(postgres_adapter, "_POLL_SAFETY", 120.0)  # a watcher not notified would not wake
    a = _open(opened, f"{ADMIN}?schema={schema}")
    b = _open(opened, f"{ADMIN}?schema={schema}")
    tenants = [T, "other"]
    for t in tenants:
        a.commit(t, ops=[Put("ns", "k", 0)])
    seen: dict[str, list[int]] = {}

    def watch(tenant: str) -> None:
        seen[tenant] = [c.revision for c in b.watch(tenant, 1, timeout=30)]

    watchers = [threading.Thread(target=watch, args=(t,)) for t in tenants]
    for w in watchers:
        w.start()
    deadline = time.monotonic() + 10
    while not b._listening and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # let the watchers wait (the test holds either way)
    for t in tenants:
        a.commit(t, ops=[Put("ns", "k", 1)])
    a.close()
    for w in watchers:
        w.join(60)
    assert seen == {T: [2], "other": [2]}


def _notifications(conn: psycopg.Connection[Any], seconds: float) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=seconds)]


@pytest.mark.parametrize("path", ["unlocked", "locking"])
def test_only_commits_of_a_watched_tenant_notify(schema: str, opened: list[PostgresStore], path: str) -> None:
    """Nobody watches: commits send nothing. A watch marks its tenant, and from then on every commit of
    that tenant (and only of it) notifies, on either commit path."""
    a = _open(opened, f"{ADMIN}?schema={schema}")
    b = _open(opened, f"{ADMIN}?schema={schema}")

    def commit(tenant: str, value: int) -> None:
        if path == "locking":
            a._contended[tenant] = time.monotonic() + 60  # this tenant's commits take the lock first
        a.commit(tenant, ops=[Put("ns", "k", value)])

    with psycopg.connect(ADMIN, autocommit=True) as listener:
        listener.execute(f'LISTEN "stateline:{schema}"')
        for i in range(3):
            commit(T, i)
            commit("other", i)
        assert _notifications(listener, 0.5) == []
        assert b.watch(T, 3, timeout=0.05) == []  # marks T watched
        commit(T, 3)
        commit("other", 3)
        commit(T, 4)
        got = _notifications(listener, 0.5)
    assert got
    assert set(got) == {T}


def test_a_commit_that_read_before_a_watch_began_but_wrote_after_notifies(
    schema: str, opened: list[PostgresStore]
) -> None:
    """The race a watch mark must not lose: a commit whose statement started before the mark committed,
    and whose write lands after it (it waited for the revision row's lock), still sees the mark."""
    a = _open(opened, f"{ADMIN}?schema={schema}")
    a.commit(T, ops=[Put("ns", "k", 0)])
    with (
        psycopg.connect(ADMIN, autocommit=True) as listener,
        psycopg.connect(ADMIN, autocommit=True) as marker,
    ):
        listener.execute(f'LISTEN "stateline:{schema}"')
        marker.execute("BEGIN")
        marker.execute(
            f"UPDATE \"{schema}\".tenants SET watched_until = now() + interval '1 minute' WHERE tenant = %s", (T,)
        )
        committer = threading.Thread(target=lambda: a.commit(T, ops=[Put("ns", "k", 1)]))
        committer.start()
        deadline = time.monotonic() + 10
        while not _admin(
            "SELECT 1 FROM pg_stat_activity WHERE datname = 'test' AND wait_event_type = 'Lock' AND query LIKE %s",
            (f'%"{schema}".tenants%',),
        ):
            assert time.monotonic() < deadline, "the commit never waited for the row lock"
            time.sleep(0.01)
        marker.execute("COMMIT")  # the mark commits while the commit's statement waits
        committer.join(10)
        assert not committer.is_alive()
        assert _notifications(listener, 2.0) == [T]


def test_watch_survives_an_outage(schema: str, opened: list[PostgresStore]) -> None:
    with FaultProxy("127.0.0.1", 5432) as proxy:
        watching = _proxied(opened, proxy, schema)
        direct = _open(opened, f"{ADMIN}?schema={schema}")
        direct.commit(T, ops=[Put("ns", "k", 1)])
        got: list[int] = []
        errors: list[BaseException] = []

        def watch() -> None:
            after = 1
            while after < 3:
                try:
                    batch = watching.watch(T, after, timeout=1.0)
                except Unavailable:
                    time.sleep(0.1)
                    continue
                except BaseException as exc:
                    errors.append(exc)
                    return
                got.extend(c.revision for c in batch)
                after = got[-1] if got else after

        t = threading.Thread(target=watch)
        t.start()
        time.sleep(0.3)
        proxy.refuse()
        direct.commit(T, ops=[Put("ns", "k", 2)])  # committed while the watcher cannot reach the server
        time.sleep(0.5)
        proxy.restore()
        direct.commit(T, ops=[Put("ns", "k", 3)])
        t.join(timeout=30)
        assert not t.is_alive()
        assert errors == []
        assert got == [2, 3]
