"""Append-only event streams with snapshots, state at a seq or time, export, cleanup and a consistency check.

Storage layout (all through the Store port):

* User stream ``S`` is the Store stream ``streams:S``; its events are numbered from 1 with no gaps.
* Snapshots of projection ``P`` of stream ``S`` are items of namespace ``streams.snapshots`` keyed
  ``<S'>/<P>/<seq, 20 digits>``, where ``S'`` is ``S`` with ``%`` and ``/`` percent-encoded, so a
  prefix scan finds exactly the snapshots of one stream (and projection), oldest first. The value is
  ``{"stream", "projection", "seq", "state", "at"}``; ``at`` is the ``recorded_at`` of event ``seq``
  (``null`` when the snapshot was written in the same commit as that event: then it equals the
  item's ``created_at``).
* A snapshot is written when an ``append`` given a projection makes the stream cross a multiple of
  ``snapshot_every``: the state after that multiple is computed *before* committing (latest snapshot
  + replay + the new events) and written **in the same commit** as the events, together with the
  deletion of the snapshots beyond the newest ``keep_snapshots``. A snapshot therefore never exists
  without its events, whatever crashes.

Complexities (n events kept, k events asked for, K snapshots kept): ``load`` is two round trips
(snapshot scan + read of at most ``snapshot_every`` events); ``read_between`` and ``state_at(time=...)``
binary-search the seq by ``recorded_at`` with one single-event read per step (O(log n) round trips)
and then read only the k events asked for; ``check`` and ``export`` read the whole stream (O(n)).
``read_between`` assumes ``recorded_at`` does not go backwards along the stream (``check`` reports it
if it does).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import orjson

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, NotFound
from stateline.store.protocol import MAX_LIMIT, Store
from stateline.types import (
    Absent,
    Append,
    Check,
    CheckFailure,
    Delete,
    Event,
    Item,
    NewEvent,
    Op,
    Put,
    StreamAt,
    StreamInfo,
    Trim,
    check_key,
    check_tenant,
)

__all__ = [
    "DEFAULT_KEEP_SNAPSHOTS",
    "DEFAULT_SNAPSHOT_EVERY",
    "SNAPSHOT_NAMESPACE",
    "STREAM_PREFIX",
    "Appended",
    "CheckIssue",
    "CheckReport",
    "Loaded",
    "Projection",
    "Streams",
]

STREAM_PREFIX = "streams:"
SNAPSHOT_NAMESPACE = "streams.snapshots"
DEFAULT_SNAPSHOT_EVERY = 100
DEFAULT_KEEP_SNAPSHOTS = 5
_SEQ_DIGITS = 20
_MAX_KEY_BYTES = 1024
_APPEND_ATTEMPTS = 50


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Projection:
    """How to fold a stream into a state: ``initial`` (a JSON value) and ``reducer(state, event) -> state``.

    The reducer receives the Store's ``Event`` records (``event.stream`` is the Store stream name,
    ``streams:<stream>``) and must be a deterministic function of the state and the event's ``seq``,
    ``type``, ``data`` and ``meta``: when an append writes a snapshot, the state is computed before
    the commit, so the new events it sees carry ``revision == 0`` and ``recorded_at == 0``. It may
    return a new state or mutate and return the one it was given; states must be JSON values
    (snapshots are stored as JSON). ``name`` tells apart the snapshots of different projections of
    one stream (letters, digits, ``_``, ``-``, ``.``).
    """

    initial: Any
    reducer: Callable[[Any, Event], Any]
    name: str = "default"
    _initial_json: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.reducer):
            raise InvalidArgument("reducer", "must be callable: reducer(state, event) -> new state")
        name = self.name
        if (
            type(name) is not str
            or not 1 <= len(name) <= 100
            or not all(ch.isascii() and (ch.isalnum() or ch in "_-.") for ch in name)
        ):
            raise InvalidArgument("projection.name", f"{name!r}: use 1-100 letters, digits, '_', '-' or '.'")
        object.__setattr__(self, "_initial_json", codec.encode(self.initial, "projection.initial"))

    def start(self) -> Any:
        """A fresh copy of the initial state (reducers may mutate it)."""
        return orjson.loads(self._initial_json)


@dataclass(frozen=True, slots=True)
class Appended:
    """The result of ``append``: the seqs given to the events, the commit's revision, and the seq of
    the snapshot written in the same commit (``None`` if none was)."""

    stream: str
    first_seq: int
    last_seq: int
    revision: int
    snapshot_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Loaded:
    """A state rebuilt by ``load_state``: the state after event ``seq``, the snapshot it started from
    (0: the initial state) and how many events were replayed on top."""

    state: Any
    seq: int
    snapshot_seq: int
    replayed: int


@dataclass(frozen=True, slots=True)
class CheckIssue:
    """One problem ``check`` found: ``kind`` is ``gap``, ``bounds``, ``revision_not_monotonic``,
    ``time_not_monotonic``, ``snapshot_beyond_stream``, ``snapshot_mismatch``, ``snapshot_corrupt``
    or ``history_missing``; ``seq`` where it was found."""

    kind: str
    seq: int
    detail: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What ``check`` found for one stream; ``ok`` when there is no issue."""

    stream: str
    first_seq: int
    last_seq: int
    events: int
    snapshots_checked: int
    snapshots_unverified: int
    issues: tuple[CheckIssue, ...]

    @property
    def ok(self) -> bool:
        return not self.issues


