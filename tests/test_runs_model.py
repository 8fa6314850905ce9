"""Runs under random worker behaviour (Hypothesis state machine on a fake clock): claims, completions,
failures, heartbeats, stale tokens, expiring leases and cancellation. After every step: no step has two
live holders, statuses only move along STEP_TRANSITIONS and RUN_TRANSITIONS, nothing runs before its
dependencies are done, completed steps keep their result, attempts stay within max_attempts, and the
run's status follows from its steps."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import stateline
from stateline import Conflict, FakeClock
from stateline.runs import RUN_TRANSITIONS, STEP_TRANSITIONS, Claim, RetryPolicy, StepSpec

LEASE = 10.0
QUICK = RetryPolicy(initial_delay=1.0, multiplier=2.0, max_delay=4.0, jitter=0.0)
SPECS = [
    StepSpec("a", max_attempts=2, retry=QUICK),
    StepSpec("b", depends_on=["a"], max_attempts=3, retry=QUICK),
    StepSpec("c", max_attempts=1, retry=QUICK, optional=True),
    StepSpec("d", depends_on=["b", "c"], max_attempts=2, retry=QUICK),
]
WORKERS = st.sampled_from(["w1", "w2", "w3"])


def _reachable(before: str, after: str, table: Any) -> bool:
    """``after`` is ``before`` or reachable from it in one or two legal moves (one call may expire a
    lease and assign the step again in the same commit)."""
    return after == before or after in table[before] or any(after in table[mid] for mid in table[before])


class RunsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.db = stateline.open("memory://", clock=self.clock)
        self.runs = self.db.tenant("acme").runs
        self.run_id = self.runs.create("flow", SPECS).run_id
        self.held: list[Claim] = []  # every claim handed out, newest last
        self.results: dict[str, Any] = {}  # step -> result, once completed
        self.last: dict[str, str] = {s.id: "pending" for s in SPECS}
        self.last_run = "pending"
        self.cancelled = False

    def teardown(self) -> None:
        self.db.close()

    def _step(self, step_id: str) -> Any:
        return self.runs.step(f"{self.run_id}/{step_id}")

    def _live(self, c: Claim) -> bool:
        s = self._step(c.step_id)
        return (
            s.assignment_id == c.assignment_id
            and s.status in ("assigned", "running")
            and s.lease_expires_at is not None
            and s.lease_expires_at > self.clock.now_us()
        )

    @rule(worker=WORKERS)
    def claim(self, worker: str) -> None:
        for c in self.runs.claim(worker, lease=LEASE):
            assert not self.cancelled
            self.held.append(c)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        self._complete(data.draw(st.sampled_from(self.held)))

    @precondition(lambda self: self.held)
    @rule()
    def complete_newest(self) -> None:
        """Workers mostly finish what they just claimed: this lets runs reach their end."""
        self._complete(self.held[-1])

    def _complete(self, c: Claim) -> None:
        live = self._live(c)
        result = {"by": c.worker_id, "attempt": c.attempt}
        try:
            step = self.runs.complete(c, c.lease_token, result)
        except Conflict:
            assert not live or self.cancelled
            return
        assert live, "a stale or expired holder completed the step"
        assert step.status == "completed"
        self.results[c.step_id] = result

    @precondition(lambda self: self.held)
    @rule(data=st.data(), retryable=st.sampled_from([True, True, True, False]))
    def fail(self, data: st.DataObject, retryable: bool) -> None:
        c = data.draw(st.sampled_from(self.held))
        live = self._live(c)
        try:
            step = self.runs.fail(c, c.lease_token, {"oops": c.attempt}, retryable=retryable)
        except Conflict:
            assert not live or self.cancelled
            return
        assert live, "a stale or expired holder failed the step"
        assert step.status in ("retrying", "dead", "failed")

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self.held))
        live = self._live(c)
        try:
            self.runs.heartbeat(c, c.lease_token)
        except Conflict:
            assert not live or self.cancelled
            return
        assert live, "a stale or expired holder extended its lease"

    @rule(seconds=st.sampled_from([0.5, 3.0, 9.0, 11.0, 30.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: not self.cancelled)
    @rule(now=st.integers(0, 9))
    def cancel(self, now: int) -> None:
        if now or self.last_run in ("completed", "cancelled"):
            return  # cancel seldom, so that most runs play out
        self.runs.cancel(self.run_id)
        self.cancelled = True

    @invariant()
    def consistent(self) -> None:
        run = self.runs.get(self.run_id)
        steps = {s.step_id: s for s in run.steps}
        for sid, s in steps.items():
            assert s.status in STEP_TRANSITIONS
            assert _reachable(self.last[sid], s.status, STEP_TRANSITIONS), (sid, self.last[sid], s.status)
            self.last[sid] = s.status
            assert s.attempts <= s.max_attempts, (sid, s.attempts)
            if s.status in ("assigned", "running", "completed"):
                for dep in s.depends_on:
                    d = steps[dep]
                    given_up = d.optional and d.status in ("failed", "dead")
                    # cancelling the run also cancels a given-up optional step under a step it holds
                    assert d.status == "completed" or given_up or (self.cancelled and d.optional), (sid, dep)
            if sid in self.results:
                assert (s.status, s.result) == ("completed", self.results[sid])
        live = [c for c in self.held if self._live(c)]
        assert len({c.step_id for c in live}) == len(live), "two live holders of one step"
        assert _reachable(self.last_run, run.status, RUN_TRANSITIONS), (self.last_run, run.status)
        self.last_run = run.status
        done = {sid for sid, s in steps.items() if s.status == "completed"}
        given_up = {sid for sid, s in steps.items() if s.optional and s.status in ("failed", "dead")}
        if self.cancelled:
            assert run.status == "cancelled"
        elif done | given_up == set(steps) and done:
            assert run.status == "completed"
        elif any(not s.optional and s.status in ("failed", "dead") for s in steps.values()):
            assert run.status == "failed"
        else:
            assert run.status in ("pending", "running")


TestRunsModel = RunsModel.TestCase
TestRunsModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
