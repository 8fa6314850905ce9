"""Locks: leases, fencing tokens under contention, paused holders, the wait-for graph and deadlocks."""

from __future__ import annotations

import threading
import time

import pytest

from stateline import Conflict, FakeClock, InvalidArgument, NotFound, Put, Tenant
from stateline.locks import Lease, Locks, WaitFor


def test_acquire_release_extend(tenant: Tenant, clock: FakeClock) -> None:
    lease = tenant.locks.acquire("db", "alice", ttl=10)
    assert isinstance(lease, Lease)
    assert (lease.name, lease.owner, lease.fencing_token) == ("db", "alice", 1)
    assert lease.expires_at == clock.now_us() + 10_000_000
    state = tenant.locks.state("db")
    assert (state.held, state.owner, state.fencing_token) == (True, "alice", 1)
    with pytest.raises(Conflict) as info:
        tenant.locks.acquire("db", "bob", ttl=10)
    assert info.value.details["holder"] == "alice"
    with pytest.raises(Conflict):
        tenant.locks.acquire("db", "alice", ttl=10)  # not re-entrant
    clock.advance(8)
    longer = tenant.locks.extend(lease, ttl=10)
    assert (longer.token, longer.fencing_token) == (lease.token, 1)
    clock.advance(8)  # past the first expiry, within the extended one
    with pytest.raises(Conflict):
        tenant.locks.acquire("db", "bob", ttl=10)
    tenant.locks.release(longer)
    assert tenant.locks.state("db").held is False
    with pytest.raises(Conflict):
        tenant.locks.release(longer)  # twice
    assert tenant.locks.acquire("db", "bob", ttl=10).fencing_token == 2


def test_fencing_tokens_increase_across_expiry_and_release(tenant: Tenant, clock: FakeClock) -> None:
    tokens = []
    for i in range(6):
        lease = tenant.locks.acquire("res", f"o{i}", ttl=5)
        tokens.append(lease.fencing_token)
        if i % 2:
            tenant.locks.release(lease)
        else:
            clock.advance(5)  # let it expire instead
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)
    assert tokens[0] == 1


def test_paused_holder_cannot_release_or_extend(tenant: Tenant, clock: FakeClock) -> None:
    paused = tenant.locks.acquire("job", "paused", ttl=10)
    clock.advance(11)  # a GC pause longer than the lease
    fresh = tenant.locks.acquire("job", "fresh", ttl=10)
    assert fresh.fencing_token > paused.fencing_token
    with pytest.raises(Conflict) as info:
        tenant.locks.release(paused)
    assert info.value.details["reason"] == "stale_lease"
    with pytest.raises(Conflict):
        tenant.locks.extend(paused, ttl=30)
    with pytest.raises(Conflict):
        tenant.locks.release("job", paused.token)
    with pytest.raises(Conflict):
        tenant.locks.check_fence("job", paused.fencing_token)  # the resource refuses the old holder
    tenant.locks.check_fence("job", fresh.fencing_token)
    assert tenant.locks.state("job").owner == "fresh"
    tenant.locks.release(fresh)


@pytest.mark.parametrize("token", ["é" * 32, "\ud800", "🔒", ""])
def test_a_token_that_is_not_one_is_refused_like_a_stale_one(tenant: Tenant, token: str) -> None:
    held = tenant.locks.acquire("job", "o", ttl=30)
    for call in (lambda: tenant.locks.release("job", token), lambda: tenant.locks.extend("job", 30, token)):
        with pytest.raises((Conflict, InvalidArgument)):  # "" is no token at all: InvalidArgument
            call()
    assert tenant.locks.state("job").owner == "o"  # still held, unchanged
    tenant.locks.release(held)


