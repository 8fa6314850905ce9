"""Key management routes: create (the secret is shown once), list, revoke. Admin scope required."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from stateline.api.auth import LAYERS, LEVELS, MAX_EXPIRY_SECONDS, SYSTEM_TENANT, Principal
from stateline.api.common import ApiModel, body_doc, ctx_of, json_response, parse_body
from stateline.api.errors import responses
from stateline.errors import Forbidden, Unauthenticated

__all__ = ["router"]

router = APIRouter(prefix="/v1/keys", tags=["keys"])


SCOPES = [*LEVELS, *(f"{layer}:{level}" for layer in LAYERS for level in LEVELS)]


class KeyCreate(ApiModel):
    """A new key. ``tenant`` defaults to the caller's; only keys of tenant ``system`` may name another."""

    scopes: list[Annotated[str, Field(json_schema_extra={"enum": SCOPES})]] = Field(
        min_length=1, max_length=50, examples=[["read", "docs:write"]]
    )
    tenant: str | None = None
    name: str = Field(default="", max_length=200)
    expires_in: float | None = Field(
        default=None, ge=1, le=MAX_EXPIRY_SECONDS, description="Seconds until the key expires"
    )


class KeyOut(BaseModel):
    """A key's public record (never its secret)."""

    id: str
    tenant: str
    scopes: list[str]
    name: str
    created_at: int
    expires_at: int | None
    revoked: bool
    revoked_at: int | None


class KeyCreated(KeyOut):
    """A created key, with the secret token: shown only in this response."""

    key: str


class KeyList(BaseModel):
    """Keys visible to the caller."""

    keys: list[KeyOut]


def _admin(request: Request) -> Principal:
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None:  # pragma: no cover - the middleware authenticates /v1
        raise Unauthenticated("an API key is required")
    principal.require("keys", "admin")
    return principal


def _scope_tenant(principal: Principal) -> str | None:
    """Keys of ``system`` manage every tenant's keys; others only their own tenant's."""
    return None if principal.tenant == SYSTEM_TENANT else principal.tenant


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    responses=responses(),
    openapi_extra=body_doc(KeyCreate),
    name="keys.create",
)
async def create_key(request: Request) -> Response:
    """Create an API key. The response holds the secret token, which is never shown again."""
    principal = _admin(request)
    body = await parse_body(request, KeyCreate)
    tenant = body.tenant or principal.tenant
    if principal.tenant not in (tenant, SYSTEM_TENANT):
        raise Forbidden("a key can only create keys for its own tenant", details={"tenant": principal.tenant})
    ctx = ctx_of(request)
    token, key = await ctx.run(lambda: ctx.keys.create(tenant, body.scopes, name=body.name, expires_in=body.expires_in))
    return json_response({**key.to_dict(), "key": token}, 201)


@router.get("", response_model=KeyList, responses=responses(), name="keys.list")
async def list_keys(request: Request) -> Response:
    """Keys of the caller's tenant (every tenant's for keys of tenant ``system``), revoked ones included."""
    principal = _admin(request)
    ctx = ctx_of(request)
    keys = await ctx.run(ctx.keys.list, _scope_tenant(principal))
    return json_response({"keys": [k.to_dict() for k in keys]})


@router.get("/{key_id}", response_model=KeyOut, responses=responses(404), name="keys.get")
async def get_key(request: Request, key_id: str) -> Response:
    """One key's record; 404 for a key of another tenant."""
    principal = _admin(request)
    ctx = ctx_of(request)
    key = await ctx.run(lambda: ctx.keys.get(key_id, tenant=_scope_tenant(principal)))
    return json_response(key.to_dict())


@router.delete("/{key_id}", response_model=KeyOut, responses=responses(404), name="keys.revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    """Revoke a key at once (idempotent); 404 for a key of another tenant."""
    principal = _admin(request)
    ctx = ctx_of(request)
    key = await ctx.run(lambda: ctx.keys.revoke(key_id, tenant=_scope_tenant(principal)))
    return json_response(key.to_dict())
