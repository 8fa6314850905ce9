"""Run routes: create runs of steps, workers claim / heartbeat / start / complete / fail, cancel, history, usage."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, BeforeValidator, Field
from starlette.responses import Response

from stateline.api.common import (
    ApiModel,
    Caller,
    JsonInt,
    KeyField,
    RunIdField,
    RunIdPath,
    RunIdQuery,
    TextField,
    body_doc,
    integral,
    json_response,
    parse_body,
)
from stateline.api.errors import responses
from stateline.runs import MAX_LEASE_SECONDS, RUN_STATUSES, Claim, Heartbeat, Run, Step, Usage
from stateline.store.protocol import MAX_INT
from stateline.types import Event

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["runs"])

LAYER = "runs"


Seconds = Annotated[float, Field(ge=0, le=MAX_LEASE_SECONDS)]
Lease = Annotated[float, Field(gt=0, le=MAX_LEASE_SECONDS, description="seconds")]
Token = Annotated[TextField, Field(description="the lease token the claim returned")]


class UsageIn(ApiModel):
    """What a step used, for metering."""

    tokens: JsonInt = Field(default=0, ge=0, le=2**53)
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)


def _usage(usage: UsageIn | None) -> dict[str, Any] | None:
    return None if usage is None else usage.model_dump(exclude_unset=True)


class RetryIn(ApiModel):
    """Backoff between attempts: ``initial_delay * multiplier**n`` up to ``max_delay``, with jitter."""

    initial_delay: Seconds | None = None
    multiplier: float | None = Field(default=None, ge=1, le=100)
    max_delay: Seconds | None = None
    jitter: float | None = Field(default=None, ge=0, le=1)


class StepIn(ApiModel):
    """One step of a new run."""

    id: RunIdField
    kind: RunIdField | None = None
    payload: Any = None
    depends_on: list[RunIdField] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=1000), BeforeValidator(integral)] | None = None
    retry: RetryIn | None = None
    optional: bool | None = None
    idempotency_key: KeyField | None = None


class RunCreate(ApiModel):
    """A new run of ``flow_id`` with its steps (a DAG through ``depends_on``)."""

    flow_id: RunIdField
    steps: list[StepIn] = Field(min_length=1, max_length=1000)
    run_id: RunIdField | None = None
    metadata: dict[str, Any] | None = None


class RunList(BaseModel):
    """Runs; pass ``next`` as ``after`` (``null``: no more)."""

    runs: list[Run]
    next: str | None


class ClaimIn(ApiModel):
    """A worker asks for up to ``limit`` ready steps of ``kinds`` under a lease of ``lease`` seconds."""

    worker_id: KeyField
    lease: Lease = 30.0
    kinds: list[RunIdField] | None = None
    limit: JsonInt = Field(default=1, ge=1, le=100)


class ClaimsOut(BaseModel):
    """The steps this worker now holds (maybe none)."""

    claims: list[Claim]


class LeaseIn(ApiModel):
    """The lease token a claim gave, and optionally a new lease length."""

    lease_token: Token
    lease: Lease | None = None


class CompleteIn(ApiModel):
    """Finish a step with its result and usage (tokens, cost_usd)."""

    lease_token: Token
    result: Any = None
    usage: UsageIn | None = None


class FailIn(ApiModel):
    """Fail an attempt; ``retryable`` false dead-letters the step at once."""

    lease_token: Token
    error: Annotated[Any, Field(json_schema_extra={"not": {"type": "null"}}, description="any JSON but null")]
    retryable: bool = True


class CancelIn(ApiModel):
    """Why the run is cancelled."""

    reason: str | None = None


class HistoryOut(BaseModel):
    """Every transition of a run, in order."""

    events: list[Event]


def _step_dict(s: StepIn) -> dict[str, Any]:
    out = s.model_dump(exclude_none=True)
    if s.retry is not None:
        out["retry"] = s.retry.model_dump(exclude_none=True)
    return out


@router.post(
    "/runs",
    status_code=201,
    response_model=Run,
    responses=responses(409),
    openapi_extra=body_doc(RunCreate),
    name="runs.create",
)
async def create_run(request: Request) -> Response:
    """Create a run; its steps without dependencies are ready to claim."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, RunCreate)
    steps = [_step_dict(s) for s in body.steps]
    run = await caller.run(
        lambda: caller.tenant.runs.create(
            body.flow_id, steps, body.run_id, body.metadata, trace_id=caller.meta.get("trace_id")
        )
    )
    return json_response(run, 201)


