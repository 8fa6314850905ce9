"""Raw Store routes: items with ETags, batch get, scan, the checks+ops transaction, streams, stats."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from stateline.api.common import (
    ApiModel,
    Caller,
    CreateOnly,
    IfMatch,
    IfNoneMatch,
    JsonInt,
    KeyField,
    KeyPath,
    KeyQuery,
    NamespaceField,
    NamespacePath,
    PrefixQuery,
    Ttl,
    VersionField,
    body_doc,
    header,
    item_dict,
    json_response,
    parse_body,
    parse_etag,
    query_number,
    read_json,
)
from stateline.api.errors import responses
from stateline.errors import Conflict, Forbidden, NotFound, PreconditionFailed
from stateline.store.protocol import MAX_INT, MAX_TTL_SECONDS
from stateline.types import (
    Absent,
    Append,
    Check,
    Commit,
    Delete,
    Exists,
    Incr,
    NewEvent,
    Op,
    Put,
    StreamAt,
    Trim,
    VersionIs,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["store"])

LAYER = "store"
_PROTECTED = ("audit", "api")  # raw writes here need store:admin (the audit chain, keys' idempotency records)


def _guard(caller: Caller, namespaces: list[str], streams: list[str]) -> None:
    for name in [*namespaces, *(s.split(":", 1)[0] for s in streams)]:
        head = name.split(".", 1)[0]
        if head in _PROTECTED and not caller.principal.allows(LAYER, "admin"):
            raise Forbidden(f"raw writes to {name!r} need the store:admin scope", details={"name": name})


# ---------------------------------------------------------------- models (the HTTP edge only)


class ItemOut(BaseModel):
    """A stored item. Times are µs since the epoch; ``version`` is also the ETag."""

    namespace: str
    key: str
    value: Any
    version: int
    revision: int
    created_at: int
    updated_at: int
    expires_at: int | None


class ItemWritten(BaseModel):
    """What a write did: the item's new version (0 after a delete) and the commit's revision."""

    namespace: str
    key: str
    version: int
    revision: int


class ScanOut(BaseModel):
    """A page of items; pass ``next`` as ``after`` for the next page (``null``: no more)."""

    items: list[ItemOut]
    next: str | None


class KeyRef(ApiModel):
    """One ``(namespace, key)``."""

    namespace: NamespaceField
    key: KeyField


class BatchGet(ApiModel):
    """Keys to read in one round trip."""

    keys: list[KeyRef] = Field(min_length=1, max_length=1000)


class BatchGetOut(BaseModel):
    """Items in the order asked; ``null`` where there is none."""

    items: list[ItemOut | None]


class VersionIsCheck(ApiModel):
    """Holds when the item has exactly this version."""

    check: Literal["version_is"]
    namespace: NamespaceField
    key: KeyField
    version: VersionField


class AbsentCheck(ApiModel):
    """Holds when there is no live item."""

    check: Literal["absent"]
    namespace: NamespaceField
    key: KeyField


class ExistsCheck(ApiModel):
    """Holds when there is a live item."""

    check: Literal["exists"]
    namespace: NamespaceField
    key: KeyField


class StreamAtCheck(ApiModel):
    """Holds when the stream's last seq is exactly ``seq``."""

    check: Literal["stream_at"]
    stream: KeyField
    seq: JsonInt = Field(ge=0, le=MAX_INT)


class PutOp(ApiModel):
    """Write a JSON value (``ttl`` seconds makes it expire)."""

    op: Literal["put"]
    namespace: NamespaceField
    key: KeyField
    value: Any = None
    ttl: Ttl | None = None


class DeleteOp(ApiModel):
    """Remove an item."""

    op: Literal["delete"]
    namespace: NamespaceField
    key: KeyField


class IncrOp(ApiModel):
    """Add ``by`` to an integer counter."""

    op: Literal["incr"]
    namespace: NamespaceField
    key: KeyField
    by: JsonInt = Field(default=1, ge=-MAX_INT, le=MAX_INT)
    ttl: Ttl | None = None


