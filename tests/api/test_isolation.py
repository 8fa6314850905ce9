"""Tenant isolation: every /v1 route, called with tenant B's key and tenant A's object ids, never shows or
changes A's data (on every backend)."""

from __future__ import annotations

from typing import Any

from .conftest import Api

MARK = "A-ONLY-7f3c9e"


def _seed_a(api: Api, h: dict[str, str]) -> dict[str, str]:
    c = api.client
    assert c.put("/v1/items/raw/secret-doc", json={"mark": MARK}, headers=h).status_code == 201
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
    ok = {200, 201}
    assert c.put("/v1/docs/secret-doc", json={"mark": MARK}, headers=h).status_code in ok
    tx = c.post("/v1/docs/transaction", json={"ops": [{"op": "put", "key": "tx-doc", "value": MARK}]}, headers=h)
    assert tx.status_code == 200, tx.text
    assert (
        c.post("/v1/streams/orders:1/events", json={"events": [{"type": "made", "data": MARK}]}, headers=h).status_code
        == 201
    )
    assert c.post("/v1/cases", json={"case_id": "secret-case", "ctx": {"mark": MARK}}, headers=h).status_code == 201
    r = c.post(
        "/v1/cases/secret-case/commit", json={"mutations": [{"type": "set_ctx", "key": "m", "value": MARK}]}, headers=h
    )
    assert r.status_code == 200, r.text
    r = c.post(
        "/v1/runs",
        json={
            "flow_id": "f",
            "run_id": "secret-run",
            "steps": [{"id": "s1", "payload": MARK}],
            "metadata": {"m": MARK},
        },
        headers=h,
    )
    assert r.status_code == 201, r.text
    claims = c.post("/v1/steps/claim", json={"worker_id": "w-a"}, headers=h).json()["claims"]
    assert len(claims) == 1
    lease = c.post("/v1/locks/secret-lock/acquire", json={"owner": MARK, "ttl": 300}, headers=h).json()
    assert c.put("/v1/sessions/secret-session", json={"provider": MARK}, headers=h).status_code == 200
    assert c.post("/v1/deliveries/secret-msg/attempt", json={}, headers=h).status_code == 200
    assert (
        c.post("/v1/policies/secret-lock/versions", json={"type": "t", "definition": MARK}, headers=h).status_code
        == 201
    )
    assert c.post("/v1/limits/secret-lock/hit", json={"key": "k", "rate": 1, "per": 3600}, headers=h).json()["allowed"]
    api.ctx.source.tenant("acme").idempotency.run("secret-doc", lambda: MARK)
    assert (
        c.put("/v1/projects/secret-project", json={"name": MARK, "config": {"m": MARK}}, headers=h).status_code == 201
    )
    r = c.post("/v1/policies/secret-policy/versions", json={"type": "t", "definition": MARK}, headers=h)
    assert r.status_code == 201, r.text
    r = c.post(
        "/v1/policies/secret-policy/versions", json={"type": "t", "definition": MARK, "activate": True}, headers=h
    )
    assert r.status_code == 201, r.text
    return {
        "key_id": made["id"],
        "tx_id": tx.json()["id"],
        "lease_token": claims[0]["lease_token"],
        "lock_token": lease["token"],
    }


