"""Value types of the Store port (checks, ops, items, events, changes, commits) and the rules for names."""

from __future__ import annotations

import math
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeAlias

from stateline.errors import InvalidArgument

__all__ = [
    "Absent",
    "Append",
    "Change",
    "ChangeOp",
    "Check",
    "CheckFailure",
    "Commit",
    "Delete",
    "Event",
    "Exists",
    "Incr",
    "Item",
    "NamespaceStats",
    "NewEvent",
    "Op",
    "Put",
    "StreamAt",
    "StreamInfo",
    "TenantStats",
    "Trim",
    "VersionIs",
    "check_event_type",
    "check_key",
    "check_list",
    "check_namespace",
    "check_number",
    "check_stream",
    "check_tenant",
    "same_secret",
]

JSON: TypeAlias = Any

MAX_KEY_BYTES = 1024

#: The tenant of the deployment's own records (API keys, gates, relay cursors), beside the users' tenants.
SYSTEM_TENANT = "system"
#: The namespace of ``SYSTEM_TENANT`` where relays keep their cursors: ``<stream>/<tenant>`` -> the
#: last revision of ``<tenant>`` that JetStream acknowledged. Change-feed retention reads it.
RELAY_CURSORS = "bus.cursors"

# ---------------------------------------------------------------- names

_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,127}")
_EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,127}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@lru_cache(maxsize=4096)
def _checked_name(kind: str, value: str) -> str:
    pattern = {"tenant": _TENANT_RE, "namespace": _NAMESPACE_RE, "event type": _EVENT_TYPE_RE}[kind]
    if not value:
        raise InvalidArgument(kind, "must not be empty")
    if pattern.fullmatch(value) is None:
        limit = 64 if kind == "tenant" else 128
        raise InvalidArgument(
            kind,
            f"{value[:80]!r} is not allowed: use letters, digits and {'_.-' if kind == 'tenant' else '_.:/-'}, "
            f"at most {limit} characters",
        )
    return value


def check_tenant(value: object) -> str:
    """Return ``value`` if it is a valid tenant name, else raise ``InvalidArgument``."""
    if type(value) is not str:
        raise InvalidArgument("tenant", f"must be a string, got {type(value).__name__}")
    return _checked_name("tenant", value)


def check_namespace(value: object) -> str:
    """Return ``value`` if it is a valid namespace, else raise ``InvalidArgument``."""
    if type(value) is not str:
        raise InvalidArgument("namespace", f"must be a string, got {type(value).__name__}")
    return _checked_name("namespace", value)


def check_event_type(value: object) -> str:
    """Return ``value`` if it is a valid event type, else raise ``InvalidArgument``."""
    if type(value) is not str:
        raise InvalidArgument("event type", f"must be a string, got {type(value).__name__}")
    return _checked_name("event type", value)


