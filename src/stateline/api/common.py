"""Helpers every route module shares: the request's context and principal, store calls, JSON in and out."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import orjson
from fastapi import Header, Path, Query, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from stateline.api.auth import Principal, require_tenant_data
from stateline.errors import InvalidArgument, Unauthenticated
from stateline.observability import current_trace_id
from stateline.store.protocol import MAX_INT, MAX_TTL_SECONDS
from stateline.types import Item

if TYPE_CHECKING:
    from stateline.api.app import ApiContext
    from stateline.database import Tenant

__all__ = [
    "BODY_MODELS",
    "CASE_ID",
    "COLLECTION",
    "ETAG",
    "KEY_TEXT",
    "NAME",
    "NAMESPACE",
    "NOT_EMPTY",
    "PREFIX_TEXT",
    "RUN_ID",
    "ApiModel",
    "Caller",
    "CaseIdField",
    "CaseIdPath",
    "CaseIdQuery",
    "CollectionField",
    "CollectionQuery",
    "CreateOnly",
    "IfMatch",
    "IfNoneMatch",
    "JsonInt",
    "JsonResponse",
    "KeyField",
    "KeyPath",
    "KeyQuery",
    "NameField",
    "NamePath",
    "NamespaceField",
    "NamespacePath",
    "NonEmptyQuery",
    "PrefixQuery",
    "RunIdField",
    "RunIdPath",
    "RunIdQuery",
    "TextField",
    "Ttl",
    "VersionField",
    "body_doc",
    "ctx_of",
    "header",
    "integral",
    "item_dict",
    "json_response",
    "parse_body",
    "parse_etag",
    "query_number",
    "query_param",
    "read_body",
    "read_json",
]

P = ParamSpec("P")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

_ETAG_RE = re.compile(r'(?:W/)?"(\d{1,19})"')


class ApiModel(BaseModel):
    """Base of request bodies: strict JSON types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")


# JSON-schema fragments for the OpenAPI document: the rules the layers check, so that a client (or a
# generator of requests) knows what is accepted. tests/api/test_fuzz.py holds the two together.
KEY_TEXT: dict[str, Any] = {"pattern": r"^[^\x00-\x1f\x7f-\x9f]{1,200}$"}
"""A key, stream, lock or session name...: no control characters, up to 1,024 bytes of UTF-8 with what
the layer adds (documented as 200 characters, which always fit)."""
RUN_ID: dict[str, Any] = {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"}
"""A run, step or flow id."""
CASE_ID: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$"}
"""A case id."""
NAMESPACE: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,127}$"}
"""A namespace or an event type."""
ETAG: dict[str, Any] = {"pattern": r'^(\*|(W/)?"[1-9][0-9]{0,17}")$'}
"""An If-Match / If-None-Match value: ``*`` or one version ETag."""
PREFIX_TEXT: dict[str, Any] = {"pattern": r"^[^\x00-\x1f\x7f-\x9f]{0,200}$"}
"""A key prefix: a key's characters, or empty."""
NAME: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_:/\-]{1,100}$"}
"""A name a layer makes a namespace of (a rate limit, an idempotency kind): no dots."""
COLLECTION: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_\-]{1,100}$"}
"""A named collection of documents."""
NOT_EMPTY: dict[str, Any] = {"minLength": 1}

