"""Runs: DAG creation, leased claims under real concurrency, retries, dead letters, cancel, metering, history."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stateline
from stateline import Conflict, Database, FakeClock, InvalidArgument, NotFound, PayloadTooLarge, Tenant
from stateline.runs import (
    ASSIGNED_EVENT_FIELDS,
    ASSIGNED_SUBJECT,
    CORRELATION_FIELDS,
    RESULT_EVENT_FIELDS,
    RESULT_SUBJECT,
    STEP_TRANSITIONS,
    USAGE_EVENT_FIELDS,
    USAGE_SUBJECT,
    Claim,
    RetryPolicy,
    Runs,
    StepSpec,
)
from tests.conftest import Backend

CYCLE = [{"id": "a", "depends_on": ["c"]}, {"id": "b", "depends_on": ["a"]}, {"id": "c", "depends_on": ["b"]}]
NO_JITTER = RetryPolicy(initial_delay=10.0, multiplier=2.0, max_delay=100.0, jitter=0.0)


def drain(runs: Runs, worker: str = "w", **claim: Any) -> list[str]:
    """Claim and complete until nothing is ready; returns the step ids in the order they were claimed."""
    order: list[str] = []
    while True:
        got = runs.claim(worker, **claim)
        if not got:
            return order
        for c in got:
            order.append(c.step_id)
            runs.complete(c, c.lease_token, {"done": c.step_id})


def events_of(runs: Runs, run_id: str, type_: str) -> list[dict[str, Any]]:
    return [e.data for e in runs.history(run_id) if e.type == type_]


# ---------------------------------------------------------------- create and validation


def test_create_get_and_history(tenant: Tenant) -> None:
    run = tenant.runs.create(
        "flow-a",
        [StepSpec("a", kind="llm", payload={"q": 1}), {"id": "b", "depends_on": ["a"], "payload": [1, 2]}],
        run_id="run-1",
        metadata={"owner": "team-x"},
        trace_id="trace-1",
    )
    assert run.status == "pending"
    assert run.step_ids == ("a", "b")
    got = tenant.runs.get("run-1")
    assert [s.status for s in got.steps] == ["pending", "pending"]
    assert got.step("a").payload == {"q": 1}
    assert got.step("b").depends_on == ("a",)
    assert got.metadata == {"owner": "team-x"}
    (created,) = tenant.runs.history("run-1")
    assert created.type == "run.created"
    assert created.data["trace_id"] == "trace-1"
    assert created.data["tenant_id"] == "acme"
    with pytest.raises(Conflict):
        tenant.runs.create("flow-a", [StepSpec("a")], run_id="run-1")
    with pytest.raises(NotFound):
        tenant.runs.get("nope")


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([], "steps"),
        ([{"id": "a"}, {"id": "a"}], "steps[1].id"),
        ([{"id": "a", "depends_on": ["zz"]}], "steps[0].depends_on"),
        ([{"id": "a", "depends_on": ["a"]}], "steps[0].depends_on"),
        (
            [{"id": "a", "depends_on": ["c"]}, {"id": "b", "depends_on": ["a"]}, {"id": "c", "depends_on": ["b"]}],
            "steps",
        ),
        ([{"id": "a/b"}], "steps[0].id"),
        ([{"id": "a", "kind": ""}], "steps[0].kind"),
        ([{"id": "a", "max_attempts": 0}], "steps[0].max_attempts"),
        ([{"id": "a", "payload": float("nan")}], "steps[0].payload"),
        ([{"id": "a", "retry": {"initial_delay": -1}}], "steps[0].retry.initial_delay"),
        ([{"id": "a", "bogus": 1}], "steps[0]"),
        ("ab", "steps"),
    ],
)
def test_bad_runs_are_refused_and_write_nothing(tenant: Tenant, steps: Any, field: str) -> None:
    before = tenant.revision()
    with pytest.raises(InvalidArgument) as info:
        tenant.runs.create("flow", steps)
    assert info.value.field == field
    assert tenant.revision() == before


def test_cycle_is_named(tenant: Tenant) -> None:
    with pytest.raises(InvalidArgument) as info:
        tenant.runs.create(
            "f", [{"id": "a", "depends_on": ["c"]}, {"id": "b", "depends_on": ["a"]}, {"id": "c", "depends_on": ["b"]}]
        )
    cycle = info.value.details["cycle"]
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}


def test_bad_worker_calls_write_nothing(tenant: Tenant) -> None:
    tenant.runs.create("f", [StepSpec("a")], run_id="r")
    (c,) = tenant.runs.claim("w")
    before = tenant.revision()
    for call in (
        lambda: tenant.runs.claim(""),
        lambda: tenant.runs.claim("w", lease=0),
        lambda: tenant.runs.claim("w", lease=float("inf")),
        lambda: tenant.runs.claim("w", limit=0),
        lambda: tenant.runs.claim("w", kinds="default"),
        lambda: tenant.runs.complete(c, c.lease_token, result={1: 2}),
        lambda: tenant.runs.complete(c, c.lease_token, result={"x": float("nan")}),
        lambda: tenant.runs.complete(c, c.lease_token, result={"text": "\ud800"}),
        lambda: tenant.runs.complete(c, c.lease_token, result={"when": threading}),
        lambda: tenant.runs.fail(c, c.lease_token, {"x": float("inf")}),
        lambda: tenant.runs.complete(c, c.lease_token, usage={"tokens": -1, "cost_usd": 0.0}),
        lambda: tenant.runs.complete(c, c.lease_token, usage={"tokens": 1, "cost_usd": float("nan")}),
        lambda: tenant.runs.complete(c, c.lease_token, usage={"tokens": 1, "dollars": 1}),
        lambda: tenant.runs.complete(c, ""),
        lambda: tenant.runs.complete("no-slash", c.lease_token),
        lambda: tenant.runs.fail(c, c.lease_token, None),
        lambda: tenant.runs.fail(c, c.lease_token, "x", retryable="yes"),  # type: ignore[arg-type]
        lambda: tenant.runs.heartbeat(c, c.lease_token, lease=-1),
        lambda: tenant.runs.list(status="bogus"),
        lambda: tenant.runs.usage_by_tenant(from_=-5),
    ):
        with pytest.raises(InvalidArgument):
            call()
    assert tenant.revision() == before
    assert tenant.runs.step(c).status == "assigned"


def test_a_result_over_the_value_limit_writes_nothing(tenant: Tenant) -> None:
    tenant.runs.create("f", [StepSpec("a")], run_id="r")
    (c,) = tenant.runs.claim("w")
    before = tenant.revision()
    with pytest.raises(PayloadTooLarge):
        tenant.runs.complete(c, c.lease_token, result="x" * (tenant.store.max_value_bytes + 1))
    assert tenant.revision() == before
    assert tenant.runs.step(c).status == "assigned"
    assert tenant.runs.complete(c, c.lease_token, result="fits").status == "completed"


# ---------------------------------------------------------------- the happy path and event shapes


def test_claim_start_complete_and_event_shapes(tenant: Tenant) -> None:
    tenant.runs.create("flow-a", [StepSpec("a", kind="llm", idempotency_key="idem-a")], run_id="r1", trace_id="t1")
    assert tenant.runs.claim("w1", kinds=["other"]) == []
    (c,) = tenant.runs.claim("w1", lease=60, kinds=["llm"])
    assert isinstance(c, Claim)
    assert (c.run_id, c.step_id, c.attempt, c.kind, c.idempotency_key) == ("r1", "a", 1, "llm", "idem-a")
    assert tenant.runs.get("r1").status == "running"
    assert tenant.runs.claim("w2") == []  # one owner at a time
    tenant.runs.start(c, c.lease_token)
    done = tenant.runs.complete(c, c.lease_token, {"answer": 42})
    assert done.status == "completed"
    assert done.result == {"answer": 42}
    assert tenant.runs.get("r1").status == "completed"

    history = tenant.runs.history("r1")
    assert [e.type for e in history] == [
        "run.created",
        "step.assigned",
        "run.running",
        "step.running",
        "step.completed",
        "run.completed",
    ]
    for e in history:
        assert set(CORRELATION_FIELDS) <= set(e.data)
        assert e.data["run_id"] == "r1"
        assert e.data["flow_id"] == "flow-a"
        assert e.data["trace_id"] == "t1"
        assert e.data["tenant_id"] == "acme"
    assigned = history[1]
    assert assigned.meta == {"subject": ASSIGNED_SUBJECT}
    assert set(ASSIGNED_EVENT_FIELDS) <= set(assigned.data)
    assert assigned.data["worker_id"] == "w1"
    assert assigned.data["idempotency_key"] == "idem-a"
    assert assigned.data["assignment_id"] == c.assignment_id
    result = history[4]
    assert result.meta == {"subject": RESULT_SUBJECT}
    assert set(RESULT_EVENT_FIELDS) <= set(result.data)
    assert (result.data["status"], result.data["result"], result.data["error"]) == ("success", {"answer": 42}, None)
    assert result.data["assignment_id"] == c.assignment_id
    # the transition and its event are one commit
    changes = tenant.changes()

    def appends(ch: Any) -> list[str]:
        return [e.type for op in ch.ops if op.op == "append" for e in op.events]

    completing = next(ch for ch in changes if "step.completed" in appends(ch))
    puts = [op.value["status"] for op in completing.ops if op.op == "put" and op.namespace == "runs.steps"]
    assert puts == ["completed"]


def test_dag_order_is_respected(tenant: Tenant) -> None:
    #   a -> b -> d
    #   a -> c -> d ;  e independent
    tenant.runs.create(
        "f",
        [
            {"id": "d", "depends_on": ["b", "c"]},
            {"id": "b", "depends_on": ["a"]},
            {"id": "c", "depends_on": ["a"]},
            {"id": "a"},
            {"id": "e"},
        ],
        run_id="dag",
    )
    first = {c.step_id for c in tenant.runs.claim("w", limit=10)}
    assert first == {"a", "e"}
    (a,) = [c for c in tenant.runs.get("dag").steps if c.step_id == "a"]
    assert a.status == "assigned"
    # nothing else is ready until a completes
    assert tenant.runs.claim("w", limit=10) == []


def test_dag_order_under_drain(tenant: Tenant) -> None:
    tenant.runs.create(
        "f",
        [
            {"id": "a"},
            {"id": "b", "depends_on": ["a"]},
            {"id": "c", "depends_on": ["a"]},
            {"id": "d", "depends_on": ["b", "c"]},
            {"id": "e", "depends_on": ["d"]},
        ],
        run_id="dag",
    )
    order = drain(tenant.runs, limit=3)
    pos = {s: i for i, s in enumerate(order)}
    assert sorted(order) == ["a", "b", "c", "d", "e"]
    assert pos["a"] < pos["b"] < pos["d"] < pos["e"]
    assert pos["a"] < pos["c"] < pos["d"]
    assert tenant.runs.get("dag").status == "completed"


# ---------------------------------------------------------------- leases


def test_stalled_worker_loses_step_and_late_complete_is_refused(tenant: Tenant, clock: FakeClock) -> None:
    tenant.runs.create("f", [StepSpec("a", max_attempts=3)], run_id="r")
    (old,) = tenant.runs.claim("slow", lease=10)
    tenant.runs.start(old, old.lease_token)
    clock.advance(5)
    assert tenant.runs.heartbeat(old, old.lease_token).cancel_requested is False  # extended to t+15
    clock.advance(9)
    assert tenant.runs.claim("fast") == []  # still leased after the heartbeat
    clock.advance(7)  # past the lease: the worker stopped heart-beating
    (new,) = tenant.runs.claim("fast", lease=10)
    assert new.attempt == 2
    assert new.lease_token != old.lease_token
    with pytest.raises(Conflict) as info:
        tenant.runs.complete(old, old.lease_token, "late")
    assert info.value.details["reason"] == "stale_lease"
    with pytest.raises(Conflict):
        tenant.runs.heartbeat(old, old.lease_token)
    with pytest.raises(Conflict):
        tenant.runs.fail(old, old.lease_token, "late failure")
    tenant.runs.complete(new, new.lease_token, "fresh")
    step = tenant.runs.step("r/a")
    assert (step.status, step.result, step.worker_id, step.attempts) == ("completed", "fresh", "fast", 2)
    types = [e.type for e in tenant.runs.history("r")]
    assert types.count("step.lease_expired") == 1
    expired = events_of(tenant.runs, "r", "step.lease_expired")[0]
    assert (expired["status"], expired["worker_id"]) == ("timeout", "slow")


@pytest.mark.parametrize("token", ["é" * 32, "\ud800", "🔒"])
def test_a_lease_token_that_is_not_one_is_refused_like_a_stale_one(tenant: Tenant, token: str) -> None:
    tenant.runs.create("f", [StepSpec("a")], run_id="r")
    (held,) = tenant.runs.claim("w")
    for call in (
        lambda: tenant.runs.heartbeat(held, token),
        lambda: tenant.runs.start(held, token),
        lambda: tenant.runs.complete(held, token, "x"),
        lambda: tenant.runs.fail(held, token, "x"),
    ):
        with pytest.raises(Conflict) as info:
            call()
        assert info.value.details["reason"] == "stale_lease"
    assert tenant.runs.step("r/a").status == "assigned"
    tenant.runs.complete(held, held.lease_token, "done")


def test_a_handle_remembering_steps_it_wrote_still_sees_what_another_handle_did(
    tenant: Tenant, clock: FakeClock
) -> None:
    """A Runs handle commits against the step documents it last wrote without reading them again; when
    another handle (another process) changed them meanwhile, the refused commit is made again on what is
    stored: a fan-in step waits for both of its dependencies, and an expired lease is still reclaimed."""
    mine = Runs(tenant.store, tenant.name)
    other = Runs(tenant.store, tenant.name)
    mine.create("f", [StepSpec("a"), StepSpec("b"), StepSpec("c", depends_on=["a", "b"])], run_id="r")
    got = {c.step_id: c for c in mine.claim("w1", lease=60, limit=2)}
    assert sorted(got) == ["a", "b"]
    other.complete(got["a"], got["a"].lease_token, "by another process")  # c: waiting 2 -> 1
    mine.complete(got["b"], got["b"].lease_token, "mine")  # remembers c waiting for 2: refused, redone
    assert mine.step("r/c").status == "pending"
    (claim,) = mine.claim("w1", lease=10)  # ready: both of its dependencies counted
    assert claim.step_id == "c"
    mine.complete(claim, claim.lease_token, "c")

    mine.create("f", [StepSpec("x", max_attempts=3)], run_id="r2")
    (held,) = other.claim("w2", lease=10)  # mine still remembers x as pending
    assert held.step_id == "x"
    clock.advance(11)
    (again,) = mine.claim("w1", lease=10)  # x is due again under its lease's entry
    assert (again.step_id, again.attempt) == ("x", 2)
    mine.complete(again, again.lease_token, "done")
    assert mine.get("r2").status == "completed"


def test_expired_lease_without_reclaim_is_refused(tenant: Tenant, clock: FakeClock) -> None:
    tenant.runs.create("f", [StepSpec("a")], run_id="r")
    (c,) = tenant.runs.claim("w", lease=5)
    clock.advance(5)
    with pytest.raises(Conflict) as info:
        tenant.runs.complete(c, c.lease_token, 1)
    assert info.value.details["reason"] == "lease_expired"


def test_expired_leases_use_up_attempts_then_dead(tenant: Tenant, clock: FakeClock) -> None:
    tenant.runs.create("f", [StepSpec("a", max_attempts=2)], run_id="r")
    tenant.runs.claim("w1", lease=5)
    clock.advance(6)
    (c2,) = tenant.runs.claim("w2", lease=5)
    assert c2.attempt == 2
    clock.advance(6)
    assert tenant.runs.claim("w3") == []  # the second expiry used up the attempts
    step = tenant.runs.step("r/a")
    assert step.status == "dead"
    assert tenant.runs.get("r").status == "failed"
    dead = events_of(tenant.runs, "r", "step.dead")[0]
    assert dead["status"] == "timeout"


# ---------------------------------------------------------------- retries and dead letters


def test_retries_obey_backoff_then_dead_then_retry_dead(tenant: Tenant, clock: FakeClock) -> None:
    tenant.runs.create("f", [StepSpec("a", max_attempts=3, retry=NO_JITTER)], run_id="r")
    for attempt, delay in ((1, 10.0), (2, 20.0)):
        (c,) = tenant.runs.claim("w")
        assert c.attempt == attempt
        failed = tenant.runs.fail(c, c.lease_token, {"msg": "boom"})
        assert failed.status == "retrying"
        assert failed.retry_at == clock.now_us() + int(delay * 1_000_000)
        assert tenant.runs.claim("w") == []
        clock.advance(delay - 0.5)
        assert tenant.runs.claim("w") == []
        clock.advance(0.5)
    (c,) = tenant.runs.claim("w")
    assert c.attempt == 3
    dead = tenant.runs.fail(c, c.lease_token, "boom again")
    assert dead.status == "dead"
    run = tenant.runs.get("r")
    assert run.status == "failed"
    assert run.dead_steps == ("a",)
    types = [e.type for e in tenant.runs.history("r")]
    assert types.count("step.retrying") == 2
    assert types.count("step.dead") == 1
    assert types[-1] == "run.failed"
    clock.advance(1000)
    assert tenant.runs.claim("w") == []  # dead letters stay put
    requeued = tenant.runs.retry_dead("r/a")
    assert (requeued.status, requeued.attempts) == ("pending", 0)
    assert tenant.runs.get("r").status == "running"
    (c,) = tenant.runs.claim("w")
    assert c.attempt == 1
    tenant.runs.complete(c, c.lease_token, "ok")
    assert tenant.runs.get("r").status == "completed"


def test_jitter_stays_within_bounds() -> None:
    policy = RetryPolicy(initial_delay=2.0, multiplier=3.0, max_delay=50.0, jitter=0.25)
    for failures, base in ((1, 2.0), (2, 6.0), (3, 18.0), (4, 50.0), (40, 50.0)):
        assert policy.base_delay(failures) == base
        for _ in range(50):
            assert base * 0.75 <= policy.delay(failures) <= min(50.0, base * 1.25)


def test_non_retryable_failure_fails_the_run_and_parks_its_other_steps(tenant: Tenant) -> None:
    tenant.runs.create("f", [StepSpec("a", kind="x"), StepSpec("b", kind="y")], run_id="r")
    (a,) = tenant.runs.claim("w", kinds=["x"])
    failed = tenant.runs.fail(a, a.lease_token, "bad input", retryable=False)
    assert failed.status == "failed"
    assert tenant.runs.get("r").status == "failed"
    assert tenant.runs.claim("w") == []  # b is held back while the run is failed
    assert tenant.runs.step("r/b").status == "pending"
    tenant.runs.retry_dead("r/a")
    assert tenant.runs.get("r").status == "running"
    assert sorted(drain(tenant.runs)) == ["a", "b"]
    assert tenant.runs.get("r").status == "completed"


def test_optional_step_failure_lets_the_run_complete(tenant: Tenant) -> None:
    tenant.runs.create(
        "f",
        [StepSpec("a", optional=True, max_attempts=1), StepSpec("b", depends_on=["a"])],
        run_id="r",
    )
    (a,) = tenant.runs.claim("w")
    assert tenant.runs.fail(a, a.lease_token, "flaky").status == "dead"
    assert tenant.runs.get("r").status == "running"
    assert drain(tenant.runs) == ["b"]
    run = tenant.runs.get("r")
    assert run.status == "completed"
    assert run.step("a").status == "dead"


# ---------------------------------------------------------------- cancel


def test_cancel(tenant: Tenant) -> None:
    tenant.runs.create("f", [StepSpec("a"), StepSpec("b", depends_on=["a"]), StepSpec("c")], run_id="r")
    (a,) = [c for c in tenant.runs.claim("w", limit=2) if c.step_id == "a"]
    tenant.runs.start(a, a.lease_token)
    cancelled = tenant.runs.cancel("r", reason="user asked")
    assert cancelled.status == "cancelled"
    run = tenant.runs.get("r")
    assert run.step("b").status == "cancelled"
    assert run.step("a").status == "running"
    assert run.step("a").cancel_requested is True
    beat = tenant.runs.heartbeat(a, a.lease_token)
    assert beat.cancel_requested is True
    assert tenant.runs.step("r/a").status == "cancelled"
    with pytest.raises(Conflict):
        tenant.runs.complete(a, a.lease_token, "too late")
    assert tenant.runs.claim("w") == []
    with pytest.raises(Conflict) as info:
        tenant.runs.cancel("r")
    assert (info.value.details["from"], info.value.details["to"]) == ("cancelled", "cancelled")
    assert "run.cancelled" in [e.type for e in tenant.runs.history("r")]


# ---------------------------------------------------------------- illegal transitions


def test_illegal_transitions_are_refused(tenant: Tenant) -> None:
    tenant.runs.create("f", [StepSpec("a"), StepSpec("b")], run_id="r")
    with pytest.raises(Conflict) as info:
        tenant.runs.retry_dead("r/a")
    assert (info.value.details["from"], info.value.details["to"]) == ("pending", "pending")
    with pytest.raises(Conflict) as info:
        tenant.runs.complete("r/a", "not-a-token", 1)
    assert (info.value.details["from"], info.value.details["to"]) == ("pending", "completed")
    c1, c2 = tenant.runs.claim("w", limit=2)
    tenant.runs.start(c1, c1.lease_token)
    with pytest.raises(Conflict) as info:
        tenant.runs.start(c1, c1.lease_token)
    assert (info.value.details["from"], info.value.details["to"]) == ("running", "running")
    tenant.runs.complete(c1, c1.lease_token, 1)
    with pytest.raises(Conflict) as info:
        tenant.runs.complete(c1, c1.lease_token, 2)
    assert (info.value.details["from"], info.value.details["to"]) == ("completed", "completed")
    with pytest.raises(Conflict):
        tenant.runs.fail(c1, c1.lease_token, "x")
    tenant.runs.complete(c2, c2.lease_token, 1)
    with pytest.raises(Conflict) as info:
        tenant.runs.cancel("r")
    assert (info.value.details["from"], info.value.details["to"]) == ("completed", "cancelled")
    assert STEP_TRANSITIONS["completed"] == frozenset()


# ---------------------------------------------------------------- metering, listing


def test_metering_sums(tenant: Tenant, clock: FakeClock) -> None:
    t0 = clock.now_us()
    tenant.runs.create("f", [StepSpec(f"s{i}") for i in range(4)], run_id="r1")
    tenant.runs.create("f", [StepSpec("x")], run_id="r2")
    costs = {"s0": (10, 0.25), "s1": (20, 0.5), "s2": (30, 1.0)}
    for c in tenant.runs.claim("w", limit=10):
        clock.advance(1)
        if c.step_id in costs:
            tokens, cost = costs[c.step_id]
            tenant.runs.complete(c, c.lease_token, None, usage={"tokens": tokens, "cost_usd": cost})
        elif c.step_id == "x":
            tenant.runs.complete(c, c.lease_token, None, usage={"tokens": 5, "cost_usd": 0.125})
        else:
            tenant.runs.complete(c, c.lease_token, None)
    u = tenant.runs.usage("r1")
    assert (u.tokens, u.cost_usd, u.steps) == (60, pytest.approx(1.75), 3)
    total = tenant.runs.usage_by_tenant()
    assert (total.tokens, total.cost_usd, total.steps) == (65, pytest.approx(1.875), 4)
    assert tenant.runs.usage_by_tenant(from_=clock.now_us() + 1).steps == 0
    assert tenant.runs.usage_by_tenant(to=t0).steps == 0
    assert tenant.runs.usage_by_tenant(from_=t0, to=clock.now_us() + 1).tokens == 65
    metered = events_of(tenant.runs, "r1", "step.metered")
    assert len(metered) == 3
    for m in metered:
        assert set(USAGE_EVENT_FIELDS) <= set(m)
    assert {(m["step_id"], m["tokens_used"], m["cost_usd"]) for m in metered} == {
        ("s0", 10, 0.25),
        ("s1", 20, 0.5),
        ("s2", 30, 1.0),
    }
    assert all(e.meta == {"subject": USAGE_SUBJECT} for e in tenant.runs.history("r1") if e.type == "step.metered")


def test_list_filters_and_pages(tenant: Tenant) -> None:
    for i in range(5):
        tenant.runs.create("even" if i % 2 == 0 else "odd", [StepSpec("a")], run_id=f"run-{i}")
    (c,) = tenant.runs.claim("w")
    tenant.runs.complete(c, c.lease_token, None)
    assert [r.run_id for r in tenant.runs.list()] == [f"run-{i}" for i in range(5)]
    assert [r.run_id for r in tenant.runs.list(flow_id="odd")] == ["run-1", "run-3"]
    assert [r.run_id for r in tenant.runs.list(status="completed")] == [c.run_id]
    assert len(tenant.runs.list(status="pending")) == 4
    assert [r.run_id for r in tenant.runs.list(flow_id="even", status="pending")] == [
        r for r in ["run-0", "run-2", "run-4"] if r != c.run_id
    ]
    page1 = tenant.runs.list(limit=2)
    page2 = tenant.runs.list(after=page1[-1].run_id, limit=2)
    assert [r.run_id for r in page1 + page2] == ["run-0", "run-1", "run-2", "run-3"]


# ---------------------------------------------------------------- real concurrency

STEPS = {"memory": 1000, "sqlite": 1000, "postgresql": 1000, "redis": 1000}


def _create_many(runs: Runs, total: int) -> list[str]:
    run_ids = []
    per_run = 50
    for i in range(0, total, per_run):
        rid = f"run-{i // per_run:04d}"
        runs.create("bulk", [StepSpec(f"s{j:03d}") for j in range(min(per_run, total - i))], run_id=rid)
        run_ids.append(rid)
    return run_ids


def _check_exactly_once(runs: Runs, run_ids: list[str], claimed: list[tuple[str, str]], total: int) -> None:
    counts = Counter(claimed)
    assert len(counts) == total
    assert max(counts.values()) == 1, "a step was assigned twice"
    for rid in run_ids:
        run = runs.get(rid)
        assert run.status == "completed"
        assert all(s.status == "completed" and s.attempts == 1 for s in run.steps)
        history = runs.history(rid)
        assert {e.data["run_id"] for e in history} == {rid}
        types = Counter(e.type for e in history)
        assert types["step.assigned"] == types["step.completed"] == len(run.steps)


def test_concurrent_threads_complete_every_step_exactly_once(backend: Backend, tenant: Tenant) -> None:
    total = STEPS[backend.kind]
    run_ids = _create_many(tenant.runs, total)
    claimed: list[tuple[str, str]] = []
    workers: set[int] = set()
    errors: list[BaseException] = []
    guard = threading.Lock()
    start = threading.Barrier(16)

    def worker(n: int) -> None:
        try:
            start.wait()
            idle = 0
            while idle < 3:
                got = tenant.runs.claim(f"w{n}", lease=600, limit=2)
                if not got:
                    idle += 1
                    continue
                idle = 0
                queue: list[Claim] = list(got)
                while queue:
                    c = queue.pop()
                    with guard:
                        claimed.append((c.run_id, c.step_id))
                        workers.add(n)
                    if n % 2:  # half the workers take their next step in the completing commit
                        _, nxt = tenant.runs.complete_and_claim(c, c.lease_token, {"by": n})
                        if nxt is not None:
                            queue.append(nxt)
                    else:
                        tenant.runs.complete(c, c.lease_token, {"by": n})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(workers) > 1, "the claims were not concurrent"
    _check_exactly_once(tenant.runs, run_ids, claimed, total)


def _process_worker(url: str, n: int, out: Any) -> None:
    db = stateline.open(url, clock=FakeClock())
    try:
        runs = db.tenant("acme").runs
        idle = 0
        mine = []
        while idle < 5:
            got = runs.claim(f"p{n}", lease=600, limit=2)
            if not got:
                idle += 1
                continue
            idle = 0
            queue = list(got)
            while queue:
                c = queue.pop()
                mine.append((c.run_id, c.step_id))
                if n % 2:
                    _, nxt = runs.complete_and_claim(c, c.lease_token, {"by": n})
                    if nxt is not None:
                        queue.append(nxt)
                else:
                    runs.complete(c, c.lease_token, {"by": n})
        out.put(("ok", mine))
    except BaseException as exc:
        out.put(("error", repr(exc)))
    finally:
        db.close()


def test_concurrent_processes_complete_every_step_exactly_once(process_backend: Backend) -> None:
    backend = process_backend
    db = Database(backend.open())
    total = 400
    runs = db.tenant("acme").runs
    run_ids = _create_many(runs, total)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(backend.url, n, out)) for n in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(kind == "ok" for kind, _ in results), results
    claimed = [pair for _, mine in results for pair in mine]
    _check_exactly_once(runs, run_ids, [tuple(p) for p in claimed], total)  # type: ignore[misc]


def test_claimers_racing_for_one_step_get_it_once(backend: Backend, tenant: Tenant) -> None:
    for round_ in range(5):
        tenant.runs.create("race", [StepSpec("only")], run_id=f"race-{round_}")
        winners: list[str] = []
        barrier = threading.Barrier(8)

        def grab(n: int, barrier: threading.Barrier = barrier, winners: list[str] = winners) -> None:
            barrier.wait()
            winners.extend(c.worker_id for c in tenant.runs.claim(f"w{n}"))

        threads = [threading.Thread(target=grab, args=(n,)) for n in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(winners) == 1


def test_holder_may_use_several_handles(backend: Backend, tenant: Tenant, clock: FakeClock) -> None:
    other = Database(backend.open()).tenant("acme").runs
    assert other is not tenant.runs
    tenant.runs.create("f", [StepSpec("a")], run_id="r")
    (c,) = tenant.runs.claim("w", lease=10)
    clock.advance(5)
    other.heartbeat(c, c.lease_token)  # the step changed behind the first handle's back
    other.start(c, c.lease_token)
    clock.advance(8)  # past the first lease, within the extended one
    done = tenant.runs.complete(c, c.lease_token, "ok")
    assert (done.status, done.result) == ("completed", "ok")
    with pytest.raises(Conflict) as info:
        other.complete(c, c.lease_token, "again")
    assert (info.value.details["from"], info.value.details["to"]) == ("completed", "completed")


def test_complete_and_claim_walks_a_chain_one_commit_per_step(tenant: Tenant) -> None:
    tenant.runs.create(
        "f",
        [StepSpec("a"), StepSpec("b", depends_on=["a"]), StepSpec("c", depends_on=["b"], kind="gpu")],
        run_id="chain",
    )
    (c,) = tenant.runs.claim("w", lease=20)
    before = tenant.revision()
    done, nxt = tenant.runs.complete_and_claim(c, c.lease_token, "A")
    assert tenant.revision() == before + 1  # the completion and the next assignment are one commit
    assert done.status == "completed"
    assert nxt is not None
    assert (nxt.step_id, nxt.worker_id, nxt.attempt) == ("b", "w", 1)
    assert nxt.lease_expires_at == tenant.store.clock.now_us() + 20_000_000
    assert tenant.runs.claim("other") == []  # b is not up for grabs: it is w's already
    done, none = tenant.runs.complete_and_claim(nxt, nxt.lease_token, "B", kinds=["cpu"])
    assert none is None  # c is of another kind: it went to the ready queue instead
    (c3,) = tenant.runs.claim("gpu-worker", kinds=["gpu"])
    done, last = tenant.runs.complete_and_claim(c3, c3.lease_token, "C")
    assert last is None
    run = tenant.runs.get("chain")
    assert run.status == "completed"
    assert [s.result for s in run.steps] == ["A", "B", "C"]
    types = [e.type for e in tenant.runs.history("chain")]
    assert types.count("step.assigned") == types.count("step.completed") == 3


def test_complete_and_claim_takes_a_ready_step_of_another_run(tenant: Tenant, clock: FakeClock) -> None:
    tenant.runs.create("f", [StepSpec("a")], run_id="r1")
    tenant.runs.create("f", [StepSpec("b", retry=NO_JITTER), StepSpec("c")], run_id="r2")
    got = {c.step_id: c for c in tenant.runs.claim("w", limit=3)}
    assert sorted(got) == ["a", "b", "c"]
    tenant.runs.fail(got["b"], got["b"].lease_token, "retry me")
    clock.advance(10)  # b's retry delay is over: it is ready in a running run
    _, nxt = tenant.runs.complete_and_claim(got["a"], got["a"].lease_token, "A")
    assert nxt is not None
    assert (nxt.run_id, nxt.step_id, nxt.attempt) == ("r2", "b", 2)
    assert tenant.runs.step("r1/a").status == "completed"
    assert tenant.runs.step(nxt).status == "assigned"
    # each run's history holds its own events only
    assert {e.data["run_id"] for e in tenant.runs.history("r1")} == {"r1"}
    assert [e.type for e in tenant.runs.history("r2")].count("step.assigned") == 3


@pytest.mark.parametrize("eager", [False, True])
def test_the_last_completion_completes_the_run_in_the_same_commit(tenant: Tenant, eager: bool) -> None:
    tenant.runs.create("f", [StepSpec("a"), StepSpec("b", depends_on=["a"])], run_id="r")
    (c,) = tenant.runs.claim("w")
    tenant.runs.complete(c, c.lease_token, "A")
    assert tenant.runs.get("r").status == "running"
    (c,) = tenant.runs.claim("w")
    before = tenant.revision()
    if eager:
        assert tenant.runs.complete_and_claim(c, c.lease_token, "B")[1] is None
    else:
        tenant.runs.complete(c, c.lease_token, "B")
    assert tenant.revision() == before + 1
    assert tenant.runs.get("r").status == "completed"
    history = tenant.runs.history("r")
    last_step = [e for e in history if e.type == "step.completed"][-1]
    (finished,) = [e for e in history if e.type == "run.completed"]
    assert finished.revision == last_step.revision
    assert finished.seq == last_step.seq + 1
    assert (finished.data["from"], finished.data["to"]) == ("running", "completed")


def test_a_run_completes_when_another_handle_settled_its_other_steps(backend: Backend, tenant: Tenant) -> None:
    other = Database(backend.open()).tenant("acme").runs
    tenant.runs.create("f", [StepSpec("a"), StepSpec("b")], run_id="r")
    got = {c.step_id: c for c in tenant.runs.claim("w", limit=2)}
    other.complete(got["a"], got["a"].lease_token, "A")  # behind the first handle's back
    tenant.runs.complete(got["b"], got["b"].lease_token, "B")
    assert tenant.runs.get("r").status == "completed"
    assert [e.type for e in tenant.runs.history("r")].count("run.completed") == 1


def test_a_stale_memory_of_the_open_steps_does_not_complete_the_run(backend: Backend, tenant: Tenant) -> None:
    other = Database(backend.open()).tenant("acme").runs
    tenant.runs.create("f", [StepSpec("a", optional=True), StepSpec("b")], run_id="r")
    got = {c.step_id: c for c in tenant.runs.claim("w", limit=2)}
    tenant.runs.fail(got["a"], got["a"].lease_token, "no", retryable=False)  # settled: b is the last open step
    other.retry_dead("r/a")  # a is open again, behind the first handle's back
    tenant.runs.complete(got["b"], got["b"].lease_token, "B")
    assert tenant.runs.get("r").status == "running"
    (a,) = other.claim("w2")
    other.complete(a, a.lease_token, "A")
    assert tenant.runs.get("r").status == "completed"
    assert [e.type for e in tenant.runs.history("r")].count("run.completed") == 1


def test_changing_a_returned_run_changes_nothing_stored(tenant: Tenant) -> None:
    run = tenant.runs.create("f", [StepSpec("a")], run_id="r", metadata={"owner": {"team": "x"}})
    run.metadata["owner"]["team"] = "changed"
    run.metadata["more"] = 1
    (c,) = tenant.runs.claim("w")  # moves the run to running
    tenant.runs.complete(c, c.lease_token)  # and to completed
    assert tenant.runs.get("r").metadata == {"owner": {"team": "x"}}


def test_a_claim_on_a_stale_memory_of_the_run_sees_it_cancelled(
    backend: Backend, tenant: Tenant, clock: FakeClock
) -> None:
    other = Database(backend.open()).tenant("acme").runs
    tenant.runs.create("f", [StepSpec("a")], run_id="r")
    tenant.runs.claim("w", lease=10)  # this handle now knows the run as running
    other.cancel("r")  # a is assigned: only marked
    clock.advance(11)  # a's lease expired: the next claim of it cancels it
    assert tenant.runs.claim("w2") == []
    assert tenant.runs.step("r/a").status == "cancelled"
    assert tenant.runs.claim("w2") == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    deps=st.lists(st.lists(st.integers(min_value=0, max_value=30), max_size=3), min_size=1, max_size=12),
    batch=st.integers(min_value=1, max_value=4),
)
def test_random_dags_run_in_dependency_order(tenant: Tenant, deps: list[list[int]], batch: int) -> None:
    # step i may depend only on earlier steps: always a DAG
    steps = [StepSpec(f"s{i}", depends_on=sorted({f"s{d % i}" for d in ds}) if i else []) for i, ds in enumerate(deps)]
    run = tenant.runs.create("prop", steps)
    done: set[str] = set()
    while True:
        got = tenant.runs.claim("w", limit=batch)
        if not got:
            break
        for c in got:
            assert c.run_id == run.run_id
            spec = next(s for s in steps if s.id == c.step_id)
            assert set(spec.depends_on) <= done, f"{c.step_id} ran before {set(spec.depends_on) - done}"
        for c in got:
            tenant.runs.complete(c, c.lease_token, None)
            done.add(c.step_id)
    assert done == {s.id for s in steps}
    assert tenant.runs.get(run.run_id).status == "completed"
