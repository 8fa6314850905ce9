"""The HTTP service: ``create_app(db)`` builds the FastAPI app with auth, limits, audit, metrics and traces."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.staticfiles import StaticFiles

from stateline.api.auditing import ApiAuditor
from stateline.api.auth import KeyStore, Principal
from stateline.api.common import BODY_MODELS
from stateline.api.errors import error_response, install_error_handlers
from stateline.api.hub import ChangeHub
from stateline.api.idempotency import HttpIdempotency, Replay, fingerprint
from stateline.api.instrument import InstrumentedStore
from stateline.clock import Clock
from stateline.database import Database
from stateline.errors import InvalidArgument, PayloadTooLarge, RateLimited, StatelineError
from stateline.observability import Metrics, make_tracer_provider
from stateline.sweeper import Sweeper

__all__ = ["ApiContext", "ApiSettings", "TenantRateLimiter", "create_app"]

_log = logging.getLogger("stateline.api")
_access = logging.getLogger("stateline.api.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UI_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"
_WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_PROPAGATOR = TraceContextTextMapPropagator()
_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"content-length", b"idempotency-key", b"traceparent", b"tracestate"}
)


@dataclass
class ApiSettings:
    """Limits and knobs of the HTTP service.

    ``rate_limit`` is requests per second per tenant (``None``: no limit) with bursts up to
    ``rate_burst``: by default counted in this process (a token bucket in memory, no store call); with
    ``rate_limit_shared`` counted in the store by the runtime layer's token bucket, so every API node and
    worker shares one budget (at the cost of a store commit per request); ``max_body_bytes`` bounds
    every request body (413 beyond);
    ``key_cache_seconds`` is how long a verified key is trusted before it is read again (a revoke made
    by another process takes effect within it); ``idempotency_ttl`` is how long a POST's response is
    kept for replay; ``max_wait`` bounds long polls; ``heartbeat_seconds`` spaces SSE keep-alives.
    ``inline_store`` calls the store on the event loop (default: only for ``memory://``).
    ``sweep_interval`` is how often the service removes expired items from the store while it runs
    (seconds; ``None``: never, for a deployment that sweeps elsewhere); with ``keep_changes`` those
    runs also trim each tenant's change feed to its last ``keep_changes`` records (``None``: keep all)
    and, with ``audit_retention_days``, remove older audit entries (``None``: keep all).
    ``freeze_gc`` takes the objects that exist when the service starts (modules, routes, validators,
    which live as long as the process) out of the cyclic garbage collector's reach until it stops
    (``gc.freeze``): a full collection then walks only what the service made since. Without it each
    full collection walks them all, a pause of ~50 ms every few seconds under write load on a small
    machine. Off: leave the collector alone, for an app sharing its process with code that manages it.
    """

    max_body_bytes: int = 2 * 1024 * 1024
    rate_limit: float | None = 1000.0
    rate_burst: int | None = None
    rate_limit_shared: bool = False
    key_cache_seconds: float = 2.0
    idempotency_ttl: float = 86400.0
    max_wait: float = 30.0
    heartbeat_seconds: float = 15.0
    inline_store: bool | None = None
    ui: bool = True
    sweep_interval: float | None = 60.0
    keep_changes: int | None = None
    audit_retention_days: float | None = None
    freeze_gc: bool = True


class TenantRateLimiter:
    """A token bucket per tenant, in this process: ``rate`` requests per second, bursts up to ``burst``.

    Runs on the event loop only (no locking). With several worker processes each one has its own buckets.
    """

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        if not rate > 0:
            raise InvalidArgument("rate_limit", "must be positive")
        if burst < 1:
            raise InvalidArgument("rate_burst", "must be at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}

    def hit(self, tenant: str) -> float | None:
        """Take one token for ``tenant``; ``None`` if admitted, else seconds until a token is free."""
        now = self.clock.now_us() / 1e6
        b = self._buckets.get(tenant)
        if b is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            b = self._buckets[tenant] = [float(self.burst), now]
        tokens = min(float(self.burst), b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if tokens >= 1.0:
            b[0] = tokens - 1.0
            return None
        b[0] = tokens
        return (1.0 - tokens) / self.rate


class ApiContext:
    """Everything the routes share: the instrumented database, keys, hub, limits, metrics and tracer."""

    def __init__(
        self,
        db: Database,
        settings: ApiSettings,
        registry: CollectorRegistry | None,
        tracer_provider: TracerProvider | None,
    ) -> None:
        self.settings = settings
        self.source = db
        self.metrics = Metrics(registry)
        self._own_tracer_provider = tracer_provider is None
        self.tracer_provider = tracer_provider if tracer_provider is not None else make_tracer_provider()
        self.tracer = None if self.tracer_provider is None else self.tracer_provider.get_tracer("stateline.api")
        self.store = InstrumentedStore(db.store, self.metrics, self.tracer)
        self.db = Database(self.store)
        self.clock = db.store.clock
        self.keys = KeyStore(self.store, cache_seconds=settings.key_cache_seconds)
        self.hub = ChangeHub(self.store)
        self.idempotency = HttpIdempotency(self.store, ttl=settings.idempotency_ttl)
        self.inline = settings.inline_store if settings.inline_store is not None else db.store.scheme == "memory"
        self.auditor = ApiAuditor(self.db, inline=self.inline)
        self.sweeper = (
            None
            if settings.sweep_interval is None
            else Sweeper(
                self.store,
                interval=settings.sweep_interval,
                keep_changes=settings.keep_changes,
                audit_retention_days=settings.audit_retention_days,
                on_swept=self.metrics.swept.inc,
                on_trimmed=self.metrics.trimmed.inc,
            )
        )
        self._froze = False
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        self.limiter = (
            TenantRateLimiter(
                settings.rate_limit,
                settings.rate_burst if settings.rate_burst is not None else max(1, math.ceil(settings.rate_limit)),
                self.clock,
            )
            if settings.rate_limit
            else None
        )

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` inline on the memory store, in the thread pool otherwise."""
        if self.inline:
            return fn(*args)
        return await run_in_threadpool(fn, *args)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one request in the metrics (the labelled series are looked up once, then kept)."""
        counter = self._requests.get((route, method, status))
        if counter is None:
            if len(self._requests) > 10_000:  # routes and methods are bounded; this is only a backstop
                self._requests.clear()
            counter = self._requests[(route, method, status)] = self.metrics.requests.labels(route, method, str(status))
        counter.inc()
        histogram = self._latency.get((route, method))
        if histogram is None:
            if len(self._latency) > 10_000:
                self._latency.clear()
            histogram = self._latency[(route, method)] = self.metrics.latency.labels(route, method)
        histogram.observe(seconds)

    def start(self) -> None:
        """Start background threads and freeze the startup objects (at the app's startup)."""
        if self.sweeper is not None and not self.sweeper.running:
            self.sweeper.start()
        if self.settings.freeze_gc and not self._froze and gc.get_freeze_count() == 0:
            gc.collect()
            gc.freeze()
            self._froze = True

    def close(self) -> None:
        """Stop background threads, export the spans still queued and unfreeze what ``start`` froze
        (the database stays open: its owner closes it)."""
        if self.sweeper is not None:
            self.sweeper.stop()
        self.hub.close()
        if self._own_tracer_provider and self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # exports the spans still queued (a passed-in provider is its owner's)
        if self._froze:
            gc.unfreeze()
            self._froze = False
        self.metrics.process_exit()


def create_app(
    db: Database,
    *,
    settings: ApiSettings | None = None,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The stateline HTTP service over ``db``.

    ``registry`` receives the Prometheus metrics (a fresh one by default, so several apps can live in
    one process); ``tracer_provider`` records spans around requests and store calls (by default one of
    its own when OTLP is configured in the environment; without one, trace ids are still propagated
    to logs, commit meta and audit entries, but no spans are recorded). The app does not close ``db``.
    """
    from stateline.api import (  # noqa: PLC0415  # route modules import this module's names
        routes_audit,
        routes_cases,
        routes_changes,
        routes_docs,
        routes_gates,
        routes_keys,
        routes_locks,
        routes_ops,
        routes_policies,
        routes_projects,
        routes_runs,
        routes_runtime,
        routes_store,
        routes_streams,
    )

    ctx = ApiContext(db, settings or ApiSettings(), registry, tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.start()
        try:
            yield
        finally:
            await run_in_threadpool(ctx.close)

    app = StatelineApp(
        title="stateline",
        version=_version(),
        summary="Durable, multi-tenant state over HTTP.",
        description=(
            "Every `/v1` route needs an API key (`Authorization: Bearer sl_...` or `X-API-Key`). "
            "The key decides the tenant. Errors share one shape: `{error: {code, message, details}}`."
        ),
        lifespan=lifespan,
    )
    app.state.stateline = ctx
    install_error_handlers(app)
    for module in (
        routes_ops,
        routes_keys,
        routes_store,
        routes_changes,
        routes_docs,
        routes_streams,
        routes_cases,
        routes_runs,
        routes_runtime,
        routes_locks,
        routes_audit,
        routes_gates,
        routes_policies,
        routes_projects,
    ):
        app.router.routes.extend(module.router.routes)  # flat: the fast lane below needs the routes in order
    front = _fast_lane(app, {**routes_docs.FAST, **routes_store.FAST, **routes_cases.FAST})
    if ctx.settings.ui and UI_DIR.is_dir():
        app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.add_middleware(ServiceMiddleware, ctx=ctx)
    app.front_routes = front
    app.front_door = ServiceMiddleware(_call_endpoint, ctx)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


#: Fast routes that no earlier route can also match (same method and path), so they may be tried first.
#: (``docs.get`` is not one: ``GET /v1/docs/transactions/{tx_id}`` comes before it.)
_FRONT = frozenset({"docs.put", "items.get", "items.put", "store.transaction", "cases.commit"})


def _fast_lane(app: FastAPI, endpoints: dict[str, Callable[[Request], Awaitable[Response]]]) -> list[_FastRoute]:
    """Serve the hottest routes as plain Starlette routes beside their documented FastAPI twins. The twin
    stays for OpenAPI and calls the same function; the plain route skips FastAPI's per-request parameter
    and dependency machinery. Routes in ``_FRONT`` go first (fewer patterns tried per request) and are
    returned: ``StatelineApp`` serves them through its front door; the others go right before their
    twin, so that matching order is unchanged."""
    routes = app.router.routes
    front: list[_FastRoute] = []
    for i in range(len(routes) - 1, -1, -1):
        route = routes[i]
        if isinstance(route, APIRoute) and route.name in endpoints:
            fast = _FastRoute(route.path, endpoints[route.name], methods=sorted(route.methods or ()), name=route.name)
            if route.name in _FRONT:
                front.append(fast)
            else:
                routes.insert(i, fast)
    front.sort(key=lambda r: _FRONT_ORDER.index(r.name))
    routes[:0] = front
    return front


#: the order in which the front door tries its routes (the commonest first)
_FRONT_ORDER = ("docs.put", "cases.commit", "store.transaction", "items.put", "items.get")


class _FastRoute(Route):
    """A plain route that, like FastAPI's, names itself in the scope (metrics and audit read it)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child

    def enter(self, scope: Scope, method: str, path: str) -> bool:
        """Whether ``method`` and ``path`` (the scope's, without a root path) fully match this route; if
        so, put what ``matches`` returns in ``scope``: the endpoint, path parameters and the route."""
        methods = self.methods
        if methods is not None and method not in methods:
            return False
        found = self.path_regex.match(path)
        if found is None:
            return False
        convertors = self.param_convertors
        params = {name: convertors[name].convert(value) for name, value in found.groupdict().items()}
        if "path_params" in scope:
            params = {**scope["path_params"], **params}
        scope["endpoint"] = self.endpoint
        scope["path_params"] = params
        scope["route"] = self
        return True


async def _call_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Call the endpoint of the fast route the front door matched (no FastAPI machinery around it). A
    stateline error becomes its response here, as the app's exception handlers would make it, so that
    ``Idempotency-Key`` stores it like any other answer."""
    try:
        response = await scope["endpoint"](Request(scope, receive, send))
    except StatelineError as exc:
        response = error_response(exc)
    await response(scope, receive, send)


class StatelineApp(FastAPI):
    """The FastAPI app with a front door: requests for the hottest routes (``_FRONT``: document PUT, case
    commit, the raw transaction, item GET/PUT) skip FastAPI's middleware stack and router, and go
    straight through the one ``ServiceMiddleware`` pass (auth, limits, idempotency, audit, metrics,
    span, errors) to their endpoint. Everything else takes the usual path, with the same middleware."""

    front_routes: list[_FastRoute]
    front_door: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        door = self.front_door
        if door is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if scope.get("root_path"):  # rare: the router's own matching strips the root path
                for route in self.front_routes:
                    match, child = route.matches(scope)
                    if match is Match.FULL:
                        scope.update(child)
                        scope["app"] = self
                        await door(scope, receive, send)
                        return
            else:
                method: str = scope["method"]
                path: str = scope["path"]
                for route in self.front_routes:
                    if route.enter(scope, method, path):
                        scope["app"] = self
                        await door(scope, receive, send)
                        return
        await super().__call__(scope, receive, send)


def _version() -> str:
    import stateline  # noqa: PLC0415

    return stateline.__version__


def _not_null(schema: dict[str, Any]) -> None:
    """An optional parameter (``str | None``) is documented by FastAPI as string-or-null; a query string or
    header cannot carry a null, only be absent, so the null branch goes."""
    branches = schema.get("anyOf")
    if branches is not None and {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        del schema["anyOf"]
        if len(rest) == 1:
            schema.update(rest[0])
        else:
            schema["anyOf"] = rest


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key `sl_<id>_<secret>`; `X-API-Key: <key>` works too.",
    }
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            # Request validation errors are 400 in the one error shape, never 422.
            op.get("responses", {}).pop("422", None)
            for param in op.get("parameters", []):
                _not_null(param["schema"])
            if path.startswith("/v1/"):
                op["security"] = [{"apiKey": []}]
        post = ops.get("post")
        if post is not None and path.startswith("/v1/"):
            post.setdefault("parameters", []).append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "A repeat with the same key and request returns the stored response",
                    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                }
            )
            post["responses"].setdefault(
                "409",
                {
                    "description": "Conflict, or the Idempotency-Key was used with another request or is in progress",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                },
            )
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    # the request bodies that routes read themselves (common.body_doc), as pydantic validates them
    _, defs = models_json_schema(
        [(m, "validation") for m in BODY_MODELS.values()], ref_template="#/components/schemas/{model}"
    )
    for name, body_schema in defs.get("$defs", {}).items():
        if schemas.setdefault(name, body_schema) != body_schema:
            raise RuntimeError(f"OpenAPI: two schemas named {name}: a request body and a response differ")
    app.openapi_schema = schema
    return schema


# ---------------------------------------------------------------- middleware


class ServiceMiddleware:
    """One pass around every request: trace span, body limit, authentication, per-tenant rate limit,
    Idempotency-Key, audit of writes, metrics, access log and a 500 that never leaks internals."""

    def __init__(self, app: ASGIApp, ctx: ApiContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = self.ctx
        started = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        hdrs: dict[bytes, bytes] = {k: v for k, v in scope["headers"] if k in _HEADERS}
        parent = None
        if b"traceparent" in hdrs:
            parent = _PROPAGATOR.extract(
                {k.decode(): v.decode("latin-1") for k, v in hdrs.items() if k.startswith(b"trace")}
            )
        span, trace_id = _server_span(ctx.tracer, method, path, parent)
        recording = span.is_recording()
        attached = otel_context.attach(trace.set_span_in_context(span))
        # [status, response started]
        state: list[Any] = [500, False]
        principal: Principal | None = None

        async def send_plain(message: Message) -> None:
            if message["type"] == "http.response.start":
                state[0] = message["status"]
                state[1] = True
            await send(message)

        try:
            if not path.startswith("/v1/"):
                await self.app(scope, receive, send_plain)
                return
            limit = ctx.settings.max_body_bytes
            length = hdrs.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes", details={"limit": limit})
            token = _token(hdrs)
            keys = ctx.keys
            if ctx.inline or keys.is_cached(token):
                principal = keys.authenticate(token)
            else:
                principal = await run_in_threadpool(keys.authenticate, token)
            scope_state = scope.get("state")
            if scope_state is None:
                scope["state"] = {"principal": principal, "trace_id": trace_id}
            else:
                scope_state["principal"] = principal
                scope_state["trace_id"] = trace_id
            if recording:
                span.set_attribute("stateline.tenant", principal.tenant)
                span.set_attribute("stateline.key_id", principal.key_id)
            if ctx.limiter is not None:
                wait = await self._rate_limit(principal.tenant)
                if wait is not None:
                    ctx.metrics.rate_limited.inc()
                    raise RateLimited(
                        f"tenant {principal.tenant!r} is over {ctx.settings.rate_limit:g} requests per second",
                        retry_after=wait,
                    )
            if length is None:
                # no Content-Length (a chunked upload): count the body as it comes; with one, the
                # server's HTTP framing already stops the body at the declared length, checked above
                receive = _limited(receive, limit)
            idem = hdrs.get(b"idempotency-key")
            if method == "POST" and idem is not None:
                await self._idempotent(scope, receive, send_plain, principal, idem.decode("latin-1"), state)
            elif method in _WRITE_METHODS:
                await self.app(scope, receive, self._audited(scope, send, principal, state))
            else:
                await self.app(scope, receive, send_plain)
        except StatelineError as exc:
            if state[1]:
                raise
            await error_response(exc)(scope, receive, send_plain)
        except ClientDisconnect:
            # the client went away before its request was whole: nothing was done and nobody is left
            # to answer; counted as 499 (the client closed the request), not as a server error
            state[0] = 499
        except Exception as exc:  # noqa: BLE001  # the one place that turns any failure into a bare 500
            _log.error("unhandled error", exc_info=exc, extra={"path": path, "method": method})
            span.record_exception(exc)
            if not state[1]:
                body = {"error": {"code": "internal", "message": "internal error", "details": {}}}
                await Response(orjson.dumps(body), 500, media_type="application/json")(scope, receive, send_plain)
        finally:
            elapsed = time.perf_counter() - started
            status: int = state[0]
            route = scope.get("route")
            template = getattr(route, "path", None) or ("/ui" if path.startswith("/ui") else "unmatched")
            if recording:
                span.update_name(f"{method} {template}")
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
            span.end()
            otel_context.detach(attached)
            ctx.observe_request(template, method, status, elapsed)
            if _access.isEnabledFor(logging.INFO):
                _access.info(
                    "request",
                    extra={
                        "method": method,
                        "path": path,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "tenant": principal.tenant if principal else None,
                        "key_id": principal.key_id if principal else None,
                        "trace_id": trace_id,
                    },
                )

    async def _rate_limit(self, tenant: str) -> float | None:
        """Seconds to wait if ``tenant`` is over its request rate, else ``None``."""
        ctx = self.ctx
        if not ctx.settings.rate_limit_shared:
            assert ctx.limiter is not None
            return ctx.limiter.hit(tenant)
        rate = ctx.settings.rate_limit or 1.0
        burst = ctx.settings.rate_burst or max(1, math.ceil(rate))
        limiter = ctx.db.tenant(tenant).limits("api_requests", burst, burst / rate, "token_bucket")
        result = await ctx.run(limiter.hit, "requests")
        return None if result.allowed else max(result.retry_after, 0.001)

    def _audited(self, scope: Scope, send: Send, principal: Principal, state: list[Any]) -> Send:
        """A ``send`` that writes the audit entry of a successful write before the response completes.

        The start of a successful response is held until the entry is committed and then sent together
        with the body (one burst of writes, as an unaudited response goes out); a streamed body sends
        the start with its first chunk and is audited before its last. ``state`` (status, response
        started) is kept as the service's plain ``send`` keeps it: set when the start goes out."""
        ctx = self.ctx
        held: list[Message] = []
        status = [500]

        async def audited_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                code = status[0] = message["status"]
                if code < 400:
                    held.append(message)
                    return
                state[0] = code
                state[1] = True
            elif kind == "http.response.body":
                if status[0] < 400 and not message.get("more_body"):
                    action, resource_type, resource_id = _audit_target(scope)
                    client = scope.get("client")
                    try:
                        await ctx.auditor.submit_fields(
                            principal.tenant,
                            principal.key_id,
                            action,
                            resource_type,
                            resource_id,
                            scope["method"],
                            scope["path"],
                            status[0],
                            client[0] if client else None,
                            scope["state"].get("trace_id"),
                        )
                    except Exception as exc:  # noqa: BLE001  # the write is committed: report, don't hide it
                        ctx.metrics.store_errors.labels("audit", "audit_failed").inc()
                        _log.error("audit write failed", exc_info=exc, extra={"audit_action": action})
                if held:
                    start = held.pop()
                    state[0] = start["status"]
                    state[1] = True
                    await send(start)
            await send(message)

        return audited_send

    async def _idempotent(
        self, scope: Scope, receive: Receive, send: Send, principal: Principal, key: str, state: list[Any]
    ) -> None:
        ctx = self.ctx
        HttpIdempotency.check_key(key)
        body, receive = await _buffer_body(receive)
        fp = fingerprint(scope["method"], scope["path"], scope.get("query_string", b""), body)
        tenant = principal.tenant
        claim = await ctx.run(ctx.idempotency.begin, tenant, key, fp)
        if isinstance(claim, Replay):
            headers = [(k.encode(), v.encode()) for k, v in claim.headers]
            headers.append((b"idempotent-replayed", b"true"))
            headers.append((b"content-length", str(len(claim.body)).encode()))
            await send({"type": "http.response.start", "status": claim.status, "headers": headers})
            await send({"type": "http.response.body", "body": claim.body})
            return
        captured_status = [500]
        captured_headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []
        inner_send = self._audited(scope, send, principal, state)

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured_status[0] = message["status"]
                captured_headers.extend((k.decode().lower(), v.decode("latin-1")) for k, v in message["headers"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    # Store the response before the client sees it complete.
                    if captured_status[0] < 500:
                        await ctx.run(
                            ctx.idempotency.finish,
                            tenant,
                            key,
                            claim,
                            fp,
                            captured_status[0],
                            captured_headers,
                            b"".join(chunks),
                        )
                    else:
                        await ctx.run(ctx.idempotency.abandon, tenant, key, claim)
            await inner_send(message)

        try:
            await self.app(scope, receive, capture)
        except BaseException:
            with contextlib.suppress(Exception):
                await ctx.run(ctx.idempotency.abandon, tenant, key, claim)
            raise


_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)


def _server_span(
    tracer: Tracer | None, method: str, path: str, parent: otel_context.Context | None
) -> tuple[trace.Span, str | None]:
    """The request's span and its trace id in hex: a recorded span when spans are exported, else a
    non-recording span that still carries a trace id (the caller's from ``traceparent``, or a new one)
    for logs and audit."""
    if tracer is not None:
        span = tracer.start_span(f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER)
        span_ctx = span.get_span_context()
        return span, format(span_ctx.trace_id, "032x") if span_ctx.is_valid else None
    incoming = trace.get_current_span(parent).get_span_context() if parent is not None else None
    trace_id = incoming.trace_id if incoming is not None and incoming.is_valid else random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, False, _SAMPLED)), format(trace_id, "032x")


_ROUTE_INFO: dict[tuple[str, str, str], tuple[str, str]] = {}


def _audit_target(scope: Scope) -> tuple[str, str, str]:
    """The audit entry's action, resource type and resource id for the request in ``scope``."""
    route = scope.get("route")
    method: str = scope["method"]
    template: str = getattr(route, "path", "") or scope["path"]
    route_name: str = getattr(route, "name", "")
    info = _ROUTE_INFO.get((template, route_name, method))
    if info is None:
        parts = [p for p in template.split("/") if p and p != "v1"]
        info = (route_name or f"{method} {template}", parts[0] if parts else "api")
        if len(_ROUTE_INFO) < 10_000:  # routes are few; unmatched paths do not fill it
            _ROUTE_INFO[(template, route_name, method)] = info
    params = scope.get("path_params")
    resource_id = "/".join(map(str, params.values())) if params else ""
    # the audit log's limit: a longer id is cut, not a failed entry
    return info[0], info[1], resource_id[:1024]


def _token(hdrs: dict[bytes, bytes]) -> str | None:
    """The API key a request presents (``Authorization: Bearer`` or ``X-API-Key``), or ``None``."""
    raw = hdrs.get(b"authorization")
    if raw is not None:
        scheme, _, value = raw.decode("latin-1").strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    key = hdrs.get(b"x-api-key")
    return None if key is None else key.decode("latin-1").strip()


def _limited(receive: Receive, limit: int) -> Receive:
    """A ``receive`` that refuses a body growing over ``limit`` bytes (chunked uploads included)."""
    seen = [0]

    async def limited() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > limit:
                raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes", details={"limit": limit})
        return message

    return limited


async def _buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body; return it and a ``receive`` that replays it, then passes through."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(parts)
    replayed = [False]

    async def replay() -> Message:
        if not replayed[0]:
            replayed[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