def test_another_handle_changing_a_lock_is_seen_by_this_one(tenant: Tenant, clock: FakeClock) -> None:
    """A handle commits against the version it wrote last, without reading; when another handle (another
    process) changed the lock since, it reads it and decides on what is stored."""
    mine = tenant.locks
    other = Locks(tenant.store, tenant.name)
    first = mine.acquire("db", "alice", ttl=10)
    mine.release(first)
    taken = other.acquire("db", "bob", ttl=10)  # free as far as `mine` remembers, but bob holds it now
    with pytest.raises(Conflict) as info:
        mine.acquire("db", "alice", ttl=10)
    assert info.value.details["holder"] == "bob"
    longer = other.extend(taken, ttl=30)
    clock.advance(20)  # past the expiry `other` first wrote, within the extension
    with pytest.raises(Conflict):
        mine.acquire("db", "carol", ttl=10)
    mine.release("db", taken.token)  # released through a handle that never wrote this lease
    with pytest.raises(Conflict) as info:
        other.release(longer)  # `other` remembers it held: what is stored says released
    assert info.value.details["reason"] == "stale_lease"
    again = other.acquire("db", "bob", ttl=10)
    assert again.fencing_token == taken.fencing_token + 1 == first.fencing_token + 2
    clock.advance(11)
    late = mine.acquire("db", "alice", ttl=10)  # bob's lease expired: alice takes over
    assert late.fencing_token == again.fencing_token + 1
    with pytest.raises(Conflict):
        other.extend(again, ttl=10)
    with pytest.raises(Conflict):
        other.release(again)
    assert mine.state("db").owner == "alice"
    mine.release(late)
    assert mine.state("db").held is False


def test_expired_lease_is_refused_even_before_takeover(tenant: Tenant, clock: FakeClock) -> None:
    lease = tenant.locks.acquire("x", "a", ttl=1)
    clock.advance(1)
    with pytest.raises(Conflict) as info:
        tenant.locks.extend(lease, 5)
    assert info.value.details["reason"] == "lease_expired"
    assert tenant.locks.state("x").held is False


def test_hold_context_manager(tenant: Tenant, clock: FakeClock) -> None:
    with tenant.locks.hold("cm", ttl=5, owner="me") as lease:
        assert tenant.locks.state("cm").owner == "me"
        tenant.locks.check_fence("cm", lease.fencing_token)
    assert tenant.locks.state("cm").held is False
    with pytest.raises(Conflict), tenant.locks.hold("cm", ttl=5, owner="me"):
        clock.advance(6)  # the lease ran out inside the block: leaving it says so
    with pytest.raises(RuntimeError), tenant.locks.hold("cm", ttl=5, owner="me"):
        raise RuntimeError("the block's own error wins")
    assert tenant.locks.state("cm").held is False


def test_fencing_tokens_strictly_increase_under_contention(tenant: Tenant) -> None:
    acquired: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for _ in range(15):
                lease = tenant.locks.acquire("hot", f"w{n}", ttl=600, wait=60)
                # inside the critical section: the newest token is ours, and we record it in order
                tenant.locks.check_fence("hot", lease.fencing_token)
                with guard:
                    acquired.append(lease.fencing_token)
                tenant.locks.release(lease)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert acquired == list(range(1, 8 * 15 + 1))  # strictly increasing, no token issued twice


def test_waiter_gets_the_lock_when_released(tenant: Tenant) -> None:
    holder = tenant.locks.acquire("q", "first", ttl=60)
    got: list[Lease] = []
    th = threading.Thread(target=lambda: got.append(tenant.locks.acquire("q", "second", ttl=60, wait=30)))
    th.start()
    _wait_until(lambda: [w.waiter for w in tenant.locks.waits()] == ["second"])
    assert tenant.locks.waits() == [WaitFor("second", "q", "first")]
    tenant.locks.release(holder)
    th.join()
    assert got[0].owner == "second"
    assert got[0].fencing_token == 2
    assert tenant.locks.waits() == []