class EventIn(ApiModel):
    """An event to append."""

    type: NamespaceField
    data: Any = None
    meta: dict[str, Any] | None = None


class AppendOp(ApiModel):
    """Append events to a stream."""

    op: Literal["append"]
    stream: KeyField
    events: list[EventIn] = Field(min_length=1, max_length=10_000)


class TrimOp(ApiModel):
    """Drop a stream's events below ``before_seq``."""

    op: Literal["trim"]
    stream: KeyField
    before_seq: JsonInt = Field(ge=1, le=MAX_INT)


CheckIn = Annotated[VersionIsCheck | AbsentCheck | ExistsCheck | StreamAtCheck, Field(discriminator="check")]
OpIn = Annotated[PutOp | DeleteOp | IncrOp | AppendOp | TrimOp, Field(discriminator="op")]


class TransactionIn(ApiModel):
    """All ``ops`` apply under one new revision if every one of ``checks`` holds, else none (409)."""

    checks: list[CheckIn] = Field(default_factory=list, max_length=10_000)
    ops: list[OpIn] = Field(min_length=1, max_length=10_000)
    meta: dict[str, Any] | None = Field(default=None, description="Stored with the change record (actor is set)")


class VersionOut(BaseModel):
    """An item's version after the commit (0: deleted)."""

    namespace: str
    key: str
    version: int


class CounterOut(BaseModel):
    """A counter's value after the commit."""

    namespace: str
    key: str
    value: int


class CommitOut(BaseModel):
    """A successful commit."""

    revision: int
    committed_at: int
    versions: list[VersionOut]
    counters: list[CounterOut]
    seqs: dict[str, int]


class EventOut(BaseModel):
    """One stored event."""

    stream: str
    seq: int
    type: str
    data: Any
    meta: dict[str, Any]
    revision: int
    recorded_at: int


class StreamOut(BaseModel):
    """A page of a stream's events with its bounds."""

    stream: str
    first_seq: int
    last_seq: int
    events: list[EventOut]


class NamespaceStatsOut(BaseModel):
    """Live items and their bytes."""

    items: int
    bytes: int


class StatsOut(BaseModel):
    """The tenant's revision and sizes."""

    tenant: str
    revision: int
    namespaces: dict[str, NamespaceStatsOut]
    streams: int
    events: int


def commit_dict(c: Commit) -> dict[str, Any]:
    """A commit as JSON."""
    return {
        "revision": c.revision,
        "committed_at": c.committed_at,
        "versions": [{"namespace": ns, "key": k, "version": v} for (ns, k), v in c.versions.items()],
        "counters": [{"namespace": ns, "key": k, "value": v} for (ns, k), v in c.counters.items()],
        "seqs": dict(c.seqs),
    }


def _etag(version: int) -> str:
    return f'"{version}"'


# ---------------------------------------------------------------- items


