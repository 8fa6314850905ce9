"""Runtime tables on every backend: TTL cache, sticky sessions, rate limits, idempotency keys, delivery attempts."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stateline import Conflict, Database, FakeClock, InvalidArgument, Tenant
from stateline.runtime import (
    Cache,
    FingerprintMismatch,
    InProgress,
    PreviousFailure,
    RateLimiter,
)
from tests.conftest import Backend

US = 1_000_000


def _threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) in n real threads started together; re-raise the first error."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ================================================================= cache


@pytest.mark.parametrize("shared", [False, True])
def test_cache_ttl_follows_the_clock(tenant: Tenant, clock: FakeClock, shared: bool) -> None:
    c = tenant.cache(f"pol{int(shared)}", ttl=10, shared=shared)
    c.set("a", {"v": 1})
    c.set("forever", 1, ttl=None)
    c.set("short", 2, ttl=1)
    assert c.get("a") == {"v": 1}
    clock.advance(1)
    assert c.get("short") is None
    clock.advance(8.999)
    assert c.get("a") == {"v": 1}
    clock.advance(0.001)
    assert c.get("a") is None
    assert c.get("a", "dflt") == "dflt"
    clock.advance(10_000)
    assert c.get("forever") == 1


def test_cache_lru_bound_evicts_least_recently_used(tenant: Tenant) -> None:
    c = tenant.cache("lru", max_size=3)
    for k in "abc":
        c.set(k, k.upper())
    assert c.get("a") == "A"  # a is now the most recently used
    c.set("d", "D")
    assert "b" not in c
    assert [c.get(k) for k in "acd"] == ["A", "C", "D"]
    c.set("e", "E")  # use order is now a, c, d: a goes
    assert "a" not in c
    s = c.stats()
    assert (s.size, s.evictions) == (3, 2)
    assert len(c) == 3


def test_cache_counts_hits_and_misses(tenant: Tenant) -> None:
    c = tenant.cache("counts")
    assert c.get("x") is None
    c.set("x", 1)
    assert c.get("x") == 1
    assert c.get("x") == 1
    assert c.get_or_compute("y", lambda: 5) == 5
    assert c.get_or_compute("y", lambda: 6) == 5
    s = c.stats()
    assert (s.hits, s.misses) == (3, 2)
    assert s.hit_ratio == 0.6


@pytest.mark.parametrize("shared", [False, True])
def test_get_or_compute_runs_once_under_16_threads(tenant: Tenant, shared: bool) -> None:
    c = tenant.cache(f"once{int(shared)}", ttl=60, shared=shared)
    calls: list[int] = []
    lock = threading.Lock()

    def compute() -> dict[str, int]:
        with lock:
            calls.append(1)
        time.sleep(0.05)  # keep the computation open while the others arrive
        return {"answer": 42}

    results = _threads(16, lambda i: c.get_or_compute("k", compute))
    assert len(calls) == 1
    assert all(r == {"answer": 42} for r in results)
    if not shared:
        assert all(r is results[0] for r in results)  # literally the one computed object


def test_get_or_compute_failure_reaches_every_waiter_and_is_not_cached(tenant: Tenant) -> None:
    c = tenant.cache("fail")
    calls: list[int] = []

    def boom() -> int:
        calls.append(1)
        time.sleep(0.05)
        raise RuntimeError("compile failed")

    outcomes = _threads(8, lambda i: _catch(lambda: c.get_or_compute("k", boom)))
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert len(calls) == 1
    assert c.get_or_compute("k", lambda: 7) == 7


def _catch(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return exc


def test_cache_invalidate_and_clear(tenant: Tenant) -> None:
    c = tenant.cache("inv")
    c.set("a", 1)
    c.set("b", 2)
    c.invalidate("a")
    assert c.get("a") is None
    assert c.clear() == 1
    assert c.get("b") is None


def test_local_cache_holds_python_objects_and_writes_nothing(tenant: Tenant) -> None:
    before = tenant.revision()
    c = tenant.cache("compiled")
    policy = object()
    c.set("p", policy)
    assert c.get("p") is policy
    assert tenant.revision() == before


def test_shared_cache_is_seen_by_another_handle(backend: Backend, db: Database, clock: FakeClock) -> None:
    other = Database(backend.open())
    a = db.tenant("acme").cache("shared", ttl=30, shared=True)
    b = Cache(other.store, "acme", "shared", ttl=30, shared=True)
    a.set("route", {"provider": "p1"})
    assert b.get("route") == {"provider": "p1"}
    assert db.store.get("acme", "cache.shared", "route") is not None
    b.invalidate("route")
    assert a.get("route") is None
    a.set("x", 1)
    a.set("y", 2)
    assert b.clear() == 2
    assert a.get("x") is None
    with pytest.raises(InvalidArgument, match="value"):
        a.set("bad", object())
    # a local near-cache may serve a stale value for at most local_ttl
    near = Cache(other.store, "acme", "shared", ttl=30, shared=True, local_ttl=5)
    a.set("k", 1)
    assert near.get("k") == 1
    a.set("k", 2)
    assert near.get("k") == 1
    clock.advance(5)
    assert near.get("k") == 2


def test_cache_refuses_bad_arguments(tenant: Tenant) -> None:
    for kwargs, field in [
        ({"ttl": 0}, "ttl"),
        ({"ttl": "1"}, "ttl"),
        ({"max_size": 0}, "max_size"),
        ({"max_size": True}, "max_size"),
        ({"shared": 1}, "shared"),
        ({"local_ttl": -1}, "local_ttl"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            Cache(tenant.store, "acme", "x", **kwargs)
        assert e.value.field == field
    with pytest.raises(InvalidArgument, match="name"):
        Cache(tenant.store, "acme", "a.b")
    c = tenant.cache("v")
    with pytest.raises(InvalidArgument, match="key"):
        c.set("", 1)
    with pytest.raises(InvalidArgument, match="ttl"):
        c.set("k", 1, ttl=-5)
    with pytest.raises(InvalidArgument, match="fn"):
        c.get_or_compute("k", 3)  # type: ignore[arg-type]
    assert c.get("k") is None


# ================================================================= sessions


def test_sessions_bind_lookup_refresh_and_expire(tenant: Tenant, clock: FakeClock) -> None:
    s = tenant.sessions
    b = s.bind("s1", "openai-eu", ttl=100)
    assert (b.provider, b.ttl, b.expires_at) == ("openai-eu", 100, clock.now_us() + 100 * US)
    clock.advance(90)
    found = s.lookup("s1")
    assert found is not None
    assert found.provider == "openai-eu"
    assert found.expires_at == clock.now_us() + 100 * US  # refreshed on use
    clock.advance(90)
    assert s.provider("s1") == "openai-eu"  # alive only because of the refresh
    clock.advance(100)
    assert s.lookup("s1") is None


def test_sessions_lookup_within_a_tenth_of_ttl_does_not_write(tenant: Tenant, clock: FakeClock) -> None:
    s = tenant.sessions
    s.bind("s1", "p", ttl=100)
    before = tenant.revision()
    clock.advance(9)
    assert s.provider("s1") == "p"
    assert tenant.revision() == before
    clock.advance(1)
    assert s.provider("s1") == "p"
    assert tenant.revision() == before + 1


def test_sessions_unbind_and_rebind(tenant: Tenant) -> None:
    s = tenant.sessions
    s.bind("s1", "p1")
    assert s.rebind("s1", "p3", expected="p2").provider == "p1"  # not bound to p2: unchanged
    assert s.rebind("s1", "p2", expected="p1").provider == "p2"
    assert s.provider("s1") == "p2"
    assert s.rebind("s1", "p4").provider == "p4"
    assert s.unbind("s1") is True
    assert s.unbind("s1") is False
    assert s.lookup("s1") is None
    assert s.rebind("new", "p1", expected="gone").provider == "p1"  # an unbound session gets bound


def test_sessions_rebind_race_moves_once(tenant: Tenant) -> None:
    s = tenant.sessions
    s.bind("s1", "down")
    results = _threads(8, lambda i: s.rebind("s1", f"p{i}", expected="down").provider)
    assert len(set(results)) == 1
    assert s.provider("s1") == results[0]


def test_sessions_refuse_bad_arguments(tenant: Tenant) -> None:
    s = tenant.sessions
    before = tenant.revision()
    for call, field in [
        (lambda: s.bind("", "p"), "session_id"),
        (lambda: s.bind("s", ""), "provider"),
        (lambda: s.bind("s", "p", ttl=0), "ttl"),
        (lambda: s.rebind("s", "p", expected=""), "expected"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == field
    assert tenant.revision() == before


# ================================================================= rate limits


def _fixed_model(events: list[tuple[int, int]], rate: int, per: int, t0: int) -> list[bool]:
    counts: dict[int, int] = {}
    out = []
    now = t0
    for advance, cost in events:
        now += advance
        w = now // per
        ok = counts.get(w, 0) + cost <= rate
        if ok:
            counts[w] = counts.get(w, 0) + cost
        out.append(ok)
    return out


def _sliding_model(events: list[tuple[int, int]], rate: int, per: int, t0: int) -> list[bool]:
    counts: dict[int, int] = {}
    out = []
    now = t0
    for advance, cost in events:
        now += advance
        w = now // per
        elapsed = now - w * per
        weighted = int(Fraction(counts.get(w - 1, 0) * (per - elapsed), per))  # floor
        ok = weighted + counts.get(w, 0) + cost <= rate
        if ok:
            counts[w] = counts.get(w, 0) + cost
        out.append(ok)
    return out


def _bucket_model(events: list[tuple[int, int]], rate: int, per: int, t0: int) -> list[bool]:
    tokens = Fraction(rate)
    last = t0
    now = t0
    out = []
    for advance, cost in events:
        now += advance
        tokens = min(Fraction(rate), tokens + Fraction((now - last) * rate, per))
        last = now
        ok = tokens >= cost
        if ok:
            tokens -= cost
        out.append(ok)
    return out


MODELS = {"fixed_window": _fixed_model, "sliding_window": _sliding_model, "token_bucket": _bucket_model}
ALGORITHMS = list(MODELS)


VARIANTS = [(a, 1) for a in ALGORITHMS] + [("fixed_window", 4), ("sliding_window", 4)]


@pytest.mark.parametrize(("algorithm", "batch"), VARIANTS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(
        st.tuples(st.sampled_from([0, 0, 0, 1, 999, 50_000, 250_000, 700_000, 1_300_000]), st.integers(1, 3)),
        min_size=1,
        max_size=40,
    ),
    rate=st.integers(1, 6),
)
def test_rate_limit_matches_the_algorithm_exactly(
    tenant: Tenant, clock: FakeClock, algorithm: str, batch: int, events: list[tuple[int, int]], rate: int
) -> None:
    """One caller sees exactly the algorithm's answers, also when it takes permits in batches."""
    per = US  # 1 second
    key = f"k{clock.now_us()}"
    clock.advance(10)  # every example starts in fresh windows, far from the previous one
    limiter = RateLimiter(tenant.store, "acme", "exact", rate, 1.0, algorithm, batch=min(batch, rate))
    t0 = clock.now_us()
    got = []
    for advance, cost in events:
        clock.advance(us=advance)
        if cost > rate:
            with pytest.raises(InvalidArgument, match="cost"):
                limiter.hit(key, cost)
            got.append(False)
            continue
        got.append(limiter.hit(key, cost).allowed)
    expected = MODELS[algorithm]([(a, c if c <= rate else 10**9) for a, c in events], rate, per, t0)
    assert got == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rate_limit_result_fields(tenant: Tenant, clock: FakeClock, algorithm: str) -> None:
    clock.set((clock.now_us() // US + 1) * US)  # at the start of a second
    t0 = clock.now_us()
    lim = tenant.limits("fields", 4, 1.0, algorithm)
    r = lim.hit("u")
    assert (r.allowed, r.limit, r.remaining, r.retry_after) == (True, 4, 3, 0.0)
    assert bool(r)
    for _ in range(3):
        r = lim.hit("u")
    assert (r.allowed, r.remaining) == (True, 0)
    r = lim.hit("u")
    assert (r.allowed, r.remaining) == (False, 0)
    assert not r
    expected_now = {
        # (reset_at, retry_after) right after the 4 hits
        "fixed_window": (t0 + US, 1.0),
        # the next window weighs these 4 hits by (1 - e): floor(4 (1 - e)) <= 3 needs e > 0, 1 µs in
        "sliding_window": (t0 + 2 * US, 1.000001),
        # one token comes back every 0.25 s; the bucket is full again after 1 s
        "token_bucket": (t0 + US, 0.25),
    }[algorithm]
    assert (r.reset_at, r.retry_after) == expected_now
    clock.advance(0.5)
    r = lim.hit("u")
    if algorithm == "token_bucket":
        assert (r.allowed, r.remaining, r.retry_after) == (True, 1, 0.0)  # two tokens came back, one used
    else:
        assert (r.allowed, r.remaining) == (False, 0)
        assert r.retry_after == {"fixed_window": 0.5, "sliding_window": 0.500001}[algorithm]


def test_token_bucket_refills_continuously(tenant: Tenant, clock: FakeClock) -> None:
    lim = tenant.limits("tb", 10, 1.0, "token_bucket")
    assert sum(lim.hit("u").allowed for _ in range(12)) == 10
    r = lim.hit("u")
    assert not r.allowed
    assert r.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert lim.hit("u").allowed
    assert not lim.hit("u").allowed
    clock.advance(0.35)
    assert sum(lim.hit("u").allowed for _ in range(5)) == 3


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_peek_consumes_nothing_and_reset_restores(tenant: Tenant, algorithm: str) -> None:
    lim = tenant.limits("peek", 3, 60.0, algorithm)
    assert lim.peek("u").allowed
    assert lim.peek("u").remaining == 2  # what hit() would answer: 2 left after it
    for _ in range(3):
        assert lim.hit("u").allowed
    assert not lim.peek("u").allowed
    assert not lim.hit("u").allowed
    lim.reset("u")
    assert lim.hit("u").allowed
    assert lim.hit("other").remaining == 2


def test_limiters_with_one_name_and_different_algorithms_do_not_collide(tenant: Tenant, db: Database) -> None:
    fixed = tenant.limits("api", 2, 60.0, "fixed_window")
    sliding = tenant.limits("api", 2, 60.0, "sliding_window")
    assert fixed.hit("u").allowed
    assert fixed.hit("u").allowed
    assert not fixed.hit("u").allowed
    assert sliding.hit("u").allowed
    other = db.tenant("globex").limits("api", 2, 60.0, "fixed_window")
    assert other.hit("u").allowed  # per tenant by construction


@pytest.mark.parametrize(("algorithm", "batch"), [*VARIANTS[:3], ("fixed_window", 8), ("sliding_window", 8)])
def test_no_over_admission_under_8_threads(tenant: Tenant, algorithm: str, batch: int) -> None:
    hits = 1000
    rate = 50
    # one limiter object per thread, as router workers would make them (they share what the process saw)
    limiters = [RateLimiter(tenant.store, "acme", "burst", rate, 3600.0, algorithm, batch=batch) for _ in range(8)]
    allowed = _threads(8, lambda i: sum(limiters[i].hit("tenant-x").allowed for _ in range(hits)))
    assert sum(allowed) == rate  # never more, and with cost 1 on a frozen clock never fewer


@pytest.mark.parametrize(("algorithm", "batch"), [*VARIANTS[:3], ("fixed_window", 8), ("sliding_window", 8)])
def test_no_over_admission_with_mixed_costs_under_8_threads(tenant: Tenant, algorithm: str, batch: int) -> None:
    rate = 60
    limiters = [RateLimiter(tenant.store, "acme", "mixed", rate, 3600.0, algorithm, batch=batch) for _ in range(8)]

    def run(i: int) -> int:
        admitted = 0
        for j in range(300):
            cost = 1 + (i + j) % 3
            if limiters[i].hit("k", cost).allowed:
                admitted += cost
        return admitted

    total = sum(_threads(8, run))
    assert rate - 2 <= total <= rate  # never over; a cost-2 or cost-3 hit may not fit the last slot


_CHILD = """
import sys
from stateline import FakeClock, open_store
from stateline.runtime import RateLimiter
url, algorithm, n, start, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
store = open_store(url, clock=FakeClock(start))
lim = RateLimiter(store, "acme", "procs", 40, 3600.0, algorithm, batch=batch)
print(sum(lim.hit("k").allowed for _ in range(n)))
store.close()
"""


@pytest.mark.parametrize(("algorithm", "batch"), [*VARIANTS[:3], ("sliding_window", 8)])
def test_no_over_admission_across_processes(
    process_backend: Backend, clock: FakeClock, algorithm: str, batch: int
) -> None:
    backend = process_backend
    backend.open().ping()  # create the schema before the children race to
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, backend.url, algorithm, "150", str(clock.now_us()), str(batch)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    total = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        total += int(out.strip())
    if batch == 1:
        assert total == 40
    else:  # never over; permits a process took and did not use are lost when it exits
        assert 40 - 3 * (batch - 1) <= total <= 40


def test_rate_limiter_refuses_bad_arguments(tenant: Tenant) -> None:
    for args, field in [
        ((0, 1.0, "fixed_window"), "rate"),
        ((1.5, 1.0, "fixed_window"), "rate"),
        ((5, 0, "fixed_window"), "per"),
        ((5, float("nan"), "fixed_window"), "per"),
        ((5, 1.0, "leaky"), "algorithm"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            tenant.limits("bad", *args)  # type: ignore[arg-type]
        assert e.value.field == field
    for kwargs, field in [
        ({"batch": 0}, "batch"),
        ({"batch": 6}, "batch"),
        ({"batch": 2, "algorithm": "token_bucket"}, "batch"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            RateLimiter(tenant.store, "acme", "bad", 5, 1.0, **kwargs)  # type: ignore[arg-type]
        assert e.value.field == field
    lim = tenant.limits("ok", 5, 1.0)
    before = tenant.revision()
    for call, field in [
        (lambda: lim.hit("u", 0), "cost"),
        (lambda: lim.hit("u", 6), "cost"),
        (lambda: lim.hit("u", True), "cost"),
        (lambda: lim.hit(""), "key"),
        (lambda: lim.hit(None), "key"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == field
    assert tenant.revision() == before


# ================================================================= idempotency


def test_idempotency_runs_once_and_returns_the_stored_result(tenant: Tenant) -> None:
    idem = tenant.idempotency
    calls: list[int] = []

    def work() -> dict[str, Any]:
        calls.append(1)
        return {"charged": 10}

    assert idem.run("req-1", work) == {"charged": 10}
    assert idem.run("req-1", work) == {"charged": 10}
    assert len(calls) == 1
    assert idem.status("req-1") == "done"
    with idem.once("req-1") as slot:
        assert slot.done
        assert not slot.owner
        assert slot.result == {"charged": 10}
        with pytest.raises(Conflict, match="already has a result"):
            slot.set(1)


def test_idempotency_16_concurrent_callers_run_the_body_once(tenant: Tenant) -> None:
    idem = tenant.idempotency
    calls: list[int] = []
    lock = threading.Lock()

    def work() -> dict[str, int]:
        with lock:
            calls.append(1)
        time.sleep(0.1)
        return {"order": 7}

    results = _threads(16, lambda i: idem.run("order-7", work, wait=30.0))
    assert len(calls) == 1
    assert results == [{"order": 7}] * 16


def test_idempotency_repeat_while_running_is_in_progress(tenant: Tenant) -> None:
    idem = tenant.idempotency
    inside = threading.Event()
    release = threading.Event()

    def slow() -> str:
        inside.set()
        release.wait(30)
        return "ok"

    t = threading.Thread(target=lambda: idem.run("r", slow))
    t.start()
    try:
        assert inside.wait(30)
        with pytest.raises(InProgress) as e:
            idem.run("r", lambda: "second")
        assert isinstance(e.value, Conflict)
        assert "in progress" in str(e.value)
        assert idem.status("r") == "running"
    finally:
        release.set()
        t.join()
    assert idem.run("r", lambda: "third") == "ok"


def test_idempotency_failure_releases_the_key(tenant: Tenant) -> None:
    idem = tenant.idempotency

    def boom() -> None:
        raise ValueError("upstream down")

    with pytest.raises(ValueError, match="upstream"):
        idem.run("r", boom)
    assert idem.status("r") is None
    assert idem.run("r", lambda: 5) == 5


def test_idempotency_remembers_failures_when_asked(tenant: Tenant) -> None:
    idem = tenant.idempotency

    def boom() -> None:
        raise ValueError("card declined")

    with pytest.raises(ValueError, match="declined"):
        idem.run("pay", boom, remember_failures=True)
    with pytest.raises(PreviousFailure) as e:
        idem.run("pay", lambda: 1, remember_failures=True)
    assert e.value.details["error"] == {"type": "ValueError", "message": "card declined"}
    assert idem.status("pay") == "failed"


def test_idempotency_fingerprint_mismatch_is_refused(tenant: Tenant) -> None:
    idem = tenant.idempotency
    fp1 = idem.fingerprint_of({"amount": 10, "to": "bob"})
    assert fp1 == idem.fingerprint_of({"to": "bob", "amount": 10})
    fp2 = idem.fingerprint_of({"amount": 99, "to": "bob"})
    assert idem.run("k", lambda: "first", fingerprint=fp1) == "first"
    with pytest.raises(FingerprintMismatch):
        idem.run("k", lambda: "second", fingerprint=fp2)
    assert idem.run("k", lambda: "x", fingerprint=fp1) == "first"
    assert idem.run("k", lambda: "x") == "first"  # no fingerprint given: not compared


def test_idempotency_kinds_are_separate_and_results_expire(tenant: Tenant, clock: FakeClock) -> None:
    idem = tenant.idempotency
    assert idem.run("42", lambda: "request", ttl=60) == "request"
    assert idem.run("42", lambda: "message", kind="message") == "message"
    assert idem.run("42", lambda: "again", kind="message") == "message"
    assert tenant.get("idempotency.message", "42") is not None
    clock.advance(60)
    assert idem.run("42", lambda: "fresh", ttl=60) == "fresh"


def test_idempotency_context_manager(tenant: Tenant) -> None:
    idem = tenant.idempotency
    with idem.once("cm") as slot:
        assert slot.owner
        assert not slot.done
        slot.set([1, 2])
    with idem.once("cm") as slot:
        assert slot.done
        assert slot.result == [1, 2]
    with idem.once("none") as slot:
        pass  # leaving without set() stores None: the work counts as done
    with idem.once("none") as slot:
        assert slot.done
        assert slot.result is None
    with pytest.raises(InvalidArgument, match="result"), idem.once("bad") as slot:
        slot.set(object())
    assert idem.status("bad") is None  # a non-JSON result released the key


def test_idempotency_decorator_with_keys_from_arguments(tenant: Tenant) -> None:
    idem = tenant.idempotency
    calls: list[str] = []

    @idem.once(lambda order_id, amount: f"order:{order_id}", kind="business", fingerprint=lambda o, a: str(a))
    def charge(order_id: str, amount: int) -> dict[str, Any]:
        calls.append(order_id)
        return {"order": order_id, "amount": amount}

    assert charge("a", 10) == {"order": "a", "amount": 10}
    assert charge("a", 10) == {"order": "a", "amount": 10}
    assert charge("b", 5) == {"order": "b", "amount": 5}
    with pytest.raises(FingerprintMismatch):
        charge("a", 11)
    assert calls == ["a", "b"]
    assert charge.__name__ == "charge"
    with pytest.raises(InvalidArgument, match="key"), idem.once(lambda: "x"):
        pass


def test_idempotency_expired_lease_lets_another_caller_in(tenant: Tenant, clock: FakeClock) -> None:
    idem = tenant.idempotency
    first = idem.once("job", lease=10)
    slot = first.__enter__()
    clock.advance(11)  # the first caller is presumed dead
    assert idem.run("job", lambda: "second") == "second"
    with pytest.raises(Conflict, match="another caller"):
        slot.set("first")
    first.__exit__(None, None, None)
    assert idem.run("job", lambda: "third") == "second"


def test_idempotency_refuses_bad_arguments(tenant: Tenant) -> None:
    idem = tenant.idempotency
    before = tenant.revision()
    for call, field in [
        (lambda: idem.once(""), "key"),
        (lambda: idem.once("k", ttl=0), "ttl"),
        (lambda: idem.once("k", kind="a b"), "kind"),
        (lambda: idem.once("k", kind=""), "kind"),
        (lambda: idem.once("k", fingerprint=""), "fingerprint"),
        (lambda: idem.once("k", wait=-1), "wait"),
        (lambda: idem.once("k", lease=0), "lease"),
        (lambda: idem.once("k", remember_failures=1), "remember_failures"),  # type: ignore[arg-type]
        (lambda: idem.run("k", 5), "fn"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == field
    assert tenant.revision() == before


# ================================================================= deliveries


def test_deliveries_count_attempts_enforce_max_and_expire(tenant: Tenant, clock: FakeClock) -> None:
    d = tenant.deliveries
    assert d.count("m1") == 0
    assert [d.attempt("m1", ttl=60) for _ in range(3)] == [1, 2, 3]
    assert not d.exceeded("m1", 3)
    assert d.attempt("m1") == 4
    assert d.exceeded("m1", 3)
    assert d.count("m2") == 0
    d.reset("m1")
    assert d.count("m1") == 0
    d.attempt("m3", ttl=60)
    clock.advance(30)
    d.attempt("m3", ttl=60)  # the TTL runs from the first attempt
    clock.advance(30)
    assert d.count("m3") == 0
    with pytest.raises(InvalidArgument, match="max"):
        d.exceeded("m1", -1)
    with pytest.raises(InvalidArgument, match="message_id"):
        d.attempt("")


def test_deliveries_count_every_concurrent_attempt(tenant: Tenant) -> None:
    d = tenant.deliveries
    got = _threads(8, lambda i: [d.attempt("m") for _ in range(20)])
    numbers = sorted(n for per_thread in got for n in per_thread)
    assert numbers == list(range(1, 161))
