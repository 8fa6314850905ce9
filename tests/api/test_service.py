"""Service behaviour: Idempotency-Key replay, 413, 429 + Retry-After, 500 without internals, change feed
(long poll and SSE), health, readiness, metrics, traces and the OpenAPI document."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import stateline
from stateline import FakeClock
from stateline.api import ApiSettings, create_app, routes_changes
from stateline.api.idempotency import HttpIdempotency
from stateline.errors import Conflict, Unavailable
from tests.conftest import Backend

from .conftest import Api, make_api

INCR = {"ops": [{"op": "incr", "namespace": "n", "key": "c"}]}


def _counter(api: Api, h: dict[str, str]) -> int:
    r = api.client.get("/v1/items/n/c", headers=h)
    return 0 if r.status_code == 404 else int(r.json()["value"])


def test_idempotency_key_replays_the_stored_response(mem_api: Api) -> None:
    h = mem_api.key("acme")
    first = mem_api.client.post("/v1/transaction", json=INCR, headers={**h, "Idempotency-Key": "pay-1"})
    again = mem_api.client.post("/v1/transaction", json=INCR, headers={**h, "Idempotency-Key": "pay-1"})
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert _counter(mem_api, h) == 1
    # Same key, different request: refused, nothing runs.
    other = mem_api.client.post(
        "/v1/transaction",
        json={"ops": [{"op": "incr", "namespace": "n", "key": "c", "by": 9}]},
        headers={**h, "Idempotency-Key": "pay-1"},
    )
    assert other.status_code == 409
    assert other.json()["error"]["details"]["reason"] == "idempotency_key_reused"
    # Another tenant's identical key is its own.
    g = mem_api.key("globex")
    assert (
        "idempotent-replayed"
        not in mem_api.client.post("/v1/transaction", json=INCR, headers={**g, "Idempotency-Key": "pay-1"}).headers
    )
    # A 4xx answer is stored too; the replay does not run the request again.
    conflict = {"checks": [{"check": "absent", "namespace": "n", "key": "c"}], **INCR}
    r1 = mem_api.client.post("/v1/transaction", json=conflict, headers={**h, "Idempotency-Key": "c-1"})
    r2 = mem_api.client.post("/v1/transaction", json=conflict, headers={**h, "Idempotency-Key": "c-1"})
    assert r1.status_code == r2.status_code == 409
    assert r2.headers["idempotent-replayed"] == "true"
    assert (
        mem_api.client.post("/v1/transaction", json=INCR, headers={**h, "Idempotency-Key": "bad key"}).status_code
        == 400
    )


def test_idempotency_expires_after_its_ttl(mem_api: Api) -> None:
    h = mem_api.key("acme", expires_in=10 * 86400)
    mem_api.client.post("/v1/transaction", json=INCR, headers={**h, "Idempotency-Key": "k"})
    mem_api.clock.advance(86400 + 1)
    r = mem_api.client.post("/v1/transaction", json=INCR, headers={**h, "Idempotency-Key": "k"})
    assert "idempotent-replayed" not in r.headers
    assert _counter(mem_api, h) == 2


def test_a_server_error_frees_the_key_and_leaks_nothing(mem_api: Api) -> None:
    calls = []

    async def boom() -> None:
        calls.append(1)
        raise RuntimeError("secret internals /etc/passwd")

    mem_api.app.router.add_api_route("/v1/boom", boom, methods=["POST"])
    h = mem_api.key("acme")
    for _ in range(2):
        r = mem_api.client.post("/v1/boom", json={}, headers={**h, "Idempotency-Key": "b"})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal", "message": "internal error", "details": {}}}
        assert "secret" not in r.text
        assert "Traceback" not in r.text
    assert len(calls) == 2  # the failed first attempt did not pin the key


def test_one_concurrent_claim_wins(clock: FakeClock) -> None:
    with stateline.open("memory://", clock=clock) as db:
        idem = HttpIdempotency(db.store)
        results: list[object] = []
        barrier = threading.Barrier(8)

        def worker() -> None:
            barrier.wait()
            try:
                results.append(idem.begin("acme", "k", "fp"))
            except Conflict as exc:
                results.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(isinstance(r, int) for r in results) == 1
        assert all(isinstance(r, Conflict) for r in results if not isinstance(r, int))


@pytest.fixture
def small_api(clock: FakeClock) -> Iterator[Api]:
    with stateline.open("memory://", clock=clock) as db:
        yield from make_api(db, clock, max_body_bytes=1000, rate_limit=3, rate_burst=3)


def test_body_over_the_limit_is_413(small_api: Api) -> None:
    h = small_api.key("acme")
    r = small_api.client.put("/v1/items/docs/a", json="x" * 2000, headers=h)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'"'
        for _ in range(30):
            yield b"x" * 100
        yield b'"'

    r = small_api.client.put("/v1/items/docs/b", content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert small_api.client.get("/v1/items/docs/b", headers=h).status_code == 404


def test_rate_limit_is_429_with_retry_after_per_tenant(small_api: Api) -> None:
    h = small_api.key("acme")
    codes = [small_api.client.get("/v1/items/docs/a", headers=h).status_code for _ in range(4)]
    assert codes == [404, 404, 404, 429]
    r = small_api.client.get("/v1/items/docs/a", headers=h)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limited"
    assert small_api.client.get("/v1/items/docs/a", headers=small_api.key("globex")).status_code == 404
    small_api.clock.advance(1)
    assert small_api.client.get("/v1/items/docs/a", headers=h).status_code == 404
    assert small_api.client.get("/healthz").status_code == 200  # operations routes are not limited


def test_changes_long_poll_filters_and_resumes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    c.put("/v1/items/docs/a", json=1, headers=h)
    c.put("/v1/items/other/b", json=2, headers=h)
    c.post(
        "/v1/transaction",
        json={"ops": [{"op": "append", "stream": "runs:r1:steps", "events": [{"type": "x"}]}]},
        headers=h,
    )
    page = c.get("/v1/changes", params={"after": 0}, headers=h).json()
    revisions = [ch["revision"] for ch in page["changes"]]
    assert revisions == list(range(1, len(revisions) + 1))  # in order, no gaps (API writes and their audit)
    assert page["next"] == revisions[-1]
    touched = [(o.get("namespace") or o.get("stream")) for ch in page["changes"] for o in ch["ops"]]
    assert [t for t in touched if not t.startswith("audit")] == ["docs", "other", "runs:r1:steps"]
    other = c.get("/v1/changes", params={"after": 0, "namespace": "other"}, headers=h).json()
    assert [o["key"] for ch in other["changes"] for o in ch["ops"]] == ["b"]
    assert other["next"] == revisions[-1]  # the cursor moved past what the filter skipped
    run = c.get("/v1/changes", params={"after": 0, "run": "r1"}, headers=h).json()
    assert [ch["ops"][0]["stream"] for ch in run["changes"]] == ["runs:r1:steps"]
    one = c.get("/v1/changes", params={"after": 1, "limit": 1}, headers=h).json()
    assert ([ch["revision"] for ch in one["changes"]], one["next"]) == ([2], 2)
    end = revisions[-1]
    assert c.get("/v1/changes", params={"after": end, "wait": 0}, headers=h).json() == {"changes": [], "next": end}


def test_long_poll_wakes_on_a_commit(api: Api) -> None:
    h = api.key("acme")
    registry = api.ctx.metrics.registry

    def writer() -> None:
        # Commit only once the poll is waiting (the gauge counts waiting polls).
        for _ in range(2000):
            if (registry.get_sample_value("stateline_watchers") or 0) >= 1:
                break
            time.sleep(0.005)
        api.ctx.source.tenant("acme").commit(ops=[stateline.Put("docs", "late", 1)])

    t = threading.Thread(target=writer)
    t.start()
    r = api.client.get("/v1/changes", params={"after": 0, "wait": 20}, headers=h)
    t.join()
    assert r.status_code == 200
    assert r.json()["changes"][0]["ops"][0]["key"] == "late"


def _sse(text: str) -> list[dict[str, str]]:
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" in fields:
            events.append(fields)
    return events


def test_sse_watch_sends_changes_in_order_and_resumes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    for i in range(3):
        c.put(f"/v1/items/docs/k{i}", json=i, headers=h)
    r = c.get("/v1/watch", params={"after": 0, "limit": 2, "namespace": "docs"}, headers=h)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert [orjson.loads(e["data"])["ops"][0]["key"] for e in events] == ["k0", "k1"]
    assert int(events[0]["id"]) < int(events[1]["id"])
    r = c.get("/v1/watch", params={"limit": 1, "namespace": "docs"}, headers={**h, "Last-Event-ID": events[-1]["id"]})
    assert [orjson.loads(e["data"])["ops"][0]["key"] for e in _sse(r.text)] == ["k2"]
    everything = _sse(c.get("/v1/watch", params={"after": 0, "limit": 6}, headers=h).text)
    assert [int(e["id"]) for e in everything] == [1, 2, 3, 4, 5, 6]
    for bad in ("x", "-1", "99999999999999999999"):  # the last is past 64 bits: refused before the stream starts
        assert c.get("/v1/watch", headers={**h, "Last-Event-ID": bad}).status_code == 400


def test_health_readiness_and_metrics(clock: FakeClock) -> None:
    db = stateline.open("memory://", clock=clock)
    for api in make_api(db, clock):
        h = api.key("acme")
        assert api.client.get("/healthz").json() == {"status": "ok"}
        assert api.client.get("/readyz").json() == {"status": "ready"}
        api.client.put("/v1/items/docs/a", json=1, headers=h)
        api.client.put("/v1/items/docs/a", json=1, headers={**h, "If-None-Match": "*"})
        text = api.client.get("/metrics").text
        assert (
            'stateline_http_requests_total{method="PUT",route="/v1/items/{namespace}/{key:path}",status="412"} 1.0'
            in text
        )
        assert "stateline_http_request_duration_seconds_bucket" in text
        assert "stateline_commits_total" in text
        assert "stateline_conflicts_total 1.0" in text
        db.close()
        r = api.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "unavailable"
        assert api.client.get("/healthz").status_code == 200


def test_incoming_trace_context_reaches_the_commit_meta(mem_api: Api) -> None:
    h = mem_api.key("acme")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    mem_api.client.put("/v1/items/docs/a", json=1, headers={**h, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    change = mem_api.client.get("/v1/changes", headers=h).json()["changes"][0]
    assert change["meta"]["trace_id"] == trace_id


def test_openapi_documents_auth_and_one_error_shape(mem_api: Api) -> None:
    doc = mem_api.client.get("/openapi.json").json()
    assert "apiKey" in doc["components"]["securitySchemes"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"], path
            if path.startswith("/v1/"):
                assert op["security"] == [{"apiKey": []}]
                assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert any(p["name"] == "Idempotency-Key" for p in doc["paths"]["/v1/transaction"]["post"]["parameters"])


def test_two_apps_in_one_process_keep_their_own_metrics(clock: FakeClock) -> None:
    apps: list[FastAPI] = []
    with stateline.open("memory://", clock=clock) as db:
        for api in make_api(db, clock):
            apps.append(api.app)
            for api2 in make_api(db, clock):
                api2.client.get("/healthz")
                assert 'route="/healthz"' in api2.client.get("/metrics").text
                assert 'route="/healthz"' not in api.client.get("/metrics").text
    assert apps


def test_spans_around_requests_and_store_calls_when_a_provider_records(clock: FakeClock) -> None:

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with stateline.open("memory://", clock=clock) as db:
        app = create_app(db, settings=ApiSettings(rate_limit=None), tracer_provider=provider)
        token, _ = app.state.stateline.keys.create("acme", ["read", "write"])
        with TestClient(app) as client:
            exporter.clear()
            r = client.put("/v1/items/docs/a", json=1, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 201
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server = spans["PUT /v1/items/{namespace}/{key:path}"]
    commit = spans["store.commit"]
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 201
    assert server.attributes["stateline.tenant"] == "acme"
    assert commit.context is not None
    assert server.context is not None
    assert commit.context.trace_id == server.context.trace_id
    assert commit.parent is not None
    assert commit.parent.span_id == server.context.span_id


def test_shared_rate_limit_is_counted_in_the_store(backend: Backend, clock: FakeClock) -> None:
    # Two apps (two API nodes) on one store share one budget per tenant.
    nodes = [
        make_api(stateline.Database(backend.open()), clock, rate_limit=2, rate_burst=2, rate_limit_shared=True)
        for _ in range(2)
    ]
    try:
        one, two = next(nodes[0]), next(nodes[1])
        h = one.key("acme")
        codes = [c.get("/v1/items/docs/a", headers=h).status_code for c in (one.client, two.client)]
        assert codes == [404, 404]
        refused = one.client.get("/v1/items/docs/a", headers=h)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert two.client.get("/v1/items/docs/a", headers=h).status_code == 429
        assert two.client.get("/v1/items/docs/a", headers=two.key("globex")).status_code == 404
        clock.advance(2)
        assert two.client.get("/v1/items/docs/a", headers=h).status_code == 404
    finally:
        for gen in nodes:
            gen.close()


# ---------------------------------------------------------------- audit of concurrent writes


def _scope(method: str, path: str, token: str, length: int, *extra: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ASGI scope of a request with ``token`` and a body of ``length`` bytes."""
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"content-length", str(length).encode()), *extra]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }


async def _asgi(app: FastAPI, method: str, path: str, body: bytes, token: str, on_body: Any = None) -> int:
    """One request straight into the ASGI app; ``on_body()`` runs when the response body is sent."""
    scope = _scope(method, path, token, len(body))
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status = [0]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif not message.get("more_body") and on_body is not None:
            on_body()

    await app(scope, receive, send)
    return status[0]


def test_concurrent_writes_share_audit_commits_and_each_is_audited_before_its_response(
    db: stateline.Database, clock: FakeClock
) -> None:
    app = create_app(db, settings=ApiSettings(rate_limit=None))
    ctx = app.state.stateline
    token, _ = ctx.keys.create("acme", ["read", "write"])
    flushes: list[int] = []
    append = ctx.auditor.append

    def counting(log: Any, bodies: list[Any]) -> object:
        flushes.append(len(bodies))
        return append(log, bodies)

    ctx.auditor.append = counting
    audit = db.tenant("acme").audit
    seen_at_response: dict[str, bool] = {}

    def checker(key: str) -> Any:
        def check() -> None:  # the entry is committed when the response completes
            seen_at_response[key] = bool(audit.query(resource_id=key, limit=1).entries)

        return check

    async def run() -> list[int]:
        return await asyncio.gather(
            *(_asgi(app, "PUT", f"/v1/docs/k{i}", b'{"i": 1}', token, checker(f"k{i}")) for i in range(20)),
            *(_asgi(app, "POST", f"/v1/cases/k{i}/commit", b"{}", token) for i in range(3)),  # 4xx: not audited
        )

    statuses = asyncio.run(run())
    ctx.close()
    assert statuses == [201] * 20 + [400] * 3
    assert seen_at_response == {f"k{i}": True for i in range(20)}
    assert sum(flushes) == 20
    assert len(flushes) < 20  # entries of concurrent requests went in together
    v = audit.verify()
    assert v.ok, v
    assert v.checked == 20
    assert sorted(e.resource_id or "" for e in audit.query(limit=100).entries) == sorted(f"k{i}" for i in range(20))


