"""Case routes: create, read, commit buffered mutations (receipt), receipts, events and chain verification."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from stateline.api.common import (
    ApiModel,
    Caller,
    CaseIdField,
    CaseIdPath,
    CaseIdQuery,
    IfMatch,
    JsonInt,
    PrefixQuery,
    body_doc,
    header,
    json_response,
    parse_body,
    parse_etag,
)
from stateline.api.errors import responses
from stateline.cases import Case, Receipt, Verification
from stateline.errors import Conflict, PreconditionFailed
from stateline.store.protocol import MAX_INT
from stateline.types import Event

__all__ = ["router"]

router = APIRouter(prefix="/v1/cases", tags=["cases"])

LAYER = "cases"


class CaseCreate(ApiModel):
    """A new case (``case_id`` is drawn when omitted); 409 if it exists."""

    case_id: CaseIdField | None = None
    ctx: dict[str, Any] | None = None


class CaseOut(BaseModel):
    """A case's committed state; ``version`` is also its ETag."""

    case_id: str
    version: int
    receipt_seq: int
    state: dict[str, Any]


class SetCtx(ApiModel):
    """Replace ``ctx`` (or, with ``key``, one key of it)."""

    type: Literal["set_ctx"]
    value: Any = None
    key: str | None = None


class AddToken(ApiModel):
    """Add a token."""

    type: Literal["add_token"]
    token_id: str
    scope: str | None = None
    position: Any = None
    data: Any = None
    status: str = "active"


class RemoveToken(ApiModel):
    """Remove a token."""

    type: Literal["remove_token"]
    token_id: str


class UpdateToken(ApiModel):
    """Change fields of a token (only those given: at least one)."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 3})  # type, token_id and a field

    type: Literal["update_token"]
    token_id: str
    status: str | None = None
    position: Any = None
    data: Any = None

    @model_validator(mode="after")
    def _a_field(self) -> UpdateToken:
        if not self.model_fields_set & {"status", "position", "data"}:
            raise ValueError("give status, position or data to set")
        return self


class EnterScope(ApiModel):
    """Open a cancel scope (nested under ``parent``)."""

    type: Literal["enter_scope"]
    scope: str
    parent: str | None = None


class ExitScope(ApiModel):
    """Close a cancel scope."""

    type: Literal["exit_scope"]
    scope: str


class CancelScope(ApiModel):
    """Cancel a scope and everything nested in it."""

    type: Literal["cancel_scope"]
    scope: str


class IncrementStepCount(ApiModel):
    """Add to the case's step count."""

    type: Literal["increment_step_count"]
    by: JsonInt = 1


class SetMetadata(ApiModel):
    """Set one metadata key."""

    type: Literal["set_metadata"]
    key: str
    value: Any = None


Mutation = Annotated[
    SetCtx
    | AddToken
    | RemoveToken
    | UpdateToken
    | EnterScope
    | ExitScope
    | CancelScope
    | IncrementStepCount
    | SetMetadata,
    Field(discriminator="type"),
]


class CaseCommit(ApiModel):
    """Mutations validated together (400 lists every invalid one) and committed with one receipt."""

    mutations: list[Mutation] = Field(min_length=1, max_length=1000)


class CommitOut(BaseModel):
    """The new state and the receipt of the commit."""

    case: CaseOut
    receipt: Receipt


class CaseIds(BaseModel):
    """Case ids in order; pass ``next`` as ``after`` (``null``: no more)."""

    case_ids: list[str]
    next: str | None


class ReceiptsOut(BaseModel):
    """Receipts of a case in seq order."""

    receipts: list[Receipt]


class CaseEventsOut(BaseModel):
    """Events of a case in seq order."""

    events: list[Event]


def _case(c: Case) -> dict[str, Any]:
    return {"case_id": c.case_id, "version": c.version, "receipt_seq": c.receipt_seq, "state": c.state()}


def _buffer(case: Case, m: Any) -> None:
    if isinstance(m, SetCtx):
        if m.key is None:
            case.set_ctx(m.value)
        else:
            case.put_ctx(m.key, m.value)
    elif isinstance(m, AddToken):
        case.add_token(m.token_id, m.scope, position=m.position, data=m.data, status=m.status)
    elif isinstance(m, RemoveToken):
        case.remove_token(m.token_id)
    elif isinstance(m, UpdateToken):
        fields = {k: getattr(m, k) for k in m.model_fields_set if k in ("status", "position", "data")}
        case.update_token(m.token_id, **fields)
    elif isinstance(m, EnterScope):
        case.enter_scope(m.scope, m.parent)
    elif isinstance(m, ExitScope):
        case.exit_scope(m.scope)
    elif isinstance(m, CancelScope):
        case.cancel_scope(m.scope)
    elif isinstance(m, IncrementStepCount):
        case.increment_step_count(m.by)
    else:
        case.set_metadata(m.key, m.value)


