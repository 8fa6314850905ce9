"""Core pieces: names, codec, clock, URL handling and the Database/Tenant handles."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import stateline
from stateline import Conflict, FakeClock, InvalidArgument, Put, Unavailable, VersionIs
from stateline.codec import encode
from stateline.errors import RateLimited, StatelineError
from stateline.store.protocol import prefix_end
from stateline.types import check_key, check_namespace, check_tenant


@pytest.mark.parametrize("name", ["acme", "a", "A-1_b.c", "x" * 64])
def test_valid_tenants(name: str) -> None:
    assert check_tenant(name) == name


@pytest.mark.parametrize("name", ["", " ", "-lead", "a b", "a/b", "ü", "x" * 65, "a\x00", 5, None])
def test_invalid_tenants(name: object) -> None:
    with pytest.raises(InvalidArgument) as exc:
        check_tenant(name)
    assert exc.value.field == "tenant"


@pytest.mark.parametrize("key", ["k", "with space", "quote'\"", "100%_", "ü/é", "\U0001f600", "k" * 1024])
def test_valid_keys(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "a\x00", "\t", "\x7f", "\x85", "k" * 1025, "\ud800", 1])
def test_invalid_keys(key: object) -> None:
    with pytest.raises(InvalidArgument):
        check_key(key)


def test_namespace_rules() -> None:
    assert check_namespace("runs.steps") == "runs.steps"
    with pytest.raises(InvalidArgument):
        check_namespace("has space")


def test_codec_refuses_what_would_not_round_trip() -> None:
    assert encode({"a": [1, 2.5, None, True, "x"]}) == b'{"a":[1,2.5,null,true,"x"]}'
    for bad in (math.nan, -math.inf, {1: 2}, {"a": {1, 2}}, b"x", object(), 2**64):
        with pytest.raises(InvalidArgument):
            encode(bad, "value")
    deep: object = []
    for _ in range(70):
        deep = [deep]
    with pytest.raises(InvalidArgument):
        encode(deep)


def test_prefix_end() -> None:
    assert prefix_end("ab") == "ac"
    assert prefix_end("") is None
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"


def test_fake_clock_only_moves_forward() -> None:
    c = FakeClock(1000)
    assert c.advance(0.5) == 501_000
    assert c.advance(us=5) == 501_005
    with pytest.raises(ValueError, match="forward"):
        c.advance(-1)
    with pytest.raises(ValueError, match="forward"):
        c.set(0)


def test_errors_carry_code_status_and_transient_flag() -> None:
    assert (InvalidArgument("f", "bad").status, InvalidArgument.code) == (400, "invalid_argument")
    assert Unavailable("down").transient
    assert not Conflict("x").transient
    limited = RateLimited("slow down", retry_after=2.5)
    assert limited.to_dict() == {
        "error": {"code": "rate_limited", "message": "slow down", "details": {"retry_after": 2.5}},
    }
    assert issubclass(InvalidArgument, StatelineError)


def test_open_urls(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        stateline.open("nosuch://x")
    with pytest.raises(InvalidArgument):
        stateline.open("no-scheme")
    with stateline.open("memory://") as db:
        t = db.tenant("acme")
        assert db.tenant("acme") is t
        t.commit(ops=[Put("docs", "a", 1)])
        with pytest.raises(Conflict):
            t.commit(checks=[VersionIs("docs", "a", 2)], ops=[Put("docs", "a", 2)])
        assert db.tenants() == ["acme"]
        assert t.revision() == 1
    with pytest.raises(InvalidArgument):
        db.tenant("bad name")


def test_tenant_cache_is_one_instance_per_name_and_refuses_other_options() -> None:
    t = stateline.open("memory://").tenant("acme")
    cache = t.cache("policies", max_size=10)
    assert t.cache("policies") is cache
    assert t.cache("policies", max_size=10) is cache
    with pytest.raises(InvalidArgument):
        t.cache("policies", max_size=5)
    assert t.limits("api", 5, 1.0, batch=2).hit("k").allowed
