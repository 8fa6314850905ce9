"""SQLite-specific behaviour: durability under kill -9, several processes on one file, group commit, options.

The generic contract is in test_conformance.py; these tests cover what only the SQLite adapter
promises. Child processes are real interpreters started with ``python -c``.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stateline import (
    Absent,
    Append,
    Conflict,
    FakeClock,
    Incr,
    InvalidArgument,
    NewEvent,
    Put,
    StreamAt,
    Unavailable,
    VersionIs,
    open_store,
)
from stateline.store import sqlite as sqlite_adapter
from stateline.store.sqlite import SCHEMA_VERSION, SQLiteStore

T = "acme"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sl.db"


@pytest.fixture
def opened() -> Iterator[Callable[..., SQLiteStore]]:
    """Open SQLite stores that are closed after the test."""
    stores: list[SQLiteStore] = []

    def open_(url: str, **options: Any) -> SQLiteStore:
        store = open_store(url, **options)
        assert isinstance(store, SQLiteStore)
        stores.append(store)
        return store

    yield open_
    for s in stores:
        s.close()


def _url(path: Path, query: str = "") -> str:
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def _child(code: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    """Start ``python -c code args...`` with text pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return out


# ------------------------------------------------------------------ durability under kill -9

CRASH_WRITER = """
import sys, threading
from stateline import Incr, Put, open_store

store = open_store(sys.argv[1])
out_lock = threading.Lock()

def work(w):
    i = 0
    while True:
        key = f"w{w}-{i}"
        c = store.commit("acme", ops=[Put("crash", key, {"w": w, "i": i}), Incr("crash", "total")])
        with out_lock:
            sys.stdout.write(f"{c.revision} {key} {c.versions[('crash', key)]}\\n")
            sys.stdout.flush()
        i += 1

threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_acknowledged_commits_survive_kill_9(
    db_path: Path, opened: Callable[..., SQLiteStore], synchronous: str
) -> None:
    proc = _child(CRASH_WRITER, _url(db_path, f"synchronous={synchronous}"))
    assert proc.stdout is not None
    acked: list[tuple[int, str, int]] = []
    try:
        while len(acked) < 600:
            line = proc.stdout.readline()
            if not line:
                _, err = proc.communicate(timeout=30)
                pytest.fail(f"the writer stopped early:\n{err}")
            rev, key, version = line.split()
            acked.append((int(rev), key, int(version)))
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the writer's threads are committing right now
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines(keepends=True):
        if line.endswith("\n"):  # a line cut by the kill was not acknowledged to anyone
            rev, key, version = line.split()
            acked.append((int(rev), key, int(version)))

    store = opened(_url(db_path))
    for rev, key, version in acked:
        item = store.get(T, "crash", key)
        assert item is not None, f"acknowledged commit {rev} ({key}) was lost"
        assert (item.version, item.revision) == (version, rev)
    last = store.revision(T)
    assert last >= max(rev for rev, _, _ in acked)
    changes = []
    while len(changes) < last:
        changes.extend(store.changes(T, after_revision=len(changes), limit=10_000))
    assert [c.revision for c in changes] == list(range(1, last + 1))  # no gap, nothing half-written
    total = store.get(T, "crash", "total")
    assert total is not None
    assert total.value == last  # every surviving commit is whole: one incr per commit
    for c in changes:
        assert [op.op for op in c.ops] == ["put", "incr"]
    # the reopened file accepts new commits at the next revision
    assert store.commit(T, ops=[Put("crash", "after", 1)]).revision == last + 1


# ------------------------------------------------------------------ several processes on one file

INCREMENTER = """
import sys
from stateline import Absent, Conflict, Incr, Put, VersionIs, open_store

store = open_store(sys.argv[1])
times = int(sys.argv[2])
conflicts = 0
for _ in range(times):
    while True:
        item = store.get("acme", "ns", "counter")
        if item is None:
            checks, value = [Absent("ns", "counter")], 0
        else:
            checks, value = [VersionIs("ns", "counter", item.version)], item.value
        try:
            store.commit("acme", checks=checks, ops=[Put("ns", "counter", value + 1), Incr("ns", "hits")])
            break
        except Conflict:
            conflicts += 1
