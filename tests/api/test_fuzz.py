"""Schemathesis against /openapi.json: generated requests for every operation never get a 5xx, and every
response (status, content type, headers, body) matches the documented schema; chained calls (the links
schemathesis finds between operations) keep a created resource visible and a deleted one gone. Also:
the document describes every request body the routes read, and the rules it states for identifiers
are the ones the layers check."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.generation.meta import TestPhase
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)

import stateline
from stateline.api import ApiSettings, create_app
from stateline.api.common import CASE_ID, ETAG, KEY_TEXT, NAMESPACE, PREFIX_TEXT, RUN_ID, parse_etag
from stateline.cases import _check_case_id
from stateline.errors import InvalidArgument
from stateline.runs import _check_id
from stateline.types import check_key, check_namespace
from tests.reliability import scale

# The schema is loaded when this module is imported, so the app is built here (memory store).
_db = stateline.open("memory://")
_app = create_app(_db, settings=ApiSettings(rate_limit=None, max_wait=0.05, freeze_gc=False))
_token, _ = _app.state.stateline.keys.create("fuzz", ["admin"])
HEADERS = {"Authorization": f"Bearer {_token}"}

schema = schemathesis.openapi.from_asgi("/openapi.json", _app).exclude(path="/v1/watch")  # an endless stream
# Refusals of well-formed requests that a JSON Schema cannot state: rules across fields and requests,
# and the store's state (every other 400 to a request the document allows means the document is wrong).
_NOT_IN_A_SCHEMA = re.compile(
    "|".join(
        [
            r"buffered mutation\(s\) are invalid",  # a case's mutations against its state
            r"unknown step|duplicate step id|lists a step twice|depends on itself|cycle",  # a run's DAG
            r"must not be below initial_delay",
            r"must be at most the rate",
            r"beyond the stream's last seq",
            r"cannot be combined with expected_version|use If-Match",  # two headers or fields together
            r"Integer exceeds 64-bit range",  # inside a free JSON value
            r"holds a non-integer value|would overflow 64 bits",  # incr against what the key holds
        ]
    )
)


@schemathesis.check
def well_formed_requests_are_accepted(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    if meta.phase.name is TestPhase.COVERAGE:  # its default case sends optional headers empty
        return None
    message = response.json()["error"]["message"]
    if _NOT_IN_A_SCHEMA.search(message) is None:
        raise AssertionError(f"{case.method} {case.path}: refused what the document allows: {message}")
    return None


CHECKS = [
    not_a_server_error,
    well_formed_requests_are_accepted,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(
    max_examples=scale(6, 60),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    if isinstance(case.body, dict) and case.path == "/v1/locks/{name}/acquire":
        case.body["wait"] = 0  # a held lock would make the call wait
    case.call_and_validate(headers=HEADERS, checks=CHECKS)


# ---------------------------------------------------------------- chained calls


class _Chains:
    """The app under the state machine, over one store; each chain of calls runs in a tenant of its own
    (the key it carries decides the tenant), so it starts from nothing."""

    def __init__(self) -> None:
        self.use(_db)

    def use(self, db: stateline.Database) -> None:
        self.app = create_app(db, settings=ApiSettings(rate_limit=None, max_wait=0.05, freeze_gc=False))
        self.chains = 0
        self.headers: dict[str, str] = {}

    def next_chain(self) -> None:
        self.chains += 1
        token, _ = self.app.state.stateline.keys.create(f"chain{self.chains}", ["admin"])
        self.headers = {"Authorization": f"Bearer {token}"}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


_chains = _Chains()
# Revoking the key the calls carry would leave nothing else to test.
_linked = (
    schemathesis.openapi.from_asgi("/openapi.json", _chains)
    .exclude(path="/v1/watch")
    .exclude(method="DELETE", path="/v1/keys/{key_id}")
)
_linked.config.generation.update(modes=[GenerationMode.POSITIVE], with_security_parameters=False)


class _Workflow(_linked.as_state_machine()):  # type: ignore[misc]
    def setup(self) -> None:
        _chains.next_chain()

    def before_call(self, case: schemathesis.Case) -> None:
        if isinstance(case.body, dict) and case.path == "/v1/locks/{name}/acquire":
            case.body["wait"] = 0

    def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
        return {"headers": _chains.headers}

    def validate_response(self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any) -> None:
        case.validate_response(response, checks=[*CHECKS, use_after_free, ensure_resource_availability])


def test_chained_calls_conform_and_keep_resources_consistent(db: stateline.Database) -> None:
    _chains.use(db)  # every adapter
    try:
        _Workflow.run(
            settings=settings(
                max_examples=scale(25, 400),
                stateful_step_count=10,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
        )
    finally:
        _chains.app.state.stateline.close()
        _chains.use(_db)


# ---------------------------------------------------------------- the document itself


def _reads_a_body(endpoint: Any) -> bool:
    source = inspect.getsource(endpoint)
    # a route of the front door hands the request to the function that serves it
    handler = re.search(r"return await (_\w+)\(request\)", source)
    if handler is not None:
        source = inspect.getsource(getattr(inspect.getmodule(endpoint), handler.group(1)))
    return "parse_body(" in source or "read_json(" in source


def test_every_request_body_a_route_reads_is_documented() -> None:
    paths = _app.openapi()["paths"]
    checked = 0
    for route in _app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods:
            op = paths[route.path_format][method.lower()]
            assert ("requestBody" in op) == _reads_a_body(route.endpoint), f"{method} {route.path_format}"
            checked += 1
    assert checked > 60


def _keywords(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keywords(v) for k, v in node.items() if k not in ("properties", "examples")))
    if isinstance(node, list):
        return set().union(*(_keywords(v) for v in node))
    return set()


def test_the_document_is_valid_openapi() -> None:
    validate(_app.openapi())


def test_the_document_speaks_json_schema() -> None:
    # pydantic writes the bounds of some optional fields as ge/le, which a client's validator ignores
    assert not _keywords(_app.openapi()) & {"ge", "le", "gt", "lt", "strict", "allow_inf_nan"}


def _accepted(check: Any, value: str) -> bool:
    try:
        check(value)
    except InvalidArgument:
        return False
    return True


_RULES = [
    # (documented rule, the layer's check, strings the layer refuses)
    (RUN_ID, lambda v: _check_id(v, "run_id"), ["", "a/b", "-a", "x" * 129]),
    (CASE_ID, _check_case_id, ["", "a:b", "a/b", "x" * 129]),
    (NAMESPACE, check_namespace, ["", ".a", "a b", "x" * 129]),
    # a key with room for what a layer adds around it (a prefix, a window suffix: under 64 bytes)
    (KEY_TEXT, lambda v: (check_key(v), check_key("k" * 32 + v + "k" * 32)), ["", "a\x00", "a\x85", "é" * 600]),
    (PREFIX_TEXT, lambda v: check_key(v + "k"), ["a\x1f", "\x7f", "é" * 600]),
    (ETAG, lambda v: parse_etag(v, "If-Match"), ['"0"', "3", '"3", "4"', "W/3"]),
]


@pytest.mark.parametrize(("rule", "check", "refused"), _RULES)
def test_documented_rules_are_the_ones_the_layers_check(rule: dict[str, str], check: Any, refused: list[str]) -> None:
    pattern = re.compile(rule["pattern"])

    @settings(max_examples=300, database=None)
    @given(st.from_regex(pattern, fullmatch=True))
    def accepted(value: str) -> None:
        assert _accepted(check, value), value

    accepted()
    for value in refused:  # the rule says no, and so does the layer
        assert pattern.search(value) is None, value
        assert not _accepted(check, value), value