@router.get("/runs", response_model=RunList, responses=responses(), name="runs.list")
async def list_runs(
    request: Request,
    status: Annotated[str | None, Query(json_schema_extra={"enum": list(RUN_STATUSES)})] = None,
    flow_id: RunIdQuery = None,
    after: RunIdQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Runs, optionally of one status or flow."""
    caller = Caller.of(request, LAYER, "read")
    runs = await caller.run(lambda: caller.tenant.runs.list(status, flow_id, after, limit))
    return json_response({"runs": runs, "next": runs[-1].run_id if len(runs) == limit else None})


@router.get("/runs/{run_id}", response_model=Run, responses=responses(404), name="runs.get")
async def get_run(request: Request, run_id: RunIdPath) -> Response:
    """A run with its steps."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.runs.get, run_id))


@router.post(
    "/runs/{run_id}/cancel",
    response_model=Run,
    responses=responses(404, 409),
    openapi_extra=body_doc(CancelIn, optional=True),
    name="runs.cancel",
)
async def cancel_run(request: Request, run_id: RunIdPath) -> Response:
    """Cancel a run: pending steps are cancelled, workers see it on their next heartbeat."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, CancelIn, optional=True)
    return json_response(await caller.run(caller.tenant.runs.cancel, run_id, body.reason))


@router.get("/runs/{run_id}/history", response_model=HistoryOut, responses=responses(404), name="runs.history")
async def run_history(
    request: Request,
    run_id: RunIdPath,
    from_seq: Annotated[int, Query(alias="from", ge=1, le=2**62)] = 1,
    limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
) -> Response:
    """Every transition of the run."""
    caller = Caller.of(request, LAYER, "read")
    return json_response({"events": await caller.run(caller.tenant.runs.history, run_id, from_seq, limit)})


@router.get("/runs/{run_id}/usage", response_model=Usage, responses=responses(404), name="runs.usage")
async def run_usage(request: Request, run_id: RunIdPath) -> Response:
    """Tokens and cost summed over the run's steps."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.runs.usage, run_id))


@router.get("/usage", response_model=Usage, responses=responses(), name="runs.tenant_usage")
async def tenant_usage(
    request: Request,
    from_ts: Annotated[int | None, Query(alias="from", ge=0, le=MAX_INT, description="µs since the epoch")] = None,
    to_ts: Annotated[int | None, Query(alias="to", ge=0, le=MAX_INT)] = None,
) -> Response:
    """Usage of the whole tenant, optionally within a time range."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.runs.usage_by_tenant, from_ts, to_ts))


def _held(operation: str) -> dict[str, Any]:
    """An OpenAPI link from a claim to ``operation`` on the first step it returned, with its lease token."""
    return {
        "operationId": f"runs_{operation}_v1_runs__run_id__steps__step_id__{operation}_post",
        "parameters": {
            "path.run_id": "$response.body#/claims/0/run_id",
            "path.step_id": "$response.body#/claims/0/step_id",
        },
        "requestBody": {"lease_token": "$response.body#/claims/0/lease_token"},
    }


@router.post(
    "/steps/claim",
    response_model=ClaimsOut,
    responses={
        **responses(),
        200: {"links": {f"{op.title()}Claimed": _held(op) for op in ("heartbeat", "start", "complete", "fail")}},
    },
    openapi_extra=body_doc(ClaimIn),
    name="runs.claim",
)
async def claim(request: Request) -> Response:
    """Claim ready steps under a lease (one claim wins each step)."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, ClaimIn)
    claims = await caller.run(lambda: caller.tenant.runs.claim(body.worker_id, body.lease, body.kinds, body.limit))
    return json_response({"claims": claims})


@router.get("/runs/{run_id}/steps/{step_id}", response_model=Step, responses=responses(404), name="runs.step")
async def get_step(request: Request, run_id: RunIdPath, step_id: RunIdPath) -> Response:
    """One step."""
    caller = Caller.of(request, LAYER, "read")
    return json_response(await caller.run(caller.tenant.runs.step, (run_id, step_id)))


@router.post(
    "/runs/{run_id}/steps/{step_id}/heartbeat",
    response_model=Heartbeat,
    responses=responses(404, 409),
    openapi_extra=body_doc(LeaseIn),
    name="runs.heartbeat",
)
async def heartbeat(request: Request, run_id: RunIdPath, step_id: RunIdPath) -> Response:
    """Extend the lease; ``cancel_requested`` tells the worker to stop."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, LeaseIn)
    return json_response(
        await caller.run(caller.tenant.runs.heartbeat, (run_id, step_id), body.lease_token, body.lease)
    )


@router.post(
    "/runs/{run_id}/steps/{step_id}/start",
    response_model=Step,
    responses=responses(404, 409),
    openapi_extra=body_doc(LeaseIn),
    name="runs.start",
)
async def start(request: Request, run_id: RunIdPath, step_id: RunIdPath) -> Response:
    """Mark a claimed step running."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, LeaseIn)
    return json_response(await caller.run(caller.tenant.runs.start, (run_id, step_id), body.lease_token))


@router.post(
    "/runs/{run_id}/steps/{step_id}/complete",
    response_model=Step,
    responses=responses(404, 409),
    openapi_extra=body_doc(CompleteIn),
    name="runs.complete",
)
async def complete(request: Request, run_id: RunIdPath, step_id: RunIdPath) -> Response:
    """Complete a step with its result and usage."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, CompleteIn)
    return json_response(
        await caller.run(
            caller.tenant.runs.complete, (run_id, step_id), body.lease_token, body.result, _usage(body.usage)
        )
    )


@router.post(
    "/runs/{run_id}/steps/{step_id}/fail",
    response_model=Step,
    responses=responses(404, 409),
    openapi_extra=body_doc(FailIn),
    name="runs.fail",
)
async def fail(request: Request, run_id: RunIdPath, step_id: RunIdPath) -> Response:
    """Fail an attempt: retried with backoff up to the step's maximum, then dead-lettered."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, FailIn)
    return json_response(
        await caller.run(caller.tenant.runs.fail, (run_id, step_id), body.lease_token, body.error, body.retryable)
    )


@router.post(
    "/runs/{run_id}/steps/{step_id}/retry", response_model=Step, responses=responses(404, 409), name="runs.retry_dead"
)
async def retry_dead(request: Request, run_id: RunIdPath, step_id: RunIdPath) -> Response:
    """Bring a dead-lettered step back to pending."""
    caller = Caller.of(request, LAYER, "write")
    return json_response(await caller.run(caller.tenant.runs.retry_dead, (run_id, step_id)))
