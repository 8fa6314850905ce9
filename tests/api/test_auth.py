"""API keys over HTTP: 401 without a valid key (missing, malformed, unknown, expired, revoked), 403 without scope."""

from __future__ import annotations

import pytest

from stateline.api.auth import KeyStore, Principal, check_scopes
from stateline.errors import InvalidArgument

from .conftest import Api


def test_no_key_is_401_with_the_error_shape(mem_api: Api) -> None:
    for method, path in [
        ("GET", "/v1/items/docs/a"),
        ("PUT", "/v1/items/docs/a"),
        ("GET", "/v1/changes"),
        ("GET", "/v1/keys"),
    ]:
        r = mem_api.client.request(method, path, json={})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "unauthenticated"
        assert set(r.json()["error"]) == {"code", "message", "details"}


@pytest.mark.parametrize(
    "header",
    [
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer sl_0123456789ab_secret"},  # unknown id
        {"X-API-Key": "sl_zz_secret"},
    ],
)
def test_malformed_or_unknown_keys_are_401(mem_api: Api, header: dict[str, str]) -> None:
    r = mem_api.client.get("/v1/items/docs/a", headers=header)
    assert r.status_code == 401
    assert r.json()["error"]["message"] in {
        "invalid API key",
        "an API key is required: send 'Authorization: Bearer sl_...' or 'X-API-Key'",
    }


def test_right_id_wrong_secret_is_401(mem_api: Api) -> None:
    token = mem_api.key("acme")["Authorization"].removeprefix("Bearer ")
    forged = token[: token.rindex("_") + 1] + "x" * 43
    r = mem_api.client.get("/v1/items/docs/a", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401


def test_x_api_key_header_works(mem_api: Api) -> None:
    token = mem_api.key("acme")["Authorization"].removeprefix("Bearer ")
    r = mem_api.client.get("/v1/items/docs/a", headers={"X-API-Key": token})
    assert r.status_code == 404  # authenticated; the item does not exist


def test_read_key_cannot_write_and_layer_scopes_are_confined(mem_api: Api) -> None:
    read = mem_api.key("acme", ["read"])
    assert mem_api.client.get("/v1/items/docs/a", headers=read).status_code == 404
    r = mem_api.client.put("/v1/items/docs/a", json=1, headers=read)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    assert mem_api.client.get("/v1/items/docs/a", headers=read).status_code == 404  # nothing written
    store_only = mem_api.key("acme", ["store:write"])
    assert mem_api.client.put("/v1/items/docs/a", json=1, headers=store_only).status_code == 201
    assert mem_api.client.get("/v1/changes", headers=store_only).status_code == 403
    assert mem_api.client.get("/v1/keys", headers=store_only).status_code == 403
    changes_only = mem_api.key("acme", ["changes:read"])
    assert mem_api.client.get("/v1/changes", headers=changes_only).status_code == 200
    assert mem_api.client.get("/v1/items/docs/a", headers=changes_only).status_code == 403


def test_expired_key_is_401(mem_api: Api) -> None:
    h = mem_api.key("acme", expires_in=60)
    assert mem_api.client.get("/v1/items/docs/a", headers=h).status_code == 404
    mem_api.clock.advance(61)
    r = mem_api.client.get("/v1/items/docs/a", headers=h)
    assert r.status_code == 401
    assert "expired" in r.json()["error"]["message"]


def test_revoked_key_is_401_at_once_through_the_api(mem_api: Api) -> None:
    admin = mem_api.key("acme", ["admin"])
    user = mem_api.key("acme")
    key_id = user["Authorization"].split("_")[1]
    assert mem_api.client.get("/v1/items/docs/a", headers=user).status_code == 404
    r = mem_api.client.delete(f"/v1/keys/{key_id}", headers=admin)
    assert r.status_code == 200
    assert r.json()["revoked"] is True
    r = mem_api.client.get("/v1/items/docs/a", headers=user)
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]["message"]


def test_revoke_by_another_process_is_seen_once_the_cache_expires(mem_api: Api) -> None:
    mem_api.ctx.keys.cache_seconds = 0  # what key_cache_seconds=0 configures
    user = mem_api.key("acme")
    assert mem_api.client.get("/v1/items/docs/a", headers=user).status_code == 404
    other = KeyStore(mem_api.db.store)  # e.g. `stateline keys revoke` elsewhere
    other.revoke(user["Authorization"].split("_")[1])
    assert mem_api.client.get("/v1/items/docs/a", headers=user).status_code == 401


def test_key_management_is_per_tenant(mem_api: Api) -> None:
    admin_a = mem_api.key("acme", ["admin"])
    admin_b = mem_api.key("globex", ["admin"])
    r = mem_api.client.post("/v1/keys", json={"scopes": ["read"], "name": "reader"}, headers=admin_a)
    assert r.status_code == 201
    made = r.json()
    assert made["tenant"] == "acme"
    assert made["key"].startswith(f"sl_{made['id']}_")
    # The new key works, only in its tenant, and only for reading.
    h = {"Authorization": f"Bearer {made['key']}"}
    assert mem_api.client.get("/v1/items/docs/a", headers=h).status_code == 404
    assert mem_api.client.put("/v1/items/docs/a", json=1, headers=h).status_code == 403
    # A tenant cannot mint keys for another tenant, see, or revoke them.
    assert (
        mem_api.client.post("/v1/keys", json={"scopes": ["read"], "tenant": "acme"}, headers=admin_b).status_code == 403
    )
    assert mem_api.client.get(f"/v1/keys/{made['id']}", headers=admin_b).status_code == 404
    assert mem_api.client.delete(f"/v1/keys/{made['id']}", headers=admin_b).status_code == 404
    listed = mem_api.client.get("/v1/keys", headers=admin_b).json()["keys"]
    assert all(k["tenant"] == "globex" for k in listed)
    # Secrets and hashes are never listed.
    listed_a = mem_api.client.get("/v1/keys", headers=admin_a).text
    assert made["key"] not in listed_a
    assert "hash" not in listed_a
    # Bad scopes are refused.
    r = mem_api.client.post("/v1/keys", json={"scopes": ["root"]}, headers=admin_a)
    assert r.status_code == 400
    assert r.json()["error"]["details"]["field"] == "scopes[0]"


def test_system_keys_manage_every_tenant_but_read_no_data(mem_api: Api) -> None:
    system = mem_api.key("system", ["admin"])
    r = mem_api.client.post("/v1/keys", json={"scopes": ["read", "write"], "tenant": "acme"}, headers=system)
    assert r.status_code == 201
    assert r.json()["tenant"] == "acme"
    assert mem_api.client.get("/v1/items/api.keys/whatever", headers=system).status_code == 403
    assert mem_api.client.get("/v1/changes", headers=system).status_code == 403
    assert any(k["tenant"] == "acme" for k in mem_api.client.get("/v1/keys", headers=system).json()["keys"])


def test_scopes_are_validated() -> None:
    assert check_scopes(["read", "docs:write", "read"]) == ("read", "docs:write")
    for bad in [[], "read", ["nope"], ["docs:nope"], ["nolayer:read"], [1]]:
        with pytest.raises(InvalidArgument):
            check_scopes(bad)
    p = Principal("k", "acme", frozenset({"docs:write", "read"}))
    assert p.allows("docs", "read")
    assert p.allows("docs", "write")
    assert p.allows("runs", "read")
    assert not p.allows("runs", "write")
    assert not p.allows("docs", "admin")
