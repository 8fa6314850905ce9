"""The SQLite Store adapter: one database file in WAL mode, durable group commits, shared by processes.

URL: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``, with optional query options:

* ``synchronous=FULL`` (the default): a commit is acknowledged only after the write-ahead log
  is flushed to disk, so an acknowledged commit survives power loss.
* ``synchronous=NORMAL``: the log is flushed at checkpoints only. An acknowledged commit
  survives a crash (or ``kill -9``) of the process, but the last commits may be lost if the
  machine loses power. Several times faster on slow disks.
* ``busy_timeout_ms`` (default 5000): how long a call waits for another process that holds the
  write lock before it raises ``Unavailable``.
* ``watch_poll_ms`` (default 10): how often a waiting ``watch`` looks for commits made by other
  processes (commits in this process wake it at once).
* ``max_value_bytes``: the per-value size limit (1 MiB by default).

Group commit: the commits that threads of one process submit while a transaction is being
written are applied together in the next write transaction, each inside its own savepoint and
with its own checks and outcome, and made durable by one ``COMMIT`` (one flush). Several
processes may open the same file; writers serialise on SQLite's write lock (``BEGIN IMMEDIATE``).
A process forked after opening a store gets fresh connections of its own on first use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import orjson

from stateline.clock import Clock
from stateline.errors import Conflict, InvalidArgument, PayloadTooLarge, StatelineError, Unavailable
from stateline.store.protocol import (
    LARGEST_MAX_VALUE_BYTES,
    MAX_INT,
    ChangeRecorder,
    PreparedAppend,
    PreparedCommit,
    PreparedDelete,
    PreparedIncr,
    PreparedPut,
    Store,
    decode_change,
    int_option,
    prefix_end,
    url_options,
)
from stateline.types import (
    Absent,
    Change,
    Check,
    CheckFailure,
    Commit,
    Event,
    Exists,
    Item,
    NamespaceStats,
    StreamAt,
    StreamInfo,
    TenantStats,
    VersionIs,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 2

# How many queued commits one write transaction takes at most.
MAX_BATCH = 512
# How long a leader may wait for the committers released by the last batch to queue again (µs).
GATHER_US = 300
# Idle reader connections kept for reuse.
MAX_IDLE_READERS = 16

_EVENTS = """CREATE TABLE IF NOT EXISTS sl_events (
    tenant TEXT NOT NULL,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    meta BLOB NOT NULL,
    revision INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, stream, seq)
)"""
_CHANGES = """CREATE TABLE IF NOT EXISTS sl_changes (
    tenant TEXT NOT NULL,
    revision INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (tenant, revision)
)"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS sl_schema (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sl_tenants (
    tenant TEXT NOT NULL PRIMARY KEY,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sl_items (
    tenant TEXT NOT NULL,
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    version INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (tenant, ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sl_items_expires ON sl_items (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS sl_streams (
    tenant TEXT NOT NULL,
    stream TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (tenant, stream)
) WITHOUT ROWID;
"""
    + _EVENTS
    + ";"
    + _CHANGES
)

# Events and change records are appended and hardly ever updated, so they live in rowid tables: each
# commit adds its rows at the end of one b-tree, and only the small primary-key entries go into the
# middle of their index. Keyed by their primary key (WITHOUT ROWID, schema version 1), a stream's rows
# went into the middle of a tree of large rows: its leaf split every few commits and SQLite rebalanced
# it with two siblings, and a change record over ~1 KB spilled into an overflow page of its own. A case
# commit (state, receipt, 5 events) wrote 15 pages to the WAL; now 12, and commits are ~15% faster.


def _rebuilt(table: str, ddl: str, columns: str, key: str) -> tuple[str, ...]:
    """The statements that rebuild ``table`` as ``ddl`` declares it, its rows copied in ``key`` order."""
    return (
        f"ALTER TABLE {table} RENAME TO {table}_old",
        ddl,
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_old ORDER BY {key}",
        f"DROP TABLE {table}_old",
    )


# _UPGRADES[v]: the statements that take a file from schema version v to v + 1 (run in one transaction).
_UPGRADES: dict[int, tuple[str, ...]] = {
    1: (
        *_rebuilt(
            "sl_events", _EVENTS, "tenant, stream, seq, type, data, meta, revision, recorded_at", "tenant, stream, seq"
        ),
        *_rebuilt("sl_changes", _CHANGES, "tenant, revision, body", "tenant, revision"),
    ),
}
assert set(_UPGRADES) == set(range(1, SCHEMA_VERSION))

# ---------------------------------------------------------------- statements (shared with bench/)

SQL_BEGIN = "BEGIN IMMEDIATE"
SQL_COMMIT = "COMMIT"
SQL_ROLLBACK = "ROLLBACK"
SQL_BUMP_REVISION = (
    "INSERT INTO sl_tenants (tenant, revision) VALUES (?, 1) "
    "ON CONFLICT (tenant) DO UPDATE SET revision = revision + 1 RETURNING revision"
)


@functools.lru_cache(maxsize=64)
def _sql_put(n: int) -> str:
    """An upsert of ``n`` items returning ``version, ns, key`` of each. ?1 tenant ?2 revision ?3 now,
    then ns, key, value, expires_at per row; an expired row counts as absent (its version restarts)."""
    rows = ", ".join(f"(?1, ?{4 + 4 * i}, ?{5 + 4 * i}, ?{6 + 4 * i}, 1, ?2, ?3, ?3, ?{7 + 4 * i})" for i in range(n))
    expired = "sl_items.expires_at IS NOT NULL AND sl_items.expires_at <= ?3"
    return (
        "INSERT INTO sl_items (tenant, ns, key, value, version, revision, created_at, updated_at, expires_at) "
        f"VALUES {rows} ON CONFLICT (tenant, ns, key) DO UPDATE SET "
        f"version = CASE WHEN {expired} THEN 1 ELSE sl_items.version + 1 END, "
        f"created_at = CASE WHEN {expired} THEN ?3 ELSE sl_items.created_at END, "
        "value = excluded.value, revision = ?2, updated_at = ?3, expires_at = excluded.expires_at "
        "RETURNING version, ns, key"
    )


@functools.lru_cache(maxsize=128)
def _sql_insert_events(n: int) -> str:
    """An insert of ``n`` events. ?1 tenant ?2 revision ?3 now, then stream, seq, type, data, meta per row."""
    rows = ", ".join(
        f"(?1, ?{4 + 5 * i}, ?{5 + 5 * i}, ?{6 + 5 * i}, ?{7 + 5 * i}, ?{8 + 5 * i}, ?2, ?3)" for i in range(n)
    )
    return f"INSERT INTO sl_events (tenant, stream, seq, type, data, meta, revision, recorded_at) VALUES {rows}"


_EVENTS_TOGETHER = 100  # 5 parameters a row: below the oldest limit on parameters (999)

# one item: (tenant, revision, now, ns, key, value, expires_at)
SQL_PUT = _sql_put(1)
SQL_INSERT_CHANGE = "INSERT INTO sl_changes (tenant, revision, body) VALUES (?, ?, ?)"

_SQL_SET_REVISION = "UPDATE sl_tenants SET revision = ? WHERE tenant = ?"
_SQL_SAVEPOINT = "SAVEPOINT c"
_SQL_ROLLBACK_TO = "ROLLBACK TO c"
_SQL_RELEASE = "RELEASE c"
_SQL_LIVE_VERSION = (
    "SELECT version FROM sl_items WHERE tenant = ? AND ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_SQL_STREAM_SEQ = "SELECT last_seq FROM sl_streams WHERE tenant = ? AND stream = ?"
_SQL_ITEM_ROW = "SELECT value, version, created_at, expires_at FROM sl_items WHERE tenant = ? AND ns = ? AND key = ?"
_SQL_WRITE_ITEM = (
    "INSERT OR REPLACE INTO sl_items (tenant, ns, key, value, version, revision, created_at, updated_at, expires_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_DELETE = "DELETE FROM sl_items WHERE tenant = ? AND ns = ? AND key = ? RETURNING version, expires_at"
_SQL_BUMP_STREAM = (
    "INSERT INTO sl_streams (tenant, stream, last_seq) VALUES (?1, ?2, ?3) "
    "ON CONFLICT (tenant, stream) DO UPDATE SET last_seq = last_seq + ?3 RETURNING last_seq"
)
_SQL_TRIM = "DELETE FROM sl_events WHERE tenant = ? AND stream = ? AND seq < ?"
_ITEM_COLS = "ns, key, value, version, revision, created_at, updated_at, expires_at"
_SQL_GET = (
    f"SELECT {_ITEM_COLS} FROM sl_items "
    "WHERE tenant = ? AND ns = ? AND key = ? AND (expires_at IS NULL OR expires_at > ?)"
)
_SQL_SCAN = f"SELECT {_ITEM_COLS} FROM sl_items WHERE tenant = ? AND ns = ? AND (expires_at IS NULL OR expires_at > ?)"
_SQL_READ_STREAM = (
    "SELECT seq, type, data, meta, revision, recorded_at FROM sl_events "
    "WHERE tenant = ? AND stream = ? AND seq >= ? AND seq <= ? ORDER BY seq LIMIT ?"
)
_SQL_STREAM_INFO = (
    "SELECT s.last_seq, (SELECT MIN(e.seq) FROM sl_events e WHERE e.tenant = s.tenant AND e.stream = s.stream) "
    "FROM sl_streams s WHERE s.tenant = ? AND s.stream = ?"
)
_SQL_REVISION = "SELECT revision FROM sl_tenants WHERE tenant = ?"
_SQL_CHANGES = "SELECT revision, body FROM sl_changes WHERE tenant = ? AND revision > ? ORDER BY revision LIMIT ?"
_SQL_FIRST_CHANGE = (
    "SELECT COALESCE((SELECT MIN(revision) FROM sl_changes WHERE tenant = ?1), "
    "(SELECT revision FROM sl_tenants WHERE tenant = ?1) + 1, 1)"
)
_SQL_TRIM_CHANGES = (
    "DELETE FROM sl_changes WHERE tenant = ?1 AND revision IN "
    "(SELECT revision FROM sl_changes WHERE tenant = ?1 AND revision < ?2 ORDER BY revision LIMIT ?3)"
)
_SQL_SWEEP = (
    "DELETE FROM sl_items WHERE (tenant, ns, key) IN "
    "(SELECT tenant, ns, key FROM sl_items WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)"
)

_SYNCHRONOUS = {"FULL": 2, "NORMAL": 1}
_OPTIONS = ("synchronous", "busy_timeout_ms", "watch_poll_ms", "max_value_bytes")


# Every open store, so that a forked child drops the connections it inherited (SQLite forbids
# using a connection across fork()); those are kept here, never used and never closed.
_LIVE: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_INHERITED: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    for store in list(_LIVE):
        store._forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _translate(exc: sqlite3.Error) -> StatelineError:
    """Map a sqlite3 error onto the error hierarchy."""
    msg = str(exc)
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in msg or "busy" in msg:
        return Unavailable(f"the database is locked by another writer beyond busy_timeout ({msg})")
    if name.startswith("SQLITE_TOOBIG") or "too big" in msg:
        return PayloadTooLarge(f"sqlite refused the size of a value ({msg})")
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in msg:
        return Unavailable("the store is closed")
    return Unavailable(f"sqlite: {msg}" + (f" ({name})" if name else ""))


@functools.lru_cache(maxsize=128)
def _sql_lookups(cols: str, n: int) -> str:
    # a compound of point lookups: ORs of (ns, key) pairs are planned as a scan of the tenant's
    # rows once there are three of them
    one = f"SELECT {cols} FROM sl_items WHERE tenant = ?1 AND ns = ?{{}} AND key = ?{{}} AND {{}}"
    live = "(expires_at IS NULL OR expires_at > ?2)"
    return " UNION ALL ".join(one.format(3 + 2 * i, 4 + 2 * i, live) for i in range(n))


_LOOKUPS_TOGETHER = 100  # below SQLite's limit on the terms of a compound select (500)


def _lookups(
    cur: sqlite3.Cursor | sqlite3.Connection, cols: str, tenant: str, now: int, pairs: Sequence[tuple[str, str]]
) -> Iterator[Any]:
    """The live rows (``cols``, beginning with ns and key) of the ``(ns, key)`` pairs that exist,
    read by one statement per 100 pairs (one snapshot only if the caller holds a transaction)."""
    for start in range(0, len(pairs), _LOOKUPS_TOGETHER):
        chunk = pairs[start : start + _LOOKUPS_TOGETHER]
        params: list[Any] = [tenant, now]
        for pair in chunk:
            params += pair
        yield from cur.execute(_sql_lookups(cols, len(chunk)), params)


def _live_versions(cur: sqlite3.Cursor, tenant: str, checks: Sequence[Check], now: int) -> dict[tuple[str, str], int]:
    """The live versions of the keys several item checks name."""
    pairs = [(ch.namespace, ch.key) for ch in checks]  # type: ignore[union-attr]
    return {(ns, key): v for ns, key, v in _lookups(cur, "ns, key, version", tenant, now, pairs)}


_PUTS_TOGETHER = 256  # 4 parameters a row: far below any SQLite build's limit on parameters


def _put_together(
    cur: sqlite3.Cursor, c: PreparedCommit, tenant: str, now: int, revision: int
) -> dict[tuple[str, str], int] | None:
    """Write every put of ``c`` with one statement when it has several and no key is written twice
    (then the order of its writes cannot matter); return their versions, or None to write op by op."""
    puts = [op for op in c.ops if type(op) is PreparedPut]
    if not 2 <= len(puts) <= _PUTS_TOGETHER:
        return None
    written = [(op.namespace, op.key) for op in c.ops if type(op) in (PreparedPut, PreparedDelete, PreparedIncr)]  # type: ignore[union-attr]
    if len(set(written)) != len(written):
        return None
    params: list[Any] = [tenant, revision, now]
    for op in puts:
        assert isinstance(op, PreparedPut)
        params += (op.namespace, op.key, op.value, None if op.ttl_us is None else now + op.ttl_us)
    return {(ns, key): v for v, ns, key in cur.execute(_sql_put(len(puts)), params)}


class _RolledBack(Exception):
    """A commit of a batch failed inside its savepoint and was rolled back alone."""

    def __init__(self, cause: StatelineError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Request:
    """One commit waiting in the group-commit queue."""

    __slots__ = ("commit", "error", "lead", "result", "wake")

    def __init__(self, commit: PreparedCommit) -> None:
        self.commit = commit
        self.result: Commit | None = None
        self.error: BaseException | None = None
        self.wake: Any = None  # a held lock, created only when the request has to wait
        self.lead = False


def _key_range(column: str, prefix: str, after: str | None) -> tuple[str, list[Any]]:
    """SQL conditions, with their parameters, for values of ``column`` that start with ``prefix``
    and come after ``after``."""
    sql, params = "", []
    if after is not None and after >= prefix:
        sql += f" AND {column} > ?"
        params.append(after)
    elif prefix:
        sql += f" AND {column} >= ?"
        params.append(prefix)
    end = prefix_end(prefix) if prefix else None
    if end is not None:
        sql += f" AND {column} < ?"
        params.append(end)
    return sql, params


class SQLiteStore(Store):
    """A Store kept in one SQLite file (WAL mode); thread-safe, and shared safely by processes.

    ``batches`` counts the write transactions this handle committed (each one flush of the log
    at ``synchronous=FULL``) and ``batched_commits`` the commits they carried, so
    ``batched_commits / batches`` is the number of commits per flush that group commit achieved.
    """

    scheme = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        clock: Clock | None = None,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        watch_poll_ms: int = 10,
        **options: Any,
    ) -> None:
        super().__init__(clock=clock, **options)
        if type(path) is not str or not path:
            raise InvalidArgument("path", "must be a non-empty file path")
        if path == ":memory:" or path.startswith("file:"):
            raise InvalidArgument("path", "must be a file path (use memory:// for an in-memory store)")
        if type(synchronous) is not str or synchronous.upper() not in _SYNCHRONOUS:
            raise InvalidArgument("synchronous", f"must be FULL or NORMAL, got {synchronous!r}")
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = int_option("busy_timeout_ms", busy_timeout_ms, 0, 3_600_000)
        self.watch_poll_s = int_option("watch_poll_ms", watch_poll_ms, 1, 10_000) / 1000.0
        self.batches = 0
        self.batched_commits = 0

        self._new_coordination()
        self._commits_seen = 0
        self._idle: list[sqlite3.Connection] = []

        writer = self._connect()
        try:
            self._init_schema(writer)
            writer.execute(f"PRAGMA synchronous = {self.synchronous}")
        except BaseException:
            writer.close()
            raise
        self._writer: sqlite3.Connection | None = writer
        self._wcur: sqlite3.Cursor | None = writer.cursor()
        _LIVE.add(self)

    def _new_coordination(self) -> None:
        """Fresh group-commit queue, locks and watcher count (on open, and in a forked child, whose
        copies of the parent's locks may be held by threads that do not exist there)."""
        self._queue: list[_Request] = []
        self._queue_lock = threading.Lock()
        self._leading = False
        self._woken = 0
        self._gather_want = 0
        self._gathered = threading.Lock()
        self._write_lock = threading.Lock()
        self._turn = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._watchers = 0

    def _reopen_writer(self) -> sqlite3.Cursor:
        """A new writer connection (after a fork: a connection must not cross into a child process)."""
        writer = self._connect()
        try:
            writer.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as exc:
            writer.close()
            raise _translate(exc) from None
        self._writer = writer
        self._wcur = cur = writer.cursor()
        return cur

    def _forget_connections(self) -> None:
        """In a forked child: drop (never use, never close) the parent's connections and locks."""
        _INHERITED.extend(c for c in (self._writer, *self._idle) if c is not None)
        self._idle = []
        self._writer = None
        self._wcur = None
        self._new_coordination()

    # ------------------------------------------------------------ opening

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **options: Any) -> Self:
        """Open ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (options: see the module)."""
        if type(url) is not str:
            raise InvalidArgument("url", "must be a string")
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite":
            raise InvalidArgument("url", f"not a sqlite:// URL: {url!r}")
        if parts.netloc:
            raise InvalidArgument(
                "url", "a sqlite URL has no host: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        if parts.fragment:
            raise InvalidArgument("url", "a sqlite URL has no fragment")
        path = unquote(parts.path)
        if not path.startswith("/") or len(path) < 2:
            raise InvalidArgument("url", "missing the file path: use sqlite:///relative/path.db")
        path = path[1:]
        merged: dict[str, Any] = {**url_options(parts.query), **options}
        for name in merged:
            if name not in _OPTIONS:
                raise InvalidArgument(name, f"unknown sqlite option; use one of {', '.join(_OPTIONS)}")
        if "max_value_bytes" in merged:
            merged["max_value_bytes"] = int_option(
                "max_value_bytes", merged["max_value_bytes"], 1, LARGEST_MAX_VALUE_BYTES
            )
        return cls(path, clock=clock, **merged)

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_ms / 1000.0,
                isolation_level=None,
                check_same_thread=False,
                cached_statements=256,
            )
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open {self.path!r}: {exc}") from None
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL and create the schema if it is missing, or upgrade an older one (idempotent; safe
        when processes race; an upgrade rewrites the tables it changes, once, under the write lock)."""
        deadline = time.monotonic() + max(self.busy_timeout_ms, 1000) / 1000.0
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise Unavailable(f"cannot switch {self.path!r} to WAL mode (got {mode!r})")
                if self._schema_version(conn) == SCHEMA_VERSION:
                    return  # the usual case: nothing to create, no write lock needed
                conn.execute(SQL_BEGIN)
                break
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    conn.execute(SQL_ROLLBACK)
                # switching to WAL can fail at once while another process creates the file
                if ("locked" in str(exc) or "busy" in str(exc)) and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise _translate(exc) from None
            except sqlite3.Error as exc:
                raise _translate(exc) from None
        try:
            version = self._schema_version(conn)  # again: another process may have got here first
            if version is None:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO sl_schema (id, version) VALUES (1, ?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                for v in range(version, SCHEMA_VERSION):
                    for statement in _UPGRADES[v]:
                        conn.execute(statement)
                conn.execute("UPDATE sl_schema SET version = ? WHERE id = 1", (SCHEMA_VERSION,))
            conn.execute(SQL_COMMIT)
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute(SQL_ROLLBACK)
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from None
            raise

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        """The file's schema version (``None``: no schema yet); refuse a newer one."""
        try:
            row = conn.execute("SELECT version FROM sl_schema WHERE id = 1").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        if row is None:
            return None
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise Unavailable(
                f"{self.path!r} has schema version {version}, newer than this stateline's {SCHEMA_VERSION}"
            )
        return version

    # ------------------------------------------------------------ reader connections

    # Readers take turns. Python's sqlite3 module lets go of the GIL at every step of a statement
    # (every row), so threads reading at once wake one another at each row; on 2 cores with 8
    # worker threads that cost more than the reads themselves. Taking turns wakes a waiting reader
    # once per read: claim+complete cycles with 8 threads rose from ~540 to ~750/s.

    def _take(self) -> sqlite3.Connection:
        """A reader connection, with the read turn held until ``_give``."""
        self._turn.acquire()
        try:
            return self._reader()
        except BaseException:
            self._turn.release()
            raise

    def _give(self, conn: sqlite3.Connection) -> None:
        try:
            self._put_back(conn)
        finally:
            self._turn.release()

    def _reader(self) -> sqlite3.Connection:
        try:
            return self._idle.pop()
        except IndexError:
            pass
        conn = self._connect()
        try:
            conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc) from None
        return conn

    def _put_back(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute(SQL_ROLLBACK)
            except sqlite3.Error:
                conn.close()
                return
        if self._closed or len(self._idle) >= MAX_IDLE_READERS:
            conn.close()
        else:
            self._idle.append(conn)

    # ------------------------------------------------------------ commits (group commit)

    def _commit(self, c: PreparedCommit) -> Commit:
        with self._queue_lock:
            if self._leading:
                req: _Request | None = _Request(c)
                assert req is not None
                req.wake = threading.Lock()
                req.wake.acquire()
                self._queue.append(req)
                if self._gather_want and len(self._queue) >= self._gather_want:
                    self._gather_want = 0
                    self._gathered.release()  # the leader waits for this group: it is complete
            else:
                self._leading = True
                req = None
        if req is None:
            return self._lead_own(c)
        req.wake.acquire()  # released by the leader: our outcome is ready, or we lead the next batch
        if req.lead:
            self._lead_queued()
        return self._outcome(req)

    @staticmethod
    def _outcome(req: _Request) -> Commit:
        if req.error is not None:
            raise req.error.with_traceback(None)
        assert req.result is not None
        return req.result

    def _lead_own(self, c: PreparedCommit) -> Commit:
        """Lead with our own commit: alone if nobody is waiting, else first of a batch with the waiters."""
        queued: list[_Request] = []
        try:
            with self._write_lock:
                self._gather(0)
                with self._queue_lock:
                    queued = self._queue[: MAX_BATCH - 1]
                    del self._queue[: MAX_BATCH - 1]
                if not queued:
                    return self._write_one(c)
                own = _Request(c)
                self._run_batch([own, *queued])
            return self._outcome(own)
        finally:
            self._hand_over(queued)

    def _lead_queued(self) -> None:
        """Lead a batch of the queue (ours is at its head)."""
        batch: list[_Request] = []
        try:
            with self._write_lock:
                self._gather(1)
                with self._queue_lock:
                    batch = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
                self._run_batch(batch)
        finally:
            self._hand_over(batch)

    def _hand_over(self, batch: list[_Request]) -> None:
        """Wake the batch's waiters and make the first newcomer (if any) the next leader."""
        woken = 0
        for r in batch:
            if r.wake is not None:
                r.wake.release()
                woken += 1
        self._woken = woken
        with self._queue_lock:
            if self._queue:
                nxt: _Request | None = self._queue[0]
                self._queue[0].lead = True
            else:
                nxt = None
                self._leading = False
        if nxt is not None:
            nxt.wake.release()

    def _gather(self, own_queued: int) -> None:
        """Before writing, give the committers the last batch just released a moment to queue again.

        Under steady concurrency this makes one transaction carry nearly every thread's commit
        instead of alternating half-batches; with a single committer it never waits.
        """
        if not self._woken or GATHER_US <= 0:
            return
        with self._queue_lock:
            want = self._woken + own_queued
            if len(self._queue) >= want:
                return
            gathered = threading.Lock()
            gathered.acquire()
            self._gather_want, self._gathered = want, gathered
        gathered.acquire(timeout=GATHER_US / 1e6)  # released by the committer that completes the group
        with self._queue_lock:
            self._gather_want = 0

    def _run_batch(self, batch: list[_Request]) -> None:
        try:
            self._write_batch(batch)
        finally:
            for r in batch:  # whatever happened, every request gets an outcome
                if r.result is None and r.error is None:
                    r.error = Unavailable("the commit was interrupted; its outcome is unknown")

    def _committed(self, commits: int) -> None:
        self.batches += 1
        self.batched_commits += commits
        self._commits_seen += 1  # only ever changed under the write lock
        if self._watchers:
            with self._cond:
                self._cond.notify_all()

    def _write_one(self, c: PreparedCommit) -> Commit:
        """The commit alone in its transaction (nobody else was waiting): raise its error directly."""
        if self._closed:
            raise Unavailable("the store is closed")
        cur = self._wcur or self._reopen_writer()
        try:
            cur.execute(SQL_BEGIN)
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        try:
            changes: list[tuple[str, int, bytes]] = []
            commit = self._apply(cur, c, self.clock.now_us(), {}, changes, False)
            cur.execute(SQL_INSERT_CHANGE, changes[0])
            cur.execute(SQL_COMMIT)
        except BaseException as exc:
            if cur.connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute(SQL_ROLLBACK)
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc) from None
            raise
        self._committed(1)
        return commit

    def _write_batch(self, batch: list[_Request]) -> None:
        """Apply ``batch`` in one write transaction; give each request its own outcome."""
        if self._closed:
            for r in batch:
                r.error = Unavailable("the store is closed")
            return
        clock = self.clock
        try:
            cur = self._wcur or self._reopen_writer()
            cur.execute(SQL_BEGIN)
        except (sqlite3.Error, StatelineError) as exc:
            err = _translate(exc) if isinstance(exc, sqlite3.Error) else exc
            for r in batch:
                r.error = err
            return
        # Per batch: tenant -> [revision assigned last, revision stored in sl_tenants], and the change rows.
        revs: dict[str, list[int]] = {}
        changes: list[tuple[str, int, bytes]] = []
        applied = 0
        try:
            if len(batch) == 1:
                r = batch[0]
                try:
                    r.result = self._apply(cur, r.commit, clock.now_us(), revs, changes, False)
                    applied = 1
                except StatelineError as exc:
                    r.error = exc
                except sqlite3.Error as exc:
                    r.error = _translate(exc)
                except Exception as exc:  # noqa: BLE001  # the commit's own outcome; the transaction rolls back
                    r.error = exc
            else:
                for r in batch:
                    try:
                        r.result = self._apply(cur, r.commit, clock.now_us(), revs, changes, True)
                        applied += 1
                    except (StatelineError, _RolledBack) as exc:
                        r.error = exc.cause if isinstance(exc, _RolledBack) else exc
            if applied:
                for tenant, (assigned, stored) in revs.items():
                    if assigned != stored:
                        cur.execute(_SQL_SET_REVISION, (assigned, tenant))
                cur.executemany(SQL_INSERT_CHANGE, changes)
                cur.execute(SQL_COMMIT)
            else:
                cur.execute(SQL_ROLLBACK)
        except Exception as exc:  # noqa: BLE001  # a write failed outside any savepoint: the whole batch fails
            if cur.connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute(SQL_ROLLBACK)
            failure: BaseException = _translate(exc) if isinstance(exc, sqlite3.Error) else exc
            for r in batch:
                r.result = None
                r.error = failure
            return
        if applied:
            self._committed(applied)

    def _apply(
        self,
        cur: sqlite3.Cursor,
        c: PreparedCommit,
        now: int,
        revs: dict[str, list[int]],
        changes: list[tuple[str, int, bytes]],
        batched: bool,
    ) -> Commit:
        """Apply one commit inside the open write transaction, or raise having written nothing of it."""
        tenant = c.tenant
        if c.checks:
            failures: list[CheckFailure] = []
            item_checks = [ch for ch in c.checks if type(ch) is not StreamAt]
            found_versions = _live_versions(cur, tenant, item_checks, now) if len(item_checks) > 1 else None
            for check in c.checks:
                if type(check) is StreamAt:
                    row = cur.execute(_SQL_STREAM_SEQ, (tenant, check.stream)).fetchone()
                    seq = 0 if row is None else row[0]
                    if seq != check.seq:
                        failures.append(CheckFailure(check, seq))
                    continue
                assert isinstance(check, VersionIs | Absent | Exists)
                if found_versions is not None:
                    found = found_versions.get((check.namespace, check.key))
                else:
                    row = cur.execute(_SQL_LIVE_VERSION, (tenant, check.namespace, check.key, now)).fetchone()
                    found = None if row is None else row[0]
                t = type(check)
                if (
                    (t is VersionIs and found != check.version)  # type: ignore[union-attr]
                    or (t is Absent and found is not None)
                    or (t is Exists and found is None)
                ):
                    failures.append(CheckFailure(check, found))
            if failures:
                raise Conflict(f"{len(failures)} check(s) failed", failures=failures)

        # The checks hold and nothing is written yet. Of the ops, only an incr can still fail (on a
        # non-integer or an overflow), so in a batch a commit with an incr runs inside its own
        # savepoint and a failure undoes that commit alone. Any other failure from here on is the
        # backend's (I/O, disk full) and fails the whole batch.
        savepoint = batched and any(type(op) is PreparedIncr for op in c.ops)
        if savepoint:
            cur.execute(_SQL_SAVEPOINT)
        rev = revs.get(tenant)
        try:
            if rev is None:
                revision: int = cur.execute(SQL_BUMP_REVISION, (tenant,)).fetchone()[0]
            else:
                revision = rev[0] + 1
            commit, body = self._write_ops(cur, c, now, revision)
        except StatelineError as exc:
            if not savepoint:
                raise  # alone in its transaction: the whole transaction rolls back
            cur.execute(_SQL_ROLLBACK_TO)
            cur.execute(_SQL_RELEASE)
            raise _RolledBack(exc) from None
        if savepoint:
            cur.execute(_SQL_RELEASE)
        if rev is None:
            revs[tenant] = [revision, revision]
        else:
            rev[0] = revision
        changes.append((tenant, revision, body))
        return commit

    def _write_ops(self, cur: sqlite3.Cursor, c: PreparedCommit, now: int, revision: int) -> tuple[Commit, bytes]:
        tenant = c.tenant
        rows: list[Any] = []  # stream, seq, type, data, meta of each new event
        totals: dict[str, int] | None = None  # stream -> events the commit appends to it
        recorder = ChangeRecorder()
        versions: dict[tuple[str, str], int] = {}
        counters: dict[tuple[str, str], int] = {}
        last_seqs: dict[str, int] = {}
        trims: dict[str, int] | None = None
        put_versions = _put_together(cur, c, tenant, now, revision)
        for op in c.ops:
            t = type(op)
            if t is PreparedPut:
                assert isinstance(op, PreparedPut)
                exp = None if op.ttl_us is None else now + op.ttl_us
                if put_versions is not None:
                    version: int = put_versions[(op.namespace, op.key)]
                else:
                    version = cur.execute(
                        SQL_PUT, (tenant, revision, now, op.namespace, op.key, op.value, exp)
                    ).fetchone()[0]
                versions[(op.namespace, op.key)] = version
                recorder.put(op.namespace, op.key, version, op.value, exp)
            elif t is PreparedDelete:
                assert isinstance(op, PreparedDelete)
                row = cur.execute(_SQL_DELETE, (tenant, op.namespace, op.key)).fetchone()
                old = 0 if row is None or (row[1] is not None and row[1] <= now) else row[0]
                versions[(op.namespace, op.key)] = 0
                recorder.delete(op.namespace, op.key, old)
            elif t is PreparedIncr:
                assert isinstance(op, PreparedIncr)
                row = cur.execute(_SQL_ITEM_ROW, (tenant, op.namespace, op.key)).fetchone()
                if row is None or (row[3] is not None and row[3] <= now):
                    base, version, created = 0, 1, now
                    exp = None if op.ttl_us is None else now + op.ttl_us
                else:
                    base = orjson.loads(row[0])
                    if type(base) is not int:
                        raise InvalidArgument("incr", f"{op.namespace}/{op.key} holds a non-integer value")
                    version, created, exp = row[1] + 1, row[2], row[3]
                value = base + op.by
                if not -MAX_INT <= value <= MAX_INT:
                    raise InvalidArgument("incr", f"{op.namespace}/{op.key} would overflow 64 bits")
                cur.execute(
                    _SQL_WRITE_ITEM,
                    (tenant, op.namespace, op.key, orjson.dumps(value), version, revision, created, now, exp),
                )
                versions[(op.namespace, op.key)] = version
                counters[(op.namespace, op.key)] = value
                recorder.incr(op.namespace, op.key, version, value, exp)
            elif t is PreparedAppend:
                assert isinstance(op, PreparedAppend)
                stream = op.stream
                last = last_seqs.get(stream)
                if last is None:
                    if totals is None:
                        totals = {}
                        for o in c.ops:
                            if type(o) is PreparedAppend:
                                totals[o.stream] = totals.get(o.stream, 0) + len(o.events)
                    total = totals[stream]
                    last = cur.execute(_SQL_BUMP_STREAM, (tenant, stream, total)).fetchone()[0] - total
                first = last + 1
                events = op.events
                for i, e in enumerate(events):
                    rows += (stream, first + i, e.type, e.data, e.meta)
                last_seqs[stream] = first + len(events) - 1
                recorder.append(stream, first, events)
            else:
                # PreparedTrim: applied after every append of the commit, like the reference adapter.
                if trims is None:
                    trims = {}
                stream, before = op.stream, op.before_seq  # type: ignore[union-attr]
                trims[stream] = max(trims.get(stream, 0), before)
                recorder.trim(stream, before)
        if rows:
            n = len(rows) // 5
            for start in range(0, n, _EVENTS_TOGETHER):
                m = min(_EVENTS_TOGETHER, n - start)
                cur.execute(_sql_insert_events(m), [tenant, revision, now, *rows[5 * start : 5 * (start + m)]])
        if trims:
            for stream, before in trims.items():
                cur.execute(_SQL_TRIM, (tenant, stream, before))
        return Commit(revision, now, versions, counters, last_seqs), recorder.body(now, c.meta)

    # ------------------------------------------------------------ reads

    @staticmethod
    def _item(row: Sequence[Any]) -> Item:
        return Item(row[0], row[1], orjson.loads(row[2]), row[3], row[4], row[5], row[6], row[7])

    def _get(self, tenant: str, namespace: str, key: str) -> Item | None:
        conn = self._take()
        try:
            row = conn.execute(_SQL_GET, (tenant, namespace, key, self.clock.now_us())).fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        finally:
            self._give(conn)
        return None if row is None else self._item(row)

    def _get_many(self, tenant: str, keys: list[tuple[str, str]]) -> list[Item | None]:
        now = self.clock.now_us()
        conn = self._take()
        try:
            chunked = len(keys) > _LOOKUPS_TOGETHER
            if chunked:
                conn.execute("BEGIN")  # one snapshot for every key (one statement is one already)
            found = {(row[0], row[1]): row for row in _lookups(conn, _ITEM_COLS, tenant, now, keys)}
            if chunked:
                conn.execute(SQL_COMMIT)
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        finally:
            self._give(conn)
        rows = [found.get(k) for k in keys]
        return [None if row is None else self._item(row) for row in rows]

    def _scan(self, tenant: str, namespace: str, prefix: str, after: str | None, limit: int) -> list[Item]:
        bounds, bound_params = _key_range("key", prefix, after)
        sql = f"{_SQL_SCAN}{bounds} ORDER BY key LIMIT ?"
        rows = self._read_all(sql, [tenant, namespace, self.clock.now_us(), *bound_params, limit])
        return [self._item(row) for row in rows]

    def _read_all(self, sql: str, params: Sequence[Any]) -> list[Any]:
        conn = self._take()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        finally:
            self._give(conn)

    def _read_one(self, sql: str, params: Sequence[Any]) -> Any:
        conn = self._take()
        try:
            return conn.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        finally:
            self._give(conn)

    def _read_stream(self, tenant: str, stream: str, from_seq: int, to_seq: int, limit: int) -> list[Event]:
        rows = self._read_all(_SQL_READ_STREAM, (tenant, stream, from_seq, to_seq, limit))
        loads = orjson.loads
        return [Event(stream, seq, typ, loads(data), loads(meta), rev, at) for seq, typ, data, meta, rev, at in rows]

    def _stream_info(self, tenant: str, stream: str) -> StreamInfo:
        row = self._read_one(_SQL_STREAM_INFO, (tenant, stream))
        if row is None:
            return StreamInfo(stream, 1, 0)
        last, first = row
        return StreamInfo(stream, last + 1 if first is None else first, last)

    def _list_streams(self, tenant: str, prefix: str, after: str | None, limit: int) -> list[StreamInfo]:
        sql = (
            "SELECT s.stream, s.last_seq, "
            "(SELECT MIN(e.seq) FROM sl_events e WHERE e.tenant = s.tenant AND e.stream = s.stream) "
            "FROM sl_streams s WHERE s.tenant = ?"
        )
        bounds, bound_params = _key_range("s.stream", prefix, after)
        sql += f"{bounds} ORDER BY s.stream LIMIT ?"
        params = [tenant, *bound_params, limit]
        return [
            StreamInfo(name, last + 1 if first is None else first, last)
            for name, last, first in self._read_all(sql, params)
        ]

    def _revision(self, tenant: str) -> int:
        row = self._read_one(_SQL_REVISION, (tenant,))
        return 0 if row is None else int(row[0])

    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]:
        rows = self._read_all(_SQL_CHANGES, (tenant, after_revision, limit))
        return [decode_change(tenant, rev, body) for rev, body in rows]

    def _first_change(self, tenant: str) -> int:
        return int(self._read_one(_SQL_FIRST_CHANGE, (tenant,))[0])

    def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int:
        return self._write_plain(_SQL_TRIM_CHANGES, (tenant, before_revision, limit))

    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]:
        deadline = time.monotonic() + timeout
        conn = self._reader()  # held while waiting: it takes the read turn only to read
        try:
            with self._cond:
                self._watchers += 1
            while True:
                with self._cond:
                    seen = self._commits_seen
                with self._turn:
                    data_version = conn.execute("PRAGMA data_version").fetchone()[0]
                    rows = conn.execute(_SQL_CHANGES, (tenant, after_revision, limit)).fetchall()
                if rows or self._closed:
                    return [decode_change(tenant, rev, body) for rev, body in rows]
                # Wait for a commit in this process (instant) or by another process (polled).
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                    with self._cond:
                        if self._commits_seen == seen and not self._closed:
                            self._cond.wait(min(remaining, self.watch_poll_s))
                        if self._commits_seen != seen or self._closed:
                            break
                    with self._turn:
                        changed = conn.execute("PRAGMA data_version").fetchone()[0] != data_version
                    if changed:
                        break
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        finally:
            with self._cond:
                self._watchers -= 1
            self._put_back(conn)

    def _tenant_revisions(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        if after is None:
            rows = self._read_all("SELECT tenant, revision FROM sl_tenants ORDER BY tenant LIMIT ?", (limit,))
        else:
            rows = self._read_all(
                "SELECT tenant, revision FROM sl_tenants WHERE tenant > ? ORDER BY tenant LIMIT ?", (after, limit)
            )
        return [(r[0], r[1]) for r in rows]

    def _stats(self, tenant: str) -> TenantStats:
        conn = self._take()
        try:
            conn.execute("BEGIN")  # one snapshot for every count
            row = conn.execute(_SQL_REVISION, (tenant,)).fetchone()
            spaces = conn.execute(
                "SELECT ns, COUNT(*), SUM(LENGTH(value)) FROM sl_items "
                "WHERE tenant = ? AND (expires_at IS NULL OR expires_at > ?) GROUP BY ns",
                (tenant, self.clock.now_us()),
            ).fetchall()
            streams = conn.execute("SELECT COUNT(*) FROM sl_streams WHERE tenant = ?", (tenant,)).fetchone()[0]
            events = conn.execute("SELECT COUNT(*) FROM sl_events WHERE tenant = ?", (tenant,)).fetchone()[0]
            conn.execute(SQL_COMMIT)
        except sqlite3.Error as exc:
            raise _translate(exc) from None
        finally:
            self._give(conn)
        return TenantStats(
            0 if row is None else row[0],
            {ns: NamespaceStats(n, size) for ns, n, size in spaces},
            streams,
            events,
        )

    # ------------------------------------------------------------ maintenance

    def _sweep(self, limit: int) -> int:
        return self._write_plain(_SQL_SWEEP, (self.clock.now_us(), limit))

    def _write_plain(self, sql: str, params: Sequence[Any]) -> int:
        """Run one statement that is not a commit (no revision, no change record) in a write transaction
        of its own; returns the rows it changed."""
        with self._write_lock:
            if self._closed:
                raise Unavailable("the store is closed")
            cur = self._wcur or self._reopen_writer()
            try:
                cur.execute(SQL_BEGIN)
                removed = cur.execute(sql, params).rowcount
                cur.execute(SQL_COMMIT)
            except sqlite3.Error as exc:
                if cur.connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        cur.execute(SQL_ROLLBACK)
                raise _translate(exc) from None
        return max(removed, 0)

    def _ping(self) -> None:
        self._read_one("SELECT 1", ())

    def backup(self, dest: str) -> int:
        """Write a consistent copy of the store, as it is at one moment, to the new file ``dest``.

        Commits of this and other processes go on meanwhile. The copy is compacted, written beside
        ``dest`` under a ``.partial-*`` name, flushed to disk and only then given its name, so
        ``dest`` is either absent or complete (an interrupted backup leaves only the partial file,
        which may be deleted). An existing ``dest`` is refused. Returns the copy's size in bytes.
        To restore: stop every process that uses the store and put the copy in its place (with no
        ``-wal`` or ``-shm`` file of the old one beside it), or open the copy where it is.
        """
        if type(dest) is not str or not dest or dest == ":memory:" or dest.startswith("file:"):
            raise InvalidArgument("dest", "must be the path of a new file")
        try:
            dest.encode()
        except UnicodeEncodeError:
            raise InvalidArgument("dest", "is not valid Unicode text") from None
        if self._closed:
            raise Unavailable("the store is closed")
        target = os.path.abspath(dest)
        folder = os.path.dirname(target)
        if not os.path.isdir(folder):
            raise InvalidArgument("dest", f"folder {folder!r} does not exist")
        taken = InvalidArgument("dest", f"{dest!r} exists; a backup never overwrites a file")
        if os.path.lexists(target):
            raise taken
        partial = f"{target}.partial-{os.getpid()}-{os.urandom(4).hex()}"
        conn = self._connect()
        try:
            conn.execute("VACUUM INTO ?", (partial,))  # one read transaction: a snapshot of one revision
        except sqlite3.Error as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise _translate(exc) from None
        finally:
            conn.close()
        # SQLite does not flush the file VACUUM INTO writes; flush it before it takes its name
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        try:
            os.link(partial, target)  # fails if dest appeared meanwhile: never overwrite
        except FileExistsError:
            os.unlink(partial)
            raise taken from None
        except OSError:  # a file system without hard links
            if os.path.lexists(target):
                os.unlink(partial)
                raise taken from None
            os.rename(partial, target)
        else:
            os.unlink(partial)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return size

    def _close(self) -> None:
        with self._cond:
            self._cond.notify_all()
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = self._wcur = None
        while self._idle:
            try:
                self._idle.pop().close()
            except IndexError:
                break

    def __repr__(self) -> str:
        return f"SQLiteStore({os.fspath(self.path)!r}, synchronous={self.synchronous})"
