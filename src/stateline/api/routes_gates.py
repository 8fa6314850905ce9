"""Feature gate routes: which features the deployment's checkpoint switches on (read-only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from stateline.api.common import Caller, json_response
from stateline.api.errors import responses

__all__ = ["router"]

router = APIRouter(prefix="/v1/gates", tags=["gates"])

LAYER = "gates"


class GatesOut(BaseModel):
    """The checkpoint in force, where it came from, why a fallback (if any), and the features on."""

    checkpoint: str | None
    source: str
    reason: str | None
    features: list[str]


class FeatureOut(BaseModel):
    """Whether one feature is available."""

    feature: str
    available: bool


@router.get("", response_model=GatesOut, responses=responses(), name="gates.status")
async def status(request: Request) -> Response:
    """The deployment's gates (a missing or invalid checkpoint falls back to the baseline set)."""
    caller = Caller.of(request, LAYER, "read")
    s = await caller.run(caller.tenant.gates.status)
    return json_response(
        {"checkpoint": s.checkpoint, "source": s.source, "reason": s.reason, "features": sorted(s.features)}
    )


@router.get("/{feature}", response_model=FeatureOut, responses=responses(), name="gates.feature")
async def feature(request: Request, feature: str) -> Response:
    """Whether ``feature`` is available."""
    caller = Caller.of(request, LAYER, "read")
    return json_response({"feature": feature, "available": await caller.run(caller.tenant.gates.available, feature)})