@dataclass(slots=True)
class _Snap:
    key: str
    projection: str
    seq: int
    state: Any
    at: int


# ---------------------------------------------------------------- helpers


def _encode_segment(text: str) -> str:
    return text.replace("%", "%25").replace("/", "%2F")


def _seq_of_key(key: str) -> int:
    tail = key.rsplit("/", 1)[-1]
    return int(tail) if len(tail) == _SEQ_DIGITS and tail.isdigit() else -1


def _opt_int(value: object, field_name: str, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < minimum:
        raise InvalidArgument(field_name, f"must be an integer >= {minimum} or None, got {value!r}")
    return value


def _time_us(value: object, field_name: str) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidArgument(field_name, "a datetime must carry a time zone")
        return round(value.timestamp() * 1_000_000)
    if type(value) is not int or value < 0:
        raise InvalidArgument(field_name, f"must be µs since the epoch (int) or an aware datetime, got {value!r}")
    return value


def _new_events(events: object) -> list[NewEvent]:
    if isinstance(events, str | bytes | dict) or not isinstance(events, Iterable):
        raise InvalidArgument("events", "must be a list of NewEvent or {'type', 'data', 'meta'} objects")
    out: list[NewEvent] = []
    for i, e in enumerate(events):
        if type(e) is NewEvent:
            out.append(e)
        elif type(e) is dict:
            extra = set(e) - {"type", "data", "meta"}
            if "type" not in e or extra:
                raise InvalidArgument(f"events[{i}]", "needs 'type' and may have only 'data' and 'meta'")
            out.append(NewEvent(e["type"], e.get("data"), e.get("meta")))
        else:
            raise InvalidArgument(f"events[{i}]", f"must be a NewEvent or a dict, got {type(e).__name__}")
    if not out:
        raise InvalidArgument("events", "must not be empty")
    if len(out) > MAX_LIMIT:
        raise InvalidArgument("events", f"at most {MAX_LIMIT} events per append")
    return out


def _reduce(projection: Projection, state: Any, events: Iterable[Event]) -> Any:
    reducer = projection.reducer
    ev: Event | None = None
    try:
        for ev in events:
            state = reducer(state, ev)
    except Exception as exc:
        seq = 0 if ev is None else ev.seq
        raise InvalidArgument(
            "reducer",
            f"projection {projection.name!r} raised {type(exc).__name__} at seq {seq}: {exc}",
            details={"seq": seq},
        ) from exc
    return state


def _json_copy(state: Any, field_name: str = "state") -> Any:
    return orjson.loads(codec.encode(state, field_name))


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS))
    except TypeError:
        return False


# ---------------------------------------------------------------- streams