# Parameters and body fields so documented (the layers validate them; these only describe)
IfMatch = Annotated[
    str | None, Header(json_schema_extra=ETAG, description='"<version>" (or *): only if it holds, else 412')
]
IfNoneMatch = Annotated[str | None, Header(json_schema_extra=ETAG, description='"<version>" or *: 304 if it holds')]
CreateOnly = Annotated[
    str | None, Header(json_schema_extra={"enum": ["*"]}, description="*: create only (412 if it exists)")
]
KeyPath = Annotated[str, Path(json_schema_extra=KEY_TEXT)]
KeyQuery = Annotated[str | None, Query(json_schema_extra=KEY_TEXT)]
PrefixQuery = Annotated[str, Query(json_schema_extra=PREFIX_TEXT)]
RunIdPath = Annotated[str, Path(json_schema_extra=RUN_ID)]
RunIdQuery = Annotated[str | None, Query(json_schema_extra=RUN_ID)]
CaseIdPath = Annotated[str, Path(json_schema_extra=CASE_ID)]
CaseIdQuery = Annotated[str | None, Query(json_schema_extra=CASE_ID)]
NamespacePath = Annotated[str, Path(json_schema_extra=NAMESPACE)]
KeyField = Annotated[str, Field(json_schema_extra=KEY_TEXT)]
NameField = Annotated[str, Field(json_schema_extra=NAME)]
NamePath = Annotated[str, Path(json_schema_extra=NAME)]
CollectionField = Annotated[str, Field(json_schema_extra=COLLECTION)]
CollectionQuery = Annotated[
    str | None, Query(json_schema_extra=COLLECTION, description="A named collection (default: the default one)")
]
NonEmptyQuery = Annotated[str | None, Query(json_schema_extra=NOT_EMPTY)]
Ttl = Annotated[float, Field(gt=0, le=MAX_TTL_SECONDS, description="seconds")]
RunIdField = Annotated[str, Field(json_schema_extra=RUN_ID)]
CaseIdField = Annotated[str, Field(json_schema_extra=CASE_ID)]
NamespaceField = Annotated[str, Field(json_schema_extra=NAMESPACE)]


def integral(value: object) -> object:
    """``value`` as an int if it is a float with no fraction (JSON has one kind of number: ``3.0`` is the
    integer 3; ``3.5``, ``"3"`` and ``true`` are not integers)."""
    return int(value) if type(value) is float and value.is_integer() and abs(value) < 2**63 else value


JsonInt = Annotated[int, BeforeValidator(integral)]
"""An integer in a request body (see ``integral``). An optional one with bounds is written
``Annotated[int, Field(ge=...), BeforeValidator(integral)] | None``: pydantic documents the bounds of
``JsonInt | None`` as ``ge``/``le``, which JSON Schema does not know."""
VersionField = Annotated[int, Field(ge=1, le=MAX_INT), BeforeValidator(integral)]
"""A version a request expects (written so, it may also be optional: see ``JsonInt``)."""
TextField = Annotated[str, Field(min_length=1)]
"""Text that must not be empty (a token, a provider)."""

BODY_MODELS: dict[str, type[BaseModel]] = {}
"""The request-body models that routes declare with ``body_doc``, by name (their schemas go into the
OpenAPI components)."""


