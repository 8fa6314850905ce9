"""The Store port: one atomic compare-and-commit primitive and the reads around it.

Every adapter subclasses ``Store``. The public methods validate their arguments
here, once, so that every adapter refuses bad input the same way and writes
nothing; adapters implement the ``_``-prefixed hooks and receive only
validated, encoded input.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl

import orjson

from stateline import codec
from stateline.clock import Clock, checked_clock
from stateline.errors import ChangesTrimmed, InvalidArgument, PayloadTooLarge, StatelineError, Unavailable
from stateline.types import (
    Absent,
    Append,
    Change,
    ChangeOp,
    Check,
    Commit,
    Delete,
    Event,
    Exists,
    Incr,
    Item,
    NewEvent,
    Op,
    Put,
    StreamAt,
    StreamInfo,
    TenantStats,
    Trim,
    VersionIs,
    check_event_type,
    check_key,
    check_list,
    check_namespace,
    check_stream,
    check_tenant,
)

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "LARGEST_MAX_VALUE_BYTES",
    "ChangeRecorder",
    "PreparedAppend",
    "PreparedCommit",
    "PreparedDelete",
    "PreparedEvent",
    "PreparedIncr",
    "PreparedOp",
    "PreparedPut",
    "PreparedTrim",
    "Store",
    "decode_change",
    "int_option",
    "prefix_end",
    "url_options",
]

DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
LARGEST_MAX_VALUE_BYTES = 256 * 1024 * 1024
"""The largest ``max_value_bytes`` a store takes."""
MAX_OPS = 10_000
MAX_LIMIT = 10_000
MAX_META_BYTES = 64 * 1024
MAX_INT = 2**63 - 1
MAX_TTL_SECONDS = 100 * 365 * 86400
MAX_WATCH_SECONDS = 3600.0


# ---------------------------------------------------------------- prepared input


@dataclass(slots=True)
class PreparedPut:
    namespace: str
    key: str
    value: bytes
    ttl_us: int | None


@dataclass(slots=True)
class PreparedDelete:
    namespace: str
    key: str


@dataclass(slots=True)
class PreparedIncr:
    namespace: str
    key: str
    by: int
    ttl_us: int | None


@dataclass(slots=True)
class PreparedEvent:
    type: str
    data: bytes
    meta: bytes


@dataclass(slots=True)
class PreparedAppend:
    stream: str
    events: tuple[PreparedEvent, ...]


@dataclass(slots=True)
class PreparedTrim:
    stream: str
    before_seq: int


PreparedOp = PreparedPut | PreparedDelete | PreparedIncr | PreparedAppend | PreparedTrim


@dataclass(slots=True)
class PreparedCommit:
    """A validated commit: names checked, values encoded, TTLs in µs. ``meta`` is encoded JSON.

    Prepared records are plain slotted classes (built on every commit; frozen ones cost three times
    as much). Treat them as immutable.
    """

    tenant: str
    checks: tuple[Check, ...]
    ops: tuple[PreparedOp, ...]
    meta: bytes


# ---------------------------------------------------------------- change records


class ChangeRecorder:
    """Builds the change record of one commit while an adapter applies its ops.

    Every adapter stores the same encoded body, so the change feed reads the
    same on every backend; ``decode_change`` turns it back into a ``Change``.
    """

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []

    def put(self, namespace: str, key: str, version: int, value: bytes, expires_at: int | None) -> None:
        self.ops.append(
            {
                "op": "put",
                "ns": namespace,
                "key": key,
                "version": version,
                "value": orjson.Fragment(value),
                "exp": expires_at,
            }
        )

    def delete(self, namespace: str, key: str, version: int) -> None:
        self.ops.append({"op": "delete", "ns": namespace, "key": key, "version": version})

    def incr(self, namespace: str, key: str, version: int, value: int, expires_at: int | None) -> None:
        self.ops.append(
            {"op": "incr", "ns": namespace, "key": key, "version": version, "value": value, "exp": expires_at}
        )

    def append(self, stream: str, first_seq: int, events: Sequence[PreparedEvent]) -> None:
        self.ops.append(
            {
                "op": "append",
                "stream": stream,
                "events": [
                    {
                        "seq": first_seq + i,
                        "type": e.type,
                        "data": orjson.Fragment(e.data),
                        "meta": orjson.Fragment(e.meta),
                    }
                    for i, e in enumerate(events)
                ],
            }
        )

    def trim(self, stream: str, before_seq: int) -> None:
        self.ops.append({"op": "trim", "stream": stream, "before": before_seq})

    def body(self, committed_at: int, meta: bytes) -> bytes:
        return orjson.dumps({"at": committed_at, "meta": orjson.Fragment(meta), "ops": self.ops})


def decode_change(tenant: str, revision: int, body: bytes | str) -> Change:
    """Decode a change record written by ``ChangeRecorder.body``."""
    raw = orjson.loads(body)
    at = raw["at"]
    ops: list[ChangeOp] = []
    for o in raw["ops"]:
        kind = o["op"]
        if kind == "append":
            stream = o["stream"]
            events = tuple(Event(stream, e["seq"], e["type"], e["data"], e["meta"], revision, at) for e in o["events"])
            ops.append(ChangeOp("append", stream=stream, events=events))
        elif kind == "trim":
            ops.append(ChangeOp("trim", stream=o["stream"], before_seq=o["before"]))
        else:
            ops.append(
                ChangeOp(
                    kind,
                    namespace=o["ns"],
                    key=o["key"],
                    version=o["version"],
                    value=o.get("value"),
                    expires_at=o.get("exp"),
                )
            )
    return Change(tenant, revision, at, raw["meta"], tuple(ops))


def url_options(query: str) -> dict[str, str]:
    """The options of a store URL's query string, by name; one given twice is refused."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in options:
            raise InvalidArgument("url", f"option {name!r} given twice")
        options[name] = value
    return options


