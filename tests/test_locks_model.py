"""Locks under random use (Hypothesis state machine on a fake clock, two handles on one store):
acquire, release, extend, expiry and fenced writes. After every step the lock's state matches a
plain model, fencing tokens only grow, and a holder whose lease is gone can neither release, extend
nor write past the fence."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import stateline
from stateline import Conflict, FakeClock
from stateline.locks import Lease

OWNERS = st.sampled_from(["p1", "p2", "p3"])
NAME = "printer"


class LocksModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.db = stateline.open("memory://", clock=self.clock)
        # two handles, as two processes would have: each remembers what it last wrote
        self.handles = [stateline.Database(self.db.store).tenant("acme").locks for _ in range(2)]
        self.leases: list[Lease] = []
        self.holder: Lease | None = None  # the model: the lease that holds the lock now, if any
        self.fence = 0  # the highest fencing token handed out
        self.fenced_write = 0  # the fencing token of the last write the resource accepted

    def teardown(self) -> None:
        self.db.close()

    def _held_now(self) -> Lease | None:
        if self.holder is not None and self.holder.expires_at > self.clock.now_us():
            return self.holder
        return None

    @rule(owner=OWNERS, handle=st.integers(0, 1), ttl=st.sampled_from([1.0, 5.0, 20.0]))
    def acquire(self, owner: str, handle: int, ttl: float) -> None:
        held = self._held_now()
        try:
            lease = self.handles[handle].acquire(NAME, owner, ttl=ttl)
        except Conflict:
            assert held is not None, "refused a free lock"
            return
        assert held is None, f"granted a lock {held.owner} holds"
        assert lease.fencing_token > self.fence, (lease.fencing_token, self.fence)
        self.fence = lease.fencing_token
        self.holder = lease
        self.leases.append(lease)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), handle=st.integers(0, 1))
    def release(self, data: st.DataObject, handle: int) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        mine = self._held_now() is lease
        try:
            self.handles[handle].release(lease)
        except Conflict:
            assert not mine, "the holder could not release"
            return
        assert mine, "a lease that no longer holds the lock released it"
        self.holder = None

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), handle=st.integers(0, 1), ttl=st.sampled_from([1.0, 5.0, 20.0]))
    def extend(self, data: st.DataObject, handle: int, ttl: float) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        mine = self._held_now() is lease
        try:
            longer = self.handles[handle].extend(lease, ttl)
        except Conflict:
            assert not mine, "the holder could not extend"
            return
        assert mine, "a lease that no longer holds the lock was extended"
        assert longer.fencing_token == lease.fencing_token
        assert longer.expires_at >= self.clock.now_us() + round(ttl * 1_000_000)
        self.leases[self.leases.index(lease)] = longer
        self.holder = longer

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def fenced_write(self, data: st.DataObject) -> None:
        """The protected resource takes a write only with a fencing token at least the newest."""
        lease = data.draw(st.sampled_from(self.leases))
        try:
            self.handles[0].check_fence(NAME, lease.fencing_token)
        except Conflict:
            assert lease.fencing_token < self.fence
            return
        assert lease.fencing_token == self.fence
        assert lease.fencing_token >= self.fenced_write
        self.fenced_write = lease.fencing_token

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0, 30.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def matches_the_model(self) -> None:
        state = self.handles[1].state(NAME)
        held = self._held_now()
        assert state.held == (held is not None)
        assert state.fencing_token == self.fence
        if held is not None:
            assert (state.owner, state.expires_at) == (held.owner, held.expires_at)


TestLocksModel = LocksModel.TestCase
TestLocksModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
