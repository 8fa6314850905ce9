"""Routes of every layer: docs, streams, cases, runs, runtime tables, locks, audit and gates."""

from __future__ import annotations

from .conftest import Api


def test_docs_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.put("/v1/docs/cfg/router", json={"routes": 1}, headers={**h, "If-None-Match": "*", "X-Reason": "init"})
    assert (r.status_code, r.headers["etag"]) == (201, '"1"')
    assert c.put("/v1/docs/cfg/router", json={}, headers={**h, "If-None-Match": "*"}).status_code == 412
    doc = c.get("/v1/docs/cfg/router", headers=h)
    assert doc.json()["value"] == {"routes": 1}
    assert doc.json()["reason"] == "init"
    assert doc.json()["actor"].startswith("key:")
    assert c.get("/v1/docs/cfg/router", headers={**h, "If-None-Match": '"1"'}).status_code == 304
    assert c.put("/v1/docs/cfg/router", json={"routes": 2}, headers={**h, "If-Match": '"9"'}).status_code == 412
    assert c.put("/v1/docs/cfg/router", json={"routes": 2}, headers={**h, "If-Match": '"1"'}).headers["etag"] == '"2"'
    c.put("/v1/docs/other", json=1, params={"collection": "misc"}, headers=h)
    assert [d["key"] for d in c.get("/v1/docs", params={"prefix": "cfg/"}, headers=h).json()["documents"]] == [
        "cfg/router"
    ]
    assert c.get("/v1/docs/other", params={"collection": "misc"}, headers=h).json()["collection"] == "misc"
    got = c.post("/v1/docs/batch-get", json={"keys": ["cfg/router", "nope"]}, headers=h).json()["documents"]
    assert [None if d is None else d["version"] for d in got] == [2, None]
    tx = c.post(
        "/v1/docs/transaction",
        json={
            "ops": [
                {"op": "put", "key": "a", "value": 1},
                {"op": "put", "key": "cfg/router", "value": 3, "expected_version": 2},
            ]
        },
        headers=h,
    )
    assert tx.status_code == 200, tx.text
    assert c.get(f"/v1/docs/transactions/{tx.json()['id']}", headers=h).json()["outcome"] == "committed"
    stale = c.post(
        "/v1/docs/transaction", json={"ops": [{"op": "delete", "key": "a", "expected_version": 7}]}, headers=h
    )
    assert stale.status_code == 409
    assert c.delete("/v1/docs/a", headers={**h, "If-Match": '"5"'}).status_code == 412
    assert c.delete("/v1/docs/a", headers=h).json()["deleted"] is True
    assert c.delete("/v1/docs/a", headers=h).status_code == 404


def test_streams_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.post(
        "/v1/streams/orders/o-1/events",
        json={"events": [{"type": "made", "data": {"n": 1}}, {"type": "paid"}], "expected_seq": 0},
        headers=h,
    )
    assert r.status_code == 201, r.text
    assert (r.json()["first_seq"], r.json()["last_seq"]) == (1, 2)
    assert (
        c.post(
            "/v1/streams/orders/o-1/events", json={"events": [{"type": "x"}], "expected_seq": 0}, headers=h
        ).status_code
        == 409
    )
    events = c.get("/v1/streams/orders/o-1/events", params={"from": 2}, headers=h).json()["events"]
    assert [e["type"] for e in events] == ["paid"]
    assert c.get("/v1/streams/orders/o-1", headers=h).json()["last_seq"] == 2
    assert c.get("/v1/streams/orders/o-1/check", headers=h).json()["issues"] == []
    assert "orders/o-1" in [
        s["stream"].split("streams:")[-1] for s in c.get("/v1/streams", headers=h).json()["streams"]
    ]