@pytest.mark.parametrize(
    ("method", "path", "whole", "route", "idempotency_key"),
    [
        ("PUT", "/v1/docs/cut", b'{"the": "whole document", "n": 12345}', "/v1/docs/{key:path}", None),
        ("PUT", "/v1/sessions/cut", b'{"provider": "node-1", "ttl": 60}', "/v1/sessions/{session_id}", None),
        ("POST", "/v1/cases", b'{"case_id": "cut", "ctx": {"customer": "c-9"}}', None, b"req-1"),
    ],
)
def test_a_client_gone_before_its_body_is_whole_changes_nothing_and_is_no_server_error(
    mem_api: Api,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    whole: bytes,
    route: str | None,
    idempotency_key: bytes | None,
) -> None:
    token = mem_api.key("acme")["Authorization"].removeprefix("Bearer ")
    extra = [] if idempotency_key is None else [(b"idempotency-key", idempotency_key)]
    scope = _scope(method, path, token, len(whole), *extra)
    incoming = [{"type": "http.request", "body": whole[:20], "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.ERROR, logger="stateline"):
        asyncio.run(mem_api.app(scope, receive, send))
    assert sent == []  # nobody to answer
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    text = mem_api.client.get("/metrics").text
    # counted as the client closing the request (under its route once routing has seen it: an
    # idempotent POST reads its body first)
    counted = f'stateline_http_requests_total{{method="{method}",route="{route or "unmatched"}",status="499"}}'
    assert f"{counted} 1.0" in text
    assert 'status="500"' not in text
    assert list(mem_api.db.tenant("acme").changes(after_revision=0)) == []  # nothing written
    # the idempotency key was not left in progress: the whole request goes through
    h = {**mem_api.key("acme"), **({"Idempotency-Key": idempotency_key.decode()} if idempotency_key else {})}
    again = mem_api.client.request(method, path, content=whole, headers=h)
    assert again.status_code in (200, 201), again.text


def test_a_failed_audit_append_is_counted_and_logged_and_the_write_still_answers(
    mem_api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    h = mem_api.key("acme")

    def broken(log: Any, bodies: list[Any]) -> object:
        raise Unavailable("the audit log is down")

    mem_api.ctx.auditor.append = broken
    with caplog.at_level(logging.ERROR, logger="stateline.api"):
        r = mem_api.client.put("/v1/docs/a", json=1, headers=h)  # the front door
        r2 = mem_api.client.post("/v1/locks/l/acquire", json={}, headers=h)  # a FastAPI route
    assert (r.status_code, r2.status_code) == (201, 200)
    assert [rec.getMessage() for rec in caplog.records].count("audit write failed") == 2
    text = mem_api.client.get("/metrics").text
    assert 'stateline_store_errors_total{call="audit",code="audit_failed"} 2.0' in text
    assert mem_api.client.get("/v1/docs/a", headers=h).json()["value"] == 1  # the write itself is there


def test_the_front_door_answers_as_the_documented_routes_do(clock: FakeClock) -> None:
    # Document PUT, case commit, the raw transaction and item GET/PUT skip FastAPI's stack: same errors,
    # metrics and audit as every other route.
    with stateline.open("memory://", clock=clock, max_value_bytes=1000) as db:
        for api in make_api(db, clock):
            c, h = api.client, api.key("acme")
            big = c.put("/v1/docs/big", json="x" * 1200, headers=h)
            assert big.status_code == 413
            assert big.json()["error"]["details"]["field"] == "value"
            bad = c.put("/v1/docs/bad", content=b"{", headers={**h, "Content-Type": "application/json"})
            assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_argument")
            assert c.put("/v1/docs/a", json=1, headers=h).status_code == 201
            stale = c.put("/v1/docs/a", json=2, headers={**h, "If-Match": '"7"'})
            assert (stale.status_code, stale.json()["error"]["code"]) == (412, "precondition_failed")
            assert (
                c.post(
                    "/v1/cases/nope/commit", json={"mutations": [{"type": "increment_step_count"}]}, headers=h
                ).status_code
                == 404
            )
            assert c.put("/v1/docs/a", json=1).status_code == 401
            assert c.put("/v1/docs/a", json=1, headers=api.key("acme", ["read"])).status_code == 403
            text = c.get("/metrics").text
            assert 'stateline_http_requests_total{method="PUT",route="/v1/docs/{key:path}",status="412"} 1.0' in text
            entries = c.get("/v1/audit", params={"order": "oldest"}, headers=h).json()["entries"]
            assert [(e["action"], e["resource_id"], e["details"]["status"]) for e in entries] == [
                ("docs.put", "a", 201)
            ]


def test_audit_bodies_from_fields_match_those_of_entries_and_keep_a_non_ip_client(db: stateline.Database) -> None:
    from stateline.api.auditing import ApiAuditor, AuditEntry  # noqa: PLC0415

    auditor = ApiAuditor(db)
    log = db.tenant("acme").audit
    fields = ("k1", "docs.put", "docs", "a", "PUT", "/v1/docs/a", 201)
    for client in ("127.0.0.1", "/run/stateline.sock"):
        made = auditor.fields_body(log, "acme", *fields, client, "ab" * 16)
        assert made == auditor.body("acme", AuditEntry(*fields, ip=client, trace_id="ab" * 16))
    assert made["ip"] is None
    assert made["details"] == {"method": "PUT", "path": "/v1/docs/a", "status": 201, "client": "/run/stateline.sock"}
    assert made["user"] == "key:k1"


def test_appending_audit_bodies_without_entry_objects_keeps_the_chain(db: stateline.Database) -> None:
    audit = db.tenant("acme").audit
    bodies = [audit.entry_body("key:k1", "docs.put", "docs", f"k{i}", {"status": 200}) for i in range(3)]
    assert audit.append_bodies(bodies[:2], entries=False) == []
    (third,) = audit.append_bodies(bodies[2:])
    assert (third.seq, third.resource_id, third.tenant) == (3, "k2", "acme")
    oldest = audit.query(order="oldest").entries
    assert [(e.seq, e.resource_id) for e in oldest] == [(1, "k0"), (2, "k1"), (3, "k2")]
    assert oldest[2].prev == oldest[1].hash
    v = audit.verify()
    assert (v.ok, v.checked) == (True, 3)


def test_an_error_echoing_an_integer_over_64_bits_still_answers_in_the_error_shape(mem_api: Api) -> None:
    h = mem_api.key("acme", ["admin"])
    huge = 458537663614667507166307418112
    r = mem_api.client.get(f"/v1/policies/p/versions/{huge}", headers=h)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "not_found"
    assert error["details"] == {"name": "p", "version": str(huge)}


def test_errors_are_never_cached(mem_api: Api) -> None:
    # 404 and 410 are cacheable by default: a browser served a 410 of the change feed again to the
    # dashboard's next request (same URL, another Last-Event-ID)
    h = mem_api.key("acme")
    for _ in range(3):
        mem_api.client.put("/v1/items/docs/a", json=1, headers=h)
    mem_api.db.store.trim_changes("acme", 3)
    for r in (
        mem_api.client.get("/v1/items/docs/missing", headers=h),
        mem_api.client.get("/v1/changes", params={"after": 0}, headers=h),
        mem_api.client.get("/v1/watch", headers={**h, "Last-Event-ID": "0"}),
        mem_api.client.get("/v1/items/docs/a"),
    ):
        assert r.status_code in (401, 404, 410)
        assert r.headers["cache-control"] == "no-store"


def test_the_service_freezes_its_startup_objects_while_it_runs(clock: FakeClock) -> None:
    assert gc.get_freeze_count() == 0
    with stateline.open("memory://", clock=clock) as db:
        made_before_start = [object()]
        for api in make_api(db, clock, freeze_gc=True):
            assert gc.get_freeze_count() > 0
            # out of reach of every collection, not only the young ones
            assert not any(o is made_before_start for o in gc.get_objects())
            made_while_serving = [object()]
            assert any(o is made_while_serving for o in gc.get_objects())
            assert api.client.put("/v1/docs/d", json={"a": 1}, headers=api.key("t")).status_code < 300
        assert gc.get_freeze_count() == 0  # given back at shutdown
        assert any(o is made_before_start for o in gc.get_objects())

        for _ in make_api(db, clock, freeze_gc=False):
            assert gc.get_freeze_count() == 0

        gc.freeze()  # the process's own freeze: neither added to nor undone by the service
        try:
            frozen = gc.get_freeze_count()
            for _ in make_api(db, clock, freeze_gc=True):
                assert 0 < gc.get_freeze_count() <= frozen  # (frozen objects can still be freed)
            assert 0 < gc.get_freeze_count() <= frozen
        finally:
            gc.unfreeze()


def test_sse_watch_keeps_quiet_streams_alive_and_ends_when_retention_overtakes_it(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = stateline.open("memory://", clock=clock)
    made = make_api(db, clock, heartbeat_seconds=0.05)
    api = next(made)
    c, h = api.client, api.key("acme")
    try:
        c.put("/v1/items/docs/a", json=0, headers=h)
        start = db.store.revision("acme")
        later = threading.Timer(0.4, lambda: c.put("/v1/items/docs/a", json=1, headers=h))
        later.start()
        r = c.get("/v1/watch", params={"after": start, "limit": 1, "namespace": "docs"}, headers=h)
        later.join()
        quiet, _, _ = r.text.partition("event: change")
        assert ": keep-alive" in quiet  # sent while nothing happened
        assert [orjson.loads(e["data"])["ops"][0]["value"] for e in _sse(r.text)] == [1]

        # a client whose next records were trimmed while it read gets an error event, and the stream ends
        for i in range(3):
            c.put("/v1/items/other/b", json=i, headers=h)
        real_page = routes_changes._page
        trimmed = threading.Event()

        async def trim_first(*args: Any, **kwargs: Any) -> Any:
            if not trimmed.is_set():
                trimmed.set()
                db.store.trim_changes("acme", db.store.revision("acme"))
            return await real_page(*args, **kwargs)

        monkeypatch.setattr(routes_changes, "_page", trim_first)
        r = c.get("/v1/watch", params={"after": start}, headers=h)
        assert r.status_code == 200
        [error] = [e for e in _sse(r.text) if e.get("event") == "error"]
        assert orjson.loads(error["data"])["error"]["code"] == "changes_trimmed"
        assert "event: change" not in r.text
    finally:
        made.close()
        db.close()
