"""The PostgreSQL Store adapter: one shared store for many processes and nodes (psycopg 3 + psycopg_pool).

Why it is built this way:

* Gap-free change feed. Sequences hand out numbers in one order and commit in another, so a reader
  could see revision 7 before 6 commits and skip 6 for ever. Instead every commit (or group of
  commits, below) first locks its tenant's row in ``tenants`` (an upsert that returns the current
  revision), and sets the new revision in the same transaction. That row lock serialises the
  commits of one tenant: revision N+1 can only be assigned after the transaction that wrote N has
  committed (or rolled back, and then N is reused), so a reader that sees N+1 sees everything
  below it. Tenants never wait for each other. Reads after the lock run under READ COMMITTED, so
  they see the state left by the previous holder; every check is then evaluated in Python with the
  same code path as the other adapters, and no serialization failure can occur. Deadlocks and
  serialization failures (only possible with unusual server settings) roll back with nothing
  written and are retried a few times before ``Unavailable`` is raised.
* Round trips. A commit of one tenant first runs without holding the lock across round trips: one
  statement reads the touched rows and the tenant's revision in one snapshot, the checks are
  evaluated, and one more statement (a transaction of its own) takes the tenant's row lock by setting
  revision N+1 only where the revision is still N, and writes the items, events and change record
  only if it did. If another process committed in between, that statement writes nothing and the
  commit is run again the locking way below (and so is every commit of that tenant for a moment, so
  that contention does not waste a read per commit). The feed stays gap-free: N+1 is still only
  assigned by a transaction that found N committed, and it holds the row lock until it commits.
  A handle that made a tenant's last commit remembers what it read and wrote (exact at N+1, since
  nobody else committed in between), so its next commit of the same rows skips the read: the same
  revision guard tells whether that is still so. A key it has never seen but that a commit
  expects absent (an ``Absent`` check, written only by puts) is taken for absent and written by a
  plain INSERT, which fails the statement if the key exists after all; that commit is then run the
  locking way. A single writer per tenant then pays one round trip per commit.
  The locking way is two pipelined round trips: (lock + read the touched rows), then
  (one statement with every write, the change record and the revision + COMMIT). Commits of one
  tenant that arrive together in one process are grouped into one transaction (group commit):
  each still gets its own revision, change record and check evaluation, a failing one does not
  affect the others, and the group pays one round trip pair and one WAL flush instead of one each.
  ``group_commit=all`` also groups different tenants (their rows are locked in sorted order, so
  groups cannot deadlock): fewer transactions on one server, but a transaction then spans tenants,
  so do not use it where tenants are sharded across servers.
* Watch. A commit of a tenant somebody watches sends ``pg_notify(<channel of the schema>, tenant)``
  after its COMMIT (in the same pipeline on the locking path; on the unlocked path a notifier thread
  with a connection of its own sends it, those of several commits together, so the commit does not
  wait a round trip), outside the transaction: NOTIFY inside a transaction takes a database-wide lock
  held until the commit is flushed, which would serialise every tenant's commits. A watcher marks its
  tenant's revision row watched for a while (``watched_until``), and the statement that moves the
  revision returns whether it is; unwatched tenants' commits send nothing (a notification cost a
  single writer a quarter of its commit rate). A listener connection per store wakes the waiters;
  while it is down (and every few seconds anyway, in case a notification was lost with a connection)
  watchers poll.
* Data time comes only from the injected clock (passed as parameters, never ``now()`` in SQL); only
  the watch marks, which are not data, use the server's clock. Values
  are stored as the exact encoded JSON bytes (``bytea``); keys use ``COLLATE "C"`` (code point order).
* Outages: connections the server closed are detected before use and replaced; a statement that
  gets no answer within ``op_timeout`` (a partition, a stalled proxy) has its socket shut down by a
  watchdog, and the server drops our transaction after the same time idle. So calls during an
  outage raise ``Unavailable`` within about ``op_timeout`` or ``pool_timeout + connect_timeout``
  seconds, commits queued behind a failed group fail with it instead of trying again, and the same
  store works again once the server is back. A commit that fails after COMMIT was sent raises
  ``Unavailable`` whose outcome is unknown (the change feed tells).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson
import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg.adapt import Dumper
from psycopg.generators import execute
from psycopg.pq import ExecStatus, Format
from psycopg_pool import ConnectionPool, PoolTimeout

from stateline.clock import Clock
from stateline.errors import Conflict, InvalidArgument, StatelineError, Unavailable
from stateline.store.protocol import (
    LARGEST_MAX_VALUE_BYTES,
    MAX_INT,
    ChangeRecorder,
    PreparedAppend,
    PreparedCommit,
    PreparedDelete,
    PreparedIncr,
    PreparedPut,
    PreparedTrim,
    Store,
    decode_change,
    prefix_end,
)
from stateline.types import (
    Absent,
    Change,
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

__all__ = ["SCHEMA_VERSION", "PostgresStore"]

SCHEMA_VERSION = 3
"""The schema version this module creates and migrates to."""

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MAX_GROUP = 64  # commits per group transaction
_RETRIES = 3  # retries of a transaction rolled back by a deadlock / serialization failure
_POLL_DOWN = 0.25  # watch poll interval while the listener is down
_POLL_SAFETY = 2.0  # ... and while it is up, in case a notification was lost
_LISTEN_PING = 5.0  # the listener proves its connection alive this often
_CONTENDED_SECONDS = 1.0  # after an unlocked commit lost a race, the tenant's commits lock first this long
_KNOWN_TENANTS = 64  # tenants whose last committed view this handle remembers
_KNOWN_ROWS = 2048  # rows and streams remembered per tenant
_WATCH_MARGIN = 60.0  # a watch marks its tenant watched this long beyond its own end, renewed halfway
_WATCHED = "coalesce(t.watched_until > now(), false)"  # (SQL) whether row t's tenant is being watched

# Migrations: MIGRATIONS[v] takes a schema from version v to v + 1. ``{s}`` is the quoted schema.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        'CREATE TABLE {s}.tenants (tenant text COLLATE "C" PRIMARY KEY, revision bigint NOT NULL)',
        """CREATE TABLE {s}.items (
            tenant text COLLATE "C" NOT NULL, ns text COLLATE "C" NOT NULL, key text COLLATE "C" NOT NULL,
            value bytea NOT NULL, version bigint NOT NULL, revision bigint NOT NULL,
            created_at bigint NOT NULL, updated_at bigint NOT NULL, expires_at bigint,
            PRIMARY KEY (tenant, ns, key))""",
        """CREATE TABLE {s}.streams (
            tenant text COLLATE "C" NOT NULL, stream text COLLATE "C" NOT NULL, last_seq bigint NOT NULL,
            PRIMARY KEY (tenant, stream))""",
        """CREATE TABLE {s}.events (
            tenant text COLLATE "C" NOT NULL, stream text COLLATE "C" NOT NULL, seq bigint NOT NULL,
            type text NOT NULL, data bytea NOT NULL, meta bytea NOT NULL,
            revision bigint NOT NULL, recorded_at bigint NOT NULL,
            PRIMARY KEY (tenant, stream, seq))""",
        """CREATE TABLE {s}.changes (
            tenant text COLLATE "C" NOT NULL, revision bigint NOT NULL, body bytea NOT NULL,
            PRIMARY KEY (tenant, revision))""",
    ),
    ("CREATE INDEX items_expiry ON {s}.items (expires_at) WHERE expires_at IS NOT NULL",),
    ("ALTER TABLE {s}.tenants ADD COLUMN watched_until timestamptz",),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION


def _is_connection_error(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    if isinstance(exc, psycopg.errors.TransactionRollback):
        return False
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return conn is not None and (conn.closed or conn.broken)


def _translate(exc: BaseException) -> StatelineError:
    if isinstance(exc, StatelineError):
        return exc
    if isinstance(exc, PoolTimeout):
        return Unavailable("postgresql: no connection available (server down or pool exhausted)")
    if isinstance(exc, psycopg.errors.TransactionRollback):
        return Unavailable(f"postgresql: transaction rolled back by the server, retries exhausted ({exc})")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return Unavailable(f"postgresql: {exc}".strip())
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return Unavailable("postgresql: the server is read-only (a standby?)")
    return StatelineError(f"postgresql: {exc}")


# ---------------------------------------------------------------- connections


class _Conn(psycopg.Connection[Any]):
    """A pooled connection that keeps one cursor for the statements whose rows are read at once, and
    runs the guarded write of the unlocked commit path on libpq directly (``write_raw``).

    ``Connection.execute`` makes a cursor per statement, and that was over a tenth of a commit's
    client CPU (a case commit: ~60 µs of ~460). The kept cursor holds its last result until the
    connection runs its next statement.
    """

    _sl_cursor: psycopg.Cursor[Any] | None = None
    _sl_prepared: set[bytes] | None = None  # the names of the ``_Raw`` statements prepared on this connection

    def write_raw(self, statement: str, params: Mapping[str, Any]) -> tuple[bool, bool] | None:
        """Run a guarded write (``_write_one(..., guarded=True)``): whether it wrote, and whether its
        tenant is watched; ``None`` if it cannot go this way (``run_kept`` it then).

        Every commit on the unlocked path is one such statement, so it skips the cursor: its array
        parameters are already in PostgreSQL's binary format, its scalars are text and int, and its
        result is one row of two booleans. Passing them through psycopg's adaptation cost about as
        much client CPU again as sending them (a case commit: ~115 against ~50 µs). The statement is
        prepared on the connection the first time under a name given to it alone (psycopg's own
        prepared statements are named differently). psycopg deallocates every prepared statement after
        a ROLLBACK once it has prepared some of its own; the connection learns of it only when it next
        runs one of the lost ones, and may have prepared others since: so a statement found missing is
        prepared again on its own (nothing ran), and one found already there is used.
        """
        raw = _raw(statement)
        if raw is None:
            return None
        values: list[bytes] = []
        formats: list[Format] = []
        for name in raw.params:
            v = params[name]
            if isinstance(v, _Encoded):
                values.append(v)
                formats.append(Format.BINARY)
            elif type(v) is str:
                values.append(v.encode())
                formats.append(Format.TEXT)
            elif type(v) is int:
                values.append(str(v).encode())
                formats.append(Format.TEXT)
            else:
                return None
        pg = self.pgconn
        with self.lock:
            for attempt in range(2):
                prepared = self._sl_prepared
                if prepared is None:
                    prepared = self._sl_prepared = set()
                if raw.name not in prepared:
                    pg.send_prepare(raw.name, raw.query)
                    # (already there: a name is only ever given to this one statement)
                    with contextlib.suppress(psycopg.errors.DuplicatePreparedStatement):
                        _raise_if_failed(self.wait(execute(pg)))
                    prepared.add(raw.name)
                pg.send_query_prepared(raw.name, values, param_formats=formats)
                try:
                    res = _raise_if_failed(self.wait(execute(pg)))
                except psycopg.errors.InvalidSqlStatementName:
                    if attempt:
                        raise
                    prepared.discard(raw.name)  # deallocated meanwhile (nothing ran): prepare again
                    continue
                if res.ntuples != 1 or res.nfields != 2:  # pragma: no cover - the statement's shape
                    raise psycopg.InterfaceError(f"unexpected result of a write: {res.ntuples} x {res.nfields}")
                return res.get_value(0, 0) == b"t", res.get_value(0, 1) == b"t"
        raise AssertionError("unreachable")  # pragma: no cover

    def run_kept(
        self, query: str, params: Sequence[Any] | Mapping[str, Any], *, binary: bool = False
    ) -> psycopg.Cursor[Any]:
        """``execute`` on the kept cursor (its previous result is discarded)."""
        cur = self._sl_cursor
        if cur is None or cur.closed:
            cur = self._sl_cursor = self.cursor()
        return cur.execute(query, params, binary=binary)


# ---------------------------------------------------------------- group commit


@dataclass(slots=True)
class _Slot:
    commit: PreparedCommit
    done: threading.Event | None = None  # a follower's, made as it queues (a leader never waits)
    lead: bool = False
    result: Commit | None = None
    error: BaseException | None = None


class _Queue:
    __slots__ = ("active", "pending")

    def __init__(self) -> None:
        self.pending: deque[_Slot] = deque()
        self.active = False


@dataclass(slots=True)
class _Row:
    value: bytes | None  # None: not loaded (only Incr needs the old value)
    version: int
    created_at: int
    expires_at: int | None


@dataclass(slots=True)
class _Known:
    """What this handle knows a tenant held at ``revision``: rows (``None``: absent) and stream heads.

    Filled from the read of an unlocked commit (one snapshot) and brought forward by that commit's
    own writes, so it is exact at ``revision`` and stays exact only while nobody else commits to the
    tenant, which the next commit's revision guard checks.
    """

    revision: int
    rows: dict[tuple[str, str], _Row | None]
    seqs: dict[str, int]

    def covers(
        self,
        keys: dict[tuple[str, str, str], bool],
        streams: set[tuple[str, str]],
        blind: set[tuple[str, str, str]],
    ) -> set[tuple[str, str]] | None:
        """``None`` if a commit of ``keys`` and ``streams`` needs more than this view holds; else the
        keys of ``blind`` missing from it (to be taken for absent, and inserted only if they are)."""
        rows = self.rows
        fresh: set[tuple[str, str]] = set()
        for k3, want in keys.items():
            k = (k3[1], k3[2])
            if k not in rows:
                if k3 not in blind:
                    return None
                fresh.add(k)
            elif want:
                r = rows[k]
                if r is not None and r.value is None:
                    return None
        if not all(name in self.seqs for _, name in streams):
            return None
        return fresh


@dataclass(slots=True)
class _Plan:
    """What one group transaction writes for one tenant."""

    tenant: str
    base_revision: int
    now: int
    items: dict[tuple[str, str], tuple[bytes, int, int, int, int | None] | None] = field(default_factory=dict)
    events: list[tuple[str, int, str, bytes, bytes, int]] = field(default_factory=list)
    last_seqs: dict[str, int] = field(default_factory=dict)
    trims: dict[str, int] = field(default_factory=dict)
    changes: list[tuple[int, bytes]] = field(default_factory=list)


# ---------------------------------------------------------------- the adapter


class PostgresStore(Store):
    """A Store in PostgreSQL: ``postgresql://user[:password]@host[:port]/db?schema=NAME&...``.

    Options (URL query parameters or keyword arguments): ``schema`` (default ``stateline``; created
    if missing), ``pool_min`` (1), ``pool_max`` (10), ``pool_timeout`` seconds to wait for a
    connection (3), ``connect_timeout`` seconds (3), ``op_timeout`` seconds one statement may wait
    for the server before its connection is dropped (10), ``group_commit`` (``tenant``: group
    concurrent commits of one tenant into one transaction; ``all``: of any tenants; ``off``). Other query
    parameters go to libpq unchanged (``sslmode``, ``password``, ``application_name``, ...).
    Opening creates the schema, or migrates an older one, safely when several processes open at once.
    Connections must be sessions of their own: watches LISTEN, and commits use prepared statements, so
    a pooler in front of the server (PgBouncer) must run in session mode.
    """

    scheme = "postgresql"

    def __init__(
        self,
        conninfo: str,
        *,
        clock: Clock | None = None,
        schema: str = "stateline",
        pool_min: int = 1,
        pool_max: int = 10,
        pool_timeout: float = 3.0,
        connect_timeout: int = 3,
        op_timeout: float = 10.0,
        group_commit: bool | str = "tenant",
        **options: Any,
    ) -> None:
        super().__init__(clock=clock, **options)
        if type(schema) is not str or not _SCHEMA_RE.fullmatch(schema):
            raise InvalidArgument("schema", "must be 1-63 lowercase letters, digits and _, not starting with a digit")
        pool_max = _int_option(pool_max, "pool_max", 1, 1000)
        pool_min = _int_option(pool_min, "pool_min", 0, pool_max)
        connect_timeout = _int_option(connect_timeout, "connect_timeout", 1, 3600)
        for name, value in (("pool_timeout", pool_timeout), ("op_timeout", op_timeout)):
            if type(value) not in (int, float) or not 0 < value <= 3600:
                raise InvalidArgument(name, "must be a number of seconds in (0, 3600]")
        self.schema = schema
        self._group = _group_mode(group_commit)
        self._conninfo = conninfo
        # the server ends a transaction whose client went silent (it would hold the tenant's lock)
        try:
            user_options = psycopg.conninfo.conninfo_to_dict(conninfo).get("options") or ""
        except psycopg.Error as exc:
            raise InvalidArgument("url", f"not a valid PostgreSQL connection string ({exc})") from None
        idle_limit = f"-c idle_in_transaction_session_timeout={round(op_timeout * 1000)}"
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": connect_timeout,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 15000,
            "options": f"{user_options} {idle_limit}".strip(),
        }
        self._watchdog = _Watchdog(float(op_timeout))
        self._drained_at = 0.0
        self._pool_timeout = float(pool_timeout)
        s = f'"{schema}"'
        self._channel = f"stateline:{schema}"[:63]
        self._q = _Queries(s)
        self._queues: dict[str, _Queue] = {}
        self._queues_lock = threading.Lock()
        self._contended: dict[str, float] = {}  # tenant -> until when its commits take the lock first
        self._known: dict[str, _Known] = {}  # tenant -> its state as this handle last committed it
        self._cond = threading.Condition(threading.Lock())
        self._gens: dict[str, int] = {}
        self._listening = False
        self._listener: threading.Thread | None = None
        self._marks: dict[str, float] = {}  # tenant -> until when (monotonic) the server has it marked watched
        self._to_notify: set[str] = set()  # tenants committed on the unlocked path, not yet notified
        self._notify_cond = threading.Condition(threading.Lock())
        self._notifier: threading.Thread | None = None
        self._pool = ConnectionPool(
            conninfo,
            connection_class=_Conn,
            kwargs=self._connect_kwargs,
            min_size=pool_min,
            max_size=pool_max,
            timeout=self._pool_timeout,
            reconnect_timeout=float(connect_timeout),
            max_idle=300.0,
            open=False,
            name=f"stateline:{schema}",
        )
        # Migrate over one connection of its own before the pool starts: a server that cannot be
        # reached fails the open at once, with one error, and leaves no pool threads retrying behind.
        try:
            self._migrate()
        except BaseException:
            self._watchdog.stop()
            raise
        self._pool.open(wait=False)

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **options: Any) -> Self:
        """Open ``postgresql://`` (or ``postgres://``) URL; stateline options may be query parameters."""
        if not isinstance(url, str):
            raise InvalidArgument("url", "must be a string")
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise InvalidArgument("url", f"not a postgresql:// URL: {url!r}")
        rest: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _URL_OPTIONS:
                options.setdefault(name, _URL_OPTIONS[name](name, value))
            else:
                rest.append((name, value))
        # libpq decodes %XX in a URI but takes "+" literally: a space must not become "+"
        conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest, quote_via=quote), ""))
        return cls(conninfo, clock=clock, **options)

    # ------------------------------------------------------------ connections

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_Conn]:
        """A healthy connection from the pool; ones the server has closed while idle are replaced first.

        If the pool has none to give within ``pool_timeout`` (after an outage it may still be backing
        off between reconnection attempts), one direct connection is tried, used once and closed, so
        that the first call after the server comes back works.
        """
        pooled = True
        for _ in range(self._pool.max_size + 1):
            try:
                conn = self._pool.getconn()
            except PoolTimeout:
                conn = self._connect_once()
                pooled = False
                break
            except psycopg.Error as exc:
                raise _translate(exc) from None
            if _healthy(conn):
                break
            self._pool.putconn(conn)  # closed: the pool replaces it
            self._drain()
        else:
            raise Unavailable("postgresql: every pooled connection is broken")
        self._watchdog.watch(conn)
        try:
            yield conn
        finally:
            try:
                if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    with contextlib.suppress(psycopg.Error):
                        conn.rollback()
            finally:
                self._watchdog.release(conn)
                broken = conn.closed or conn.broken
                if pooled:
                    self._pool.putconn(conn)
                else:
                    conn.close()
                if broken:
                    self._drain()

    def _drain(self) -> None:
        """One connection was lost: the idle ones probably were too (restart, partition). Replace them."""
        now = time.monotonic()
        if now - self._drained_at < 1.0 or self._closed:
            return
        self._drained_at = now
        with contextlib.suppress(Exception):
            self._pool.drain()

    def _connect_once(self) -> _Conn:
        try:
            return _Conn.connect(self._conninfo, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise Unavailable(f"postgresql: cannot connect ({str(exc).strip()})") from None

    def _read(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run one read statement; a broken connection is retried once on a fresh one."""
        for attempt in range(2):
            with self._connection() as conn:
                try:
                    return conn.run_kept(query, params, binary=True).fetchall()
                except psycopg.Error as exc:
                    if attempt == 0 and _is_connection_error(exc, conn):
                        continue
                    raise _translate(exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _migrate(self) -> None:
        lock_key = int.from_bytes(hashlib.blake2b(f"stateline:{self.schema}".encode(), digest_size=8).digest(), "big")
        lock_key -= 1 << 63 if lock_key >= 1 << 63 else 0
        s = f'"{self.schema}"'
        conn = self._connect_once()
        self._watchdog.watch(conn)
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.schema_version "
                    "(id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)"
                )
                row = conn.execute(f"SELECT version FROM {s}.schema_version").fetchone()
                version = 0 if row is None else int(row[0])
                if version > SCHEMA_VERSION:
                    raise InvalidArgument(
                        "schema",
                        f"{self.schema!r} is at version {version}, newer than this stateline supports "
                        f"({SCHEMA_VERSION}): upgrade stateline",
                    )
                for v in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[v]:
                        conn.execute(statement.format(s=s))
                if version != SCHEMA_VERSION:
                    conn.execute(
                        f"INSERT INTO {s}.schema_version VALUES (1, %s) "
                        "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                        (SCHEMA_VERSION,),
                    )
        except psycopg.Error as exc:
            raise _translate(exc) from None
        finally:
            self._watchdog.release(conn)
            conn.close()

    # ------------------------------------------------------------ commit

    def _commit(self, c: PreparedCommit) -> Commit:
        if self._group == "off":
            res = self._run_group([_Slot(c)])[0]
            if isinstance(res, BaseException):
                raise res
            return res
        slot = _Slot(c)
        key = c.tenant if self._group == "tenant" else ""
        with self._queues_lock:
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = _Queue()
            q.pending.append(slot)
            if q.active:
                slot.done = threading.Event()
            else:
                q.active = slot.lead = True
        if slot.done is not None:
            slot.done.wait()
        if slot.lead:
            self._lead(key, q)
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _lead(self, key: str, q: _Queue) -> None:
        """Run one group of queued commits (the leader's among them), then pass the lead on."""
        with self._queues_lock:
            group = [q.pending.popleft() for _ in range(min(len(q.pending), _MAX_GROUP))]
        results: list[Commit | Exception] = []
        try:
            results = list(self._run_group(group))
        except Exception as exc:  # noqa: BLE001  (the leader hands any error to every commit of its group)
            err = _translate(exc) if isinstance(exc, psycopg.Error) else exc
            # one exception object per waiting thread: each raise writes its own traceback
            results = [err, *(_copy_error(err) for _ in group[1:])]
        finally:
            if len(results) != len(group):  # interrupted (KeyboardInterrupt, ...): never leave followers waiting
                results = [
                    Unavailable("postgresql: the commit was interrupted; it may or may not have applied") for _ in group
                ]
            for slot, res in zip(group, results, strict=True):
                if isinstance(res, Commit):
                    slot.result = res
                else:
                    slot.error = res
            failed = isinstance(results[0], Unavailable)
            with self._queues_lock:
                if failed and q.pending:
                    # the server is unreachable: the commits queued meanwhile fail now, not one attempt later
                    for waiting in q.pending:
                        waiting.error = Unavailable(
                            f"postgresql: not applied, the commit before it failed: {results[0]}",
                            details={"applied": False},
                        )
                        group.append(waiting)
                    q.pending.clear()
                if q.pending:
                    nxt = q.pending[0]
                    nxt.lead = True
                    assert nxt.done is not None
                    nxt.done.set()
                else:
                    q.active = False
                    if self._queues.get(key) is q:
                        del self._queues[key]
            for slot in group:
                if slot.done is not None:
                    slot.done.set()

    def _run_group(self, group: list[_Slot]) -> list[Commit | StatelineError]:
        lost = 0
        for attempt in range(_RETRIES + 1):
            try:
                return self._try_group(group)
            except _Retry as exc:
                # a rolled-back transaction is tried again a few times; a lost connection once (it may
                # have been a stale one), since the next attempt already pays the connect timeout
                lost += not isinstance(exc.cause, psycopg.errors.TransactionRollback)
                if attempt == _RETRIES or lost > 1:
                    raise _translate(exc.cause) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _try_group(self, group: list[_Slot]) -> list[Commit | StatelineError]:
        q = self._q
        keys: dict[tuple[str, str, str], bool] = {}
        streams: set[tuple[str, str]] = set()
        blind: set[tuple[str, str, str]] = set()  # keys a commit expects absent (Absent check)
        changed: set[tuple[str, str, str]] = set()  # keys a delete or an incr touches
        for slot in group:
            tenant = slot.commit.tenant
            for check in slot.commit.checks:
                if type(check) is StreamAt:
                    streams.add((tenant, check.stream))
                else:
                    assert isinstance(check, VersionIs | Absent | Exists)
                    k = (tenant, check.namespace, check.key)
                    keys.setdefault(k, False)
                    if type(check) is Absent:
                        blind.add(k)
            for op in slot.commit.ops:
                t = type(op)
                if t is PreparedAppend or t is PreparedTrim:
                    assert isinstance(op, PreparedAppend | PreparedTrim)
                    streams.add((tenant, op.stream))
                else:
                    assert isinstance(op, PreparedPut | PreparedDelete | PreparedIncr)
                    k = (tenant, op.namespace, op.key)
                    keys[k] = keys.get(k, False) or t is PreparedIncr
                    if t is not PreparedPut:
                        changed.add(k)
        tenants = sorted({slot.commit.tenant for slot in group})  # one lock order everywhere: no deadlock
        if len(tenants) == 1 and self._contended.get(tenants[0], 0.0) <= time.monotonic():
            done = self._try_unlocked(group, tenants[0], keys, streams, blind - changed if blind else blind)
            if done is not None:
                return done
        for tenant in tenants:  # this commit moves the revision past any view of it this handle keeps
            self._known.pop(tenant, None)

        with self._connection() as conn:
            # Round trip 1: lock the tenants' revision rows, then read what the group touches.
            rows: dict[str, dict[tuple[str, str], _Row]] = {t: {} for t in tenants}
            seqs: dict[str, dict[str, int]] = {t: {} for t in tenants}
            try:
                if len(tenants) == 1:
                    # one tenant (always so unless group_commit=all): the tenant is a scalar, and items
                    # and streams are read by one statement
                    tenant = tenants[0]
                    cur_items = None
                    with conn.pipeline():
                        conn.execute("BEGIN")
                        cur_rev = conn.execute(q.lock_tenant, (tenant,), binary=True)
                        if keys or streams:
                            cur_items = conn.execute(
                                q.read_one,
                                _read_one_params(tenant, keys, streams),
                                binary=True,
                            )
                    locked = cur_rev.fetchall()
                    if cur_items is not None:
                        _read_one_rows(cur_items.fetchall(), rows[tenant], seqs[tenant])
                else:
                    with conn.pipeline():
                        conn.execute("BEGIN")
                        cur_rev = conn.execute(q.lock_tenants, (tenants,), binary=True)
                        cur_items = cur_streams = None
                        if keys:
                            ks = list(keys)
                            cur_items = conn.execute(
                                q.read_items,
                                ([k[0] for k in ks], [k[1] for k in ks], [k[2] for k in ks], list(keys.values())),
                                binary=True,
                            )
                        if streams:
                            ss = list(streams)
                            cur_streams = conn.execute(
                                q.read_streams, ([x[0] for x in ss], [x[1] for x in ss]), binary=True
                            )
                    locked = cur_rev.fetchall()
                    if cur_items is not None:
                        for tenant, ns, key, value, version, created, expires in cur_items.fetchall():
                            rows[tenant][(ns, key)] = _Row(value, version, created, expires)
                    if cur_streams is not None:
                        for tenant, name, last in cur_streams.fetchall():
                            seqs[tenant][name] = last
                bases = {t: int(r) for t, r, _ in locked}
                watched = [t for t, _, w in locked if w]
                assert len(bases) == len(tenants)
            except psycopg.Error as exc:
                self._abort(conn)
                if isinstance(exc, psycopg.errors.TransactionRollback) or _is_connection_error(exc, conn):
                    raise _Retry(exc) from None
                raise _translate(exc) from None

            now = self.clock.now_us()
            plans = {t: _Plan(t, bases[t], now) for t in tenants}
            results = [
                self._apply(slot.commit, plans[slot.commit.tenant], rows[slot.commit.tenant], seqs[slot.commit.tenant])
                for slot in group
            ]
            active = [p for p in plans.values() if p.changes]
            if not active:
                self._abort(conn)
                return results
            idle = [p.tenant for p in plans.values() if not p.changes]

            # Round trip 2: every write, the change records and the revision in one statement, COMMIT;
            # then wake the watchers, if any (outside the transaction, see the module docstring).
            wake = [p.tenant for p in active if p.tenant in watched]
            committing = False
            try:
                with conn.pipeline():
                    if len(tenants) == 1:
                        statement, params = _write_one(q, active[0])
                        conn.execute(statement, params)
                    else:
                        conn.execute(q.write, _write_params(active, idle))
                    committing = True
                    conn.execute("COMMIT")
                    if len(wake) == 1:
                        conn.execute("SELECT pg_notify(%s, %s)", (self._channel, wake[0]))
                    elif wake:
                        conn.execute(q.notify_many, (self._channel, wake))
            except psycopg.Error as exc:
                committed = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and not conn.broken
                self._abort(conn)
                if committed:  # only the notification failed: the commit stands, watchers poll
                    return results
                if isinstance(exc, psycopg.errors.TransactionRollback):
                    raise _Retry(exc) from None
                if committing and _is_connection_error(exc, conn):
                    raise Unavailable(
                        f"postgresql: connection lost while committing; the commit may or may not have applied ({exc})"
                    ) from None
                raise _translate(exc) from None
        return results

    def _try_unlocked(
        self,
        group: list[_Slot],
        tenant: str,
        keys: dict[tuple[str, str, str], bool],
        streams: set[tuple[str, str]],
        blind: set[tuple[str, str, str]],
    ) -> list[Commit | StatelineError] | None:
        """Run a one-tenant group as two single statements, without holding a lock in between.

        The first reads the touched rows and the tenant's revision in one snapshot; the second (its own
        transaction) sets the next revision only if the revision is still the one read, and writes
        nothing otherwise: then another process committed meanwhile, and ``None`` sends the group to
        the locking path (which this tenant then takes for a moment, so that contention does not cost
        every commit a wasted read). When this handle made the tenant's last commit and remembers
        every row and stream head the group needs (``_Known``), the read is skipped: the same guard
        tells whether that view is still current. A group refused on the remembered view is judged
        again on a fresh read. Keys in ``blind`` (a commit expects them absent, and only puts write
        them) may be missing from the view: they are taken for absent and written by a plain INSERT,
        which fails if one exists after all, and the group then takes the locking path. (If the plan
        would not write one of them, nothing would check it: the group then reads.)
        """
        q = self._q
        # (with group_commit=off commits of one tenant run at once, so no view is kept then)
        remembering = self._group != "off"
        prior = self._known.get(tenant) if remembering else None
        fresh = None if prior is None else prior.covers(keys, streams, blind)
        known = prior if fresh is not None else None
        with self._connection() as conn:
            while True:
                rows: dict[tuple[str, str], _Row] = {}
                seqs: dict[str, int] = {}
                if known is not None:
                    # this handle wrote the tenant's last commit and remembers all it needs: no read
                    # (the revision guard below refuses the write if anyone committed since)
                    base = known.revision
                    for _, ns, key in keys:
                        r = known.rows.get((ns, key))  # (absent from the view: a fresh key)
                        if r is not None:
                            rows[(ns, key)] = r
                    for _, name in streams:
                        seqs[name] = known.seqs[name]
                else:
                    try:
                        found = conn.run_kept(
                            q.read_one, _read_one_params(tenant, keys, streams), binary=True
                        ).fetchall()
                    except psycopg.Error as exc:
                        if isinstance(exc, psycopg.errors.TransactionRollback) or _is_connection_error(exc, conn):
                            raise _Retry(exc) from None
                        raise _translate(exc) from None
                    base = _read_one_rows(found, rows, seqs)
                plan = _Plan(tenant, base, self.clock.now_us())
                results = [self._apply(slot.commit, plan, rows, seqs) for slot in group]
                if known is None:
                    break
                if fresh and any(plan.items.get(k) is None for k in fresh):
                    known = fresh = None  # a key taken for absent would go unwritten, so unchecked: read
                    continue
                if all(isinstance(r, Commit) for r in results):
                    break
                # a refusal is judged on what is stored now, not on what this handle remembers
                self._known.pop(tenant, None)
                known = fresh = None
            if not plan.changes:
                return results
            statement, params = _write_one(q, plan, guarded=True, fresh=fresh)
            pid = conn.info.backend_pid
            try:
                row = conn.write_raw(statement, params)
                if row is None:
                    row = conn.run_kept(statement, params).fetchone()
            except psycopg.Error as exc:
                self._known.pop(tenant, None)
                if fresh and isinstance(exc, psycopg.errors.UniqueViolation):
                    return None  # a key taken for absent exists: the locking path reads it (nothing written)
                if isinstance(exc, psycopg.errors.TransactionRollback):
                    raise _Retry(exc) from None
                if _is_connection_error(exc, conn):
                    # (a pooled connection the server dropped a moment ago can look healthy until used)
                    applied = self._applied(plan, pid)
                    if applied is False:
                        raise _Retry(exc) from None
                    if applied is None:
                        raise Unavailable(
                            "postgresql: connection lost while committing; "
                            f"the commit may or may not have applied ({exc})"
                        ) from None
                    self._notify_soon(tenant)
                    return results
                raise _translate(exc) from None
            if row is None or not row[0]:
                self._known.pop(tenant, None)
                if len(self._contended) > 1000:
                    self._contended.clear()
                self._contended[tenant] = time.monotonic() + _CONTENDED_SECONDS
                return None
            if remembering:
                self._remember(tenant, known or prior, keys, streams, rows, seqs, plan)
        if row[1]:
            self._notify_soon(tenant)
        return results

    def _applied(self, plan: _Plan, pid: int) -> bool | None:
        """Whether the guarded write of ``plan`` took effect, asked on another connection after its own
        (to server process ``pid``) was lost: True if its first change record is there; False if
        another is, or none is once that process has ended (the guard makes the write all or
        nothing, and a statement still running could yet commit); None if that cannot be told
        within ``op_timeout``."""
        deadline = time.monotonic() + self._watchdog.limit
        while True:
            try:
                rows = self._read(self._q.outcome, (plan.tenant, plan.base_revision + 1, pid))
            except StatelineError:
                return None
            body, running = rows[0]
            if body is not None:
                return bytes(body) == plan.changes[0][1]
            if not running:
                return False
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def _remember(
        self,
        tenant: str,
        known: _Known | None,
        keys: dict[tuple[str, str, str], bool],
        streams: set[tuple[str, str]],
        rows: dict[tuple[str, str], _Row],
        seqs: dict[str, int],
        plan: _Plan,
    ) -> None:
        """Bring this handle's view of ``tenant`` forward to the revision ``plan`` just wrote.

        ``rows`` and ``seqs`` are what the plan was made on (read at ``plan.base_revision``); ``known``
        is kept and extended only if it is exact at that same revision."""
        if known is None or known.revision != plan.base_revision or len(known.rows) + len(known.seqs) > _KNOWN_ROWS:
            if tenant not in self._known and len(self._known) >= _KNOWN_TENANTS:
                self._known.clear()
            known = _Known(plan.base_revision, {}, {})
        for _, ns, key in keys:
            known.rows[(ns, key)] = rows.get((ns, key))
        for _, name in streams:
            known.seqs[name] = seqs.get(name, 0)
        known.revision = plan.base_revision + len(plan.changes)
        for (ns, key), v in plan.items.items():
            # values only where an incr will need them; versions and times for everything else
            known.rows[(ns, key)] = (
                None if v is None else _Row(v[0] if keys[(tenant, ns, key)] else None, v[1], v[3], v[4])
            )
        known.seqs.update(plan.last_seqs)
        self._known[tenant] = known

    @staticmethod
    def _abort(conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            return
        with contextlib.suppress(psycopg.Error):
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")

    def _apply(
        self, c: PreparedCommit, plan: _Plan, rows: dict[tuple[str, str], _Row], seqs: dict[str, int]
    ) -> Commit | StatelineError:
        """Evaluate one commit of a group against the state the group has built so far."""
        now = plan.now
        items = plan.items

        def current(ns: str, key: str, staged: dict[tuple[str, str], _Row | None]) -> _Row | None:
            k = (ns, key)
            if k in staged:
                return staged[k]
            if k in items:
                v = items[k]
                return None if v is None else _Row(v[0], v[1], v[3], v[4])
            r = rows.get(k)
            if r is None or (r.expires_at is not None and r.expires_at <= now):
                return None
            return r

        failures = []
        for check in c.checks:
            if type(check) is StreamAt:
                seq = plan.last_seqs.get(check.stream, seqs.get(check.stream, 0))
                if seq != check.seq:
                    failures.append(CheckFailure(check, seq))
                continue
            assert isinstance(check, VersionIs | Absent | Exists)
            rec = current(check.namespace, check.key, {})
            found = None if rec is None else rec.version
            if (
                (type(check) is VersionIs and found != check.version)
                or (type(check) is Absent and found is not None)
                or (type(check) is Exists and found is None)
            ):
                failures.append(CheckFailure(check, found))
        if failures:
            return Conflict(f"{len(failures)} check(s) failed", failures=failures)

        revision = plan.base_revision + len(plan.changes) + 1
        recorder = ChangeRecorder()
        staged: dict[tuple[str, str], _Row | None] = {}
        values: dict[tuple[str, str], tuple[bytes, int, int, int, int | None] | None] = {}
        events: list[tuple[str, int, str, bytes, bytes, int]] = []
        last_seqs: dict[str, int] = {}
        trims: dict[str, int] = {}
        versions: dict[tuple[str, str], int] = {}
        counters: dict[tuple[str, str], int] = {}
        for op in c.ops:
            if type(op) is PreparedPut:
                old = current(op.namespace, op.key, staged)
                exp = None if op.ttl_us is None else now + op.ttl_us
                version = 1 if old is None else old.version + 1
                created = now if old is None else old.created_at
                staged[(op.namespace, op.key)] = _Row(op.value, version, created, exp)
                values[(op.namespace, op.key)] = (op.value, version, revision, created, exp)
                versions[(op.namespace, op.key)] = version
                recorder.put(op.namespace, op.key, version, op.value, exp)
            elif type(op) is PreparedDelete:
                old = current(op.namespace, op.key, staged)
                staged[(op.namespace, op.key)] = None
                values[(op.namespace, op.key)] = None
                versions[(op.namespace, op.key)] = 0
                recorder.delete(op.namespace, op.key, 0 if old is None else old.version)
            elif type(op) is PreparedIncr:
                old = current(op.namespace, op.key, staged)
                if old is None:
                    base, version, created, exp = 0, 1, now, (None if op.ttl_us is None else now + op.ttl_us)
                else:
                    assert old.value is not None  # Incr keys are read with their values
                    base = orjson.loads(old.value)
                    if type(base) is not int:
                        return InvalidArgument("incr", f"{op.namespace}/{op.key} holds a non-integer value")
                    version, created, exp = old.version + 1, old.created_at, old.expires_at
                value = base + op.by
                if not -MAX_INT <= value <= MAX_INT:
                    return InvalidArgument("incr", f"{op.namespace}/{op.key} would overflow 64 bits")
                encoded = orjson.dumps(value)
                staged[(op.namespace, op.key)] = _Row(encoded, version, created, exp)
                values[(op.namespace, op.key)] = (encoded, version, revision, created, exp)
                versions[(op.namespace, op.key)] = version
                counters[(op.namespace, op.key)] = value
                recorder.incr(op.namespace, op.key, version, value, exp)
            elif type(op) is PreparedAppend:
                if op.stream not in last_seqs:
                    last_seqs[op.stream] = plan.last_seqs.get(op.stream, seqs.get(op.stream, 0))
                first = last_seqs[op.stream] + 1
                events.extend((op.stream, first + i, e.type, e.data, e.meta, revision) for i, e in enumerate(op.events))
                last_seqs[op.stream] = first + len(op.events) - 1
                recorder.append(op.stream, first, op.events)
            else:
                assert type(op) is PreparedTrim
                trims[op.stream] = max(trims.get(op.stream, 0), op.before_seq)
                recorder.trim(op.stream, op.before_seq)

        # valid: merge into the group's plan
        items.update(values)
        plan.events.extend(events)
        plan.last_seqs.update(last_seqs)
        for name, before in trims.items():
            # a trim removes only events that exist when it applies (after this commit's appends)
            last = plan.last_seqs.get(name, seqs.get(name, 0))
            cut = min(before, last + 1)
            if cut > plan.trims.get(name, 0):
                plan.trims[name] = cut
                plan.events = [e for e in plan.events if e[0] != name or e[1] >= cut]
        plan.changes.append((revision, recorder.body(now, c.meta)))
        return Commit(revision, now, versions, counters, last_seqs)

    # ------------------------------------------------------------ reads

    def _item(self, row: tuple[Any, ...]) -> Item:
        ns, key, value, version, revision, created, updated, expires = row
        return Item(ns, key, orjson.loads(value), version, revision, created, updated, expires)

    def _get(self, tenant: str, namespace: str, key: str) -> Item | None:
        rows = self._read(self._q.get, (tenant, namespace, key, self.clock.now_us()))
        return self._item(rows[0]) if rows else None

    def _get_many(self, tenant: str, keys: list[tuple[str, str]]) -> list[Item | None]:
        rows = self._read(
            self._q.get_many, (_texts([k[0] for k in keys]), _texts([k[1] for k in keys]), tenant, self.clock.now_us())
        )
        found = {(r[0], r[1]): self._item(r) for r in rows}
        return [found.get(k) for k in keys]

    def _scan(self, tenant: str, namespace: str, prefix: str, after: str | None, limit: int) -> list[Item]:
        end = prefix_end(prefix) if prefix else None
        rows = self._read(self._q.scan, (tenant, namespace, self.clock.now_us(), prefix, after, after, end, end, limit))
        return [self._item(r) for r in rows]

    def _read_stream(self, tenant: str, stream: str, from_seq: int, to_seq: int, limit: int) -> list[Event]:
        rows = self._read(self._q.read_stream, (tenant, stream, from_seq, to_seq, limit))
        return [
            Event(stream, seq, typ, orjson.loads(data), orjson.loads(meta), rev, at)
            for seq, typ, data, meta, rev, at in rows
        ]

    def _stream_info(self, tenant: str, stream: str) -> StreamInfo:
        rows = self._read(self._q.stream_info, (tenant, stream))
        if not rows:
            return StreamInfo(stream, 1, 0)
        last, first = rows[0]
        return StreamInfo(stream, last + 1 if first is None else first, last)

    def _list_streams(self, tenant: str, prefix: str, after: str | None, limit: int) -> list[StreamInfo]:
        end = prefix_end(prefix) if prefix else None
        rows = self._read(self._q.list_streams, (tenant, prefix, after, after, end, end, limit))
        return [StreamInfo(name, last + 1 if first is None else first, last) for name, last, first in rows]

    def _revision(self, tenant: str) -> int:
        rows = self._read(self._q.revision, (tenant,))
        return int(rows[0][0]) if rows else 0

    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]:
        rows = self._read(self._q.changes, (tenant, after_revision, limit))
        out: list[Change] = []
        expect = rows[0][0] if rows else 0  # above after_revision + 1 if trimmed: Store.changes tells
        for revision, body in rows:
            if revision != expect:  # cannot happen (see the module docstring); never hand out a gap
                break
            out.append(decode_change(tenant, revision, body))
            expect += 1
        return out

    def _first_change(self, tenant: str) -> int:
        return int(self._read(self._q.first_change, (tenant, tenant))[0][0])

    def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int:
        return len(self._read(self._q.trim_changes, (tenant, before_revision, limit)))

    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]:
        deadline = time.monotonic() + timeout
        if timeout > 0:
            self._ensure_listener()
            self._mark_watched(tenant, timeout)
        while True:
            with self._cond:
                gen = self._gens.get(tenant, 0)
                listening = self._listening
            found = self._changes(tenant, after_revision, limit)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0 or self._closed:
                return found
            wait = min(remaining, _POLL_SAFETY if listening else _POLL_DOWN)
            with self._cond:
                self._cond.wait_for(partial(self._woken, tenant, gen, listening), wait)

    def _mark_watched(self, tenant: str, timeout: float) -> None:
        """Have commits of ``tenant`` notify until well after a watch of ``timeout`` seconds ends.

        A commit sends a notification only while its tenant is marked watched (most tenants are not,
        and a notification costs a statement). The mark is a write of the tenant's revision row, and
        every commit locks that row, so each commit is either before the mark (and so before the
        watcher's first read) or sees it; none is missed. The mark is renewed once less than half the
        margin is left, and lapses on its own if its watcher goes away."""
        now = time.monotonic()
        if self._marks.get(tenant, 0.0) - now >= timeout + _WATCH_MARGIN / 2:
            return
        lease = timeout + _WATCH_MARGIN
        self._read(self._q.mark_watched, (tenant, lease))
        if len(self._marks) >= 10_000:
            self._marks.clear()
        self._marks[tenant] = now + lease

    def _woken(self, tenant: str, gen: int, listening: bool) -> bool:
        return self._gens.get(tenant, 0) != gen or self._listening != listening or self._closed

    def _notify_soon(self, tenant: str) -> None:
        """Have the notifier thread send ``tenant``'s notification (the commit does not wait for it)."""
        with self._notify_cond:
            self._to_notify.add(tenant)
            if self._notifier is None:
                self._notifier = threading.Thread(
                    target=self._notify_loop, name=f"stateline-notify-{self.schema}", daemon=True
                )
                self._notifier.start()
            else:
                self._notify_cond.notify()

    def _notify_loop(self) -> None:
        """Send the pending notifications on a connection of its own, those that came meanwhile together.
        A failure loses only wake-ups: watchers poll."""
        conn: psycopg.Connection[Any] | None = None
        try:
            while True:
                with self._notify_cond:
                    while not self._to_notify and not self._closed:
                        self._notify_cond.wait()
                    if not self._to_notify:
                        return  # closed, and every notification sent
                    tenants = sorted(self._to_notify)
                    self._to_notify.clear()
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = psycopg.connect(self._conninfo, **self._connect_kwargs)
                    self._watchdog.watch(conn)
                    try:
                        conn.execute(self._q.notify_many, (self._channel, tenants))
                    finally:
                        self._watchdog.release(conn)
                except psycopg.Error:
                    if conn is not None:
                        with contextlib.suppress(psycopg.Error):
                            conn.close()
                    conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()

    def _ensure_listener(self) -> None:
        with self._cond:
            if self._listener is not None or self._closed:
                return
            self._listener = threading.Thread(target=self._listen, name=f"stateline-listen-{self.schema}", daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        """Keep one LISTEN connection; each notification bumps its tenant's generation and wakes watchers."""
        while not self._closed:
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = psycopg.connect(self._conninfo, **self._connect_kwargs)
                conn.execute(f'LISTEN "{self._channel}"')
                with self._cond:
                    self._listening = True
                    self._cond.notify_all()
                last_ping = time.monotonic()
                while not self._closed:
                    for n in conn.notifies(timeout=0.5):
                        with self._cond:
                            self._gens[n.payload] = self._gens.get(n.payload, 0) + 1
                            self._cond.notify_all()
                    if conn.closed or conn.broken:
                        break
                    if time.monotonic() - last_ping > _LISTEN_PING:  # a silent partition would look idle
                        self._watchdog.watch(conn)
                        try:
                            conn.execute("SELECT 1")
                        finally:
                            self._watchdog.release(conn)
                        last_ping = time.monotonic()
            except psycopg.Error:
                pass
            finally:
                with self._cond:
                    self._listening = False
                    self._cond.notify_all()
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
            if not self._closed:
                time.sleep(_POLL_DOWN)

    def _tenant_revisions(self, after: str | None, limit: int) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in self._read(self._q.tenants, (after, after, limit))]

    def _stats(self, tenant: str) -> TenantStats:
        rows = self._read(self._q.stats, (tenant, self.clock.now_us(), tenant, tenant, tenant))
        revision, streams, events = 0, 0, 0
        spaces: dict[str, NamespaceStats] = {}
        for kind, name, a, b in rows:
            if kind == "ns":
                spaces[name] = NamespaceStats(int(a), int(b))
            else:
                revision, streams, events = int(a or 0), int(b), int(name)
        return TenantStats(revision, spaces, streams, events)

    def _sweep(self, limit: int) -> int:
        now = self.clock.now_us()
        return len(self._read(self._q.sweep, (now, limit, now)))

    def _ping(self) -> None:
        self._read("SELECT 1", ())

    def _close(self) -> None:
        with self._cond:
            self._cond.notify_all()
            listener = self._listener
        with self._notify_cond:
            self._notify_cond.notify_all()
            notifier = self._notifier
        if listener is not None:
            listener.join(timeout=2.0)
        if notifier is not None:
            notifier.join(timeout=2.0)  # it sends what is pending first
        self._pool.close(timeout=1.0)
        self._watchdog.stop()


# Array parameters are encoded here, straight into PostgreSQL's binary array format, and handed to
# psycopg as values of their own types whose dumpers pass the bytes through. psycopg's generic list
# dumper inspects every list and element in Python on each call: 16 arrays of a case commit cost it
# ~70 µs, about 15% of the commit's client CPU. The element types are fixed by the statements.
_I4 = struct.Struct(">i")
_I4_I8 = struct.Struct(">iq")
_HEAD = struct.Struct(">iiIii")  # dimensions (1), has nulls, element oid, length, lower bound (1)
_NULL = _I4.pack(-1)
_OIDS = {"text": 25, "bytea": 17, "int8": 20, "bool": 16}


class _Encoded(bytes):
    """A parameter already in PostgreSQL's binary format."""


class _TextArray(_Encoded):
    pass


class _ByteaArray(_Encoded):
    pass


class _Int8Array(_Encoded):
    pass


class _BoolArray(_Encoded):
    pass


def _head(element: str, n: int, nulls: bool) -> bytes:
    if n == 0:
        return struct.pack(">iiI", 0, 0, _OIDS[element])
    return _HEAD.pack(1, 1 if nulls else 0, _OIDS[element], n, 1)


def _texts(values: Sequence[str]) -> _TextArray:
    parts = [_head("text", len(values), False)]
    for v in values:
        b = v.encode()
        parts.append(_I4.pack(len(b)))
        parts.append(b)
    return _TextArray(b"".join(parts))


def _blobs(values: Sequence[bytes]) -> _ByteaArray:
    parts = [_head("bytea", len(values), False)]
    for b in values:
        parts.append(_I4.pack(len(b)))
        parts.append(b)
    return _ByteaArray(b"".join(parts))


def _int8s(values: Sequence[int | None]) -> _Int8Array:
    if None not in values:
        return _Int8Array(_head("int8", len(values), False) + b"".join([_I4_I8.pack(8, v) for v in values]))
    parts = [_head("int8", len(values), True)]
    parts.extend(_NULL if v is None else _I4_I8.pack(8, v) for v in values)
    return _Int8Array(b"".join(parts))


_TRUE = b"\0\0\0\1\1"
_FALSE = b"\0\0\0\1\0"


def _bools(values: Sequence[bool]) -> _BoolArray:
    return _BoolArray(_head("bool", len(values), False) + b"".join([_TRUE if v else _FALSE for v in values]))


def _passthrough(oid: int) -> type[Dumper]:
    class _Pass(Dumper):
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            encoded: bytes = obj
            return encoded

    _Pass.oid = oid
    return _Pass


for _cls, _oid in ((_TextArray, 1009), (_ByteaArray, 1001), (_Int8Array, 1016), (_BoolArray, 1000)):
    psycopg.adapters.register_dumper(_cls, _passthrough(_oid))


def _write_params(plans: list[_Plan], idle: list[str]) -> dict[str, Any]:
    """The parameters of ``_Queries.write`` for a group's plans, one per tenant with a commit to write.

    ``idle`` names the group's other tenants: their revision rows, locked but unchanged, are removed
    again if this group created them (a tenant exists once it has committed).
    """
    p: dict[str, list[Any]] = {name: [] for name in _WRITE_ARRAYS}
    for plan in plans:
        t = plan.tenant
        for (ns, key), v in plan.items.items():
            if v is None:
                p["del_t"].append(t)
                p["del_ns"].append(ns)
                p["del_key"].append(key)
            else:
                p["t"].append(t)
                p["ns"].append(ns)
                p["key"].append(key)
                p["value"].append(v[0])
                p["version"].append(v[1])
                p["rev"].append(v[2])
                p["created"].append(v[3])
                p["expires"].append(v[4])
        for stream, seq, typ, data, meta, rev in plan.events:
            p["ev_t"].append(t)
            p["ev_stream"].append(stream)
            p["ev_seq"].append(seq)
            p["ev_type"].append(typ)
            p["ev_data"].append(data)
            p["ev_meta"].append(meta)
            p["ev_rev"].append(rev)
        for stream, last in plan.last_seqs.items():
            p["st_t"].append(t)
            p["st_stream"].append(stream)
            p["st_last"].append(last)
        for stream, cut in plan.trims.items():
            p["tr_t"].append(t)
            p["tr_stream"].append(stream)
            p["tr_cut"].append(cut)
        for rev, body in plan.changes:
            p["ch_t"].append(t)
            p["ch_rev"].append(rev)
            p["ch_body"].append(body)
        p["rv_t"].append(t)
        p["rv"].append(plan.base_revision + len(plan.changes))
    params: dict[str, Any] = {name: encode(p[name]) for name, encode in _WRITE_ARRAYS.items()}
    params["idle"] = _texts(idle)
    params["now"] = plans[0].now
    return params


def _read_one_params(
    tenant: str, keys: dict[tuple[str, str, str], bool], streams: set[tuple[str, str]]
) -> tuple[Any, ...]:
    ks = list(keys)
    return (
        _texts([k[1] for k in ks]),
        _texts([k[2] for k in ks]),
        _bools(list(keys.values())),
        tenant,
        _texts([x[1] for x in streams]),
        tenant,
        tenant,
    )


def _read_one_rows(found: list[tuple[Any, ...]], rows: dict[tuple[str, str], _Row], seqs: dict[str, int]) -> int:
    """Sort the rows of ``_Queries.read_one`` into ``rows`` and ``seqs``; returns the tenant's revision."""
    revision = 0
    for ns, key, value, version, created, expires in found:
        if key is not None:
            rows[(ns, key)] = _Row(value, version, created, expires)
        elif ns is not None:
            seqs[ns] = version
        else:
            revision = version
    return revision


def _write_one(
    q: _Queries, plan: _Plan, *, guarded: bool = False, fresh: set[tuple[str, str]] | None = None
) -> tuple[str, dict[str, Any]]:
    """The statement and parameters that write one tenant's plan: only the parts it needs, the tenant a scalar.

    ``guarded``: the statement is a transaction of its own that writes only if the tenant's revision is
    still ``plan.base_revision``, and returns whether it wrote. ``fresh``: keys taken for absent, written
    by a plain INSERT (a unique violation fails the statement if one exists).
    """
    p: dict[str, Any] = {"t": plan.tenant, "now": plan.now, "rv": plan.base_revision + len(plan.changes)}
    if guarded:
        p["base"] = plan.base_revision
    dels = [k for k, v in plan.items.items() if v is None]
    puts = [(k, v) for k, v in plan.items.items() if v is not None]
    new = fresh or set()
    inserts = [(k, v) for k, v in puts if k in new]
    if inserts:
        puts = [(k, v) for k, v in puts if k not in new]
        _item_params(p, "i_", inserts)
    if dels:
        p["del_ns"] = _texts([k[0] for k in dels])
        p["del_key"] = _texts([k[1] for k in dels])
    if puts:
        _item_params(p, "", puts)
    events = plan.events
    if events:
        p["ev_stream"] = _texts([e[0] for e in events])
        p["ev_seq"] = _int8s([e[1] for e in events])
        p["ev_type"] = _texts([e[2] for e in events])
        p["ev_data"] = _blobs([e[3] for e in events])
        p["ev_meta"] = _blobs([e[4] for e in events])
        p["ev_rev"] = _int8s([e[5] for e in events])
    if plan.last_seqs:
        p["st_stream"] = _texts(list(plan.last_seqs))
        p["st_last"] = _int8s(list(plan.last_seqs.values()))
    if plan.trims:
        p["tr_stream"] = _texts(list(plan.trims))
        p["tr_cut"] = _int8s(list(plan.trims.values()))
    p["ch_rev"] = _int8s([c[0] for c in plan.changes])
    p["ch_body"] = _blobs([c[1] for c in plan.changes])
    guard = ("new" if plan.base_revision == 0 else "next") if guarded else ""
    statement = q.write_one(
        guard, bool(dels), bool(puts), bool(events), bool(plan.last_seqs), bool(plan.trims), bool(inserts)
    )
    return statement, p


def _item_params(
    p: dict[str, Any], prefix: str, rows: list[tuple[tuple[str, str], tuple[bytes, int, int, int, int | None]]]
) -> None:
    """The array parameters of ``_Queries.items_insert`` for ``rows`` (key, planned row), named ``prefix`` + column."""
    p[f"{prefix}ns"] = _texts([k[0] for k, _ in rows])
    p[f"{prefix}key"] = _texts([k[1] for k, _ in rows])
    p[f"{prefix}value"] = _blobs([v[0] for _, v in rows])
    p[f"{prefix}version"] = _int8s([v[1] for _, v in rows])
    p[f"{prefix}rev"] = _int8s([v[2] for _, v in rows])
    p[f"{prefix}created"] = _int8s([v[3] for _, v in rows])
    p[f"{prefix}expires"] = _int8s([v[4] for _, v in rows])


_WRITE_ARRAYS: dict[str, Callable[[Any], _Encoded]] = {
    "del_t": _texts, "del_ns": _texts, "del_key": _texts,
    "t": _texts, "ns": _texts, "key": _texts, "value": _blobs, "version": _int8s, "rev": _int8s,
    "created": _int8s, "expires": _int8s,
    "ev_t": _texts, "ev_stream": _texts, "ev_seq": _int8s, "ev_type": _texts, "ev_data": _blobs,
    "ev_meta": _blobs, "ev_rev": _int8s,
    "st_t": _texts, "st_stream": _texts, "st_last": _int8s,
    "tr_t": _texts, "tr_stream": _texts, "tr_cut": _int8s,
    "ch_t": _texts, "ch_rev": _int8s, "ch_body": _blobs,
    "rv_t": _texts, "rv": _int8s,
}  # fmt: skip


class _Watchdog:
    """Shuts down the socket of a connection whose statement has waited longer than ``limit`` seconds.

    libpq waits for an answer for ever; behind a partition (or a stalled proxy) that is a hang. Shutting
    the socket down makes the waiting call fail at once with a connection error.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._active: dict[int, tuple[float, psycopg.Connection[Any]]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._active[id(conn)] = (time.monotonic() + self.limit, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stateline-pg-watchdog", daemon=True)
                self._thread.start()

    def release(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            self._active.pop(id(conn), None)

    def stop(self) -> None:
        with self._lock:
            self._active.clear()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            time.sleep(min(0.25, self.limit / 4))
            now = time.monotonic()
            with self._lock:
                if self._thread is not me:
                    return
                for key, (deadline, conn) in list(self._active.items()):
                    if deadline <= now:
                        del self._active[key]
                        _shut_down(conn)


def _shut_down(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(OSError, ValueError, psycopg.Error):
        fd = conn.fileno()
        dup = socket.socket(fileno=os.dup(fd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


class _Retry(Exception):
    """Internal: the transaction was rolled back with nothing written and may be run again."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _copy_error(err: Exception) -> Exception:
    if type(err) is Unavailable or type(err) is StatelineError:
        assert isinstance(err, StatelineError)
        return type(err)(err.message, details=err.details)
    return err


def _healthy(conn: psycopg.Connection[Any]) -> bool:
    """False if the connection is closed, or the server has sent something unasked (it closed the connection)."""
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        readable = [True]
    if readable:
        with contextlib.suppress(psycopg.Error):
            conn.close()
        return False
    return True


def _int_option(value: object, name: str, low: int, high: int) -> int:
    if type(value) is str and value.strip().lstrip("-").isdigit():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise InvalidArgument(name, f"must be an integer from {low} to {high}, got {value!r}")
    return value


def _float_option(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidArgument(name, f"must be a number, got {value!r}") from None


def _group_mode(value: object) -> str:
    v = value.strip().lower() if isinstance(value, str) else value
    if v is True or v in ("1", "true", "yes", "on", "tenant"):
        return "tenant"
    if v is False or v in ("0", "false", "no", "off"):
        return "off"
    if v == "all":
        return "all"
    raise InvalidArgument("group_commit", f"must be tenant (true), all or off (false), got {value!r}")


_URL_OPTIONS: dict[str, Any] = {
    "schema": lambda _n, v: v,
    "pool_min": lambda _n, v: v,
    "pool_max": lambda _n, v: v,
    "pool_timeout": _float_option,
    "connect_timeout": lambda _n, v: v,
    "op_timeout": _float_option,
    "group_commit": lambda _n, v: v,
    "max_value_bytes": lambda n, v: _int_option(v, n, 1, LARGEST_MAX_VALUE_BYTES),
}


# Array parameters go in binary: in text, every bytea element would be hex-encoded, then quoted and
# escaped inside the array literal, in Python (a case commit's client CPU: 2.42M -> 1.49M instructions).
_ARRAY_PARAM = re.compile(r"%(\(\w+\))?s(::\w+\[\])")
# The arrays a statement unnests go in through sub-selects, so that the planner estimates them alike
# whatever they hold. Given the arrays themselves it estimates their few rows, costs a custom plan below
# the generic one (which assumes 10) and plans the statement again at every execution: the write of a
# commit cost ~0.45 ms of server time, ~0.26 with its generic plan kept.
_UNNEST_ARGS = re.compile(r"unnest\(((?:%(?:\(\w+\))?s::\w+\[\](?:, )?)+)\)")


def _prepared_form(statement: str) -> str:
    """``statement`` with its array parameters in binary, those it unnests through sub-selects."""

    def sub_selected(m: re.Match[str]) -> str:
        return "unnest(" + _ARRAY_PARAM.sub(r"(SELECT %\1s\2)", m.group(1)) + ")"

    return _ARRAY_PARAM.sub(r"%\1b\2", _UNNEST_ARGS.sub(sub_selected, statement))


@dataclass(frozen=True, slots=True)
class _Raw:
    """A statement in libpq's form: ``$n`` placeholders, the names of its parameters in that order,
    and the name it is prepared under on every connection."""

    name: bytes
    query: bytes
    params: tuple[str, ...]


_PLACEHOLDER = re.compile(r"%\((\w+)\)[sb]")
_RAWS: dict[str, _Raw | None] = {}
_RAW_NAMES = itertools.count()  # a name is never given twice: connections keep what they prepared


def _raw(statement: str) -> _Raw | None:
    """``statement`` (named placeholders only, each with a cast) in libpq's form; None if it has another
    kind of placeholder or a literal percent sign."""
    if statement in _RAWS:
        return _RAWS[statement]
    names: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        return f"${names.setdefault(m.group(1), len(names) + 1)}"

    query = _PLACEHOLDER.sub(number, statement)
    raw = None if "%" in query else _Raw(f"sl_write_{next(_RAW_NAMES)}".encode(), query.encode(), tuple(names))
    if len(_RAWS) >= 4096:  # statements come in a few hundred shapes per schema
        _RAWS.clear()
    _RAWS[statement] = raw
    return raw


def _raise_if_failed(results: list[psycopg.pq.abc.PGresult]) -> psycopg.pq.abc.PGresult:
    """The last of ``results``, or the error of the first that failed."""
    for res in results:
        if res.status == ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(res)
    return results[-1]


# A statement that looks keys up from arrays finds each one by its own index probe, whatever the planner
# estimates. A plain join of the arrays with the table let a prepared statement's generic plan (which
# assumes a tenant of average size) read all of one tenant's rows and hash-join them: a commit of a tenant
# of 50,000 items then took 25 ms instead of 1. A LATERAL subquery with LIMIT (or OFFSET 0) is not merged
# into the join, so it runs once per array element as an index scan; deletes go by the ctids it finds (a
# TID scan). The rows found cannot change before they are deleted: writers hold the tenant's row lock, and
# a guarded write writes nothing if another commit came in since its snapshot.
def _one_item(s: str, tenant: str = "%s") -> str:
    """The row of ``items`` of ``tenant`` (an SQL expression) with the key ``k.ns, k.key``, as a LATERAL subquery."""
    return (
        f"(SELECT j.*, j.ctid FROM {s}.items j WHERE j.tenant = {tenant} "
        'AND j.ns = k.ns COLLATE "C" AND j.key = k.key COLLATE "C" LIMIT 1)'
    )


def _one_stream(s: str, tenant: str = "%s") -> str:
    """The row of ``streams`` of ``tenant`` named ``k.stream``, as a LATERAL subquery."""
    return f'(SELECT j.* FROM {s}.streams j WHERE j.tenant = {tenant} AND j.stream = k.stream COLLATE "C" LIMIT 1)'


def _events_before(s: str, tenant: str) -> str:
    """The ctids of the events of ``tenant`` in stream ``k.stream`` before seq ``k.cut``, as a LATERAL subquery."""
    return (
        f'(SELECT j.ctid FROM {s}.events j WHERE j.tenant = {tenant} AND j.stream = k.stream COLLATE "C" '
        "AND j.seq < k.cut OFFSET 0)"
    )


class _Queries:
    """Every statement, with the schema filled in once."""

    def __init__(self, s: str) -> None:
        self.s = s
        live = "(i.expires_at IS NULL OR i.expires_at > %s)"
        cols = "i.ns, i.key, i.value, i.version, i.revision, i.created_at, i.updated_at, i.expires_at"
        self.lock_tenant = (
            f"INSERT INTO {s}.tenants AS t (tenant, revision) VALUES (%s, 0) "
            f"ON CONFLICT (tenant) DO UPDATE SET revision = t.revision RETURNING tenant, revision, {_WATCHED}"
        )
        self.lock_tenants = (  # rows are locked in the (sorted) order given
            f"INSERT INTO {s}.tenants AS t (tenant, revision) SELECT u, 0 FROM unnest(%s::text[]) AS u "
            f"ON CONFLICT (tenant) DO UPDATE SET revision = t.revision RETURNING tenant, revision, {_WATCHED}"
        )
        # a watcher marks its tenant watched for a while (server time); only then do commits notify
        self.mark_watched = (
            f"INSERT INTO {s}.tenants AS t (tenant, revision, watched_until) "
            "VALUES (%s, 0, now() + make_interval(secs => %s)) "
            "ON CONFLICT (tenant) DO UPDATE SET watched_until = greatest(t.watched_until, excluded.watched_until) "
            "RETURNING 1"
        )
        self.read_items = (
            "SELECT i.tenant, i.ns, i.key, CASE WHEN k.want THEN i.value END, i.version, i.created_at, i.expires_at "
            "FROM unnest(%s::text[], %s::text[], %s::text[], %s::bool[]) AS k(tenant, ns, key, want) "
            f"CROSS JOIN LATERAL {_one_item(s, 'k.tenant')} i"
        )
        self.read_streams = (
            f"SELECT st.tenant, st.stream, st.last_seq FROM unnest(%s::text[], %s::text[]) AS k(tenant, stream) "
            f"CROSS JOIN LATERAL {_one_stream(s, 'k.tenant')} st"
        )
        # one tenant's items (key not null), streams (key null; ns: the stream, version: its last seq) and
        # revision (ns and key null; version: the revision), all in one snapshot
        self.read_one = (
            "SELECT i.ns, i.key, CASE WHEN k.want THEN i.value END, i.version, i.created_at, i.expires_at "
            "FROM unnest(%s::text[], %s::text[], %s::bool[]) AS k(ns, key, want) "
            f"CROSS JOIN LATERAL {_one_item(s)} i "
            "UNION ALL SELECT st.stream, NULL, NULL, st.last_seq, NULL, NULL "
            f"FROM unnest(%s::text[]) AS k(stream) CROSS JOIN LATERAL {_one_stream(s)} st "
            f"UNION ALL SELECT NULL, NULL, NULL, t.revision, NULL, NULL FROM {s}.tenants t WHERE t.tenant = %s"
        )
        self.notify_many = "SELECT pg_notify(%s, u) FROM unnest(%s::text[]) AS u"
        # every write of a group in one statement: data-modifying CTEs all run, on disjoint rows (the
        # plan has one final state per key, and drops new events that a trim of the same group removes)
        self.write = (
            f"WITH del AS (DELETE FROM {s}.items WHERE ctid = ANY(ARRAY(SELECT i.ctid FROM unnest(%(del_t)s::text[], "
            f"%(del_ns)s::text[], %(del_key)s::text[]) AS k(tenant, ns, key) CROSS JOIN LATERAL "
            f"{_one_item(s, 'k.tenant')} i))), "
            f"put AS (INSERT INTO {s}.items "
            "(tenant, ns, key, value, version, revision, created_at, updated_at, expires_at) "
            "SELECT k.tenant, k.ns, k.key, k.value, k.version, k.revision, k.created_at, %(now)s, k.expires_at "
            "FROM unnest(%(t)s::text[], %(ns)s::text[], %(key)s::text[], %(value)s::bytea[], %(version)s::bigint[], "
            "%(rev)s::bigint[], %(created)s::bigint[], %(expires)s::bigint[]) "
            "AS k(tenant, ns, key, value, version, revision, created_at, expires_at) "
            "ON CONFLICT (tenant, ns, key) DO UPDATE SET value = excluded.value, version = excluded.version, "
            "revision = excluded.revision, created_at = excluded.created_at, updated_at = excluded.updated_at, "
            "expires_at = excluded.expires_at), "
            f"ev AS (INSERT INTO {s}.events (tenant, stream, seq, type, data, meta, revision, recorded_at) "
            "SELECT e.tenant, e.stream, e.seq, e.type, e.data, e.meta, e.revision, %(now)s "
            "FROM unnest(%(ev_t)s::text[], %(ev_stream)s::text[], %(ev_seq)s::bigint[], %(ev_type)s::text[], "
            "%(ev_data)s::bytea[], %(ev_meta)s::bytea[], %(ev_rev)s::bigint[]) "
            "AS e(tenant, stream, seq, type, data, meta, revision)), "
            f"st AS (INSERT INTO {s}.streams (tenant, stream, last_seq) "
            "SELECT k.tenant, k.stream, k.last_seq "
            "FROM unnest(%(st_t)s::text[], %(st_stream)s::text[], %(st_last)s::bigint[]) "
            "AS k(tenant, stream, last_seq) "
            "ON CONFLICT (tenant, stream) DO UPDATE SET last_seq = excluded.last_seq), "
            f"tr AS (DELETE FROM {s}.events WHERE ctid = ANY(ARRAY(SELECT e.ctid FROM unnest(%(tr_t)s::text[], "
            "%(tr_stream)s::text[], %(tr_cut)s::bigint[]) AS k(tenant, stream, cut) CROSS JOIN LATERAL "
            f"{_events_before(s, 'k.tenant')} e))), "
            f"ch AS (INSERT INTO {s}.changes (tenant, revision, body) "
            "SELECT c.tenant, c.revision, c.body "
            "FROM unnest(%(ch_t)s::text[], %(ch_rev)s::bigint[], %(ch_body)s::bytea[]) AS c(tenant, revision, body)), "
            f"idle AS (DELETE FROM {s}.tenants WHERE tenant = ANY(%(idle)s::text[]) AND revision = 0 "
            "AND watched_until IS NULL) "
            f"UPDATE {s}.tenants t SET revision = v.rev "
            "FROM unnest(%(rv_t)s::text[], %(rv)s::bigint[]) AS v(tenant, rev) "
            'WHERE t.tenant = v.tenant COLLATE "C"'
        )
        self._write_one: dict[tuple[str | bool, ...], str] = {}
        self.get = f"SELECT {cols} FROM {s}.items i WHERE i.tenant = %s AND i.ns = %s AND i.key = %s AND {live}"
        self.get_many = (
            f"SELECT {cols} FROM unnest(%s::text[], %s::text[]) AS k(ns, key) CROSS JOIN LATERAL {_one_item(s)} i "
            f"WHERE {live}"
        )
        self.scan = (
            f"SELECT {cols} FROM {s}.items i WHERE i.tenant = %s AND i.ns = %s AND {live} AND i.key >= %s "
            "AND (%s::text IS NULL OR i.key > %s) AND (%s::text IS NULL OR i.key < %s) ORDER BY i.key LIMIT %s"
        )
        self.read_stream = (
            f"SELECT seq, type, data, meta, revision, recorded_at FROM {s}.events "
            "WHERE tenant = %s AND stream = %s AND seq >= %s AND seq <= %s ORDER BY seq LIMIT %s"
        )
        first = f"(SELECT min(e.seq) FROM {s}.events e WHERE e.tenant = st.tenant AND e.stream = st.stream)"
        self.stream_info = f"SELECT st.last_seq, {first} FROM {s}.streams st WHERE st.tenant = %s AND st.stream = %s"
        self.list_streams = (
            f"SELECT st.stream, st.last_seq, {first} FROM {s}.streams st WHERE st.tenant = %s AND st.stream >= %s "
            "AND (%s::text IS NULL OR st.stream > %s) AND (%s::text IS NULL OR st.stream < %s) "
            "ORDER BY st.stream LIMIT %s"
        )
        self.revision = f"SELECT revision FROM {s}.tenants WHERE tenant = %s"
        self.changes = (
            f"SELECT revision, body FROM {s}.changes WHERE tenant = %s AND revision > %s ORDER BY revision LIMIT %s"
        )
        self.first_change = (
            f"SELECT COALESCE((SELECT min(revision) FROM {s}.changes WHERE tenant = %s), "
            f"(SELECT revision FROM {s}.tenants WHERE tenant = %s) + 1, 1)"
        )
        # FOR UPDATE without SKIP LOCKED: two trims at once must not leave a hole below a failed one
        self.trim_changes = (
            f"DELETE FROM {s}.changes WHERE ctid = ANY(ARRAY(SELECT ctid FROM {s}.changes "
            "WHERE tenant = %s AND revision < %s ORDER BY revision LIMIT %s FOR UPDATE)) RETURNING 1"
        )
        self.outcome = (
            f"SELECT (SELECT body FROM {s}.changes WHERE tenant = %s AND revision = %s), "
            "EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)"
        )
        self.tenants = (
            f"SELECT tenant, revision FROM {s}.tenants WHERE revision > 0 AND (%s::text IS NULL OR tenant > %s) "
            "ORDER BY tenant LIMIT %s"
        )
        self.stats = (
            f"SELECT 'ns', i.ns, count(*), sum(length(i.value)) FROM {s}.items i "
            f"WHERE i.tenant = %s AND {live} GROUP BY i.ns "
            f"UNION ALL SELECT 'tenant', (SELECT count(*) FROM {s}.events WHERE tenant = %s)::text, "
            f"(SELECT revision FROM {s}.tenants WHERE tenant = %s), "
            f"(SELECT count(*) FROM {s}.streams WHERE tenant = %s)"
        )
        self.sweep = (  # by ctid, like the deletes of a commit: a join read every expired row at each call
            f"DELETE FROM {s}.items WHERE ctid = ANY(ARRAY(SELECT ctid FROM {s}.items "
            "WHERE expires_at <= %s LIMIT %s FOR UPDATE SKIP LOCKED)) AND expires_at <= %s RETURNING 1"
        )
        for name, value in list(vars(self).items()):
            if isinstance(value, str):
                setattr(self, name, _prepared_form(value))

    def _items_insert(self, prefix: str, where: str) -> str:
        """INSERT of one tenant's items from the arrays ``_item_params`` names with ``prefix``."""
        return (
            f"INSERT INTO {self.s}.items "
            "(tenant, ns, key, value, version, revision, created_at, updated_at, expires_at) "
            "SELECT %(t)s::text, k.ns, k.key, k.value, k.version, k.revision, k.created_at, %(now)s::bigint, "
            f"k.expires_at FROM unnest(%({prefix}ns)s::text[], %({prefix}key)s::text[], %({prefix}value)s::bytea[], "
            f"%({prefix}version)s::bigint[], %({prefix}rev)s::bigint[], %({prefix}created)s::bigint[], "
            f"%({prefix}expires)s::bigint[]) AS k(ns, key, value, version, revision, created_at, expires_at){where}"
        )

    def write_one(
        self, guard: str, dels: bool, puts: bool, events: bool, streams: bool, trims: bool, inserts: bool = False
    ) -> str:
        """The write of one tenant's plan with the parts it needs (like ``write``, the tenant a scalar).

        ``guard``: empty (the caller holds the tenant's lock), ``next`` or ``new``: the statement takes the
        lock itself and writes only if the revision is still ``%(base)s`` (``new``: 0, perhaps no row yet);
        it then returns one row, true if it wrote. Every write waits for the guard (it reads its result).
        ``inserts``: items known to be new, inserted without ``ON CONFLICT`` (``%(i_ns)s``, ...).
        """
        shape = (guard, dels, puts, events, streams, trims, inserts)
        statement = self._write_one.get(shape)
        if statement is not None:
            return statement
        s = self.s
        parts = []
        if guard == "next":
            parts.append(
                f"rv AS (UPDATE {s}.tenants t SET revision = %(rv)s::bigint "
                f"WHERE tenant = %(t)s::text AND revision = %(base)s::bigint RETURNING {_WATCHED} AS w)"
            )
        elif guard == "new":
            parts.append(
                f"rv AS (INSERT INTO {s}.tenants AS t (tenant, revision) VALUES (%(t)s::text, %(rv)s::bigint) "
                f"ON CONFLICT (tenant) DO UPDATE SET revision = excluded.revision WHERE t.revision = 0 "
                f"RETURNING {_WATCHED} AS w)"
            )
        only = " AND EXISTS (SELECT FROM rv)" if guard else ""
        where = " WHERE EXISTS (SELECT FROM rv)" if guard else ""
        if dels:
            parts.append(
                f"del AS (DELETE FROM {s}.items WHERE ctid = ANY(ARRAY(SELECT i.ctid FROM unnest(%(del_ns)s::text[], "
                f"%(del_key)s::text[]) AS k(ns, key) CROSS JOIN LATERAL {_one_item(s, '%(t)s::text')} i)){only})"
            )
        if puts:
            upsert = (
                " ON CONFLICT (tenant, ns, key) DO UPDATE SET value = excluded.value, version = excluded.version, "
                "revision = excluded.revision, created_at = excluded.created_at, updated_at = excluded.updated_at, "
                "expires_at = excluded.expires_at"
            )
            parts.append(f"put AS ({self._items_insert('', where)}{upsert})")
        if inserts:
            parts.append(f"ins AS ({self._items_insert('i_', where)})")
        if events:
            parts.append(
                f"ev AS (INSERT INTO {s}.events (tenant, stream, seq, type, data, meta, revision, recorded_at) "
                "SELECT %(t)s::text, e.stream, e.seq, e.type, e.data, e.meta, e.revision, %(now)s::bigint "
                "FROM unnest(%(ev_stream)s::text[], %(ev_seq)s::bigint[], %(ev_type)s::text[], "
                "%(ev_data)s::bytea[], %(ev_meta)s::bytea[], %(ev_rev)s::bigint[]) "
                f"AS e(stream, seq, type, data, meta, revision){where})"
            )
        if streams:
            parts.append(
                f"st AS (INSERT INTO {s}.streams (tenant, stream, last_seq) "
                "SELECT %(t)s::text, k.stream, k.last_seq "
                f"FROM unnest(%(st_stream)s::text[], %(st_last)s::bigint[]) AS k(stream, last_seq){where} "
                "ON CONFLICT (tenant, stream) DO UPDATE SET last_seq = excluded.last_seq)"
            )
        if trims:
            parts.append(
                f"tr AS (DELETE FROM {s}.events WHERE ctid = ANY(ARRAY(SELECT e.ctid FROM "
                "unnest(%(tr_stream)s::text[], %(tr_cut)s::bigint[]) AS k(stream, cut) CROSS JOIN LATERAL "
                f"{_events_before(s, '%(t)s::text')} e)){only})"
            )
        parts.append(
            f"ch AS (INSERT INTO {s}.changes (tenant, revision, body) SELECT %(t)s::text, c.revision, c.body "
            f"FROM unnest(%(ch_rev)s::bigint[], %(ch_body)s::bytea[]) AS c(revision, body){where})"
        )
        if guard:
            statement = f"WITH {', '.join(parts)} SELECT count(*) > 0, coalesce(bool_or(w), false) FROM rv"
        else:
            statement = (
                f"WITH {', '.join(parts)} UPDATE {s}.tenants SET revision = %(rv)s::bigint WHERE tenant = %(t)s::text"
            )
        statement = _prepared_form(statement)
        self._write_one[shape] = statement
        return statement
