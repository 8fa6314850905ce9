"""The change feed over HTTP: ``GET /v1/changes`` (long poll) and ``GET /v1/watch`` (Server-Sent Events)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from stateline.api.common import Caller, NonEmptyQuery, json_response
from stateline.api.errors import responses
from stateline.errors import ChangesTrimmed, InvalidArgument
from stateline.store.protocol import MAX_INT
from stateline.types import Change, ChangeOp

__all__ = ["ChangeFilter", "router"]

router = APIRouter(prefix="/v1", tags=["changes"])

LAYER = "changes"
PAGE = 200


@dataclass(frozen=True, slots=True)
class ChangeFilter:
    """Which ops of a change a reader wants.

    ``namespace`` keeps item ops in that namespace or its sub-namespaces (``runs`` keeps ``runs.steps``);
    ``stream`` keeps appends/trims of that stream or its sub-streams (``cases:c1`` keeps
    ``cases:c1:receipts``); ``run`` keeps what the runs layer writes about one run. No filter keeps all.
    """

    namespace: str | None = None
    stream: str | None = None
    run: str | None = None

    @property
    def empty(self) -> bool:
        return self.namespace is None and self.stream is None and self.run is None

    def ops(self, c: Change) -> tuple[ChangeOp, ...]:
        """The ops of ``c`` this filter keeps (all of them without a filter)."""
        if self.empty:
            return c.ops
        return tuple(o for o in c.ops if self._keeps(o))

    def _keeps(self, o: ChangeOp) -> bool:
        if o.stream:
            if self.stream is not None and _under(o.stream, self.stream, ":"):
                return True
            return self.run is not None and _under(o.stream, f"runs:{self.run}", ":")
        if self.namespace is not None and _under(o.namespace, self.namespace, "."):
            return True
        if self.run is not None and _under(o.namespace, "runs", "."):
            return o.key == self.run or o.key.startswith((f"{self.run}:", f"{self.run}/"))
        return False


def _under(name: str, root: str, sep: str) -> bool:
    return name == root or name.startswith(root + sep)


class ChangeOpOut(BaseModel):
    """One op of a change: item ops carry namespace/key/version/value, stream ops stream and events."""

    op: str
    namespace: str | None = None
    key: str | None = None
    version: int | None = None
    value: Any = None
    expires_at: int | None = None
    stream: str | None = None
    events: list[dict[str, Any]] | None = None
    before_seq: int | None = None


class ChangeOut(BaseModel):
    """One committed change (with a filter: only the ops it keeps)."""

    revision: int
    committed_at: int
    meta: dict[str, Any]
    ops: list[ChangeOpOut]


class ChangesOut(BaseModel):
    """A page of the change feed. Resume with ``after=next``: it moves past filtered-out changes too."""

    changes: list[ChangeOut]
    next: int


async def _page(caller: Caller, after: int, limit: int, flt: ChangeFilter) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit`` kept changes after ``after`` (reading at most a few pages), and the new cursor."""
    out: list[dict[str, Any]] = []
    for _ in range(10):
        batch = await caller.run(caller.tenant.changes, after, PAGE if not flt.empty else limit)
        for c in batch:
            if len(out) >= limit:
                return out, after
            ops = flt.ops(c)
            after = c.revision
            if ops:
                out.append(c.to_dict(ops))
        if len(batch) < PAGE or len(out) >= limit:
            break
    return out, after


def _filter(namespace: str | None, stream: str | None, run: str | None) -> ChangeFilter:
    for name, value in (("namespace", namespace), ("stream", stream), ("run", run)):
        if value is not None and not value:
            raise InvalidArgument(name, "must not be empty")
    return ChangeFilter(namespace, stream, run)


