"""Lock routes: acquire (lease with a fencing token), extend, release by token, state, deadlocks."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from stateline.api.common import ApiModel, Caller, KeyField, KeyPath, TextField, body_doc, json_response, parse_body
from stateline.api.errors import responses
from stateline.locks import MAX_TTL_SECONDS, Lease, LockState, WaitFor

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["locks"])

LAYER = "locks"


class AcquireIn(ApiModel):
    """Take the lock for ``ttl`` seconds, waiting up to ``wait`` seconds (409 if still held)."""

    owner: KeyField | None = None
    ttl: float = Field(default=30.0, gt=0, le=MAX_TTL_SECONDS)
    wait: float = Field(default=0.0, ge=0, le=30)


class TokenIn(ApiModel):
    """The lease's token (from acquire)."""

    token: TextField


class ExtendIn(ApiModel):
    """Extend the lease to ``ttl`` seconds from now."""

    token: TextField
    ttl: float = Field(gt=0, le=MAX_TTL_SECONDS)


class Released(BaseModel):
    """The lock was released."""

    name: str
    released: bool


class Deadlocks(BaseModel):
    """Cycles in the wait-for graph, and every current wait."""

    deadlocks: list[list[WaitFor]]
    waits: list[WaitFor]


@router.post(
    "/locks/{name}/acquire",
    response_model=Lease,
    responses={
        **responses(409),
        200: {  # OpenAPI links: what to do with the lease
            "links": {
                f"{op.title()}Held": {
                    "operationId": f"locks_{op}_v1_locks__name__{op}_post",
                    "parameters": {"path.name": "$response.body#/name"},
                    "requestBody": {"token": "$response.body#/token"},
                }
                for op in ("extend", "release")
            }
        },
    },
    openapi_extra=body_doc(AcquireIn, optional=True),
    name="locks.acquire",
)
async def acquire(request: Request, name: KeyPath) -> Response:
    """Acquire a lease; its ``fencing_token`` only ever increases, its ``token`` releases or extends it."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, AcquireIn, optional=True)
    lease = await caller.run(caller.tenant.locks.acquire, name, body.owner, body.ttl, body.wait)
    return json_response(lease)


@router.post(
    "/locks/{name}/extend",
    response_model=Lease,
    responses=responses(409),
    openapi_extra=body_doc(ExtendIn),
    name="locks.extend",
)
async def extend(request: Request, name: KeyPath) -> Response:
    """Extend a current lease (a stale token is 409)."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, ExtendIn)
    return json_response(await caller.run(caller.tenant.locks.extend, name, body.ttl, body.token))


@router.post(
    "/locks/{name}/release",
    response_model=Released,
    responses=responses(409),
    openapi_extra=body_doc(TokenIn),
    name="locks.release",
)
async def release(request: Request, name: KeyPath) -> Response:
    """Release a lease by its token (a stale token is 409)."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, TokenIn)
    await caller.run(caller.tenant.locks.release, name, body.token)
    return json_response({"name": name, "released": True})


@router.get("/locks/{name}", response_model=LockState, responses=responses(), name="locks.state")
async def state(request: Request, name: KeyPath) -> Response:
    """Who holds the lock and until when (never the lease token)."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.locks.state, name))


@router.get("/deadlocks", response_model=Deadlocks, responses=responses(), name="locks.deadlocks")
async def deadlocks(request: Request) -> Response:
    """Deadlocks (cycles of waiters) and the wait-for graph."""
    caller = Caller.of(request, LAYER, "read")

    def run() -> dict[str, object]:
        locks = caller.tenant.locks
        return {"deadlocks": locks.deadlocks(), "waits": locks.waits()}

    return json_response(await caller.run(run))
