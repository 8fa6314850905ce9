"""Policy routes: versioned policy documents, one active version per policy, activate and roll back.

Kept as documents (the docs layer): each version at ``policies/<name>/v<n>`` in collection
``policies`` (never changed once written), and the policy's head at ``<name>`` in collection
``policy_heads`` (type, latest version, active version and the activation history). Every change is
one docs transaction guarded by the head's version, so concurrent writers cannot lose an update.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from stateline.api.common import ApiModel, Caller, JsonInt, KeyQuery, body_doc, json_response, parse_body
from stateline.api.errors import responses
from stateline.docs import Transaction
from stateline.errors import Conflict, InvalidArgument, NotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1/policies", tags=["policies"])

LAYER = "policies"
VERSIONS = "policies"
HEADS = "policy_heads"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]


class PolicyVersionIn(ApiModel):
    """A new version of a policy: its ``type`` (fixed by the first version) and ``definition``."""

    type: str = Field(min_length=1, max_length=100)
    definition: Any = None
    activate: bool = False


class ActivateIn(ApiModel):
    """The version to make active."""

    version: JsonInt = Field(ge=1)


class PolicyVersion(BaseModel):
    """One version of a policy (immutable)."""

    name: str
    type: str
    version: int
    definition: Any
    created_at: int
    actor: str | None


class PolicyHead(BaseModel):
    """A policy: its type, latest and active version (``null``: none active) and activation history."""

    name: str
    type: str
    latest: int
    active: int | None
    history: list[int]


class PolicyOut(PolicyHead):
    """A policy with its active version's definition (``null`` when none is active)."""

    active_definition: Any = None


class PolicyList(BaseModel):
    """Policies in name order; pass ``next`` as ``after`` (``null``: no more)."""

    policies: list[PolicyHead]
    next: str | None


class _Refused(Exception):  # carries a Conflict out of run_transaction, which retries Conflicts
    def __init__(self, error: Conflict) -> None:
        super().__init__(error.message)
        self.error = error


async def _transact(caller: Caller, fn: Callable[[Transaction], dict[str, Any]]) -> dict[str, Any]:
    try:
        return await caller.run(lambda: caller.tenant.docs.run_transaction(fn, actor=caller.meta["actor"]))
    except _Refused as exc:
        raise exc.error from None


def _name(name: str) -> str:
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidArgument("name", "use letters, digits and _.- (at most 128 characters)")
    return name


def _vkey(name: str, version: int) -> str:
    return f"{name}/v{version:09d}"


def _head(tx: Transaction, name: str) -> dict[str, Any]:
    doc = tx.get(name, collection=HEADS)
    if doc is None:
        raise NotFound(f"no policy {name!r}", details={"name": name})
    head: dict[str, Any] = doc.value
    return head


@router.get("", response_model=PolicyList, responses=responses(), name="policies.list")
async def list_policies(
    request: Request, after: KeyQuery = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Response:
    """Policies of the tenant."""
    caller = Caller.of(request, LAYER, "read")
    docs = await caller.run(lambda: caller.tenant.docs.list(after=after, limit=limit, collection=HEADS))
    return json_response({"policies": [d.value for d in docs], "next": docs[-1].key if len(docs) == limit else None})


@router.post(
    "/{name}/versions",
    status_code=201,
    response_model=PolicyVersion,
    responses=responses(409),
    openapi_extra=body_doc(PolicyVersionIn),
    name="policies.create",
)
async def create_version(request: Request, name: Name) -> Response:
    """Add the next version of a policy (creating the policy); ``activate`` makes it active at once."""
    caller = Caller.of(request, LAYER, "write")
    _name(name)
    body = await parse_body(request, PolicyVersionIn)

    def run(tx: Transaction) -> dict[str, Any]:
        doc = tx.get(name, collection=HEADS)
        head: dict[str, Any] = (
            dict(doc.value)
            if doc is not None
            else {"name": name, "type": body.type, "latest": 0, "active": None, "history": []}
        )
        if head["type"] != body.type:
            raise _Refused(
                Conflict(
                    f"policy {name!r} is of type {head['type']!r}, not {body.type!r}",
                    details={"name": name, "type": head["type"]},
                )
            )
        version = head["latest"] + 1
        record = {
            "name": name,
            "type": body.type,
            "version": version,
            "definition": body.definition,
            "created_at": caller.ctx.clock.now_us(),
            "actor": caller.meta["actor"],
        }
        head["latest"] = version
        if body.activate:
            head["active"] = version
            head["history"] = [*head["history"], version][-100:]
        tx.put(_vkey(name, version), record, must_not_exist=True, collection=VERSIONS)
        tx.put(name, head, collection=HEADS)
        return record

    return json_response(await _transact(caller, run), 201)


@router.get("/{name}", response_model=PolicyOut, responses=responses(404), name="policies.get")
async def get_policy(request: Request, name: Name) -> Response:
    """A policy with the definition of its active version."""
    caller = Caller.of(request, LAYER, "read")

    def run() -> dict[str, Any]:
        docs = caller.tenant.docs
        doc = docs.get(name, collection=HEADS)
        if doc is None:
            raise NotFound(f"no policy {name!r}", details={"name": name})
        out = dict(doc.value)
        active = out.get("active")
        version = docs.get(_vkey(name, active), collection=VERSIONS) if active else None
        out["active_definition"] = None if version is None else version.value["definition"]
        return out

    return json_response(await caller.run(run))


@router.get(
    "/{name}/versions/{version}", response_model=PolicyVersion, responses=responses(404), name="policies.version"
)
async def get_version(request: Request, name: Name, version: Annotated[int, Path(ge=1)]) -> Response:
    """One version of a policy."""
    caller = Caller.of(request, LAYER, "read")
    doc = await caller.run(lambda: caller.tenant.docs.get(_vkey(name, version), collection=VERSIONS))
    if doc is None:
        raise NotFound(f"policy {name!r} has no version {version}", details={"name": name, "version": version})
    return json_response(doc.value)


@router.post(
    "/{name}/activate",
    response_model=PolicyHead,
    responses=responses(404, 409),
    openapi_extra=body_doc(ActivateIn),
    name="policies.activate",
)
async def activate(request: Request, name: Name) -> Response:
    """Make one version the active one (the only active one)."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, ActivateIn)

    def run(tx: Transaction) -> dict[str, Any]:
        head = dict(_head(tx, name))
        if body.version > head["latest"]:
            raise NotFound(f"policy {name!r} has no version {body.version}", details={"version": body.version})
        if head["active"] != body.version:
            head["active"] = body.version
            head["history"] = [*head["history"], body.version][-100:]
            tx.put(name, head, collection=HEADS)
        return head

    return json_response(await _transact(caller, run))


@router.post("/{name}/rollback", response_model=PolicyHead, responses=responses(404, 409), name="policies.rollback")
async def rollback(request: Request, name: Name) -> Response:
    """Make the previously active version active again (409 if there is none)."""
    caller = Caller.of(request, LAYER, "write")

    def run(tx: Transaction) -> dict[str, Any]:
        head = dict(_head(tx, name))
        history = list(head["history"])
        if len(history) < 2:
            raise _Refused(Conflict(f"policy {name!r} has no earlier active version", details={"name": name}))
        history.pop()
        head["active"] = history[-1]
        head["history"] = history
        tx.put(name, head, collection=HEADS)
        return head

    return json_response(await _transact(caller, run))
