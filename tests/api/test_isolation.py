"""Tenant isolation: every /v1 route, called with tenant B's key and tenant A's object ids, never shows or
changes A's data (on every backend)."""

from __future__ import annotations

from typing import Any

from .conftest import Api

MARK = "A-ONLY-7f3c9e"


def _seed_a(api: Api, h: dict[str, str]) -> dict[str, str]:
    c = api.client
    assert c.put("/v1/items/docs/secret-doc", json={"mark": MARK}, headers=h).status_code == 201
    r = c.post(
        "/v1/transaction",
        json={
            "ops": [
                {"op": "append", "stream": "orders:1", "events": [{"type": "created", "data": {"mark": MARK}}]},
                {"op": "incr", "namespace": "counters", "key": "secret-doc"},
            ]
        },
        headers=h,
    )
    assert r.status_code == 200, r.text
    made = c.post("/v1/keys", json={"scopes": ["read"], "name": MARK}, headers=h).json()
    return {"key_id": made["id"]}


def _bodies(ids: dict[str, str]) -> dict[tuple[str, str], Any]:
    """A request body per route, aimed at tenant A's objects."""
    return {
        ("POST", "/v1/batch/get"): {"keys": [{"namespace": "docs", "key": "secret-doc"}]},
        ("POST", "/v1/transaction"): {
            "checks": [{"check": "version_is", "namespace": "docs", "key": "secret-doc", "version": 1}],
            "ops": [{"op": "delete", "namespace": "docs", "key": "secret-doc"}],
        },
        ("POST", "/v1/keys"): {"scopes": ["admin"], "tenant": "acme"},
        ("PUT", "/v1/items/{namespace}/{key}"): {"overwritten": True},
    }


def _params(ids: dict[str, str]) -> dict[str, str]:
    """A's object ids, by path parameter name. A route with a parameter not named here fails the test."""
    return {
        "namespace": "docs",
        "key": "secret-doc",
        "stream": "orders:1",
        "key_id": ids["key_id"],
    }


_QUERY = {"/v1/watch": {"after": 0, "limit": 1}, "/v1/changes": {"after": 0}, "/v1/items/{namespace}": {}}


def test_tenant_b_never_sees_or_changes_tenant_a(api: Api) -> None:
    a = api.key("acme", ["admin"])
    b = api.key("globex", ["admin"])
    ids = _seed_a(api, a)
    assert api.client.put("/v1/items/own/b1", json={"b": 1}, headers=b).status_code == 201  # B has a change feed
    before = api.client.get("/v1/stats", headers=a).json()
    params = _params(ids)
    bodies = _bodies(ids)
    paths = api.client.get("/openapi.json").json()["paths"]
    tried = 0
    for template, ops in paths.items():
        if not template.startswith("/v1/"):
            continue
        for method in ops:
            url = template
            for name in [p["name"] for p in ops[method].get("parameters", []) if p["in"] == "path"]:
                assert name in params, f"add tenant A's id for path parameter {name!r} of {template}"
                url = url.replace("{" + name + "}", params[name])
            r = api.client.request(
                method.upper(),
                url,
                params=_QUERY.get(template, {}),
                json=bodies.get((method.upper(), template), {}),
                headers=b,
            )
            tried += 1
            assert r.status_code < 500, (method, url, r.text)
            assert MARK not in r.text, (method, url, r.text)
            if r.status_code in (403, 404):
                assert set(r.json()["error"]) == {"code", "message", "details"}
            else:  # an error may echo the id B sent; anything else must not contain A's key
                assert ids["key_id"] not in r.text, (method, url, r.text)
    assert tried >= 12
    # Tenant A is exactly as it was.
    after = api.client.get("/v1/stats", headers=a).json()
    assert after == before
    doc = api.client.get("/v1/items/docs/secret-doc", headers=a).json()
    assert doc["value"] == {"mark": MARK}
    assert doc["version"] == 1
    key = api.client.get(f"/v1/keys/{ids['key_id']}", headers=a).json()
    assert key["revoked"] is False
    # And B's key, pointed at A's objects, got B's own (empty) world: e.g. A's doc is not found for B.
    assert api.client.get("/v1/items/counters/secret-doc", headers=b).status_code == 404


def test_a_tenant_named_in_a_body_or_url_does_not_override_the_key(api: Api) -> None:
    b = api.key("globex")
    a = api.key("acme")
    api.client.put("/v1/items/docs/x", json={"mark": MARK}, headers=a)
    r = api.client.get("/v1/items/docs/x", params={"tenant": "acme"}, headers={**b, "X-Tenant": "acme"})
    assert r.status_code == 404
    r = api.client.post(
        "/v1/transaction",
        json={"ops": [{"op": "put", "namespace": "docs", "key": "x", "value": 1}], "meta": {"tenant": "acme"}},
        headers=b,
    )
    assert r.status_code == 200
    assert api.client.get("/v1/items/docs/x", headers=a).json()["value"] == {"mark": MARK}