class Streams:
    """Event streams of one tenant (``t.streams``): append with an expected seq, read ranges, snapshots,
    state at a seq or time, export, cleanup and check.

    ``snapshot_every`` (default 100) and ``keep_snapshots`` (default 5) apply to appends given a
    projection. Errors: an unknown stream raises ``NotFound``; a seq or time out of range, bad input
    or a reducer that raises raise ``InvalidArgument``; history removed by ``cleanup`` that a call
    needs raises ``NotFound``. A failed call writes nothing. Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        tenant: str,
        *,
        snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
        keep_snapshots: int = DEFAULT_KEEP_SNAPSHOTS,
    ) -> None:
        if not isinstance(store, Store):
            raise InvalidArgument("store", "must be a Store")
        if type(snapshot_every) is not int or not 1 <= snapshot_every <= 1_000_000:
            raise InvalidArgument("snapshot_every", f"must be an integer from 1 to 1000000, got {snapshot_every!r}")
        if type(keep_snapshots) is not int or not 1 <= keep_snapshots <= 1000:
            raise InvalidArgument("keep_snapshots", f"must be an integer from 1 to 1000, got {keep_snapshots!r}")
        self.store = store
        self.tenant = check_tenant(tenant)
        self.snapshot_every = snapshot_every
        self.keep_snapshots = keep_snapshots

    # ------------------------------------------------------------ names

    def _name(self, stream: object) -> str:
        """Validate a user stream name; returns the Store stream name."""
        stream = check_key(stream, "stream")
        assert isinstance(stream, str)
        snap_key = f"{_encode_segment(stream)}/{'x' * 100}/{'0' * _SEQ_DIGITS}"
        if len(snap_key.encode("utf-8")) > _MAX_KEY_BYTES:
            raise InvalidArgument("stream", "is too long (its snapshot keys would exceed 1024 bytes)")
        return STREAM_PREFIX + stream

    @staticmethod
    def _snap_prefix(stream: str, projection: str | None) -> str:
        head = _encode_segment(stream) + "/"
        return head if projection is None else f"{head}{projection}/"

    @staticmethod
    def _projection(projection: object) -> Projection:
        if not isinstance(projection, Projection):
            raise InvalidArgument("projection", f"must be a Projection, got {type(projection).__name__}")
        return projection

    def _info(self, stream: str, sname: str) -> StreamInfo:
        info = self.store.stream_info(self.tenant, sname)
        if info.last_seq == 0:
            raise NotFound(f"no stream {stream!r}", details={"stream": stream})
        return info

    def _user_event(self, stream: str, e: Event) -> Event:
        return Event(stream, e.seq, e.type, e.data, e.meta, e.revision, e.recorded_at)

    # ------------------------------------------------------------ raw reading

    def _events(self, sname: str, from_seq: int, to_seq: int) -> Iterator[Event]:
        """Kept events ``from_seq..to_seq``, paging through the Store."""
        nxt = from_seq
        while nxt <= to_seq:
            page = self.store.read_stream(self.tenant, sname, nxt, to_seq, MAX_LIMIT)
            if not page:
                return
            yield from page
            nxt = page[-1].seq + 1
            if len(page) < MAX_LIMIT:
                return

    def _replay(
        self, stream: str, sname: str, projection: Projection, state: Any, after_seq: int, to_seq: int
    ) -> tuple[Any, int]:
        """Fold events ``after_seq+1..to_seq`` into ``state``; returns the state and events replayed.
        Raises ``NotFound`` when some of them were removed by cleanup."""
        if to_seq <= after_seq:
            return state, 0
        events = list(self._events(sname, after_seq + 1, to_seq))
        if not events or events[0].seq != after_seq + 1:
            raise NotFound(
                f"stream {stream!r}: events from {after_seq + 1} were removed by cleanup and "
                f"no kept snapshot of projection {projection.name!r} covers them",
                details={"stream": stream, "from_seq": after_seq + 1},
            )
        return _reduce(projection, state, events), len(events)

    def _snapshots(self, stream: str, projection: str | None) -> list[_Snap]:
        """Kept snapshots of ``stream`` (of one projection, or of all), oldest first per projection."""
        prefix = self._snap_prefix(stream, projection)
        snaps = (self._snap(item) for item in self.store.scan_all(self.tenant, SNAPSHOT_NAMESPACE, prefix))
        return [snap for snap in snaps if snap is not None]

    @staticmethod
    def _snap(item: Item) -> _Snap | None:
        v = item.value
        seq = _seq_of_key(item.key)
        if seq < 0 or type(v) is not dict or v.get("seq") != seq:
            return None
        at = v.get("at")
        return _Snap(item.key, str(v.get("projection")), seq, v.get("state"), item.created_at if at is None else at)

    # ------------------------------------------------------------ appending

    def append(
        self,
        stream: str,
        events: Iterable[NewEvent | dict[str, Any]],
        *,
        expected_seq: int | None = None,
        projection: Projection | None = None,
    ) -> Appended:
        """Append ``events`` (``NewEvent`` or ``{"type", "data", "meta"}``) to ``stream``, creating it if new.

        With ``expected_seq`` the append happens only if the stream's last seq is exactly that
        (0 for a new stream); otherwise ``Conflict`` names the seq found. With a ``projection``,
        an append that crosses a multiple of ``snapshot_every`` also writes the projection's
        snapshot at that multiple, and deletes snapshots beyond the newest ``keep_snapshots``, in
        the same commit; without ``expected_seq`` it then retries by itself on a concurrent append.
        A reducer that raises raises ``InvalidArgument`` and nothing is written.
        """
        sname = self._name(stream)
        new = _new_events(events)
        expected = _opt_int(expected_seq, "expected_seq")
        meta = {"layer": "streams", "stream": stream}
        if projection is None:
            checks: list[Check] = [] if expected is None else [StreamAt(sname, expected)]
            try:
                c = self.store.commit(self.tenant, checks, [Append(sname, new)], meta)
            except Conflict as exc:
                raise _stream_conflict(stream, exc) from None
            last = c.seqs[sname]
            return Appended(stream, last - len(new) + 1, last, c.revision)
        proj = self._projection(projection)
        for attempt in range(_APPEND_ATTEMPTS):
            if attempt:
                time.sleep(random.uniform(0.0, min(0.1, 0.001 * 2**attempt)))
            last = expected if expected is not None else self.store.stream_info(self.tenant, sname).last_seq
            ops: list[Op] = [Append(sname, new)]
            checks = [StreamAt(sname, last)]
            snap_seq = self._plan_snapshot(stream, sname, proj, last, new, ops, checks)
            try:
                c = self.store.commit(self.tenant, checks, ops, meta)
            except Conflict as exc:
                if expected is not None or not any(
                    isinstance(f, CheckFailure) and isinstance(f.check, StreamAt) for f in exc.failures
                ):
                    raise _stream_conflict(stream, exc) from None
                continue
            end = c.seqs[sname]
            return Appended(stream, end - len(new) + 1, end, c.revision, snap_seq)
        raise Conflict(f"stream {stream!r}: gave up appending after {_APPEND_ATTEMPTS} concurrent appends")

    def _plan_snapshot(
        self,
        stream: str,
        sname: str,
        proj: Projection,
        last: int,
        new: list[NewEvent],
        ops: list[Op],
        checks: list[Check],
    ) -> int | None:
        """If appending ``new`` after seq ``last`` crosses a multiple of ``snapshot_every``, add the
        snapshot (and the retention deletes) to ``ops``; returns the snapshot's seq."""
        every = self.snapshot_every
        snap_seq = (last + len(new)) // every * every
        if snap_seq <= last:
            return None
        snaps = self._snapshots(stream, proj.name)
        base = None
        for s in reversed(snaps):
            if s.seq <= last:
                base = s
                break
        if base is None:
            state, base_seq = proj.start(), 0
        else:
            state, base_seq = base.state, base.seq
        try:
            state, _ = self._replay(stream, sname, proj, state, base_seq, last)
        except NotFound:
            found = self.store.stream_info(self.tenant, sname).last_seq
            if found != last:  # an expected_seq beyond the stream: a conflict, not lost history
                failure = CheckFailure(StreamAt(sname, last), found)
                raise Conflict(f"stream {stream!r}: expected seq {last}, found {found}", failures=[failure]) from None
            raise
        # the reducer sees the events as a replay will: decoded from JSON, not the caller's objects
        pending = (
            Event(
                sname,
                last + 1 + i,
                e.type,
                _json_copy(e.data, f"events[{i}].data"),
                _json_copy(e.meta or {}, f"events[{i}].meta"),
                0,
                0,
            )
            for i, e in enumerate(new[: snap_seq - last])
        )
        state = _reduce(proj, state, pending)
        key = self._snap_prefix(stream, proj.name) + f"{snap_seq:0{_SEQ_DIGITS}d}"
        value = {"stream": stream, "projection": proj.name, "seq": snap_seq, "state": _json_copy(state), "at": None}
        ops.append(Put(SNAPSHOT_NAMESPACE, key, value))
        checks.append(Absent(SNAPSHOT_NAMESPACE, key))
        older = [s for s in snaps if s.seq < snap_seq]
        ops.extend(Delete(SNAPSHOT_NAMESPACE, s.key) for s in older[: max(0, len(older) + 1 - self.keep_snapshots)])
        return snap_seq

    def snapshot(self, stream: str, projection: Projection) -> int:
        """Write a snapshot of ``projection`` at the stream's current last seq now (keeping the newest
        ``keep_snapshots``); returns its seq. Writing one that already exists changes nothing."""
        sname = self._name(stream)
        proj = self._projection(projection)
        loaded = self.load_state(stream, proj)
        key = self._snap_prefix(stream, proj.name) + f"{loaded.seq:0{_SEQ_DIGITS}d}"
        if loaded.snapshot_seq == loaded.seq:
            return loaded.seq
        at = self.store.read_stream(self.tenant, sname, loaded.seq, loaded.seq, 1)[0].recorded_at
        value = {
            "stream": stream,
            "projection": proj.name,
            "seq": loaded.seq,
            "state": _json_copy(loaded.state),
            "at": at,
        }
        snaps = [s for s in self._snapshots(stream, proj.name) if s.seq < loaded.seq]
        ops: list[Op] = [Put(SNAPSHOT_NAMESPACE, key, value)]
        ops.extend(Delete(SNAPSHOT_NAMESPACE, s.key) for s in snaps[: max(0, len(snaps) + 1 - self.keep_snapshots)])
        # a Conflict means someone wrote it meanwhile: same seq, hence the same state
        with contextlib.suppress(Conflict):
            self.store.commit(
                self.tenant, [Absent(SNAPSHOT_NAMESPACE, key)], ops, {"layer": "streams", "stream": stream}
            )
        return loaded.seq

    # ------------------------------------------------------------ reading

    def info(self, stream: str) -> StreamInfo:
        """The stream's bounds (``first_seq``: oldest kept event); ``NotFound`` for an unknown stream."""
        sname = self._name(stream)
        info = self._info(stream, sname)
        return StreamInfo(stream, info.first_seq, info.last_seq)

    def exists(self, stream: str) -> bool:
        """Whether ``stream`` has ever been appended to."""
        return self.store.stream_info(self.tenant, self._name(stream)).last_seq > 0

    def list(self, prefix: str = "", *, after: str | None = None, limit: int = 100) -> builtins.list[StreamInfo]:
        """Streams whose names start with ``prefix``, in name order, after ``after``, at most ``limit``."""
        if type(prefix) is not str:
            raise InvalidArgument("prefix", "must be a string")
        if after is not None:
            after = STREAM_PREFIX + check_key(after, "after")
        found = self.store.list_streams(self.tenant, STREAM_PREFIX + prefix, after, limit)
        return [StreamInfo(i.stream[len(STREAM_PREFIX) :], i.first_seq, i.last_seq) for i in found]

    def read(
        self, stream: str, from_seq: int | None = None, to_seq: int | None = None, *, limit: int | None = None
    ) -> builtins.list[Event]:
        """Events ``from_seq..to_seq`` (inclusive; default: the oldest kept event to the last), at most ``limit``.

        ``from_seq`` may be ``last_seq + 1`` (nothing new yet); a seq beyond that, or a ``to_seq``
        beyond the last, raises ``InvalidArgument``; asking for events removed by ``cleanup`` raises
        ``NotFound``.
        """
        sname = self._name(stream)
        lo = _opt_int(from_seq, "from_seq", 1)
        hi = _opt_int(to_seq, "to_seq", 0)
        cap = _opt_int(limit, "limit", 1)
        info = self._info(stream, sname)
        lo = info.first_seq if lo is None else lo
        hi = info.last_seq if hi is None else hi
        if lo > info.last_seq + 1:
            raise InvalidArgument("from_seq", f"{lo} is beyond the stream's last seq {info.last_seq}")
        if hi > info.last_seq:
            raise InvalidArgument("to_seq", f"{hi} is beyond the stream's last seq {info.last_seq}")
        if lo < info.first_seq and hi >= lo:
            raise NotFound(
                f"stream {stream!r}: events before {info.first_seq} were removed by cleanup",
                details={"stream": stream, "first_seq": info.first_seq},
            )
        if cap is not None:
            hi = min(hi, lo + cap - 1)
        return [self._user_event(stream, e) for e in self._events(sname, lo, hi)]

    def _seq_from_time(self, sname: str, lo: int, hi: int, at: int) -> int:
        """The smallest seq in ``lo..hi`` whose event has ``recorded_at >= at`` (``hi + 1`` if none)."""
        while lo <= hi:
            mid = (lo + hi) // 2
            ev = self.store.read_stream(self.tenant, sname, mid, mid, 1)
            if not ev:  # removed meanwhile by cleanup: everything below is gone too
                lo = mid + 1
            elif ev[0].recorded_at >= at:
                hi = mid - 1
            else:
                lo = mid + 1
        return lo

    def read_between(
        self, stream: str, from_time: int | datetime | None = None, to_time: int | datetime | None = None
    ) -> builtins.list[Event]:
        """Kept events with ``from_time <= recorded_at < to_time`` (µs since the epoch or aware datetimes;
        ``None``: unbounded). Finds the range by binary search (O(log n) reads) and then reads it."""
        sname = self._name(stream)
        t0 = None if from_time is None else _time_us(from_time, "from_time")
        t1 = None if to_time is None else _time_us(to_time, "to_time")
        if t0 is not None and t1 is not None and t1 < t0:
            raise InvalidArgument("to_time", "must not be before from_time")
        info = self._info(stream, sname)
        lo = info.first_seq if t0 is None else self._seq_from_time(sname, info.first_seq, info.last_seq, t0)
        hi = info.last_seq if t1 is None else self._seq_from_time(sname, lo, info.last_seq, t1) - 1
        return [
            self._user_event(stream, e)
            for e in self._events(sname, lo, hi)
            if (t0 is None or e.recorded_at >= t0) and (t1 is None or e.recorded_at < t1)
        ]

    # ------------------------------------------------------------ states

    def load_state(self, stream: str, projection: Projection) -> Loaded:
        """The stream's current state: the latest snapshot of ``projection`` plus a replay of the later events."""
        sname = self._name(stream)
        proj = self._projection(projection)
        snaps = self._snapshots(stream, proj.name)
        if snaps:
            base = snaps[-1]
            state, base_seq = base.state, base.seq
        else:
            state, base_seq = proj.start(), 0
        events = list(self._events(sname, base_seq + 1, 2**63 - 1))
        if not events:
            info = self._info(stream, sname)  # NotFound for an unknown stream
            if info.last_seq > base_seq and info.first_seq > base_seq + 1:
                raise NotFound(
                    f"stream {stream!r}: events before {info.first_seq} were removed by cleanup and no kept "
                    f"snapshot of projection {proj.name!r} covers them",
                    details={"stream": stream},
                )
            return Loaded(state, base_seq, base_seq, 0)
        if events[0].seq != base_seq + 1:
            raise NotFound(
                f"stream {stream!r}: events before {events[0].seq} were removed by cleanup and no kept snapshot "
                f"of projection {proj.name!r} covers them",
                details={"stream": stream, "first_seq": events[0].seq},
            )
        return Loaded(_reduce(proj, state, events), events[-1].seq, base_seq, len(events))

    def load(self, stream: str, projection: Projection) -> Any:
        """The stream's current state (see ``load_state``)."""
        return self.load_state(stream, projection).state

    def replay(self, stream: str, projection: Projection) -> Any:
        """The stream's current state by a full replay from event 1, ignoring snapshots
        (``NotFound`` if cleanup removed early events)."""
        sname = self._name(stream)
        proj = self._projection(projection)
        info = self._info(stream, sname)
        state, _ = self._replay(stream, sname, proj, proj.start(), 0, info.last_seq)
        return state

    def state_at(
        self, stream: str, projection: Projection, *, seq: int | None = None, time: int | datetime | None = None
    ) -> Any:
        """The state right after event ``seq`` (0: the initial state), or after the last event recorded at
        or before ``time`` (µs since the epoch or an aware datetime). Exactly one of the two is needed.

        Replays from the nearest snapshot at or before that seq. A ``seq`` beyond the stream raises
        ``InvalidArgument``; a point before the oldest kept snapshot once ``cleanup`` removed the
        events it needs raises ``NotFound``.
        """
        sname = self._name(stream)
        proj = self._projection(projection)
        if (seq is None) == (time is None):
            raise InvalidArgument("seq", "give exactly one of seq and time")
        target = _opt_int(seq, "seq", 0)
        at = None if time is None else _time_us(time, "time")
        info = self._info(stream, sname)
        snaps = self._snapshots(stream, proj.name)
        if at is not None:
            target = self._seq_from_time(sname, info.first_seq, info.last_seq, at + 1) - 1
            if target == info.first_seq - 1 and info.first_seq > 1:
                # before the oldest kept event: only a snapshot at exactly first_seq - 1 can answer
                exact = [s for s in snaps if s.seq == target and s.at <= at]
                if not exact:
                    raise NotFound(
                        f"stream {stream!r}: the history before {info.first_seq} was removed by cleanup",
                        details={"stream": stream, "first_seq": info.first_seq},
                    )
                return exact[0].state
        assert target is not None
        if target > info.last_seq:
            raise InvalidArgument("seq", f"{target} is beyond the stream's last seq {info.last_seq}")
        if target == 0:
            return proj.start()
        base = None
        for s in reversed(snaps):
            if s.seq <= target:
                base = s
                break
        state, base_seq = (proj.start(), 0) if base is None else (base.state, base.seq)
        state, _ = self._replay(stream, sname, proj, state, base_seq, target)
        return state

    # ------------------------------------------------------------ export, cleanup, check

    def export(
        self,
        stream: str,
        target: str | os.PathLike[str] | IO[str] | IO[bytes],
        *,
        from_seq: int | None = None,
        to_seq: int | None = None,
    ) -> int:
        """Write the stream's kept events as JSON Lines (one object per event: ``stream``, ``seq``, ``type``,
        ``data``, ``meta``, ``revision``, ``recorded_at``) to a file path or a writable text or binary
        file object; returns how many events were written."""
        sname = self._name(stream)
        lo = _opt_int(from_seq, "from_seq", 1)
        hi = _opt_int(to_seq, "to_seq", 0)
        info = self._info(stream, sname)
        lo = info.first_seq if lo is None else max(lo, info.first_seq)
        hi = info.last_seq if hi is None else min(hi, info.last_seq)
        if isinstance(target, str | os.PathLike):
            with open(target, "wb") as f:
                return self._write_lines(stream, sname, lo, hi, f.write)
        write = getattr(target, "write", None)
        if not callable(write):
            raise InvalidArgument("target", "must be a file path or a writable file object")
        if isinstance(target, io.TextIOBase):
            return self._write_lines(stream, sname, lo, hi, lambda b: write(b.decode("utf-8")))
        return self._write_lines(stream, sname, lo, hi, write)

    def _write_lines(self, stream: str, sname: str, lo: int, hi: int, write: Callable[[bytes], Any]) -> int:
        n = 0
        buf: list[bytes] = []
        for e in self._events(sname, lo, hi):
            buf.append(
                orjson.dumps(
                    {
                        "stream": stream,
                        "seq": e.seq,
                        "type": e.type,
                        "data": e.data,
                        "meta": e.meta,
                        "revision": e.revision,
                        "recorded_at": e.recorded_at,
                    }
                )
            )
            n += 1
            if len(buf) >= 1000:
                write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            write(b"\n".join(buf) + b"\n")
        return n

    def cleanup(self, stream: str, before_time: int | datetime, *, projection: Projection | str | None = None) -> int:
        """Remove events recorded before ``before_time`` that a kept snapshot already covers; returns how many.

        Only events up to and including the OLDEST kept snapshot (of every projection that has
        snapshots, or only of ``projection``) are removed, so every kept snapshot still has all the
        events after it: ``load`` keeps working, and ``state_at`` keeps working for every seq from the
        oldest kept snapshot on. A stream without snapshots is left alone. A projection that never
        wrote a snapshot cannot be rebuilt from the start after a cleanup.
        """
        sname = self._name(stream)
        cut_time = _time_us(before_time, "before_time")
        if isinstance(projection, Projection):
            projection = projection.name
        elif projection is not None and type(projection) is not str:
            raise InvalidArgument("projection", "must be a Projection, a projection name or None")
        info = self._info(stream, sname)
        snaps = [s for s in self._snapshots(stream, projection) if s.seq <= info.last_seq]
        if not snaps:
            return 0
        oldest: dict[str, int] = {}
        for s in snaps:
            oldest[s.projection] = min(oldest.get(s.projection, s.seq), s.seq)
        covered = min(oldest.values())
        by_time = self._seq_from_time(sname, info.first_seq, min(covered, info.last_seq), cut_time)
        before = min(covered + 1, by_time)
        if before <= info.first_seq:
            return 0
        self.store.commit(
            self.tenant, [], [Trim(sname, before)], {"layer": "streams", "stream": stream, "cleanup": before}
        )
        return before - info.first_seq

    def check(self, stream: str, projection: Projection | None = None) -> CheckReport:
        """Check the stream: seqs contiguous and within its bounds, revisions and times not going
        backwards, and (given a projection) every kept snapshot of it equal to a replay.

        Snapshots are replayed from event 1, or, once ``cleanup`` removed early events, from the oldest
        kept snapshot (which then counts as unverified). Snapshots of other projections are counted as
        unverified; any snapshot beyond the stream's last seq is an issue. Reads the whole stream.
        """
        sname = self._name(stream)
        proj = None if projection is None else self._projection(projection)
        info = self._info(stream, sname)
        issues: list[CheckIssue] = []
        snaps = self._snapshots(stream, None)
        mine = sorted((s for s in snaps if proj is not None and s.projection == proj.name), key=lambda s: s.seq)
        unverified = len(snaps) - len(mine)
        issues.extend(
            CheckIssue("snapshot_beyond_stream", s.seq, f"snapshot {s.key!r} is beyond last seq {info.last_seq}")
            for s in snaps
            if s.seq > info.last_seq
        )
        state: Any = None
        pos = 0  # seq the replayed state is at; -1: no replay possible
        todo = [s for s in mine if s.seq <= info.last_seq]
        if proj is not None:
            if info.first_seq == 1:
                state, pos = proj.start(), 0
            elif todo and todo[0].seq >= info.first_seq - 1:
                first = todo.pop(0)
                state, pos = first.state, first.seq
                unverified += 1
            else:
                pos = -1
                if todo:
                    issues.append(
                        CheckIssue("history_missing", info.first_seq, "no kept snapshot covers the removed events")
                    )
        expected = info.first_seq
        prev_rev = prev_at = -1
        count = 0
        checked = 0
        for e in self._events(sname, info.first_seq, info.last_seq):
            count += 1
            if e.seq != expected:
                issues.append(CheckIssue("gap", e.seq, f"expected seq {expected}, found {e.seq}"))
            expected = e.seq + 1
            if e.revision < prev_rev:
                issues.append(CheckIssue("revision_not_monotonic", e.seq, f"revision {e.revision} after {prev_rev}"))
            if e.recorded_at < prev_at:
                issues.append(CheckIssue("time_not_monotonic", e.seq, f"recorded_at {e.recorded_at} after {prev_at}"))
            prev_rev, prev_at = e.revision, e.recorded_at
            if proj is not None and pos >= 0 and e.seq > pos:
                state = _reduce(proj, state, (e,))
                pos = e.seq
                while todo and todo[0].seq <= pos:
                    s = todo.pop(0)
                    checked += 1
                    if s.seq != pos:
                        issues.append(CheckIssue("snapshot_corrupt", s.seq, f"snapshot {s.key!r} has no event"))
                    elif not _same(s.state, state):
                        issues.append(
                            CheckIssue("snapshot_mismatch", s.seq, f"snapshot {s.key!r} differs from a replay")
                        )
        if expected != info.last_seq + 1:
            issues.append(CheckIssue("bounds", expected, f"events end at {expected - 1}, stream at {info.last_seq}"))
        unverified += len(todo)
        return CheckReport(stream, info.first_seq, info.last_seq, count, checked, unverified, tuple(issues))


def _stream_conflict(stream: str, exc: Conflict) -> Conflict:
    parts = []
    for f in exc.failures:
        if isinstance(f, CheckFailure) and isinstance(f.check, StreamAt):
            parts.append(f"stream {stream!r}: expected seq {f.check.seq}, found {f.found}")
        elif isinstance(f, CheckFailure):
            parts.append(f"snapshot {getattr(f.check, 'key', '?')!r} changed meanwhile")
    return Conflict("; ".join(parts) or exc.message, failures=exc.failures)
