"""The API's one error shape ``{error: {code, message, details}}``: exception handlers and OpenAPI entries."""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from stateline.errors import InvalidArgument, RateLimited, StatelineError

__all__ = [
    "ERROR_RESPONSES",
    "ErrorBody",
    "error_response",
    "install_error_handlers",
    "responses",
]

_log = logging.getLogger("stateline.api")

_HTTP_CODES = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``code``, a message for people, structured ``details``."""

    code: str = Field(examples=["invalid_argument"])
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every error the API returns has this shape."""

    error: ErrorDetail


def error_response(exc: StatelineError, headers: dict[str, str] | None = None) -> Response:
    """The HTTP response for a stateline error (429 carries ``Retry-After``).

    Never cached: 404 and 410 are cacheable by default, and a browser kept serving a 410 of the change
    feed to the dashboard's later requests (same URL, other ``Last-Event-ID``), and could serve a
    stale 404 for a document created since."""
    hdrs = {"Cache-Control": "no-store", **(headers or {})}
    if isinstance(exc, RateLimited):
        hdrs["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    body = exc.to_dict()
    try:
        data = orjson.dumps(body)
    except TypeError:  # e.g. an integer from the request outside 64 bits, echoed in the details
        data = orjson.dumps(_json_safe(body))
    return Response(data, exc.status, hdrs, media_type="application/json")


def _json_safe(value: Any) -> Any:
    """``value`` with every integer JSON cannot carry exactly (outside 64 bits) as its decimal string."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if type(value) is int and not -(2**63) <= value < 2**64:
        return str(value)
    return value


def _plain(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> Response:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return Response(orjson.dumps(body, default=str), status, media_type="application/json")


async def _stateline_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StatelineError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    field = ".".join(p for p in first["loc"] if p not in {"body", "query", "path", "header"}) or "request"
    err = InvalidArgument(field, str(first["msg"]), details={"errors": errors[:20]})
    return error_response(err)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    resp = _plain(exc.status_code, code, str(exc.detail))
    if exc.headers:
        resp.headers.update(exc.headers)
    return resp


async def _internal_error(request: Request, exc: Exception) -> Response:
    _log.error(
        "unhandled error",
        exc_info=exc,
        extra={"path": request.url.path, "method": request.method},
    )
    return _plain(500, "internal", "internal error; the request may or may not have been applied")


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the one JSON shape; a 500 says nothing about the cause (it is logged)."""
    app.add_exception_handler(StatelineError, _stateline_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


def _doc(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        out["headers"] = headers
    return out


ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: _doc("Invalid argument: nothing was written"),
    401: _doc("No API key, or an unknown, expired or revoked one"),
    403: _doc("The key lacks the scope for this call"),
    404: _doc("Not found (or not visible to this key's tenant)"),
    409: _doc("Conflict: a check failed (details.failures) or the transition is not allowed"),
    412: _doc("If-Match / If-None-Match did not hold"),
    413: _doc("The request body or a value is over its size limit"),
    429: _doc(
        "Too many requests for this tenant",
        {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}},
    ),
    503: _doc("The store cannot be reached now; retry later"),
}

_COMMON = (400, 401, 403, 404, 413, 429, 503)  # 404: also any path that names no route


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: the common errors plus ``statuses``."""
    return {s: ERROR_RESPONSES[s] for s in sorted({*_COMMON, *statuses})}