def _wait_until(cond: object, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail("condition not reached")
        time.sleep(0.01)


def test_three_party_wait_cycle_is_refused_at_once(tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    leases = {o: tenant.locks.acquire(f"L-{o}", o, ttl=600) for o in ("a", "b", "c")}
    results: dict[str, object] = {}
    # a waiter looks for a cycle right after recording its wait; c must come after a's and b's first
    # look, or b, looking late, would find c's edge too and (rightly) refuse itself as well
    looked: set[str] = set()
    cycle = Locks._cycle

    def counted(self: Locks, owner: str, lock: str, holder: str) -> list[WaitFor]:
        found = cycle(self, owner, lock, holder)
        looked.add(owner)
        return found

    monkeypatch.setattr(Locks, "_cycle", counted)

    def wait_for(owner: str, lock: str) -> None:
        try:
            results[owner] = tenant.locks.acquire(lock, owner, ttl=600, wait=60)
        except Conflict as exc:
            results[owner] = exc

    ta = threading.Thread(target=wait_for, args=("a", "L-b"))
    tb = threading.Thread(target=wait_for, args=("b", "L-c"))
    ta.start()
    tb.start()
    _wait_until(lambda: len(tenant.locks.waits()) == 2 and {"a", "b"} <= looked)
    assert tenant.locks.deadlocks() == []
    with pytest.raises(Conflict) as info:
        tenant.locks.acquire("L-a", "c", ttl=600, wait=60)  # c -> a -> b -> c
    assert info.value.details["reason"] == "deadlock"
    cycle = info.value.details["cycle"]
    assert [(e["waiter"], e["lock"], e["holder"]) for e in cycle] == [
        ("c", "L-a", "a"),
        ("a", "L-b", "b"),
        ("b", "L-c", "c"),
    ]
    assert "c waits for L-a held by a" in info.value.message
    assert len(tenant.locks.waits()) == 2  # the refused waiter left no edge behind
    # unwind: c gives up L-c, so b gets it, then b gives up L-b, so a gets it
    tenant.locks.release(leases["c"])
    tb.join()
    assert isinstance(results["b"], Lease)
    tenant.locks.release(leases["b"])
    ta.join()
    assert isinstance(results["a"], Lease)


def test_deadlocks_finds_cycles_in_the_graph(tenant: Tenant) -> None:
    # two processes that recorded their waits at the same instant can both miss the other; the
    # graph then holds a cycle, which deadlocks() reports (the items are written as acquire would)
    tenant.locks.acquire("L1", "p", ttl=600)
    tenant.locks.acquire("L2", "q", ttl=600)
    tenant.locks.acquire("L3", "r", ttl=600)
    tenant.commit(
        [],
        [
            Put("locks.waits", "p", {"owner": "p", "lock": "L2", "since": 0, "until": 0}, ttl=600),
            Put("locks.waits", "q", {"owner": "q", "lock": "L1", "since": 0, "until": 0}, ttl=600),
            Put("locks.waits", "r", {"owner": "r", "lock": "L1", "since": 0, "until": 0}, ttl=600),
        ],
    )
    assert tenant.locks.deadlocks() == [[WaitFor("p", "L2", "q"), WaitFor("q", "L1", "p")]]


def test_cleanup_expired(tenant: Tenant, clock: FakeClock) -> None:
    tenant.locks.acquire("a", "o", ttl=5)
    tenant.locks.acquire("b", "o", ttl=50)
    assert tenant.locks.cleanup_expired() == 0
    clock.advance(6)
    assert tenant.locks.cleanup_expired() == 1
    assert tenant.locks.state("a").held is False
    assert tenant.locks.state("a").fencing_token == 1
    assert tenant.locks.state("b").held is True
    assert tenant.locks.acquire("a", "n", ttl=5).fencing_token == 2


def test_bad_input_is_refused_and_writes_nothing(tenant: Tenant) -> None:
    lease = tenant.locks.acquire("ok", "o", ttl=5)
    before = tenant.revision()
    for call in (
        lambda: tenant.locks.acquire("", "o", ttl=5),
        lambda: tenant.locks.acquire("n", "", ttl=5),
        lambda: tenant.locks.acquire("n", "o", ttl=0),
        lambda: tenant.locks.acquire("n", "o", ttl=float("nan")),
        lambda: tenant.locks.acquire("n", "o", ttl=5, wait=-1),
        lambda: tenant.locks.extend(lease, ttl=-3),
        lambda: tenant.locks.release("ok"),
        lambda: tenant.locks.check_fence("ok", 0),
        lambda: tenant.locks.check_fence("ok", "1"),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidArgument):
            call()
    assert tenant.revision() == before
    with pytest.raises(NotFound):
        tenant.locks.check_fence("never", 1)