def body_doc(model: type[BaseModel], *, optional: bool = False) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body as ``model`` with ``parse_body`` (FastAPI
    documents only the bodies it parses itself). ``optional``: an empty body is allowed."""
    known = BODY_MODELS.setdefault(model.__name__, model)
    if known is not model:
        raise ValueError(f"two request-body models are named {model.__name__}")
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": not optional, "content": {"application/json": {"schema": schema}}}}


def ctx_of(request: Request) -> ApiContext:
    """The service context of the app that serves ``request``."""
    ctx: ApiContext = request.app.state.stateline
    return ctx


#: (scopes, layer, level) -> whether they grant it: a key's scopes are checked once, not per request
_GRANTS: dict[tuple[frozenset[str], str, str], bool] = {}


@dataclass(slots=True)
class Caller:
    """The authenticated caller of one request, bound to its tenant (which only the key decides)."""

    ctx: ApiContext
    principal: Principal
    tenant: Tenant
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, request: Request, layer: str, level: str) -> Caller:
        """The caller if its key grants ``level`` on ``layer``; else ``Forbidden``."""
        scope = request.scope
        ctx = ctx_of(request)
        state = scope.get("state")
        principal: Principal | None = None if state is None else state.get("principal")
        if state is None or principal is None:  # pragma: no cover - the middleware authenticates every /v1 request
            raise Unauthenticated("an API key is required")
        grant = (principal.scopes, layer, level)
        allowed = _GRANTS.get(grant)
        if allowed is None:
            allowed = principal.allows(layer, level)
            if len(_GRANTS) < 10_000:
                _GRANTS[grant] = allowed
        if not allowed:
            principal.require(layer, level)  # raises Forbidden
        tenant = ctx.db.tenant(require_tenant_data(principal))
        meta = {"actor": f"key:{principal.key_id}", "via": "api"}
        trace_id = state.get("trace_id") if "trace_id" in state else current_trace_id()
        if trace_id:
            meta["trace_id"] = trace_id
        return cls(ctx, principal, tenant, meta)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn`` inline on the memory store, in the thread pool on stores that may block."""
        if self.ctx.inline:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    def commit_meta(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        """The meta stored with a commit: the caller's (actor, trace id) over any ``extra`` given."""
        if not extra:
            return self.meta
        return {**extra, **self.meta}


class JsonResponse(Response):
    """A JSON response encoded with orjson, its raw headers built directly (the hot routes answer with it)."""

    media_type = "application/json"

    def __init__(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = orjson.dumps(data)
        self.status_code = status
        self.body = body
        self.background = None
        raw = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        if headers:
            raw.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())
        self.raw_headers = raw


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response encoded with orjson."""
    return JsonResponse(data, status, headers)


def header(request: Request, name: bytes) -> str | None:
    """The request header ``name`` (lower case), or ``None``: a scan of the raw headers, no ``Headers`` object."""
    for k, v in request.scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def query_param(request: Request, name: str) -> str | None:
    """The query parameter ``name``, or ``None`` (the query string is parsed only when there is one)."""
    if not request.scope.get("query_string"):
        return None
    return request.query_params.get(name)


async def read_body(request: Request) -> bytes:
    """The whole request body (read once, then kept on the request as Starlette's ``body()`` keeps it)."""
    body: bytes | None = getattr(request, "_body", None)
    if body is not None:
        return body
    receive = request.receive
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body"):
        body = message.get("body", b"")
    else:
        chunks: list[bytes] = []
        while True:
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
            message = await receive()
        body = b"".join(chunks)
    request._body = body
    return body


_LONG_DIGITS = re.compile(rb"\d{19,}")


async def read_json(request: Request) -> Any:
    """The request body as JSON; ``InvalidArgument`` (400) if it is not."""
    body = await read_body(request)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument("body", f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    if _LONG_DIGITS.search(body) is not None:
        # orjson reads an integer outside 64 bits as a float, which would store a different number;
        # the standard parser keeps it exact, so the store's codec refuses it (400) instead.
        value = json.loads(body)
    return value


async def parse_body(request: Request, model: type[M], *, optional: bool = False) -> M:
    """Validate the request body against ``model`` (pydantic, from JSON); errors are 400 with every problem.

    With ``optional``, an empty body means the model's defaults."""
    body = await read_body(request)
    if optional and not body.strip():
        body = b"{}"
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid body"}
        field_name = ".".join(first["loc"]) or "body"
        raise InvalidArgument(field_name, str(first["msg"]), details={"errors": errors[:20]}) from None


def query_number(request: Request, name: str) -> float | None:
    """A positive number from the query string (``None`` if absent); ``InvalidArgument`` otherwise."""
    raw = query_param(request, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(name, f"must be a number, got {raw[:40]!r}") from None
    if not value > 0 or value == float("inf"):
        raise InvalidArgument(name, "must be a positive number")
    return value


def parse_etag(value: str | None, header: str) -> int | str | None:
    """An If-Match / If-None-Match header: ``None`` if absent, ``"*"``, or the version in ``"<version>"``."""
    if value is None:
        return None
    value = value.strip()
    if value == "*":
        return "*"
    m = _ETAG_RE.fullmatch(value)
    if m is None or int(m.group(1)) < 1:
        raise InvalidArgument(header, 'must be "*" or one ETag such as "3"')
    return int(m.group(1))


def item_dict(item: Item) -> dict[str, Any]:
    """An item as JSON."""
    return {
        "namespace": item.namespace,
        "key": item.key,
        "value": item.value,
        "version": item.version,
        "revision": item.revision,
        "created_at": item.created_at,
        "updated_at": item.updated_at,
        "expires_at": item.expires_at,
    }