store.close()
print(conflicts)
"""


def test_processes_incrementing_one_key_with_retry_end_at_exact_total(
    db_path: Path, opened: Callable[..., SQLiteStore]
) -> None:
    opened(_url(db_path))  # create the file first: the children only race on commits here
    procs, per_proc = 3, 40
    children = [_child(INCREMENTER, _url(db_path), str(per_proc)) for _ in range(procs)]
    for p in children:
        _finish(p)
    store = opened(_url(db_path))
    item = store.get(T, "ns", "counter")
    assert item is not None
    assert (item.value, item.version) == (procs * per_proc, procs * per_proc)
    hits = store.get(T, "ns", "hits")
    assert hits is not None
    assert hits.value == procs * per_proc
    assert store.revision(T) == procs * per_proc
    assert [c.revision for c in store.changes(T, limit=1000)] == list(range(1, procs * per_proc + 1))


OPENER = """
import sys
from stateline import Incr, open_store

store = open_store(sys.argv[1])
store.commit("acme", ops=[Incr("ns", "opened")])
store.close()
"""


def test_processes_opening_a_new_file_at_once_create_the_schema_once(
    db_path: Path, opened: Callable[..., SQLiteStore]
) -> None:
    children = [_child(OPENER, _url(db_path)) for _ in range(4)]
    for p in children:
        _finish(p)
    store = opened(_url(db_path))
    item = store.get(T, "ns", "opened")
    assert item is not None
    assert item.value == 4
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT id, version FROM sl_schema").fetchall() == [(1, SCHEMA_VERSION)]
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


COMMIT_ON_CUE = """
import sys
from stateline import Put, open_store