@router.post(
    "",
    status_code=201,
    response_model=CaseOut,
    responses=responses(409),
    openapi_extra=body_doc(CaseCreate),
    name="cases.create",
)
async def create_case(request: Request) -> Response:
    """Create a case with an optional initial ``ctx``."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, CaseCreate)
    case = await caller.run(caller.tenant.cases.create, body.case_id, body.ctx)
    return json_response(_case(case), 201, {"ETag": f'"{case.version}"'})


@router.get("", response_model=CaseIds, responses=responses(), name="cases.list")
async def list_cases(
    request: Request,
    prefix: PrefixQuery = "",
    after: CaseIdQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Case ids starting with ``prefix``."""
    caller = Caller.of(request, LAYER, "read")
    ids = await caller.run(caller.tenant.cases.list_ids, prefix, after, limit)
    return json_response({"case_ids": ids, "next": ids[-1] if len(ids) == limit else None})


@router.get("/{case_id}", response_model=CaseOut, responses=responses(404), name="cases.get")
async def get_case(request: Request, case_id: CaseIdPath) -> Response:
    """A case's last committed state."""
    caller = Caller.of(request, LAYER, "read")
    case = await caller.run(caller.tenant.cases.open, case_id)
    return json_response(_case(case), headers={"ETag": f'"{case.version}"'})


@router.post(
    "/{case_id}/commit",
    response_model=CommitOut,
    responses=responses(404, 409, 412),
    openapi_extra=body_doc(CaseCommit),
    name="cases.commit",
)
async def commit_case(
    request: Request,
    case_id: CaseIdPath,
    if_match: IfMatch = None,
) -> Response:
    """Buffer the mutations, validate them all, and commit them with a receipt in one atomic write."""
    return await _commit_case(request)


async def _commit_case(request: Request) -> Response:
    case_id: str = request.path_params["case_id"]
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, CaseCommit)
    expected = parse_etag(header(request, b"if-match"), "If-Match")

    def run() -> dict[str, Any]:
        case = caller.tenant.cases.open(case_id)
        if isinstance(expected, int) and case.version != expected:
            raise PreconditionFailed(
                f"case {case_id!r} is at version {case.version}, not {expected}",
                details={"expected": expected, "found": case.version},
            )
        for m in body.mutations:
            _buffer(case, m)
        receipt = case.commit()
        return {"case": _case(case), "receipt": receipt}

    try:
        out = await caller.run(run)
    except Conflict as exc:
        if isinstance(exc, PreconditionFailed) or expected is None:
            raise
        raise PreconditionFailed(str(exc.message), details=exc.details) from None
    return json_response(out, headers={"ETag": f'"{out["case"]["version"]}"'})


@router.get("/{case_id}/receipts", response_model=ReceiptsOut, responses=responses(404), name="cases.receipts")
async def receipts(
    request: Request,
    case_id: CaseIdPath,
    from_seq: Annotated[int, Query(alias="from", ge=1, le=MAX_INT)] = 1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> Response:
    """The case's receipts (a hash chain) from ``from``."""
    caller = Caller.of(request, LAYER, "read")

    def run() -> list[Receipt]:
        caller.tenant.cases.open(case_id)  # 404 for an unknown case
        return caller.tenant.cases.receipts(case_id, from_seq, limit)

    return json_response({"receipts": await caller.run(run)})


@router.get("/{case_id}/events", response_model=CaseEventsOut, responses=responses(404), name="cases.events")
async def case_events(
    request: Request,
    case_id: CaseIdPath,
    from_seq: Annotated[int, Query(alias="from", ge=1, le=MAX_INT)] = 1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> Response:
    """The case's events from ``from``."""
    caller = Caller.of(request, LAYER, "read")

    def run() -> list[Event]:
        caller.tenant.cases.open(case_id)
        return caller.tenant.cases.events(case_id, from_seq, limit)

    return json_response({"events": await caller.run(run)})


@router.get("/{case_id}/verify", response_model=Verification, responses=responses(404), name="cases.verify")
async def verify(request: Request, case_id: CaseIdPath) -> Response:
    """Check the receipt chain and the state against it; says which receipt is bad and why."""
    caller = Caller.of(request, LAYER, "read")

    def run() -> Verification:
        caller.tenant.cases.open(case_id)
        return caller.tenant.cases.verify(case_id)

    return json_response(await caller.run(run))


#: Routes served without FastAPI's per-request parameter machinery (same code as the documented routes).
FAST = {"cases.commit": _commit_case}
