"""Schemathesis against /openapi.json: generated requests for every operation never get a 5xx, and every
response (status, content type, headers, body) matches the documented schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import stateline
from stateline.api import ApiSettings, create_app

# The schema is loaded when this module is imported, so the app is built here (memory store).
_db = stateline.open("memory://")
_app = create_app(_db, settings=ApiSettings(rate_limit=None, max_wait=0.05))
_token, _ = _app.state.stateline.keys.create("fuzz", ["admin"])
HEADERS = {"Authorization": f"Bearer {_token}"}

schema = schemathesis.openapi.from_asgi("/openapi.json", _app).exclude(path="/v1/watch")  # an endless stream
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(
    max_examples=6,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    if isinstance(case.body, dict) and case.path == "/v1/locks/{name}/acquire":
        case.body["wait"] = 0  # a held lock would make the call wait
    case.call_and_validate(headers=HEADERS, checks=CHECKS)
