"""Project routes: a tenant's projects and their configuration, as versioned documents with ETags."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from stateline.api.common import (
    ApiModel,
    Caller,
    CreateOnly,
    IfMatch,
    KeyQuery,
    body_doc,
    json_response,
    parse_body,
    parse_etag,
)
from stateline.api.errors import responses
from stateline.errors import Conflict, InvalidArgument, NotFound, PreconditionFailed

__all__ = ["router"]

router = APIRouter(prefix="/v1/projects", tags=["projects"])

LAYER = "docs"  # projects are documents: the docs scopes apply
COLLECTION = "projects"
ProjectId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]


class ProjectIn(ApiModel):
    """A project's name and configuration (any JSON object)."""

    name: str = ""
    config: dict[str, Any] = Field(default_factory=dict)


class ProjectOut(BaseModel):
    """A project; ``version`` is also its ETag."""

    project_id: str
    name: str
    config: dict[str, Any]
    version: int
    updated_at: int


class ProjectList(BaseModel):
    """Projects in id order; pass ``next`` as ``after`` (``null``: no more)."""

    projects: list[ProjectOut]
    next: str | None


def _out(doc: Any) -> dict[str, Any]:
    return {
        "project_id": doc.key,
        "name": doc.value.get("name", ""),
        "config": doc.value.get("config", {}),
        "version": doc.version,
        "updated_at": doc.updated_at,
    }


@router.get("", response_model=ProjectList, responses=responses(), name="projects.list")
async def list_projects(
    request: Request, after: KeyQuery = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Response:
    """The tenant's projects."""
    caller = Caller.of(request, LAYER, "read")
    docs = await caller.run(lambda: caller.tenant.docs.list(after=after, limit=limit, collection=COLLECTION))
    return json_response({"projects": [_out(d) for d in docs], "next": docs[-1].key if len(docs) == limit else None})


@router.get("/{project_id}", response_model=ProjectOut, responses=responses(404), name="projects.get")
async def get_project(request: Request, project_id: ProjectId) -> Response:
    """One project with its configuration."""
    caller = Caller.of(request, LAYER, "read")
    doc = await caller.run(lambda: caller.tenant.docs.get(project_id, collection=COLLECTION))
    if doc is None:
        raise NotFound(f"no project {project_id!r}", details={"project_id": project_id})
    return json_response(_out(doc), headers={"ETag": f'"{doc.version}"'})


@router.put(
    "/{project_id}",
    response_model=ProjectOut,
    responses={**responses(412), 201: {"model": ProjectOut, "description": "Created"}},
    openapi_extra=body_doc(ProjectIn),
    name="projects.put",
)
async def put_project(
    request: Request,
    project_id: ProjectId,
    if_match: IfMatch = None,
    if_none_match: CreateOnly = None,
) -> Response:
    """Create or replace a project's name and configuration."""
    caller = Caller.of(request, LAYER, "write")
    body = await parse_body(request, ProjectIn)
    match = parse_etag(if_match, "If-Match")
    none_match = parse_etag(if_none_match, "If-None-Match")
    if none_match not in (None, "*") or match == "*":
        raise InvalidArgument("If-Match", 'use If-Match: "<version>" or If-None-Match: *')
    docs = caller.tenant.docs

    def put() -> dict[str, Any]:
        docs.put(
            project_id,
            {"name": body.name, "config": body.config},
            expected_version=match if isinstance(match, int) else None,
            must_not_exist=none_match == "*",
            collection=COLLECTION,
            actor=caller.meta["actor"],
            trace_id=caller.meta.get("trace_id"),
        )
        doc = docs.get(project_id, collection=COLLECTION)
        assert doc is not None
        return _out(doc)

    try:
        out = await caller.run(put)
    except Conflict as exc:
        if match is None and none_match is None:
            raise
        raise PreconditionFailed(
            f"the precondition on project {project_id!r} did not hold", failures=exc.failures
        ) from None
    return json_response(out, 201 if out["version"] == 1 else 200, {"ETag": f'"{out["version"]}"'})