store = open_store(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
c = store.commit("acme", ops=[Put("ns", "from-child", 1)])
print(c.revision, flush=True)
store.close()
"""


def test_watch_wakes_on_a_commit_from_another_process(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("ns", "before", 1)])
    proc = _child(COMMIT_ON_CUE, _url(db_path), stdin=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        result: list[Any] = []
        watcher = threading.Thread(target=lambda: result.extend(store.watch(T, 1, timeout=60)))
        watcher.start()
        time.sleep(0.3)  # let the watch start waiting (it is correct either way)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        watcher.join(90)
        assert not watcher.is_alive()
        rev = int(proc.stdout.readline())
    finally:
        _finish(proc)  # closes stdin: a child still waiting for its cue commits and exits
    assert [c.revision for c in result] == [2] == [rev]
    assert result[0].ops[0].key == "from-child"


def test_a_waiting_watch_does_not_hold_up_reads(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    # readers take turns; a watch keeps its connection while it waits but must not keep the turn
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("ns", "k", 1)])
    woke = threading.Event()

    def watch() -> None:
        store.watch(T, 1, timeout=60)
        woke.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        time.sleep(0.2)  # let the watch start waiting (it is correct either way)
        for _ in range(50):
            item = store.get(T, "ns", "k")
            assert item is not None
            assert item.value == 1
            assert [i.key for i in store.scan(T, "ns")] == ["k"]
            assert store.get_many(T, [("ns", "k"), ("ns", "x")])[1] is None
        assert not woke.is_set()  # every read above finished while the watch still waited
    finally:
        store.commit(T, ops=[Put("ns", "k", 2)])
        watcher.join(60)
    assert woke.is_set()


def test_readers_on_many_threads_see_whole_commits(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("ns", "a", 0), Put("ns", "b", 0)])
    stop = threading.Event()
    torn: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                a, b = store.get_many(T, [("ns", "a"), ("ns", "b")])
                assert a is not None
                assert b is not None
                if a.value != b.value:
                    torn.append((a.value, b.value))
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(8)]
    for t in readers:
        t.start()
    try:
        for i in range(1, 200):
            store.commit(T, ops=[Put("ns", "a", i), Put("ns", "b", i)])
    finally:
        stop.set()
        for t in readers:
            t.join(60)
    assert not errors
    assert not torn


# ------------------------------------------------------------------ group commit


def test_concurrent_commits_share_transactions(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    store = opened(_url(db_path))  # synchronous=FULL
    threads, per_thread = 16, 25
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(per_thread):
                store.commit(T, ops=[Put("gc", f"t{i}-{j}", j)])
        except BaseException as exc:
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(120)
    assert errors == []
    total = threads * per_thread
    assert store.batched_commits == total
    assert store.batches < total  # some transactions (and flushes) carried several commits
    assert store.revision(T) == total
    assert [c.revision for c in store.changes(T, limit=total)] == list(range(1, total + 1))


def _queue_commits_into_one_batch(store: SQLiteStore, calls: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
    """Run ``calls`` (each one commit) from separate threads so that all land in one write transaction,
    in the order given. Returns each call's outcome: ("ok", Commit) or ("error", exception)."""
    outcomes: list[tuple[str, Any] | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            outcomes[i] = ("ok", calls[i]())
        except Exception as exc:
            outcomes[i] = ("error", exc)

    ths = []
    with store._write_lock:  # the first committer becomes the leader and waits here; the rest queue up
        for i in range(len(calls)):
            th = threading.Thread(target=run, args=(i,))
            th.start()
            ths.append(th)
            deadline = time.monotonic() + 30
            while not store._leading or len(store._queue) < i:  # the leader's own commit is not queued
                assert time.monotonic() < deadline, "a commit never reached the queue"
                time.sleep(0.001)
    for th in ths:
        th.join(60)
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]


def test_a_failing_commit_in_a_batch_does_not_affect_the_others(
    db_path: Path, opened: Callable[..., SQLiteStore]
) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("ns", "text", "not a number"), Put("ns", "v", 0)])
    batches, commits = store.batches, store.batched_commits

    outcomes = _queue_commits_into_one_batch(
        store,
        [
            # beta's first commit in the batch fails after its checks: its revision must not be used
            lambda: store.commit("beta", ops=[Put("ns", "seed", "x"), Incr("ns", "seed")]),
            lambda: store.commit(T, ops=[Put("ns", "a", 1)]),
            lambda: store.commit(T, checks=[VersionIs("ns", "v", 7)], ops=[Put("ns", "b", 1)]),
            lambda: store.commit(T, ops=[Put("ns", "c", 1), Incr("ns", "text")]),
            lambda: store.commit(T, checks=[Absent("ns", "a")], ops=[Put("ns", "d", 1)]),
            lambda: store.commit(T, checks=[VersionIs("ns", "a", 1)], ops=[Incr("ns", "n", 5)]),
            lambda: store.commit("beta", ops=[Append("beta:s", [NewEvent("e")])]),
            lambda: store.commit("beta", checks=[StreamAt("beta:s", 1)], ops=[Put("ns", "ok", 1)]),
        ],
    )
    assert store.batches == batches + 1  # all of them in one transaction
    assert store.batched_commits == commits + 4

    kinds = [(kind, type(value).__name__) for kind, value in outcomes]
    assert kinds == [
        ("error", "InvalidArgument"),  # incr on a non-integer: rolled back alone
        ("ok", "Commit"),
        ("error", "Conflict"),  # failed check
        ("error", "InvalidArgument"),  # its put of c is rolled back with it
        ("error", "Conflict"),  # sees a, written earlier in the same transaction
        ("ok", "Commit"),  # sees a at version 1
        ("ok", "Commit"),
        ("ok", "Commit"),  # sees the append of the commit before it
    ]
    assert outcomes[2][1].failures[0].found == 1
    assert outcomes[4][1].failures[0].found == 1
    assert [outcomes[i][1].revision for i in (1, 5)] == [2, 3]
    assert [outcomes[i][1].revision for i in (6, 7)] == [1, 2]  # beta's failed first commit used no revision
    assert outcomes[5][1].counters == {("ns", "n"): 5}

    assert store.get(T, "ns", "c") is None
    assert store.get(T, "ns", "b") is None
    assert store.get(T, "ns", "d") is None
    assert store.get("beta", "ns", "seed") is None
    assert store.revision(T) == 3
    assert store.revision("beta") == 2
    assert [c.revision for c in store.changes(T)] == [1, 2, 3]
    assert [c.revision for c in store.changes("beta")] == [1, 2]
    assert store.commit(T, ops=[Put("ns", "later", 1)]).revision == 4


