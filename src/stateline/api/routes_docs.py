"""Document routes: versioned JSON documents with ETag / If-Match, batch get, list, multi-document transactions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from stateline.api.common import (
    ApiModel,
    Caller,
    CollectionField,
    CollectionQuery,
    CreateOnly,
    IfMatch,
    IfNoneMatch,
    KeyField,
    KeyPath,
    KeyQuery,
    PrefixQuery,
    VersionField,
    body_doc,
    header,
    json_response,
    parse_body,
    parse_etag,
    query_param,
    read_json,
)
from stateline.api.errors import responses
from stateline.docs import Document, TxRecord, Written
from stateline.errors import Conflict, InvalidArgument, NotFound, PreconditionFailed

__all__ = ["router"]

router = APIRouter(prefix="/v1/docs", tags=["docs"])

LAYER = "docs"


def _etag(version: int) -> str:
    return f'"{version}"'


class DocList(BaseModel):
    """A page of documents in key order; pass ``next`` as ``after`` (``null``: no more)."""

    documents: list[Document]
    next: str | None


class DocBatch(ApiModel):
    """Documents to read in one round trip."""

    keys: list[KeyField] = Field(min_length=1, max_length=1000)
    collection: CollectionField | None = None


class DocBatchOut(BaseModel):
    """Documents in the order asked; ``null`` where absent."""

    documents: list[Document | None]


class DocPut(ApiModel):
    """Write a document in a transaction (``expected_version`` / ``must_not_exist`` guard it)."""

    op: Literal["put"]
    key: KeyField
    value: Any = None
    expected_version: VersionField | None = None
    must_not_exist: bool = False
    collection: CollectionField | None = None


class DocDelete(ApiModel):
    """Delete a document in a transaction."""

    op: Literal["delete"]
    key: KeyField
    expected_version: VersionField | None = None
    collection: CollectionField | None = None


class DocTransactionIn(ApiModel):
    """Write several documents all-or-nothing; a failed guard is 409 and writes nothing."""

    ops: list[Annotated[DocPut | DocDelete, Field(discriminator="op")]] = Field(min_length=1, max_length=1000)
    reason: str | None = None


class DocDeleted(BaseModel):
    """A deleted document."""

    key: str
    collection: str | None
    deleted: bool


class DocTransactionOut(BaseModel):
    """The committed transaction: its id and revision."""

    id: str
    revision: int | None


@router.get("", response_model=DocList, responses=responses(), name="docs.list")
async def list_docs(
    request: Request,
    prefix: PrefixQuery = "",
    after: KeyQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    collection: CollectionQuery = None,
) -> Response:
    """Documents whose keys start with ``prefix``, in key order."""
    caller = Caller.of(request, LAYER, "read")
    docs = await caller.run(lambda: caller.tenant.docs.list(prefix, after=after, limit=limit, collection=collection))
    return json_response({"documents": docs, "next": docs[-1].key if len(docs) == limit else None})


@router.post(
    "/batch-get",
    response_model=DocBatchOut,
    responses=responses(),
    openapi_extra=body_doc(DocBatch),
    name="docs.batch_get",
)
async def batch_get_docs(request: Request) -> Response:
    """Several documents in one round trip."""
    caller = Caller.of(request, LAYER, "read")
    body = await parse_body(request, DocBatch)
    docs = await caller.run(lambda: caller.tenant.docs.get_many(body.keys, collection=body.collection))
    return json_response({"documents": docs})


@router.post(
    "/transaction",
    response_model=DocTransactionOut,
    responses=responses(409),
    openapi_extra=body_doc(DocTransactionIn),
    name="docs.transaction",
)
async def doc_transaction(request: Request) -> Response:
    """Write several documents atomically, each optionally guarded by its expected version."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, DocTransactionIn)

    def run() -> dict[str, Any]:
        tx = caller.tenant.docs.transaction(
            actor=caller.meta["actor"], reason=body.reason, trace_id=caller.meta.get("trace_id")
        )
        with tx:
            for op in body.ops:
                if isinstance(op, DocPut):
                    tx.put(
                        op.key,
                        op.value,
                        expected_version=op.expected_version,
                        must_not_exist=op.must_not_exist,
                        collection=op.collection,
                    )
                else:
                    tx.delete(op.key, expected_version=op.expected_version, collection=op.collection)
            revision = tx.commit()
        return {"id": tx.id, "revision": revision}

    return json_response(await caller.run(run))


