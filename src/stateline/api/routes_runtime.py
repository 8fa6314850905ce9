"""Runtime table routes: rate-limit hits, sticky sessions, delivery attempts, idempotency key status."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, BeforeValidator, Field
from starlette.responses import Response

from stateline.api.common import (
    NAME,
    ApiModel,
    Caller,
    JsonInt,
    KeyField,
    KeyPath,
    NamePath,
    TextField,
    Ttl,
    body_doc,
    integral,
    json_response,
    parse_body,
)
from stateline.api.errors import responses
from stateline.errors import Conflict, NotFound
from stateline.runtime import RateLimitResult, Session

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["runtime"])

LAYER = "runtime"
KindQuery = Annotated[str, Query(json_schema_extra=NAME, description="The key's kind")]


class HitIn(ApiModel):
    """Take ``cost`` from ``key``'s allowance under a limit of ``rate`` per ``per`` seconds."""

    key: KeyField
    rate: JsonInt = Field(ge=1, le=2**40)
    per: Ttl
    algorithm: Literal["sliding_window", "token_bucket"] = "sliding_window"
    cost: JsonInt = Field(default=1, ge=1, le=2**40)


class SessionIn(ApiModel):
    """Bind a session to a provider for ``ttl`` seconds (the default TTL when omitted)."""

    provider: TextField
    ttl: Ttl | None = None


class DeliveryOut(BaseModel):
    """Delivery attempts counted for a message."""

    message_id: str
    attempts: int


class AttemptIn(ApiModel):
    """Count one delivery attempt; ``max`` makes an attempt past it a 409."""

    max: Annotated[int, Field(ge=1), BeforeValidator(integral)] | None = None
    ttl: Ttl = 86400.0


class IdempotencyOut(BaseModel):
    """The state of an execute-once key: ``running``, ``done``, ``failed`` or ``null`` (free)."""

    key: str
    kind: str
    status: str | None


@router.post(
    "/limits/{name}/hit",
    response_model=RateLimitResult,
    responses=responses(),
    openapi_extra=body_doc(HitIn),
    name="runtime.limit_hit",
)
async def limit_hit(request: Request, name: NamePath) -> Response:
    """Count a hit against a named limit (shared by every API node). ``allowed`` false sets ``Retry-After``;
    the answer is 200 either way: the limit is the caller's, not this request's."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, HitIn)
    result = await caller.run(
        lambda: caller.tenant.limits(name, body.rate, body.per, body.algorithm).hit(body.key, body.cost)
    )
    headers = {} if result.allowed else {"Retry-After": str(max(1, math.ceil(result.retry_after)))}
    return json_response(result, headers=headers)


@router.put(
    "/sessions/{session_id}",
    response_model=Session,
    responses=responses(),
    openapi_extra=body_doc(SessionIn),
    name="runtime.session_bind",
)
async def bind_session(request: Request, session_id: KeyPath) -> Response:
    """Bind (or re-bind) a sticky session."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, SessionIn)
    return json_response(await caller.run(caller.tenant.sessions.bind, session_id, body.provider, body.ttl))


@router.get("/sessions/{session_id}", response_model=Session, responses=responses(404), name="runtime.session_get")
async def get_session(request: Request, session_id: KeyPath) -> Response:
    """A live session binding (refreshing its TTL)."""
    caller = Caller.of(request, LAYER, "read")
    s = await caller.run(caller.tenant.sessions.lookup, session_id)
    if s is None:
        raise NotFound(f"no session {session_id!r}", details={"session_id": session_id})
    return json_response(s)


@router.delete(
    "/sessions/{session_id}", response_model=Session, responses=responses(404), name="runtime.session_unbind"
)
async def unbind_session(request: Request, session_id: KeyPath) -> Response:
    """Remove a session binding."""
    caller = Caller.of(request, LAYER, "write")

    def run() -> Session:
        s = caller.tenant.sessions.lookup(session_id)
        if s is None or not caller.tenant.sessions.unbind(session_id):
            raise NotFound(f"no session {session_id!r}", details={"session_id": session_id})
        return s

    return json_response(await caller.run(run))


@router.post(
    "/deliveries/{message_id}/attempt",
    response_model=DeliveryOut,
    responses=responses(409),
    openapi_extra=body_doc(AttemptIn, optional=True),
    name="runtime.delivery_attempt",
)
async def delivery_attempt(request: Request, message_id: KeyPath) -> Response:
    """Count one more delivery of a message; with ``max``, 409 once the attempts exceed it."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, AttemptIn, optional=True)
    n = await caller.run(caller.tenant.deliveries.attempt, message_id, body.ttl)
    if body.max is not None and n > body.max:
        raise Conflict(
            f"message {message_id!r} exceeded {body.max} delivery attempts",
            details={"message_id": message_id, "attempts": n, "max": body.max},
        )
    return json_response({"message_id": message_id, "attempts": n})


@router.get(
    "/deliveries/{message_id}", response_model=DeliveryOut, responses=responses(), name="runtime.delivery_count"
)
async def delivery_count(request: Request, message_id: KeyPath) -> Response:
    """Delivery attempts counted for a message."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(
        {"message_id": message_id, "attempts": await caller.run(caller.tenant.deliveries.count, message_id)}
    )


@router.get(
    "/idempotency/{key}", response_model=IdempotencyOut, responses=responses(), name="runtime.idempotency_status"
)
async def idempotency_status(
    request: Request,
    key: KeyPath,
    kind: KindQuery = "request",
) -> Response:
    """The state of an execute-once key."""
    caller = Caller.of(request, LAYER, "read")
    status = await caller.run(caller.tenant.idempotency.status, key, kind)
    return json_response({"key": key, "kind": kind, "status": status})


@router.delete(
    "/idempotency/{key}", response_model=IdempotencyOut, responses=responses(), name="runtime.idempotency_forget"
)
async def idempotency_forget(
    request: Request,
    key: KeyPath,
    kind: KindQuery = "request",
) -> Response:
    """Free an execute-once key whatever its state (the next caller runs again)."""
    caller = Caller.of(request, LAYER, "admin")
    await caller.run(caller.tenant.idempotency.forget, key, kind)
    return json_response({"key": key, "kind": kind, "status": None})
