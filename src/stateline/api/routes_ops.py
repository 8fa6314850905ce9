"""Operations routes: ``/healthz`` (process up), ``/readyz`` (store reachable), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.responses import RedirectResponse, Response

from stateline.api.common import ctx_of, json_response
from stateline.api.errors import ERROR_RESPONSES

__all__ = ["router"]

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    """Service status."""

    status: str


@router.get("/healthz", response_model=Health, name="healthz")
async def healthz() -> Response:
    """The process is up and serving (says nothing about the store)."""
    return json_response({"status": "ok"})


@router.get("/readyz", response_model=Health, responses={503: ERROR_RESPONSES[503]}, name="readyz")
async def readyz(request: Request) -> Response:
    """The store answers; 503 (``unavailable``) when it does not."""
    ctx = ctx_of(request)
    await ctx.run(ctx.store.ping)
    return json_response({"status": "ready"})


@router.get(
    "/metrics",
    name="metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency, commits, conflicts, store errors."""
    return Response(ctx_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def root() -> Response:
    """Send browsers to the dashboard."""
    return RedirectResponse("/ui/")