@router.get("/transactions/{tx_id}", response_model=TxRecord, responses=responses(404), name="docs.get_transaction")
async def get_transaction(request: Request, tx_id: KeyPath) -> Response:
    """One entry of the transaction log."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.docs.get_transaction, tx_id))


@router.get(
    "/{key:path}",
    response_model=Document,
    responses={**responses(404), 304: {"description": "If-None-Match holds"}},
    name="docs.get",
)
async def get_doc(
    request: Request,
    key: KeyPath,
    collection: CollectionQuery = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """One document with its version as the ``ETag``."""
    return await _get_doc(request)


async def _get_doc(request: Request) -> Response:
    key: str = request.path_params["key"]
    collection = query_param(request, "collection")
    caller = Caller.of(request, LAYER, "read")
    wanted = parse_etag(header(request, b"if-none-match"), "If-None-Match")
    doc = await caller.run(lambda: caller.tenant.docs.get(key, collection=collection))
    if doc is None:
        raise NotFound(f"no document {key!r}", details={"key": key})
    if wanted in ("*", doc.version):
        return Response(status_code=304, headers={"ETag": _etag(doc.version)})
    return json_response(doc, headers={"ETag": _etag(doc.version)})


@router.put(
    "/{key:path}",
    response_model=Written,
    responses={**responses(412), 201: {"model": Written, "description": "Created"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The document: any JSON",
            "content": {"application/json": {"schema": {}}},
        }
    },
    name="docs.put",
)
async def put_doc(
    request: Request,
    key: KeyPath,
    collection: CollectionQuery = None,
    if_match: IfMatch = None,
    if_none_match: CreateOnly = None,
    x_reason: Annotated[str | None, Header(description="Why: stored with the write")] = None,
) -> Response:
    """Write a document; ``If-Match`` for optimistic locking, ``If-None-Match: *`` to create only."""
    return await _put_doc(request)


async def _put_doc(request: Request) -> Response:
    key: str = request.path_params["key"]
    collection = query_param(request, "collection")
    x_reason = header(request, b"x-reason")
    caller = Caller.of(request, LAYER, "write")
    value = await read_json(request)
    match = parse_etag(header(request, b"if-match"), "If-Match")
    none_match = parse_etag(header(request, b"if-none-match"), "If-None-Match")
    if none_match not in (None, "*"):
        raise InvalidArgument("If-None-Match", "only * is supported on a write")
    docs = caller.tenant.docs

    def put() -> Written:
        if match == "*" and not docs.exists(key, collection=collection):
            raise PreconditionFailed(f"no document {key!r} to match", details={"key": key})
        return docs.put(
            key,
            value,
            expected_version=match if isinstance(match, int) else None,
            must_not_exist=none_match == "*",
            collection=collection,
            actor=caller.meta["actor"],
            reason=x_reason,
            trace_id=caller.meta.get("trace_id"),
        )

    try:
        w = await caller.run(put)
    except Conflict as exc:
        if match is None and none_match is None:
            raise
        raise PreconditionFailed(f"the precondition on document {key!r} did not hold", failures=exc.failures) from None
    return json_response(w, 201 if w.version == 1 else 200, {"ETag": _etag(w.version)})


@router.delete("/{key:path}", response_model=DocDeleted, responses=responses(404, 412), name="docs.delete")
async def delete_doc(
    request: Request,
    key: KeyPath,
    collection: CollectionQuery = None,
    if_match: IfMatch = None,
) -> Response:
    """Delete a document: 404 if there is none, 412 if ``If-Match`` does not hold."""
    caller = Caller.of(request, LAYER, "write")
    match = parse_etag(if_match, "If-Match")
    docs = caller.tenant.docs

    def delete() -> bool:
        return docs.delete(
            key,
            expected_version=match if isinstance(match, int) else None,
            collection=collection,
            actor=caller.meta["actor"],
            trace_id=caller.meta.get("trace_id"),
        )

    try:
        deleted = await caller.run(delete)
    except Conflict as exc:
        raise PreconditionFailed(f"the precondition on document {key!r} did not hold", failures=exc.failures) from None
    if not deleted:
        raise NotFound(f"no document {key!r}", details={"key": key})
    return json_response({"key": key, "collection": collection, "deleted": True})


#: Routes served without FastAPI's per-request parameter machinery (same code as the documented routes).
FAST = {"docs.get": _get_doc, "docs.put": _put_doc}