def test_a_batch_that_cannot_commit_fails_every_commit_in_it(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    store = opened(_url(db_path, "busy_timeout_ms=50"))
    store.commit(T, ops=[Put("ns", "k", 0)])
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock beyond busy_timeout
        outcomes = _queue_commits_into_one_batch(
            store, [lambda i=i: store.commit(T, ops=[Put("ns", f"x{i}", i)]) for i in range(3)]
        )
        assert [type(v) for _, v in outcomes] == [Unavailable] * 3
        assert all(v.transient for _, v in outcomes)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert store.revision(T) == 1
    assert store.commit(T, ops=[Put("ns", "x0", 0)]).revision == 2


# ------------------------------------------------------------------ errors, options, schema, sweep


def test_a_write_lock_held_beyond_busy_timeout_raises_unavailable(
    db_path: Path, opened: Callable[..., SQLiteStore]
) -> None:
    store = opened(_url(db_path, "busy_timeout_ms=100"))
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable) as info:
            store.commit(T, ops=[Put("ns", "k", 1)])
        assert info.value.transient
        with pytest.raises(Unavailable):
            store.sweep()
        late = opened(_url(db_path, "busy_timeout_ms=100"))  # opening and reading need no write lock
        assert late.get(T, "ns", "k") is None
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert store.get(T, "ns", "k") is None
    assert store.commit(T, ops=[Put("ns", "k", 1)]).revision == 1


def _pragma(store: SQLiteStore, name: str) -> Any:
    return store._writer.execute(f"PRAGMA {name}").fetchone()[0]


def test_synchronous_option(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    assert _pragma(opened(_url(db_path)), "synchronous") == 2  # FULL by default
    assert _pragma(opened(_url(db_path, "synchronous=NORMAL")), "synchronous") == 1
    assert _pragma(opened(_url(db_path, "synchronous=full")), "synchronous") == 2
    assert _pragma(opened(_url(db_path), synchronous="NORMAL"), "synchronous") == 1
    store = opened(_url(db_path, "busy_timeout_ms=250&synchronous=NORMAL"))
    assert _pragma(store, "busy_timeout") == 250
    assert _pragma(store, "journal_mode") == "wal"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("synchronous=OFF", "synchronous"),
        ("synchronous=fast", "synchronous"),
        ("synchronous=", "synchronous"),
        ("busy_timeout_ms=-1", "busy_timeout_ms"),
        ("busy_timeout_ms=1.5", "busy_timeout_ms"),
        ("busy_timeout_ms=abc", "busy_timeout_ms"),
        ("watch_poll_ms=0", "watch_poll_ms"),
        ("max_value_bytes=0", "max_value_bytes"),
        ("journal_mode=DELETE", "journal_mode"),
        ("synchronous=FULL&synchronous=NORMAL", "url"),
    ],
)
def test_invalid_options_are_refused(db_path: Path, query: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        open_store(_url(db_path, query))
    assert info.value.field == field
    assert not db_path.exists()


def test_invalid_keyword_options_are_refused(db_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="synchronous"):
        open_store(_url(db_path), synchronous="EXTRA")
    with pytest.raises(InvalidArgument, match="busy_timeout_ms"):
        open_store(_url(db_path), busy_timeout_ms=True)
    assert not db_path.exists()


@pytest.mark.parametrize(
    "url",
    ["sqlite://", "sqlite:///", "sqlite://host/x.db", "sqlite:///:memory:", "sqlite:///x.db#frag", "sqlit:///x.db"],
)
def test_malformed_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidArgument):
        SQLiteStore.from_url(url)


def test_relative_and_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opened: Callable[..., SQLiteStore]
) -> None:
    monkeypatch.chdir(tmp_path)
    opened("sqlite:///rel.db").commit(T, ops=[Put("ns", "k", 1)])
    assert (tmp_path / "rel.db").exists()
    (tmp_path / "sub").mkdir()
    opened("sqlite:///sub/x.db").commit(T, ops=[Put("ns", "k", 1)])
    assert (tmp_path / "sub" / "x.db").exists()
    absolute = tmp_path / "abs.db"
    assert str(absolute).startswith("/")
    opened(f"sqlite:///{absolute}").commit(T, ops=[Put("ns", "k", 1)])  # sqlite:////abs/olute.db
    assert absolute.exists()