@router.get("/items/{namespace}", response_model=ScanOut, responses=responses(), name="items.scan")
async def scan_items(
    request: Request,
    namespace: NamespacePath,
    prefix: PrefixQuery = "",
    after: KeyQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Items of a namespace whose keys start with ``prefix``, in key order, after ``after``."""
    caller = Caller.of(request, LAYER, "read")
    items = await caller.run(caller.tenant.scan, namespace, prefix, after, limit)
    nxt = items[-1].key if len(items) == limit else None
    return json_response({"items": [item_dict(i) for i in items], "next": nxt})


@router.get(
    "/items/{namespace}/{key:path}",
    response_model=ItemOut,
    responses={
        **responses(404),
        200: {"headers": {"ETag": {"description": "The item's version", "schema": {"type": "string"}}}},
        304: {"description": "If-None-Match holds: the item has that version"},
    },
    name="items.get",
)
async def get_item(
    request: Request,
    namespace: NamespacePath,
    key: KeyPath,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """One item, with its version as the ``ETag``; 304 when ``If-None-Match`` names that version."""
    return await _get_item(request)


async def _get_item(request: Request) -> Response:
    namespace: str = request.path_params["namespace"]
    key: str = request.path_params["key"]
    caller = Caller.of(request, LAYER, "read")
    wanted = parse_etag(header(request, b"if-none-match"), "If-None-Match")
    item = await caller.run(caller.tenant.get, namespace, key)
    if item is None:
        raise NotFound(f"no item {namespace}/{key}", details={"namespace": namespace, "key": key})
    if wanted in ("*", item.version):
        return Response(status_code=304, headers={"ETag": _etag(item.version)})
    return json_response(item_dict(item), headers={"ETag": _etag(item.version)})


@router.put(
    "/items/{namespace}/{key:path}",
    response_model=ItemWritten,
    status_code=200,
    responses={
        **responses(412),
        201: {"model": ItemWritten, "description": "Created (the item did not exist)"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The item's new value: any JSON",
            "content": {"application/json": {"schema": {}}},
        }
    },
    name="items.put",
)
async def put_item(
    request: Request,
    namespace: NamespacePath,
    key: KeyPath,
    ttl: Annotated[float | None, Query(gt=0, le=MAX_TTL_SECONDS, description="Seconds until the item expires")] = None,
    if_match: IfMatch = None,
    if_none_match: CreateOnly = None,
) -> Response:
    """Write an item. ``If-Match`` makes it a compare-and-set; ``If-None-Match: *`` a create."""
    return await _put_item(request)


async def _put_item(request: Request) -> Response:
    namespace: str = request.path_params["namespace"]
    key: str = request.path_params["key"]
    ttl = query_number(request, "ttl")
    caller = Caller.of(request, LAYER, "write")
    _guard(caller, [namespace], [])
    value = await read_json(request)
    checks: list[Check] = []
    match = parse_etag(header(request, b"if-match"), "If-Match")
    none_match = parse_etag(header(request, b"if-none-match"), "If-None-Match")
    if match == "*":
        checks.append(Exists(namespace, key))
    elif match is not None:
        assert isinstance(match, int)
        checks.append(VersionIs(namespace, key, match))
    if none_match == "*":
        checks.append(Absent(namespace, key))
    elif none_match is not None:
        raise PreconditionFailed("If-None-Match on a write supports only *")
    op = Put(namespace, key, value, ttl)
    try:
        c = await caller.run(caller.tenant.commit, checks, [op], caller.meta)
    except Conflict as exc:
        raise PreconditionFailed(f"the precondition on {namespace}/{key} did not hold", failures=exc.failures) from None
    version = c.versions[(namespace, key)]
    return json_response(
        {"namespace": namespace, "key": key, "version": version, "revision": c.revision},
        201 if version == 1 else 200,
        {"ETag": _etag(version)},
    )


@router.delete(
    "/items/{namespace}/{key:path}", response_model=ItemWritten, responses=responses(404, 412), name="items.delete"
)
async def delete_item(
    request: Request,
    namespace: NamespacePath,
    key: KeyPath,
    if_match: IfMatch = None,
) -> Response:
    """Delete an item: 404 if there is none, 412 if ``If-Match`` does not hold."""
    caller = Caller.of(request, LAYER, "write")
    _guard(caller, [namespace], [])
    match = parse_etag(if_match, "If-Match")
    check: Check = VersionIs(namespace, key, match) if isinstance(match, int) else Exists(namespace, key)
    try:
        c = await caller.run(caller.tenant.commit, [check], [Delete(namespace, key)], caller.meta)
    except Conflict as exc:
        if match is None:
            raise NotFound(f"no item {namespace}/{key}", details={"namespace": namespace, "key": key}) from None
        raise PreconditionFailed(f"the precondition on {namespace}/{key} did not hold", failures=exc.failures) from None
    return json_response({"namespace": namespace, "key": key, "version": 0, "revision": c.revision})


@router.post(
    "/batch/get",
    response_model=BatchGetOut,
    responses=responses(),
    openapi_extra=body_doc(BatchGet),
    name="items.batch_get",
)
async def batch_get(request: Request) -> Response:
    """Several items in one round trip, in the order asked (``null`` where absent)."""
    caller = Caller.of(request, LAYER, "read")
    body = await parse_body(request, BatchGet)
    items = await caller.run(caller.tenant.get_many, [(k.namespace, k.key) for k in body.keys])
    return json_response({"items": [None if i is None else item_dict(i) for i in items]})


# ---------------------------------------------------------------- the raw transaction


def _check(c: VersionIsCheck | AbsentCheck | ExistsCheck | StreamAtCheck) -> Check:
    if isinstance(c, VersionIsCheck):
        return VersionIs(c.namespace, c.key, c.version)
    if isinstance(c, AbsentCheck):
        return Absent(c.namespace, c.key)
    if isinstance(c, ExistsCheck):
        return Exists(c.namespace, c.key)
    return StreamAt(c.stream, c.seq)


def _op(o: PutOp | DeleteOp | IncrOp | AppendOp | TrimOp) -> Op:
    if isinstance(o, PutOp):
        return Put(o.namespace, o.key, o.value, o.ttl)
    if isinstance(o, DeleteOp):
        return Delete(o.namespace, o.key)
    if isinstance(o, IncrOp):
        return Incr(o.namespace, o.key, o.by, o.ttl)
    if isinstance(o, AppendOp):
        return Append(o.stream, [NewEvent(e.type, e.data, e.meta) for e in o.events])
    return Trim(o.stream, o.before_seq)


@router.post(
    "/transaction",
    response_model=CommitOut,
    responses=responses(409),
    openapi_extra=body_doc(TransactionIn),
    name="store.transaction",
)
async def transaction(request: Request) -> Response:
    """Commit ``ops`` if every one of ``checks`` holds, atomically. A failed check is 409 with
    ``details.failures``: every failed check and what was found."""
    return await _transaction(request)


async def _transaction(request: Request) -> Response:
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, TransactionIn)
    checks = [_check(c) for c in body.checks]
    ops = [_op(o) for o in body.ops]
    _guard(
        caller,
        [o.namespace for o in body.ops if not isinstance(o, AppendOp | TrimOp)],
        [o.stream for o in body.ops if isinstance(o, AppendOp | TrimOp)],
    )
    c = await caller.run(caller.tenant.commit, checks, ops, caller.commit_meta(body.meta))
    return json_response(commit_dict(c))


# ---------------------------------------------------------------- streams and stats


@router.get("/log/{stream:path}", response_model=StreamOut, responses=responses(), name="store.read_stream")
async def read_stream(
    request: Request,
    stream: KeyPath,
    from_seq: Annotated[int, Query(alias="from", ge=1, le=MAX_INT)] = 1,
    to_seq: Annotated[int | None, Query(alias="to", ge=0, le=MAX_INT)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """A raw stream's kept events from ``from`` to ``to`` (a stream never appended to is empty)."""
    caller = Caller.of(request, LAYER, "read")

    def read() -> dict[str, Any]:
        info = caller.tenant.stream_info(stream)
        events = caller.tenant.read_stream(stream, from_seq, to_seq, limit)
        return {
            "stream": stream,
            "first_seq": info.first_seq,
            "last_seq": info.last_seq,
            "events": [e.to_dict() for e in events],
        }

    return json_response(await caller.run(read))


@router.get("/stats", response_model=StatsOut, responses=responses(), name="store.stats")
async def stats(request: Request) -> Response:
    """The tenant's revision, live items and bytes per namespace, streams and events."""
    caller = Caller.of(request, LAYER, "read")
    s = await caller.run(caller.tenant.stats)
    return json_response(
        {
            "tenant": caller.tenant.name,
            "revision": s.revision,
            "namespaces": {ns: {"items": n.items, "bytes": n.bytes} for ns, n in s.namespaces.items()},
            "streams": s.streams,
            "events": s.events,
        }
    )


#: Routes served without FastAPI's per-request parameter machinery (same code as the documented routes).
FAST = {"items.get": _get_item, "items.put": _put_item, "store.transaction": _transaction}