def _bodies(ids: dict[str, str]) -> dict[tuple[str, str], Any]:
    """A request body per route, aimed at tenant A's objects."""
    return {
        ("POST", "/v1/batch/get"): {"keys": [{"namespace": "raw", "key": "secret-doc"}]},
        ("POST", "/v1/transaction"): {
            "checks": [{"check": "version_is", "namespace": "raw", "key": "secret-doc", "version": 1}],
            "ops": [{"op": "delete", "namespace": "raw", "key": "secret-doc"}],
        },
        ("POST", "/v1/keys"): {"scopes": ["admin"], "tenant": "acme"},
        ("PUT", "/v1/items/{namespace}/{key}"): {"overwritten": True},
        ("PUT", "/v1/docs/{key}"): {"overwritten": True},
        ("POST", "/v1/docs/batch-get"): {"keys": ["secret-doc", "tx-doc"]},
        ("POST", "/v1/docs/transaction"): {"ops": [{"op": "delete", "key": "secret-doc", "expected_version": 1}]},
        ("POST", "/v1/streams/{stream}/events"): {"events": [{"type": "x"}], "expected_seq": 1},
        ("POST", "/v1/cases"): {"case_id": "secret-case"},
        ("POST", "/v1/cases/{case_id}/commit"): {"mutations": [{"type": "set_ctx", "value": {}}]},
        ("POST", "/v1/runs"): {"flow_id": "f", "run_id": "secret-run", "steps": [{"id": "s1"}]},
        ("POST", "/v1/runs/{run_id}/cancel"): {"reason": "b"},
        ("POST", "/v1/steps/claim"): {"worker_id": "w-b"},
        ("POST", "/v1/runs/{run_id}/steps/{step_id}/heartbeat"): {"lease_token": ids["lease_token"]},
        ("POST", "/v1/runs/{run_id}/steps/{step_id}/start"): {"lease_token": ids["lease_token"]},
        ("POST", "/v1/runs/{run_id}/steps/{step_id}/complete"): {"lease_token": ids["lease_token"], "result": 1},
        ("POST", "/v1/runs/{run_id}/steps/{step_id}/fail"): {"lease_token": ids["lease_token"], "error": "x"},
        ("POST", "/v1/locks/{name}/acquire"): {"ttl": 5},
        ("POST", "/v1/locks/{name}/release"): {"token": ids["lock_token"]},
        ("POST", "/v1/locks/{name}/extend"): {"token": ids["lock_token"], "ttl": 5},
        ("PUT", "/v1/sessions/{session_id}"): {"provider": "b"},
        ("POST", "/v1/limits/{name}/hit"): {"key": "k", "rate": 1, "per": 3600},
        ("POST", "/v1/policies/{name}/activate"): {"version": 1},
        ("PUT", "/v1/projects/{project_id}"): {"name": "b", "config": {}},
        ("POST", "/v1/policies/{name}/versions"): {"type": "t", "definition": "b"},
    }


def _params(ids: dict[str, str]) -> dict[str, str]:
    """A's object ids, by path parameter name. A route with a parameter not named here fails the test."""
    return {
        "namespace": "raw",
        "key": "secret-doc",
        "stream": "orders:1",
        "key_id": ids["key_id"],
        "tx_id": ids["tx_id"],
        "case_id": "secret-case",
        "run_id": "secret-run",
        "step_id": "s1",
        "name": "secret-lock",  # also the limit's and the policy's name
        "session_id": "secret-session",
        "message_id": "secret-msg",
        "seq": "1",
        "feature": "secret-feature",
        "version": "1",
        "project_id": "secret-project",
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
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"code", "message", "details"}
            else:  # an error may echo an id B sent; an answer must hold none of A's secrets
                for secret in ids.values():
                    assert secret not in r.text, (method, url, r.text)
    assert tried >= 50
    # Tenant A is exactly as it was.
    after = api.client.get("/v1/stats", headers=a).json()
    assert after == before
    for path in ("/v1/items/raw/secret-doc", "/v1/docs/secret-doc"):
        doc = api.client.get(path, headers=a).json()
        assert (doc["value"], doc["version"]) == ({"mark": MARK}, 1)
    key = api.client.get(f"/v1/keys/{ids['key_id']}", headers=a).json()
    assert key["revoked"] is False
    step = api.client.get("/v1/runs/secret-run/steps/s1", headers=a).json()
    assert (step["status"], step["worker_id"]) == ("assigned", "w-a")
    assert api.client.get("/v1/locks/secret-lock", headers=a).json()["owner"] == MARK
    assert api.client.get("/v1/cases/secret-case/verify", headers=a).json()["ok"] is True
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
