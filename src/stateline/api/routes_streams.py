"""Event stream routes: append with an expected seq, read ranges, list, bounds, consistency check."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, BeforeValidator, Field
from starlette.responses import Response

from stateline.api.common import (
    ApiModel,
    Caller,
    KeyPath,
    KeyQuery,
    NamespaceField,
    PrefixQuery,
    body_doc,
    integral,
    json_response,
    parse_body,
)
from stateline.api.errors import responses
from stateline.store.protocol import MAX_INT
from stateline.streams import Appended, CheckReport
from stateline.types import Event, NewEvent, StreamInfo

__all__ = ["router"]

router = APIRouter(prefix="/v1/streams", tags=["streams"])

LAYER = "streams"


class EventIn(ApiModel):
    """An event to append."""

    type: NamespaceField
    data: Any = None
    meta: dict[str, Any] | None = None


class AppendIn(ApiModel):
    """Events to append; with ``expected_seq`` only if the stream's last seq is exactly that (409)."""

    events: list[EventIn] = Field(min_length=1, max_length=10_000)
    expected_seq: Annotated[int, Field(ge=0, le=MAX_INT), BeforeValidator(integral)] | None = None


class EventsOut(BaseModel):
    """A page of a stream's events in seq order."""

    stream: str
    events: list[Event]


class StreamList(BaseModel):
    """Streams in name order; pass ``next`` as ``after`` (``null``: no more)."""

    streams: list[StreamInfo]
    next: str | None


@router.get("", response_model=StreamList, responses=responses(), name="streams.list")
async def list_streams(
    request: Request,
    prefix: PrefixQuery = "",
    after: KeyQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Streams whose names start with ``prefix``."""
    caller = Caller.of(request, LAYER, "read")
    out = await caller.run(lambda: caller.tenant.streams.list(prefix, after=after, limit=limit))
    return json_response({"streams": out, "next": out[-1].stream if len(out) == limit else None})


@router.post(
    "/{stream:path}/events",
    status_code=201,
    response_model=Appended,
    responses=responses(409),
    openapi_extra=body_doc(AppendIn),
    name="streams.append",
)
async def append(request: Request, stream: KeyPath) -> Response:
    """Append events; they get the next seqs, contiguous."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, AppendIn)
    events = [NewEvent(e.type, e.data, e.meta) for e in body.events]
    out = await caller.run(lambda: caller.tenant.streams.append(stream, events, expected_seq=body.expected_seq))
    return json_response(out, 201)


@router.get("/{stream:path}/events", response_model=EventsOut, responses=responses(404), name="streams.read")
async def read(
    request: Request,
    stream: KeyPath,
    from_seq: Annotated[int | None, Query(alias="from", ge=1, le=MAX_INT)] = None,
    to_seq: Annotated[int | None, Query(alias="to", ge=0, le=MAX_INT)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """Events from ``from`` to ``to`` (inclusive), in seq order (a stream never appended to is empty)."""
    caller = Caller.of(request, LAYER, "read")
    events = await caller.run(lambda: caller.tenant.streams.read(stream, from_seq, to_seq, limit=limit))
    return json_response({"stream": stream, "events": events})


@router.get("/{stream:path}/check", response_model=CheckReport, responses=responses(404), name="streams.check")
async def check(request: Request, stream: KeyPath) -> Response:
    """Consistency check: seqs contiguous, revisions monotonic, snapshots sound."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.streams.check, stream))


@router.get("/{stream:path}", response_model=StreamInfo, responses=responses(404), name="streams.info")
async def info(request: Request, stream: KeyPath) -> Response:
    """A stream's bounds (``last_seq`` 0: never appended to)."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.streams.info, stream))
