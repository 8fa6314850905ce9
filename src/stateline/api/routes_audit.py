"""Audit routes: filtered queries of the tenant's hash-chained audit log, one entry, chain verification."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from stateline.api.common import Caller, NonEmptyQuery, json_response
from stateline.api.errors import responses
from stateline.audit import AuditEntry, AuditPage, AuditVerification
from stateline.errors import NotFound
from stateline.store.protocol import MAX_INT

__all__ = ["router"]

router = APIRouter(prefix="/v1/audit", tags=["audit"])

LAYER = "audit"


@router.get("", response_model=AuditPage, responses=responses(), name="audit.query")
async def query(
    request: Request,
    user: NonEmptyQuery = None,
    action: NonEmptyQuery = None,
    resource_type: NonEmptyQuery = None,
    resource_id: NonEmptyQuery = None,
    from_ts: Annotated[int | None, Query(ge=0, le=MAX_INT, description="µs since the epoch, inclusive")] = None,
    to_ts: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT, description="next_after of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    order: Literal["newest", "oldest"] = "newest",
) -> Response:
    """Entries matching every filter given, newest first by default."""
    caller = Caller.of(request, LAYER, "read")
    page = await caller.run(
        lambda: caller.tenant.audit.query(
            user=user,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            from_ts=from_ts,
            to_ts=to_ts,
            after=after,
            limit=limit,
            order=order,
        )
    )
    return json_response(page)


@router.get("/verify", response_model=AuditVerification, responses=responses(), name="audit.verify")
async def verify(request: Request) -> Response:
    """Check the whole kept chain; names the first bad entry and why."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.audit.verify))


@router.get("/{seq}", response_model=AuditEntry, responses=responses(404), name="audit.get")
async def get_entry(request: Request, seq: Annotated[int, Path(ge=1, le=MAX_INT)]) -> Response:
    """One entry by its seq."""
    caller = Caller.of(request, LAYER, "read")
    entry = await caller.run(caller.tenant.audit.get, seq)
    if entry is None:
        raise NotFound(f"no audit entry {seq}", details={"seq": seq})
    return json_response(entry)