def int_option(name: str, value: object, minimum: int, maximum: int) -> int:
    """An integer option of a store, given as an int or (in its URL) as ASCII digits, from ``minimum``
    to ``maximum``; else ``InvalidArgument``."""
    if type(value) is str and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not int or not minimum <= value <= maximum:
        raise InvalidArgument(name, f"must be an integer from {minimum} to {maximum}, got {value!r}")
    return value


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (``None``: no bound)."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            chars[-1] = chr(nxt)
            return "".join(chars)
        chars.pop()
    return None


# ---------------------------------------------------------------- validation helpers


def _int(value: object, field: str, *, minimum: int = 0, maximum: int = MAX_INT) -> int:
    if type(value) is not int:
        raise InvalidArgument(field, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidArgument(field, f"must be between {minimum} and {maximum}, got {value}")
    return value


def _ttl_us(ttl: object, field: str) -> int | None:
    if ttl is None:
        return None
    if type(ttl) not in (int, float) or math.isnan(ttl):  # type: ignore[arg-type]  # bool is refused
        raise InvalidArgument(field, f"must be a number of seconds, got {ttl!r}")
    assert isinstance(ttl, int | float)
    if not 0 < ttl <= MAX_TTL_SECONDS:
        raise InvalidArgument(field, f"must be positive and at most {MAX_TTL_SECONDS} seconds, got {ttl!r}")
    return max(1, round(ttl * 1_000_000))


def _op_field(index: int, field: str) -> str:
    if not field or field.startswith("."):
        return f"ops[{index}]{field}"
    return f"ops[{index}].{field}"


def _limit(value: object, field: str = "limit") -> int:
    return _int(value, field, minimum=1, maximum=MAX_LIMIT)


def _prefix(value: object) -> str:
    if type(value) is not str:
        raise InvalidArgument("prefix", f"must be a string, got {type(value).__name__}")
    return check_key(value, "prefix") if value else ""


# ---------------------------------------------------------------- the port


class Store(ABC):
    """The storage port: a keyspace of items and streams per tenant, changed only by ``commit``.

    Contract (every adapter, checked by ``tests/store``):

    * ``commit`` applies all of its ops or none. If every check holds, every op applies in one
      backend transaction under the tenant's next revision (exactly one more than the last),
      and the change record for that revision is written in the same transaction. If any check
      fails, nothing is written and ``Conflict`` lists every failed check with what was found.
    * A transaction never spans tenants, and no read crosses tenants.
    * Expired items are invisible to every read and check at once (as if deleted); ``sweep``
      removes them later. A key that comes back after expiry or delete starts at version 1.
    * ``changes`` returns records in revision order with no gaps: a reader that has seen revision
      N will see every revision below N. ``trim_changes`` removes the oldest records (retention);
      a reader that asks for a removed one gets ``ChangesTrimmed``, never a feed that skips.
    * Methods are thread-safe. Bad input raises ``InvalidArgument`` (or ``PayloadTooLarge``) and
      writes nothing; an unreachable backend raises ``Unavailable``.
    """

    scheme: ClassVar[str]

    def __init__(
        self, *, clock: Clock | None = None, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES, **unknown: Any
    ) -> None:
        """``unknown``: the options the adapter did not take, refused by name."""
        if unknown:
            raise InvalidArgument(next(iter(unknown)), f"unknown option of a {self.scheme}:// store")
        self.clock: Clock = checked_clock(clock)
        self.max_value_bytes = _int(max_value_bytes, "max_value_bytes", minimum=1, maximum=LARGEST_MAX_VALUE_BYTES)
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **options: Any) -> Self:
        """Open the store a URL names (``memory://``, ``sqlite:///path``, ...)."""

    # ------------------------------------------------------------ preparing commits

    def prepare(
        self,
        tenant: str,
        checks: Iterable[Check] = (),
        ops: Iterable[Op] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> PreparedCommit:
        """Validate and encode a commit without applying it."""
        tenant = check_tenant(tenant)
        checks_t = check_list(checks, "checks")
        ops_t = check_list(ops, "ops")
        if not ops_t:
            raise InvalidArgument("ops", "a commit needs at least one op")
        if len(ops_t) > MAX_OPS or len(checks_t) > MAX_OPS:
            raise InvalidArgument("ops", f"at most {MAX_OPS} checks and {MAX_OPS} ops per commit")
        for i, c in enumerate(checks_t):
            self._validate_check(c, f"checks[{i}]")
        prepared = []
        for i, op in enumerate(ops_t):
            try:
                prepared.append(self._prepare_op(op))
            except InvalidArgument as exc:  # name the op: field names are built only on this path
                raise InvalidArgument(_op_field(i, exc.field), exc.problem, details=exc.details) from None
            except PayloadTooLarge as exc:
                field = _op_field(i, str(exc.details.get("field", "")))
                problem = exc.message.split(": ", 1)[-1]
                raise PayloadTooLarge(f"{field}: {problem}", details={**exc.details, "field": field}) from None
        if meta is None:
            meta_json = b"{}"
        else:
            if not isinstance(meta, Mapping):
                raise InvalidArgument("meta", f"must be an object, got {type(meta).__name__}")
            meta_json = codec.encode(dict(meta), "meta")
            if len(meta_json) > MAX_META_BYTES:
                raise PayloadTooLarge(f"meta: over the limit of {MAX_META_BYTES} bytes", details={"field": "meta"})
        return PreparedCommit(tenant, checks_t, tuple(prepared), meta_json)

    @staticmethod
    def _validate_check(c: object, field: str) -> None:
        t = type(c)
        if t is VersionIs:
            assert isinstance(c, VersionIs)
            check_namespace(c.namespace)
            check_key(c.key)
            _int(c.version, f"{field}.version", minimum=1)
        elif t is Absent or t is Exists:
            assert isinstance(c, Absent | Exists)
            check_namespace(c.namespace)
            check_key(c.key)
        elif t is StreamAt:
            assert isinstance(c, StreamAt)
            check_stream(c.stream)
            _int(c.seq, f"{field}.seq")
        else:
            raise InvalidArgument(field, f"unknown check kind {t.__name__}")

    def _prepare_op(self, op: object) -> PreparedOp:
        field = ""
        t = type(op)
        if t is Put:
            assert isinstance(op, Put)
            return PreparedPut(
                check_namespace(op.namespace),
                check_key(op.key),
                codec.encode(op.value, ".value", self.max_value_bytes),
                None if op.ttl is None else _ttl_us(op.ttl, ".ttl"),
            )
        if t is Delete:
            assert isinstance(op, Delete)
            return PreparedDelete(check_namespace(op.namespace), check_key(op.key))
        if t is Incr:
            assert isinstance(op, Incr)
            return PreparedIncr(
                check_namespace(op.namespace),
                check_key(op.key),
                _int(op.by, f"{field}.by", minimum=-MAX_INT),
                _ttl_us(op.ttl, f"{field}.ttl"),
            )
        if t is Append:
            assert isinstance(op, Append)
            stream = check_stream(op.stream)
            events_in: object = op.events
            if isinstance(events_in, str | bytes) or not isinstance(events_in, list | tuple):
                raise InvalidArgument(f"{field}.events", "must be a list of NewEvent")
            if not op.events:
                raise InvalidArgument(f"{field}.events", "must not be empty")
            events = []
            for j, e in enumerate(op.events):
                if type(e) is not NewEvent:
                    raise InvalidArgument(f"{field}.events[{j}]", f"must be a NewEvent, got {type(e).__name__}")
                if e.meta is not None and type(e.meta) is not dict:
                    raise InvalidArgument(f"{field}.events[{j}].meta", "must be an object or None")
                try:
                    event_type = check_event_type(e.type)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{field}.events[{j}].type", exc.problem) from None
                events.append(
                    PreparedEvent(
                        event_type,
                        codec.encode(e.data, f"{field}.events[{j}].data", self.max_value_bytes),
                        b"{}" if not e.meta else codec.encode(e.meta, f"{field}.events[{j}].meta", MAX_META_BYTES),
                    )
                )
            return PreparedAppend(stream, tuple(events))
        if t is Trim:
            assert isinstance(op, Trim)
            return PreparedTrim(check_stream(op.stream), _int(op.before_seq, f"{field}.before_seq", minimum=1))
        raise InvalidArgument(field, f"unknown op kind {t.__name__}")

    def _open(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed")

    # ------------------------------------------------------------ the public API

    def commit(
        self,
        tenant: str,
        checks: Iterable[Check] = (),
        ops: Iterable[Op] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> Commit:
        """Apply ``ops`` atomically if every one of ``checks`` holds; else raise ``Conflict``.

        ``meta`` (a JSON object: actor, reason, trace id, ...) is stored with the change record.
        """
        self._open()
        return self._commit(self.prepare(tenant, checks, ops, meta))

    def commit_prepared(self, prepared: PreparedCommit) -> Commit:
        """Apply a commit that ``prepare`` already validated."""
        self._open()
        if type(prepared) is not PreparedCommit:
            raise InvalidArgument("prepared", "must come from Store.prepare")
        return self._commit(prepared)

    def get(self, tenant: str, namespace: str, key: str) -> Item | None:
        """The live item at ``(namespace, key)``, or ``None``."""
        self._open()
        return self._get(check_tenant(tenant), check_namespace(namespace), check_key(key))

    def get_many(self, tenant: str, keys: Iterable[tuple[str, str]]) -> list[Item | None]:
        """Items for several ``(namespace, key)`` pairs in one round trip, in the order asked."""
        self._open()
        tenant = check_tenant(tenant)
        pairs: list[tuple[str, str]] = []
        for i, pair in enumerate(check_list(keys, "keys")):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidArgument(f"keys[{i}]", "must be a (namespace, key) tuple")
            pairs.append((check_namespace(pair[0]), check_key(pair[1])))
        if len(pairs) > MAX_LIMIT:
            raise InvalidArgument("keys", f"at most {MAX_LIMIT} keys per call")
        if not pairs:
            return []
        return self._get_many(tenant, pairs)

    def scan(
        self, tenant: str, namespace: str, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> list[Item]:
        """Live items of ``namespace`` whose keys start with ``prefix``, in key order (by code point),
        starting after key ``after``, at most ``limit``. Page by passing the last key as ``after``."""
        self._open()
        return self._scan(
            check_tenant(tenant),
            check_namespace(namespace),
            _prefix(prefix),
            None if after is None else check_key(after, "after"),
            _limit(limit),
        )

    def scan_all(self, tenant: str, namespace: str, prefix: str = "") -> Iterator[Item]:
        """Every live item of ``namespace`` whose key starts with ``prefix``, in key order, read a page
        of 1,000 at a time as the iteration goes (``scan`` paged by its last key)."""
        after: str | None = None
        while True:
            page = self.scan(tenant, namespace, prefix, after, 1000)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1].key

    def read_stream(
        self, tenant: str, stream: str, from_seq: int = 1, to_seq: int | None = None, limit: int = MAX_LIMIT
    ) -> list[Event]:
        """Kept events of ``stream`` with ``from_seq <= seq <= to_seq``, in seq order, at most ``limit``."""
        self._open()
        _int(from_seq, "from_seq", minimum=1)
        if to_seq is not None:
            _int(to_seq, "to_seq", minimum=0)
        return self._read_stream(
            check_tenant(tenant),
            check_stream(stream),
            from_seq,
            to_seq if to_seq is not None else MAX_INT,
            _limit(limit),
        )

    def stream_info(self, tenant: str, stream: str) -> StreamInfo:
        """The bounds of ``stream`` (a stream never appended to has ``last_seq == 0``)."""
        self._open()
        return self._stream_info(check_tenant(tenant), check_stream(stream))

    def list_streams(
        self, tenant: str, prefix: str = "", after: str | None = None, limit: int = 100
    ) -> list[StreamInfo]:
        """Streams whose names start with ``prefix``, in name order, after ``after``, at most ``limit``."""
        self._open()
        return self._list_streams(
            check_tenant(tenant), _prefix(prefix), None if after is None else check_key(after, "after"), _limit(limit)
        )

    def revision(self, tenant: str) -> int:
        """The tenant's last committed revision (0 before its first commit)."""
        self._open()
        return self._revision(check_tenant(tenant))

    def changes(self, tenant: str, after_revision: int = 0, limit: int = 1000) -> list[Change]:
        """Change records with revision > ``after_revision``, in order, with no gaps, at most ``limit``.

        Raises ``ChangesTrimmed`` if the record right after ``after_revision`` was removed by
        ``trim_changes`` (its ``first_available`` is where the kept feed starts).
        """
        self._open()
        tenant = check_tenant(tenant)
        after_revision = _int(after_revision, "after_revision")
        return self._unbroken(tenant, after_revision, self._changes(tenant, after_revision, _limit(limit)))

    def watch(self, tenant: str, after_revision: int, timeout: float = 30.0, limit: int = 1000) -> list[Change]:
        """Like ``changes``, but wait up to ``timeout`` seconds for at least one; ``[]`` on timeout."""
        self._open()
        tenant = check_tenant(tenant)
        _int(after_revision, "after_revision")
        if type(timeout) not in (int, float) or not 0 <= timeout <= MAX_WATCH_SECONDS:
            raise InvalidArgument("timeout", f"must be a number of seconds from 0 to {MAX_WATCH_SECONDS:g}")
        return self._unbroken(
            tenant, after_revision, self._watch(tenant, after_revision, float(timeout), _limit(limit))
        )

    def first_change(self, tenant: str) -> int:
        """The lowest revision of ``tenant`` whose change record is kept (the revision after the last
        one if ``trim_changes`` removed every record; 1 for a tenant that never committed)."""
        self._open()
        return self._first_change(check_tenant(tenant))

    def trim_changes(self, tenant: str, before_revision: int, limit: int = MAX_LIMIT) -> int:
        """Remove the oldest change records of ``tenant`` below ``before_revision``, at most ``limit``
        of them; returns how many. Retention for the change feed, which otherwise keeps a record of
        every commit for good.

        Not a commit: no revision, nothing in the feed. The tenant's data, streams and revision are
        untouched; only ``changes`` and ``watch`` from below the new start raise ``ChangesTrimmed``.
        Whoever trims decides what may go: a relay or subscriber that has not read a record yet
        loses it (``Sweeper`` keeps what this store's relays have not published).
        """
        self._open()
        tenant = check_tenant(tenant)
        return self._trim_changes(tenant, _int(before_revision, "before_revision"), _limit(limit))

    def _unbroken(self, tenant: str, after_revision: int, got: list[Change]) -> list[Change]:
        """``got`` if it starts right after ``after_revision``, or is empty with nothing removed there."""
        if got and got[0].revision == after_revision + 1:
            return got
        first = self._first_change(tenant)
        if after_revision + 1 < first:
            raise ChangesTrimmed(tenant, after_revision, first)
        if got:  # a hole the feed never has: the backend's data was changed behind the adapter's back
            raise StatelineError(f"change record {after_revision + 1} of {tenant!r} is missing")
        return got

    def tenants(self, after: str | None = None, limit: int = 1000) -> list[str]:
        """Tenants that have committed at least once, in name order, after ``after``."""
        return [tenant for tenant, _ in self.tenant_revisions(after, limit)]

    def tenant_revisions(self, after: str | None = None, limit: int = 1000) -> list[tuple[str, int]]:
        """``(tenant, last committed revision)`` of the tenants that have committed at least once, in
        name order, after ``after``: one read for a page of tenants, where ``revision`` is one each
        (a poller that only needs to know which tenants moved reads them this way)."""
        self._open()
        return self._tenant_revisions(None if after is None else check_tenant(after), _limit(limit))

    def all_tenants(self) -> list[str]:
        """Every tenant that has committed at least once, in name order (``tenants`` paged)."""
        return list(self.all_revisions())

    def all_revisions(self) -> dict[str, int]:
        """Every tenant that has committed at least once, in name order, with its last committed
        revision (``tenant_revisions`` paged)."""
        out: dict[str, int] = {}
        after: str | None = None
        while True:
            page = self.tenant_revisions(after=after, limit=1000)
            out.update(page)
            if len(page) < 1000:
                return out
            after = page[-1][0]

    def stats(self, tenant: str) -> TenantStats:
        """Live items and bytes per namespace, streams and kept events of one tenant."""
        self._open()
        return self._stats(check_tenant(tenant))

    def sweep(self, limit: int = MAX_LIMIT) -> int:
        """Physically remove up to ``limit`` expired items; returns how many. Not a commit: no revision."""
        self._open()
        return self._sweep(_limit(limit))

    def ping(self) -> None:
        """Raise ``Unavailable`` unless the backend answers."""
        self._open()
        self._ping()

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._closed

    def close(self) -> None:
        """Release connections; later calls raise ``Unavailable``. Closing twice is allowed."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ adapter hooks

    @abstractmethod
    def _commit(self, c: PreparedCommit) -> Commit: ...

    @abstractmethod
    def _get(self, tenant: str, namespace: str, key: str) -> Item | None: ...

    @abstractmethod
    def _get_many(self, tenant: str, keys: list[tuple[str, str]]) -> list[Item | None]: ...

    @abstractmethod
    def _scan(self, tenant: str, namespace: str, prefix: str, after: str | None, limit: int) -> list[Item]: ...

    @abstractmethod
    def _read_stream(self, tenant: str, stream: str, from_seq: int, to_seq: int, limit: int) -> list[Event]: ...

    @abstractmethod
    def _stream_info(self, tenant: str, stream: str) -> StreamInfo: ...

    @abstractmethod
    def _list_streams(self, tenant: str, prefix: str, after: str | None, limit: int) -> list[StreamInfo]: ...

    @abstractmethod
    def _revision(self, tenant: str) -> int: ...

    @abstractmethod
    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]: ...

    @abstractmethod
    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]: ...

    @abstractmethod
    def _first_change(self, tenant: str) -> int:
        """The lowest kept revision, else the tenant's revision + 1, read atomically (one snapshot)."""

    @abstractmethod
    def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int: ...

    @abstractmethod
    def _tenant_revisions(self, after: str | None, limit: int) -> list[tuple[str, int]]: ...

    @abstractmethod
    def _stats(self, tenant: str) -> TenantStats: ...

    @abstractmethod
    def _sweep(self, limit: int) -> int: ...

    @abstractmethod
    def _ping(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...
