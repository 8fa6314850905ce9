"""The HTTP API under hostile input and concurrency: hand-written bad inputs are refused with a 4xx
or round-trip exactly (never a 5xx, never stored half), and histories of concurrent HTTP clients
are linearizable."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from stateline import Database, FakeClock
from tests.api.conftest import Api, make_api
from tests.reliability.conftest import record
from tests.reliability.linearizability import Op, check


@pytest.fixture
def http(db: Database, clock: FakeClock) -> Iterator[Api]:
    yield from make_api(db, clock, max_body_bytes=2 * 1024 * 1024)


def _url(key: str) -> str:
    return "/v1/docs/" + quote(key, safe="")


# (Starlette's TestClient decodes a path twice, so a key spelled like an escape, e.g. "%41", would not
# survive the test client itself; uvicorn decodes once.)
ROUND_TRIP_KEYS = [
    'quote"d',
    "it's",
    "100%",
    "under_score",
    "sp ace",
    "ü/é/ß",
    "\U0001f600",
    "a" * 1024,
    "/lead",
]
ROUND_TRIP_VALUES: list[Any] = [
    None,
    0,
    -(2**63) + 1,
    2**63 - 1,
    1e308,
    -5e-324,
    "",
    "nul \u0000 inside a string is data",
    {"deep": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]},
    {"": "empty key", "ü": ["x"] * 100},
]


def test_awkward_keys_and_values_round_trip_exactly(http: Api) -> None:
    h = http.key("acme")
    tried = 0
    for key in ROUND_TRIP_KEYS:
        for value in ROUND_TRIP_VALUES[:3] if key != "sp ace" else ROUND_TRIP_VALUES:
            tried += 1
            put = http.client.put(
                _url(key), content=orjson.dumps(value), headers={**h, "content-type": "application/json"}
            )
            assert put.status_code in (200, 201), (key, value, put.text)
            got = http.client.get(_url(key), headers=h)
            assert got.status_code == 200
            assert got.json()["key"] == key
            assert orjson.loads(got.content)["value"] == value
    record(bad_inputs_tried=tried)


def _refused(http: Api, h: dict[str, str], method: str, url: str, **kwargs: Any) -> int:
    before = http.db.tenant("acme").revision()
    r = http.client.request(method, url, headers={**h, **kwargs.pop("headers", {})}, **kwargs)
    assert 400 <= r.status_code < 500, (url[:80], r.status_code, r.text[:200])
    body = r.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    assert "Traceback" not in r.text
    assert http.db.tenant("acme").revision() == before, "a refused request wrote something"
    return r.status_code


def test_bad_input_is_refused_with_4xx_and_writes_nothing(http: Api) -> None:
    h = http.key("acme")
    json_h = {"content-type": "application/json"}
    nested = b"[" * 200 + b"]" * 200
    huge_key_tx = orjson.dumps({"ops": [{"op": "put", "key": "k" * (1024 * 1024), "value": 1}]})
    form_h = {"content-type": "application/x-www-form-urlencoded"}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", _url("nul\x00key"), {"content": b"1", "headers": json_h}),
        ("PUT", _url("ctl\x07key"), {"content": b"1", "headers": json_h}),
        ("PUT", _url("k" * 1025), {"content": b"1", "headers": json_h}),
        ("PUT", _url("k" * 60_000), {"content": b"1", "headers": json_h}),  # clients cap URLs at 64 KiB
        ("POST", "/v1/docs/transaction", {"content": huge_key_tx, "headers": json_h}),
        ("PUT", _url("nested"), {"content": nested, "headers": json_h}),
        ("PUT", _url("huge-int"), {"content": b'{"n": 1180591620717411303424}', "headers": json_h}),
        ("PUT", _url("nan"), {"content": b'{"n": NaN}', "headers": json_h}),
        ("PUT", _url("inf"), {"content": b"[Infinity]", "headers": json_h}),
        ("PUT", _url("broken"), {"content": b'{"a": ', "headers": json_h}),
        ("PUT", _url("empty"), {"content": b"", "headers": json_h}),
        ("PUT", _url("form"), {"content": b"a=1&b=2", "headers": form_h}),
        ("PUT", _url("text"), {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        ("PUT", _url("bad-utf8"), {"content": b'"\xff\xfe"', "headers": json_h}),
        ("PUT", _url("too-big"), {"content": b'"' + b"x" * (3 * 1024 * 1024) + b'"', "headers": json_h}),
        ("PUT", _url("if-match"), {"content": b"1", "headers": {**json_h, "if-match": "not-a-version"}}),
        ("POST", "/v1/docs/transaction", {"content": b'{"ops": []}', "headers": json_h}),
        ("POST", "/v1/docs/transaction", {"content": b'{"ops": [{"op": "explode", "key": "k"}]}', "headers": json_h}),
        ("POST", "/v1/docs/transaction", {"content": b'{"ops": "not a list"}', "headers": json_h}),
        ("POST", "/v1/docs/transaction", {"content": b"[1,2,3]", "headers": json_h}),
        ("POST", "/v1/docs/transaction",
         {"content": b'{"ops": [{"op": "put", "key": "ok", "value": 1}, {"op": "put", "key": "", "value": 2}]}',
          "headers": json_h}),
        ("GET", "/v1/docs?limit=-1", {}),
        ("GET", "/v1/docs?limit=abc", {}),
        ("GET", "/v1/changes?after=-5", {}),
    ]  # fmt: skip
    statuses = [_refused(http, h, method, url, **kwargs) for method, url, kwargs in cases]
    assert 413 in statuses
    assert http.client.get(_url("ok"), headers=h).status_code == 404  # the half-valid transaction wrote nothing
    record(bad_inputs_tried=len(cases))


# ------------------------------------------------------------------ linearizability over HTTP


def _cas(http: Api, h: dict[str, str], key: str, expected: Any, new: Any) -> bool:
    while True:
        got = http.client.get(_url(key), headers=h)
        current = got.json()["value"] if got.status_code == 200 else None
        if current != expected:
            return False
        guard = {"if-match": got.headers["etag"]} if got.status_code == 200 else {"if-none-match": "*"}
        put = http.client.put(
            _url(key), content=orjson.dumps(new), headers={**h, **guard, "content-type": "application/json"}
        )
        if put.status_code in (200, 201):
            return True
        assert put.status_code == 412, put.text


def _txn(http: Api, h: dict[str, str], triples: tuple[tuple[str, Any, Any], ...]) -> bool:
    while True:
        docs = http.client.post("/v1/docs/batch-get", json={"keys": [k for k, _, _ in triples]}, headers=h).json()
        found = docs["documents"]
        if any((None if d is None else d["value"]) != exp for d, (_, exp, _) in zip(found, triples, strict=True)):
            return False
        ops = [
            {
                "op": "put",
                "key": k,
                "value": new,
                **({"must_not_exist": True} if d is None else {"expected_version": d["version"]}),
            }
            for d, (k, _, new) in zip(found, triples, strict=True)
        ]
        r = http.client.post("/v1/docs/transaction", json={"ops": ops}, headers=h)
        if r.status_code == 200:
            return True
        assert r.status_code == 409, r.text


@pytest.mark.parametrize("seed", range(2))
def test_http_histories_are_linearizable(http: Api, seed: int) -> None:
    h = http.key("acme")
    keys = ["x", "y", "z"]
    history: list[Op] = []
    lock = threading.Lock()
    fresh = iter(range(1, 10**9))

    def client(cid: int) -> None:
        rng = random.Random(seed * 100 + cid)
        for _ in range(8):
            kind = rng.choice(["get", "get", "put", "cas", "txn"])
            key = rng.choice(keys)
            with lock:
                new = next(fresh)
            t0 = time.monotonic()
            arg: Any = None
            out: Any = None
            if kind == "get":
                r = http.client.get(_url(key), headers=h)
                out = r.json()["value"] if r.status_code == 200 else None
            elif kind == "put":
                arg = new
                r = http.client.put(_url(key), json=new, headers=h)
                assert r.status_code in (200, 201)
            elif kind == "cas":
                r = http.client.get(_url(key), headers=h)
                expected = r.json()["value"] if r.status_code == 200 and rng.random() > 0.2 else None
                arg = (expected, new)
                out = _cas(http, h, key, expected, new)
            else:
                k2 = rng.choice([k for k in keys if k != key])
                cur = http.client.post("/v1/docs/batch-get", json={"keys": [key, k2]}, headers=h).json()["documents"]
                arg = tuple((k, None if d is None else d["value"], new) for k, d in zip((key, k2), cur, strict=True))
                out = _txn(http, h, arg)
            with lock:
                history.append(Op(cid, kind, key, arg, out, t0, time.monotonic()))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(history) == 64
    assert check(history)
    record(linearizability_histories=1, operations_checked=len(history))
