"""Raw store routes on every backend: ETag / If-Match / If-None-Match flows, batch get, scan, the transaction."""

from __future__ import annotations

from .conftest import Api


def test_etag_flow(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.put("/v1/items/docs/a", json={"n": 1}, headers={**h, "If-None-Match": "*"})
    assert (r.status_code, r.headers["etag"], r.json()["version"]) == (201, '"1"', 1)
    r = c.put("/v1/items/docs/a", json={"n": 1}, headers={**h, "If-None-Match": "*"})
    assert r.status_code == 412
    assert r.json()["error"]["details"]["failures"] == [
        {"check": "absent", "namespace": "docs", "key": "a", "found": 1}
    ]
    r = c.get("/v1/items/docs/a", headers=h)
    assert (r.status_code, r.headers["etag"], r.json()["value"]) == (200, '"1"', {"n": 1})
    assert c.get("/v1/items/docs/a", headers={**h, "If-None-Match": '"1"'}).status_code == 304
    assert c.get("/v1/items/docs/a", headers={**h, "If-None-Match": '"7"'}).status_code == 200
    r = c.put("/v1/items/docs/a", json={"n": 2}, headers={**h, "If-Match": '"1"'})
    assert (r.status_code, r.headers["etag"]) == (200, '"2"')
    r = c.put("/v1/items/docs/a", json={"n": 3}, headers={**h, "If-Match": '"1"'})  # a lost update, refused
    assert r.status_code == 412
    assert r.json()["error"]["details"]["failures"][0]["found"] == 2
    assert c.get("/v1/items/docs/a", headers=h).json()["value"] == {"n": 2}
    assert c.put("/v1/items/docs/new", json=1, headers={**h, "If-Match": "*"}).status_code == 412
    assert c.put("/v1/items/docs/a", json=1, headers={**h, "If-Match": "abc"}).status_code == 400
    assert c.delete("/v1/items/docs/a", headers={**h, "If-Match": '"1"'}).status_code == 412
    r = c.delete("/v1/items/docs/a", headers={**h, "If-Match": '"2"'})
    assert (r.status_code, r.json()["version"]) == (200, 0)
    assert c.delete("/v1/items/docs/a", headers=h).status_code == 404
    assert c.get("/v1/items/docs/a", headers=h).status_code == 404


def test_ttl_and_keys_with_slashes(api: Api) -> None:
    c, h = api.client, api.key("acme")
    assert c.put("/v1/items/cache/a/b/c", json="v", params={"ttl": 5}, headers=h).status_code == 201
    r = c.get("/v1/items/cache/a/b/c", headers=h)
    assert r.json()["key"] == "a/b/c"
    assert r.json()["expires_at"] is not None
    api.clock.advance(6)
    assert c.get("/v1/items/cache/a/b/c", headers=h).status_code == 404


def test_bad_input_is_400_and_writes_nothing(api: Api) -> None:
    c, h = api.client, api.key("acme")
    r = c.put("/v1/items/docs/a", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["details"]["field"] == "body"
    r = c.post(
        "/v1/transaction",
        json={
            "ops": [
                {"op": "put", "namespace": "ok", "key": "k", "value": 1},
                {"op": "put", "namespace": "bad ns!", "key": "k"},
            ]
        },
        headers=h,
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_argument"
    r = c.post("/v1/transaction", json={"ops": [{"op": "explode"}]}, headers=h)
    assert r.status_code == 400
    assert c.post("/v1/transaction", json={"ops": []}, headers=h).status_code == 400
    assert c.get("/v1/stats", headers=h).json()["revision"] == 0


def test_transaction_commits_all_or_reports_every_failed_check(api: Api) -> None:
    c, h = api.client, api.key("acme")
    ok = c.post(
        "/v1/transaction",
        json={
            "checks": [
                {"check": "absent", "namespace": "docs", "key": "a"},
                {"check": "stream_at", "stream": "s:1", "seq": 0},
            ],
            "ops": [
                {"op": "put", "namespace": "docs", "key": "a", "value": {"x": 1}},
                {"op": "incr", "namespace": "n", "key": "hits", "by": 5},
                {"op": "append", "stream": "s:1", "events": [{"type": "made", "data": 1}, {"type": "made", "data": 2}]},
            ],
            "meta": {"reason": "test"},
        },
        headers=h,
    )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["counters"] == [{"namespace": "n", "key": "hits", "value": 5}]
    assert body["seqs"] == {"s:1": 2}
    bad = c.post(
        "/v1/transaction",
        json={
            "checks": [
                {"check": "version_is", "namespace": "docs", "key": "a", "version": 9},
                {"check": "absent", "namespace": "docs", "key": "a"},
                {"check": "exists", "namespace": "docs", "key": "zz"},
            ],
            "ops": [{"op": "delete", "namespace": "docs", "key": "a"}],
        },
        headers=h,
    )
    assert bad.status_code == 409
    failures = bad.json()["error"]["details"]["failures"]
    assert [f["check"] for f in failures] == ["version_is", "absent", "exists"]
    assert c.get("/v1/items/docs/a", headers=h).status_code == 200
    log = c.get("/v1/log/s:1", headers=h).json()
    assert [e["data"] for e in log["events"]] == [1, 2]
    change = c.get("/v1/changes", headers=h).json()["changes"][0]
    assert change["meta"]["reason"] == "test"
    assert change["meta"]["actor"].startswith("key:")


def test_batch_get_and_scan(api: Api) -> None:
    c, h = api.client, api.key("acme")
    for i in range(5):
        c.put(f"/v1/items/docs/k{i}", json=i, headers=h)
    r = c.post(
        "/v1/batch/get",
        json={"keys": [{"namespace": "docs", "key": "k3"}, {"namespace": "docs", "key": "nope"}]},
        headers=h,
    )
    assert [None if i is None else i["value"] for i in r.json()["items"]] == [3, None]
    page = c.get("/v1/items/docs", params={"limit": 2}, headers=h).json()
    assert [i["key"] for i in page["items"]] == ["k0", "k1"]
    page = c.get("/v1/items/docs", params={"limit": 3, "after": page["next"]}, headers=h).json()
    assert [i["key"] for i in page["items"]] == ["k2", "k3", "k4"]


def test_raw_writes_to_audit_and_api_namespaces_need_admin(api: Api) -> None:
    h = api.key("acme")
    assert api.client.put("/v1/items/audit/x", json=1, headers=h).status_code == 403
    assert api.client.put("/v1/items/api.idempotency/x", json=1, headers=h).status_code == 403
    r = api.client.post(
        "/v1/transaction", json={"ops": [{"op": "append", "stream": "audit:log", "events": [{"type": "x"}]}]}, headers=h
    )
    assert r.status_code == 403
    assert api.client.put("/v1/items/audit/x", json=1, headers=api.key("acme", ["store:admin"])).status_code == 201