def test_cases_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.post("/v1/cases", json={"case_id": "c1", "ctx": {"order": 7}}, headers=h)
    assert r.status_code == 201, r.text
    assert c.post("/v1/cases", json={"case_id": "c1"}, headers=h).status_code == 409
    muts = [
        {"type": "set_ctx", "key": "paid", "value": True},
        {"type": "enter_scope", "scope": "s1"},
        {"type": "add_token", "token_id": "t1", "scope": "s1"},
        {"type": "increment_step_count"},
        {"type": "set_metadata", "key": "by", "value": "api"},
    ]
    r = c.post("/v1/cases/c1/commit", json={"mutations": muts}, headers={**h, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["case"]["state"]["ctx"] == {"order": 7, "paid": True}
    assert body["receipt"]["seq"] >= 1
    assert c.post("/v1/cases/c1/commit", json={"mutations": muts}, headers={**h, "If-Match": '"1"'}).status_code == 412
    bad = c.post(
        "/v1/cases/c1/commit",
        json={"mutations": [{"type": "remove_token", "token_id": "nope"}, {"type": "exit_scope", "scope": "nope"}]},
        headers=h,
    )
    assert bad.status_code == 400
    assert len(bad.json()["error"]["details"]["problems"]) == 2  # every problem, not just the first
    assert c.get("/v1/cases/c1", headers=h).json()["version"] == body["case"]["version"]
    receipts = c.get("/v1/cases/c1/receipts", headers=h).json()["receipts"]
    assert receipts[-1]["hash"] == body["receipt"]["hash"]
    assert c.get("/v1/cases/c1/verify", headers=h).json()["ok"] is True
    assert c.get("/v1/cases/c1/events", headers=h).json()["events"]
    assert c.get("/v1/cases", headers=h).json()["case_ids"] == ["c1"]
    assert c.get("/v1/cases/nope/verify", headers=h).status_code == 404


def test_runs_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.post(
        "/v1/runs",
        json={
            "flow_id": "checkout",
            "run_id": "r1",
            "steps": [
                {"id": "a", "kind": "llm", "max_attempts": 2, "retry": {"initial_delay": 1, "jitter": 0}},
                {"id": "b", "depends_on": ["a"]},
            ],
        },
        headers=h,
    )
    assert r.status_code == 201, r.text
    claims = c.post("/v1/steps/claim", json={"worker_id": "w1", "kinds": ["llm"], "lease": 30}, headers=h).json()[
        "claims"
    ]
    assert [(x["run_id"], x["step_id"]) for x in claims] == [("r1", "a")]
    token = claims[0]["lease_token"]
    assert c.post("/v1/steps/claim", json={"worker_id": "w2", "kinds": ["llm"]}, headers=h).json()["claims"] == []
    assert (
        c.post("/v1/runs/r1/steps/a/heartbeat", json={"lease_token": token}, headers=h).json()["cancel_requested"]
        is False
    )
    assert c.post("/v1/runs/r1/steps/a/start", json={"lease_token": token}, headers=h).json()["status"] == "running"
    failed = c.post("/v1/runs/r1/steps/a/fail", json={"lease_token": token, "error": "boom"}, headers=h).json()
    assert failed["status"] in {"retrying", "pending"}
    api.clock.advance(5)
    token = c.post("/v1/steps/claim", json={"worker_id": "w1", "kinds": ["llm"]}, headers=h).json()["claims"][0][
        "lease_token"
    ]
    done = c.post(
        "/v1/runs/r1/steps/a/complete",
        json={"lease_token": token, "result": {"ok": 1}, "usage": {"tokens": 10, "cost_usd": 0.5}},
        headers=h,
    )
    assert done.json()["status"] == "completed", done.text
    assert c.post("/v1/runs/r1/steps/a/complete", json={"lease_token": token}, headers=h).status_code == 409
    assert c.get("/v1/runs/r1/usage", headers=h).json()["tokens"] == 10
    assert c.get("/v1/usage", headers=h).json()["tokens"] == 10
    assert c.get("/v1/runs/r1/steps/b", headers=h).json()["status"] == "pending"
    assert c.post("/v1/runs/r1/cancel", headers=h).json()["status"] == "cancelled"
    assert len(c.get("/v1/runs/r1/history", headers=h).json()["events"]) >= 5
    assert [x["run_id"] for x in c.get("/v1/runs", params={"flow_id": "checkout"}, headers=h).json()["runs"]] == ["r1"]
    assert c.get("/v1/runs/nope", headers=h).status_code == 404


def test_runtime_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    hit = {"key": "user-1", "rate": 2, "per": 60}
    assert [c.post("/v1/limits/api/hit", json=hit, headers=h).json()["allowed"] for _ in range(3)] == [
        True,
        True,
        False,
    ]
    refused = c.post("/v1/limits/api/hit", json=hit, headers=h)
    assert int(refused.headers["retry-after"]) >= 1
    assert c.put("/v1/sessions/s1", json={"provider": "gpu-a", "ttl": 60}, headers=h).json()["provider"] == "gpu-a"
    assert c.get("/v1/sessions/s1", headers=h).json()["provider"] == "gpu-a"
    assert c.delete("/v1/sessions/s1", headers=h).status_code == 200
    assert c.get("/v1/sessions/s1", headers=h).status_code == 404
    assert [c.post("/v1/deliveries/m1/attempt", json={"max": 2}, headers=h).status_code for _ in range(3)] == [
        200,
        200,
        409,
    ]
    assert c.get("/v1/deliveries/m1", headers=h).json()["attempts"] == 3
    api.ctx.source.tenant("acme").idempotency.run("job-1", lambda: 1)
    assert c.get("/v1/idempotency/job-1", headers=h).json()["status"] == "done"
    assert c.delete("/v1/idempotency/job-1", headers=h).status_code == 403  # forgetting needs admin
    assert c.delete("/v1/idempotency/job-1", headers=api.key("acme", ["runtime:admin"])).status_code == 200
    assert c.get("/v1/idempotency/job-1", headers=h).json()["status"] is None


def test_locks_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    lease = c.post("/v1/locks/res-1/acquire", json={"owner": "w1", "ttl": 10}, headers=h).json()
    assert c.post("/v1/locks/res-1/acquire", json={"owner": "w2"}, headers=h).status_code == 409
    state = c.get("/v1/locks/res-1", headers=h).json()
    assert (state["held"], state["owner"]) == (True, "w1")
    assert lease["token"] not in c.get("/v1/locks/res-1", headers=h).text
    assert c.post("/v1/locks/res-1/extend", json={"token": lease["token"], "ttl": 20}, headers=h).status_code == 200
    assert c.post("/v1/locks/res-1/release", json={"token": "stale"}, headers=h).status_code == 409
    assert c.post("/v1/locks/res-1/release", json={"token": lease["token"]}, headers=h).json()["released"] is True
    again = c.post("/v1/locks/res-1/acquire", json={"owner": "w2"}, headers=h).json()
    assert again["fencing_token"] > lease["fencing_token"]
    assert c.get("/v1/deadlocks", headers=h).json() == {"deadlocks": [], "waits": []}


def test_every_api_write_is_audited(api: Api) -> None:
    c, h = api.client, api.key("acme")
    key_id = h["Authorization"].split("_")[1]
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    c.put("/v1/docs/cfg", json=1, headers={**h, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    c.post("/v1/locks/l/acquire", json={}, headers=h)
    c.put("/v1/docs/cfg", json=1, headers={**h, "If-Match": '"9"'})  # refused: not a write, not audited
    c.get("/v1/docs/cfg", headers=h)  # a read: not audited
    page = c.get("/v1/audit", params={"order": "oldest"}, headers=h).json()
    entries = page["entries"]
    assert [(e["action"], e["resource_type"], e["resource_id"]) for e in entries] == [
        ("docs.put", "docs", "cfg"),
        ("locks.acquire", "locks", "l"),
    ]
    first = entries[0]
    assert (first["user"], first["trace_id"], first["details"]["status"]) == (f"key:{key_id}", trace_id, 201)
    assert (
        c.get("/v1/audit", params={"resource_type": "locks"}, headers=h).json()["entries"][0]["action"]
        == "locks.acquire"
    )
    assert c.get(f"/v1/audit/{first['seq']}", headers=h).json()["hash"] == first["hash"]
    assert c.get("/v1/audit/verify", headers=h).json()["ok"] is True
    assert c.get("/v1/audit", headers=api.key("acme", ["docs:read"])).status_code == 403


def test_gates_routes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    status = c.get("/v1/gates", headers=h).json()
    assert isinstance(status["features"], list)
    first = status["features"][0] if status["features"] else "nothing"
    assert c.get(f"/v1/gates/{first}", headers=h).json()["available"] is bool(status["features"])
    assert c.get("/v1/gates/surely-not-a-feature", headers=h).json()["available"] is False


def test_policy_versions_activate_and_rollback(api: Api) -> None:
    c, h = api.client, api.key("acme")
    v1 = c.post("/v1/policies/routing/versions", json={"type": "router", "definition": {"to": "a"}}, headers=h)
    assert (v1.status_code, v1.json()["version"]) == (201, 1)
    assert c.get("/v1/policies/routing", headers=h).json()["active"] is None
    v2 = c.post(
        "/v1/policies/routing/versions", json={"type": "router", "definition": {"to": "b"}, "activate": True}, headers=h
    )
    assert v2.json()["version"] == 2
    assert c.post("/v1/policies/routing/versions", json={"type": "other"}, headers=h).status_code == 409
    got = c.get("/v1/policies/routing", headers=h).json()
    assert (got["active"], got["active_definition"], got["latest"]) == (2, {"to": "b"}, 2)
    assert c.post("/v1/policies/routing/activate", json={"version": 1}, headers=h).json()["active"] == 1
    assert c.post("/v1/policies/routing/activate", json={"version": 9}, headers=h).status_code == 404
    back = c.post("/v1/policies/routing/rollback", headers=h).json()
    assert (back["active"], back["history"]) == (2, [2])
    assert c.post("/v1/policies/routing/rollback", headers=h).status_code == 409  # nothing earlier
    assert c.get("/v1/policies/routing/versions/1", headers=h).json()["definition"] == {"to": "a"}
    assert c.get("/v1/policies/routing/versions/3", headers=h).status_code == 404
    assert [p["name"] for p in c.get("/v1/policies", headers=h).json()["policies"]] == ["routing"]
    assert c.get("/v1/policies/nope", headers=h).status_code == 404


def test_projects_with_config(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.put(
        "/v1/projects/shop", json={"name": "Shop", "config": {"region": "eu"}}, headers={**h, "If-None-Match": "*"}
    )
    assert (r.status_code, r.headers["etag"], r.json()["config"]) == (201, '"1"', {"region": "eu"})
    assert c.put("/v1/projects/shop", json={}, headers={**h, "If-None-Match": "*"}).status_code == 412
    assert (
        c.put("/v1/projects/shop", json={"config": {"region": "us"}}, headers={**h, "If-Match": '"1"'}).json()[
            "version"
        ]
        == 2
    )
    assert c.put("/v1/projects/shop", json={}, headers={**h, "If-Match": '"1"'}).status_code == 412
    assert c.get("/v1/projects/shop", headers=h).json()["config"] == {"region": "us"}
    assert [p["project_id"] for p in c.get("/v1/projects", headers=h).json()["projects"]] == ["shop"]
    assert c.get("/v1/projects/nope", headers=h).status_code == 404
    assert c.put("/v1/projects/shop", json={"config": []}, headers=h).status_code == 400