def test_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        open_store(_url(tmp_path / "missing" / "x.db"))


def test_a_newer_schema_version_is_refused(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    opened(_url(db_path)).commit(T, ops=[Put("ns", "k", 1)])
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE sl_schema SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(Unavailable, match="schema version"):
        open_store(_url(db_path))


# The two tables that schema version 1 kept WITHOUT ROWID, as version 1 declared them.
_V1_TABLES = {
    "sl_events": """CREATE TABLE sl_events (tenant TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
        type TEXT NOT NULL, data BLOB NOT NULL, meta BLOB NOT NULL, revision INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL, PRIMARY KEY (tenant, stream, seq)) WITHOUT ROWID""",
    "sl_changes": """CREATE TABLE sl_changes (tenant TEXT NOT NULL, revision INTEGER NOT NULL, body BLOB NOT NULL,
        PRIMARY KEY (tenant, revision)) WITHOUT ROWID""",
}


def _schema_of(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT type, name, tbl_name FROM sqlite_schema ORDER BY name").fetchall()
        ddl = raw.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name = 'sl_events'").fetchall()
    raw.close()
    assert "WITHOUT ROWID" not in ddl[0][1]
    return rows


def test_a_version_1_file_is_upgraded_in_place_with_its_data(
    tmp_path: Path, opened: Callable[..., SQLiteStore]
) -> None:
    path = tmp_path / "v1.db"
    store = opened(_url(path), clock=FakeClock())
    for i in range(30):
        store.commit(
            T if i % 3 else "other",
            ops=[Put("ns", f"k{i % 4}", {"i": i}), Append(f"s{i % 5}", [NewEvent("t", {"i": i}), NewEvent("u", i)])],
        )
    store.trim_changes(T, 5, 100)
    streams = {(t, f"s{j}"): store.read_stream(t, f"s{j}") for t in (T, "other") for j in range(5)}
    feeds = {t: store.changes(t, store.first_change(t) - 1, 1000) for t in (T, "other")}
    store.close()
    with sqlite3.connect(path) as raw:  # make it the file that version 1 wrote
        for table, ddl in _V1_TABLES.items():
            raw.execute(f"ALTER TABLE {table} RENAME TO old")
            raw.execute(ddl)
            raw.execute(f"INSERT INTO {table} SELECT * FROM old")
            raw.execute("DROP TABLE old")
        raw.execute("UPDATE sl_schema SET version = 1")
    raw.close()

    stores: list[SQLiteStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_at_once() -> None:
        try:
            barrier.wait()
            stores.append(opened(_url(path), clock=FakeClock()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_at_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT version FROM sl_schema").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()
    opened(_url(tmp_path / "new.db")).close()
    assert _schema_of(path) == _schema_of(tmp_path / "new.db")

    store = stores[0]
    assert {key: store.read_stream(*key) for key in streams} == streams
    assert {t: store.changes(t, store.first_change(t) - 1, 1000) for t in feeds} == feeds
    assert store.first_change(T) == 5
    last, revision = streams[(T, "s1")][-1].seq, feeds[T][-1].revision
    done = store.commit(T, ops=[Append("s1", [NewEvent("t", "after")])], checks=[StreamAt("s1", last)])
    assert done.revision == store.revision(T) == revision + 1
    assert [e.seq for e in store.read_stream(T, "s1")][-2:] == [last, last + 1]
    assert [c.revision for c in store.changes(T, revision - 1, 10)] == [revision, revision + 1]


def test_reopening_keeps_everything(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    first = opened(_url(db_path))
    first.commit(T, ops=[Put("ns", "k", {"a": [1, 2]}), Append("s", [NewEvent("t", 1)])])
    first.close()
    second = opened(_url(db_path))
    item = second.get(T, "ns", "k")
    assert item is not None
    assert (item.value, item.version) == ({"a": [1, 2]}, 1)
    assert second.stream_info(T, "s").last_seq == 1
    assert second.revision(T) == 1


def test_sweep_deletes_expired_rows(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    clock = FakeClock()
    store = opened(_url(db_path), clock=clock)
    store.commit(T, ops=[Put("ns", f"t{i}", i, ttl=10) for i in range(5)] + [Put("ns", "keep", 1)])
    store.commit("beta", ops=[Put("ns", "t", 1, ttl=1)])
    clock.advance(11)

    def rows() -> int:
        with sqlite3.connect(db_path) as raw:
            n = raw.execute("SELECT COUNT(*) FROM sl_items").fetchone()[0]
        raw.close()
        return int(n)

    assert rows() == 7  # expired but still stored, invisible to reads
    assert store.get(T, "ns", "t0") is None
    assert store.sweep(limit=4) == 4
    assert store.sweep() == 2
    assert store.sweep() == 0
    assert rows() == 1
    assert store.revision(T) == 1  # sweeping is not a commit


def test_two_handles_in_one_process_see_each_other(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    a = opened(_url(db_path))
    b = opened(_url(db_path))
    a.commit(T, ops=[Put("ns", "k", 1)])
    with pytest.raises(Conflict):
        b.commit(T, checks=[Absent("ns", "k")], ops=[Put("ns", "k", 2)])
    assert b.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", 2)]).revision == 2
    got: list[Any] = []
    watcher = threading.Thread(target=lambda: got.extend(a.watch(T, 2, timeout=60)))
    watcher.start()
    b.commit(T, ops=[Put("ns", "k", 3)])  # another connection: a's watch learns of it by polling
    watcher.join(90)
    assert [c.revision for c in got] == [3]


def test_a_forked_child_opens_its_own_connections(db_path: Path, opened: Callable[..., SQLiteStore]) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("ns", "k", 0)])
    assert store.get(T, "ns", "k") is not None  # the parent now has a reader connection as well
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer Pythons warn about fork() with threads
        pid = os.fork()
    if pid == 0:  # the child: SQLite connections must not cross fork(), so it must use fresh ones
        code = 1
        try:
            if store._wcur is None and not store._idle:
                store.commit(T, ops=[Incr("ns", "k")])
                item = store.get(T, "ns", "k")
                code = 0 if item is not None and item.value == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._wcur is not None  # the parent keeps its own
    item = store.get(T, "ns", "k")
    assert item is not None
    assert item.value == 1
    assert store.commit(T, ops=[Incr("ns", "k")]).revision == 3


@pytest.mark.parametrize("checked", [3, 250])
def test_checks_of_several_keys_look_each_key_up(
    db_path: Path, opened: Callable[..., SQLiteStore], checked: int
) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("ns", f"k{i:03d}", i) for i in range(300)])
    conn = sqlite3.connect(db_path)
    try:
        together = min(checked, sqlite_adapter._LOOKUPS_TOGETHER)
        sql = sqlite_adapter._sql_lookups("ns, key, version", together)
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", [T, 0] + ["ns", "k"] * together)]
    finally:
        conn.close()
    searches = [step for step in plan if "sl_items" in step]
    assert len(searches) == min(checked, sqlite_adapter._LOOKUPS_TOGETHER)
    assert all("(tenant=? AND ns=? AND key=?)" in step for step in searches), plan

    checks = [VersionIs("ns", f"k{i:03d}", 1) for i in range(checked)]
    with pytest.raises(Conflict) as caught:  # the last key, in the last statement, is stale
        store.commit(T, checks=[*checks[:-1], VersionIs("ns", f"k{checked - 1:03d}", 2)], ops=[Put("ns", "x", 1)])
    assert [(getattr(f.check, "key", None), f.found) for f in caught.value.failures] == [(f"k{checked - 1:03d}", 1)]
    assert store.get(T, "ns", "x") is None
    assert store.commit(T, checks=[*checks, Absent("ns", "x")], ops=[Put("ns", "x", 1)]).versions[("ns", "x")] == 1


# ------------------------------------------------------------------ backup


def test_a_backup_taken_during_commits_is_one_whole_revision(
    db_path: Path, opened: Callable[..., SQLiteStore], tmp_path: Path
) -> None:
    store = opened(_url(db_path))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                store.commit(
                    T,
                    ops=[
                        Put("kv", f"w{w}", i),
                        Incr("kv", "total"),
                        Append("log", [NewEvent("wrote", {"w": w, "i": i})]),
                    ],
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        while store.revision(T) < 200:
            time.sleep(0.005)
        size = store.backup(str(tmp_path / "copy.db"))
        at_backup = store.revision(T)
        while store.revision(T) < at_backup + 50:  # the writers went on during and after it
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert size == (tmp_path / "copy.db").stat().st_size
    assert not list(tmp_path.glob("copy.db.partial-*"))

    copy = opened(_url(tmp_path / "copy.db"))
    r = copy.revision(T)
    assert 200 <= r <= at_backup
    feed = copy.changes(T, 0, 10_000)
    assert [c.revision for c in feed] == list(range(1, r + 1))  # the feed up to r, nothing after
    assert [c.ops for c in feed] == [c.ops for c in store.changes(T, 0, r)]
    # every item and stream is as the feed up to r leaves it
    last: dict[str, int] = {}
    for c in feed:
        for op in c.ops:
            if op.op == "put":
                last[op.key] = op.value  # type: ignore[assignment]
    assert {k: copy.get(T, "kv", k).value for k in last} == last  # type: ignore[union-attr]
    assert copy.get(T, "kv", "total").value == r  # type: ignore[union-attr]
    assert copy.stream_info(T, "log").last_seq == r
    assert copy.commit(T, ops=[Put("kv", "after", 1)]).revision == r + 1  # a working store


def test_a_backup_refuses_what_it_cannot_do_and_writes_nothing(
    db_path: Path, opened: Callable[..., SQLiteStore], tmp_path: Path
) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("kv", "k", 1)])
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    for dest, message in [
        (str(taken), "exists"),
        (str(tmp_path / "nowhere" / "copy.db"), "does not exist"),
        (str(db_path), "exists"),
        ("", "new file"),
        (":memory:", "new file"),
        (123, "new file"),
        (str(tmp_path / "bad\ud800.db"), "Unicode"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            store.backup(dest)  # type: ignore[arg-type]
    assert taken.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no copy, no partial file
    store.close()
    with pytest.raises(Unavailable):
        store.backup(str(tmp_path / "late.db"))
    assert not (tmp_path / "late.db").exists()


BACKUP = """
import sys
from stateline import open_store
store = open_store(sys.argv[1])
print("starting", flush=True)
store.backup(sys.argv[2])
print("done", flush=True)
"""


def test_a_backup_killed_midway_leaves_no_file_under_its_name(
    db_path: Path, opened: Callable[..., SQLiteStore], tmp_path: Path
) -> None:
    store = opened(_url(db_path, "synchronous=NORMAL"))
    for b in range(40):
        store.commit(T, ops=[Put("big", f"k{b:03d}-{i:04d}", "x" * 1000) for i in range(1000)])
    dest = tmp_path / "copy.db"
    proc = _child(BACKUP, _url(db_path), str(dest))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("copy.db.partial-*")):  # VACUUM INTO has begun writing the copy
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    # the next backup is not disturbed by the partial file left behind
    assert store.backup(str(dest)) == dest.stat().st_size
    assert opened(_url(dest)).get(T, "big", "k039-0999").value == "x" * 1000  # type: ignore[union-attr]


def test_a_backup_never_overwrites_a_file_that_appears_while_it_runs(
    db_path: Path, opened: Callable[..., SQLiteStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened(_url(db_path))
    store.commit(T, ops=[Put("kv", "k", 1)])
    dest = tmp_path / "copy.db"
    link = os.link

    def someone_else_first(src: str, dst: str) -> None:
        Path(dst).write_bytes(b"theirs")
        link(src, dst)

    monkeypatch.setattr(sqlite_adapter.os, "link", someone_else_first)
    with pytest.raises(InvalidArgument, match="exists"):
        store.backup(str(dest))
    assert dest.read_bytes() == b"theirs"
    assert not list(tmp_path.glob("copy.db.partial-*"))

    def no_hard_links(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sqlite_adapter.os, "link", no_hard_links)
    dest.unlink()
    assert store.backup(str(dest)) == dest.stat().st_size  # renamed into place instead
    assert not list(tmp_path.glob("copy.db.partial-*"))
    assert opened(_url(dest)).get(T, "kv", "k").value == 1  # type: ignore[union-attr]