@lru_cache(maxsize=65536)
def _checked_key(field_name: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field_name, "must not be empty")
    if _CONTROL_RE.search(value) is not None:
        raise InvalidArgument(field_name, "must not contain control characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(field_name, "is not valid Unicode text") from None
    if size > MAX_KEY_BYTES:
        raise InvalidArgument(field_name, f"is {size} bytes, over the limit of {MAX_KEY_BYTES}")
    return value


def check_key(value: object, field_name: str = "key") -> str:
    """Return ``value`` if it is a valid key: 1..1024 UTF-8 bytes, no control characters."""
    if type(value) is not str:
        raise InvalidArgument(field_name, f"must be a string, got {type(value).__name__}")
    return _checked_key(field_name, value)


def check_stream(value: object) -> str:
    """Return ``value`` if it is a valid stream name (same rules as keys)."""
    return check_key(value, "stream")


def same_secret(expected: str, given: str) -> bool:
    """Whether ``given`` is the secret ``expected`` (a token this library made: ASCII), compared in time
    that does not depend on where they differ. Text that is not ASCII is never one."""
    return given.isascii() and secrets.compare_digest(expected, given)


def check_number(
    value: object, field_name: str, minimum: float, maximum: float, *, above: bool = False, unit: str = ""
) -> float:
    """``value`` as a float if it is an int or a float (not a bool), finite, from ``minimum`` (above it
    with ``above``) to ``maximum``; else raise ``InvalidArgument`` (``unit`` names what it counts)."""
    if (
        type(value) not in (int, float)
        or not math.isfinite(value)  # type: ignore[arg-type]
        or not minimum <= value <= maximum  # type: ignore[operator]
        or (above and value == minimum)
    ):
        low = f"> {minimum:g}" if above else f">= {minimum:g}"
        high = "" if maximum == math.inf else f" and <= {maximum:g}"
        what = f"a number of {unit}" if unit else "a number"
        raise InvalidArgument(field_name, f"must be {what} {low}{high}, got {value!r:.80}")
    return float(value)  # type: ignore[arg-type]


def check_list(value: object, field_name: str) -> tuple[Any, ...]:
    """``value``, a list, tuple or other iterable that is not a string, bytes or a mapping, as a tuple;
    else raise ``InvalidArgument``. Its elements are the caller's to check."""
    t = type(value)
    if t is tuple:
        return value  # type: ignore[return-value]
    if t is list:
        return tuple(value)  # type: ignore[arg-type]
    if isinstance(value, str | bytes | bytearray | Mapping) or not isinstance(value, Iterable):
        raise InvalidArgument(field_name, f"must be a list, got {t.__name__}")
    return tuple(value)


# ---------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class VersionIs:
    """Holds when the live item ``(namespace, key)`` has exactly this version."""

    namespace: str
    key: str
    version: int


@dataclass(frozen=True, slots=True)
class Absent:
    """Holds when there is no live item at ``(namespace, key)`` (expired counts as absent)."""

    namespace: str
    key: str


@dataclass(frozen=True, slots=True)
class Exists:
    """Holds when there is a live item at ``(namespace, key)``."""

    namespace: str
    key: str


@dataclass(frozen=True, slots=True)
class StreamAt:
    """Holds when the stream's last seq is exactly ``seq`` (0: the stream has no events yet)."""

    stream: str
    seq: int


Check: TypeAlias = VersionIs | Absent | Exists | StreamAt


@dataclass(frozen=True, slots=True)
class CheckFailure:
    """A check that did not hold, with what was found: the live version (``None`` if absent) or the stream's seq."""

    check: Check
    found: int | None

    def describe(self) -> dict[str, Any]:
        c = self.check
        if isinstance(c, StreamAt):
            return {"check": "stream_at", "stream": c.stream, "expected": c.seq, "found": self.found}
        kind = {VersionIs: "version_is", Absent: "absent", Exists: "exists"}[type(c)]
        out: dict[str, Any] = {"check": kind, "namespace": c.namespace, "key": c.key, "found": self.found}
        if isinstance(c, VersionIs):
            out["expected"] = c.version
        return out


# ---------------------------------------------------------------- ops


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``value`` (any JSON value) at ``(namespace, key)``; ``ttl`` seconds makes it expire."""

    namespace: str
    key: str
    value: JSON
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove ``(namespace, key)``; deleting an absent key is allowed and changes nothing else."""

    namespace: str
    key: str


@dataclass(frozen=True, slots=True)
class Incr:
    """Add ``by`` to the integer at ``(namespace, key)`` (absent counts as 0).

    ``ttl`` seconds applies only when the counter is created; an existing counter keeps its expiry.
    """

    namespace: str
    key: str
    by: int = 1
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its ``type``, JSON ``data`` and optional ``meta`` object."""

    type: str
    data: JSON = None
    meta: dict[str, JSON] | None = None


@dataclass(frozen=True, slots=True)
class Append:
    """Append ``events`` to ``stream``; they get the next seqs, contiguous from the stream's last."""

    stream: str
    events: Sequence[NewEvent]


@dataclass(frozen=True, slots=True)
class Trim:
    """Remove the events of ``stream`` with seq below ``before_seq``; the stream's last seq is kept."""

    stream: str
    before_seq: int


Op: TypeAlias = Put | Delete | Incr | Append | Trim


# ---------------------------------------------------------------- results


@dataclass(slots=True)
class Item:
    """A live stored value. Times are µs since the epoch; ``revision`` is the commit that last wrote it.

    Results (``Item``, ``Event``, ``Commit``) are plain slotted records, not frozen ones: they are made
    on every read and commit, and a frozen dataclass costs three times as much to build.
    """

    namespace: str
    key: str
    value: JSON
    version: int
    revision: int
    created_at: int
    updated_at: int
    expires_at: int | None


@dataclass(slots=True)
class Event:
    """One event of a stream, numbered by ``seq`` from 1 with no gaps."""

    stream: str
    seq: int
    type: str
    data: JSON
    meta: dict[str, JSON]
    revision: int
    recorded_at: int

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON."""
        return {
            "stream": self.stream,
            "seq": self.seq,
            "type": self.type,
            "data": self.data,
            "meta": self.meta,
            "revision": self.revision,
            "recorded_at": self.recorded_at,
        }


@dataclass(frozen=True, slots=True)
class ChangeOp:
    """One op of a committed change, as the change feed shows it.

    ``op`` is ``put``, ``delete``, ``incr``, ``append`` or ``trim``. For item ops, ``version`` is the
    version written (for ``delete``: the version removed, 0 if there was none) and ``value`` the value
    written. For ``append``, ``events`` holds the appended events; for ``trim``, ``before_seq``.
    """

    op: str
    namespace: str = ""
    key: str = ""
    version: int = 0
    value: JSON = None
    expires_at: int | None = None
    stream: str = ""
    events: tuple[Event, ...] = ()
    before_seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The op as JSON, with only the fields of its kind (the HTTP change feed's shape)."""
        if self.op == "append":
            return {
                "op": "append",
                "stream": self.stream,
                "events": [e.to_dict() for e in self.events],
            }
        if self.op == "trim":
            return {"op": "trim", "stream": self.stream, "before_seq": self.before_seq}
        return {
            "op": self.op,
            "namespace": self.namespace,
            "key": self.key,
            "version": self.version,
            "value": self.value,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """The record of one successful commit, written in the same transaction as the commit."""

    tenant: str
    revision: int
    committed_at: int
    meta: dict[str, JSON]
    ops: tuple[ChangeOp, ...]

    def to_dict(self, ops: tuple[ChangeOp, ...] | None = None) -> dict[str, Any]:
        """The record as JSON (the HTTP change feed's shape); ``ops`` replaces its ops (those a filter kept)."""
        return {
            "revision": self.revision,
            "committed_at": self.committed_at,
            "meta": self.meta,
            "ops": [o.to_dict() for o in (self.ops if ops is None else ops)],
        }


@dataclass(slots=True)
class Commit:
    """What a successful commit returns.

    ``versions`` maps ``(namespace, key)`` to the version now live (0 after a delete),
    ``counters`` each incremented key to its new value, ``seqs`` each appended stream to its new last seq.
    """

    revision: int
    committed_at: int
    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's bounds: ``last_seq`` (0 if it has no events) and ``first_seq``, its oldest kept event.

    A stream with no kept events has ``first_seq == last_seq + 1``.
    """

    stream: str
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class NamespaceStats:
    """Live items in one namespace and the bytes of their encoded values."""

    items: int
    bytes: int


@dataclass(frozen=True, slots=True)
class TenantStats:
    """Counts for one tenant: its revision, live items per namespace, streams and kept events."""

    revision: int
    namespaces: dict[str, NamespaceStats]
    streams: int
    events: int


class LastWritten:
    """For layers: what a handle last wrote, ``key -> (document, version)``, so that its next write
    of that key can commit against the version without reading it first. Thread-safe; holds at most
    ``size`` keys, dropping the longest unwritten first. A stale entry only costs a refused commit."""

    __slots__ = ("_lock", "_map", "_size")

    def __init__(self, size: int) -> None:
        self._map: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def put(self, key: str, doc: dict[str, Any], version: int) -> None:
        with self._lock:
            self._map[key] = (doc, version)
            self._map.move_to_end(key)
            if len(self._map) > self._size:
                self._map.popitem(last=False)

    def get(self, key: str) -> tuple[dict[str, Any], int] | None:
        with self._lock:
            return self._map.get(key)

    def drop(self, key: str) -> None:
        with self._lock:
            self._map.pop(key, None)