@router.get("/changes", response_model=ChangesOut, responses=responses(), name="changes.list")
async def changes(
    request: Request,
    after: Annotated[int, Query(ge=0, le=MAX_INT, description="Return changes with revision > after")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    wait: Annotated[float, Query(ge=0, le=3600, description="Seconds to wait for a change (long poll)")] = 0,
    namespace: NonEmptyQuery = None,
    stream: NonEmptyQuery = None,
    run: NonEmptyQuery = None,
) -> Response:
    """The tenant's change feed after a revision, in order, never skipping one. With ``wait``, an empty
    answer waits up to that many seconds (at most the server's limit) for a change. 410
    (``changes_trimmed``, with ``first_available``) if retention removed changes after ``after``."""
    caller = Caller.of(request, LAYER, "read")
    flt = _filter(namespace, stream, run)
    out, cursor = await _page(caller, after, limit, flt)
    wait = min(wait, caller.ctx.settings.max_wait)
    if not out and wait > 0:
        hub = caller.ctx.hub
        deadline = time.monotonic() + wait
        caller.ctx.metrics.watchers.inc()
        try:
            while not out and not hub.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if await hub.wait(caller.tenant.name, cursor, left) <= cursor:
                    continue
                out, cursor = await _page(caller, cursor, limit, flt)
        finally:
            caller.ctx.metrics.watchers.dec()
    return json_response({"changes": out, "next": cursor})


LastEventId = Annotated[
    str | None,
    Header(
        json_schema_extra={"pattern": r"^[0-9]{1,18}$"}, description="Resume after this revision (set by EventSource)"
    ),
]


@router.get(
    "/watch",
    response_class=StreamingResponse,
    responses={
        **responses(),
        200: {
            "description": "Server-Sent Events: `id` is the revision, `event: change`, `data` a change as JSON",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
    name="changes.watch",
)
async def watch(
    request: Request,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_INT, description="Start after this revision (default: now)")
    ] = None,
    namespace: NonEmptyQuery = None,
    stream: NonEmptyQuery = None,
    run: NonEmptyQuery = None,
    limit: Annotated[int | None, Query(ge=1, le=MAX_INT, description="Close the stream after this many events")] = None,
    last_event_id: LastEventId = None,
) -> Response:
    """The change feed as Server-Sent Events, live. Resumable: ``Last-Event-ID`` (or ``after``) is a
    revision, and every later change is sent in order. Comments (``: keep-alive``) keep the line open.
    A start below what retention kept is refused with 410 (``changes_trimmed``); a client that falls
    that far behind while connected gets an ``event: error`` with the same body, and the stream ends."""
    caller = Caller.of(request, LAYER, "read")
    flt = _filter(namespace, stream, run)
    if last_event_id is not None and last_event_id.strip():
        raw = last_event_id.strip()
        if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_INT:
            raise InvalidArgument("Last-Event-ID", "must be a revision number")
        start = int(raw)
    elif after is not None:
        start = after
    else:
        start = await caller.run(caller.tenant.revision)
    first = await caller.run(caller.tenant.first_change)
    if start + 1 < first:  # a 410 before the stream starts: EventSource does not reconnect on it
        raise ChangesTrimmed(caller.tenant.name, start, first)
    ctx = caller.ctx
    heartbeat = ctx.settings.heartbeat_seconds

    async def events() -> AsyncIterator[bytes]:
        cursor = start
        sent = 0
        ctx.metrics.watchers.inc()
        try:
            yield b"retry: 2000\n: connected\n\n"
            while not ctx.hub.closed:
                try:
                    batch, cursor_next = await _page(caller, cursor, PAGE, flt)
                except ChangesTrimmed as exc:  # retention overtook this client: say so and end
                    yield b"event: error\ndata: %s\n\n" % orjson.dumps(exc.to_dict())
                    return
                for change in batch:
                    yield b"id: %d\nevent: change\ndata: %s\n\n" % (change["revision"], orjson.dumps(change))
                    sent += 1
                    if limit is not None and sent >= limit:
                        return
                cursor = cursor_next
                if batch:
                    continue
                got = await ctx.hub.wait(caller.tenant.name, cursor, heartbeat)
                if got <= cursor:
                    yield b": keep-alive\n\n"
        finally:
            ctx.metrics.watchers.dec()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
