"""Spans leave over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set: a collector on loopback receives
the request's span and its store calls, and the spans still queued at shutdown are not lost."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

import stateline
from stateline import FakeClock

from .conftest import make_api


class Collector:
    """An OTLP/HTTP trace endpoint on loopback that keeps every export request it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, self.headers["Content-Type"], body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def test_spans_are_exported_to_the_configured_collector_and_flushed_at_shutdown(
    collector: Collector, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    with stateline.open("memory://", clock=clock) as db:
        made = make_api(db, clock)
        api = next(made)
        h = api.key("acme")
        assert api.client.put("/v1/items/docs/a", json={"x": 1}, headers=h).status_code == 201
        assert collector.requests == []  # queued for the next batch: nothing sent yet
        made.close()  # the app shuts down: what is queued goes out now

    assert collector.requests, "no export reached the collector"
    spans = []
    for path, content_type, body in collector.requests:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "stateline"
            spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
    by_name = {s.name: s for s in spans}
    server = by_name["PUT /v1/items/{namespace}/{key:path}"]
    commit = by_name["store.commit"]
    assert commit.trace_id == server.trace_id
    assert commit.parent_span_id == server.span_id
