"""Sticky sessions under random use (Hypothesis state machine on a fake clock, two handles): bind,
lookup, rebind with and without ``expected``, unbind and time passing. A session is live at least
until its last write's TTL, or 0.9 × TTL after any lookup that found it, and never after its last
use plus its TTL; its provider is the last one bound."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

import stateline
from stateline import FakeClock

SIDS = st.sampled_from(["s1", "s2"])
PROVIDERS = st.sampled_from(["p1", "p2", "p3"])
TTLS = st.sampled_from([10.0, 100.0])
US = 1_000_000


class SessionsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.db = stateline.open("memory://", clock=self.clock)
        self.handles = [stateline.Database(self.db.store).tenant("acme").sessions for _ in range(2)]
        # sid -> (provider, ttl, live at least until, live at most until) in µs
        self.model: dict[str, tuple[str, float, int, int]] = {}

    def teardown(self) -> None:
        self.db.close()

    def _now(self) -> int:
        return self.clock.now_us()

    def _check(self, sid: str, found: str | None) -> None:
        """``found`` is what a read saw now; it must fit the model's bounds."""
        m = self.model.get(sid)
        now = self._now()
        if m is None or now >= m[3]:
            assert found is None, (sid, found, m, now)
            self.model.pop(sid, None)
        elif now < m[2]:
            assert found == m[0], (sid, found, m, now)
        elif found is None:
            self.model.pop(sid, None)  # expired somewhere between the bounds
        else:
            assert found == m[0]

    @rule(sid=SIDS, provider=PROVIDERS, ttl=TTLS, h=st.integers(0, 1))
    def bind(self, sid: str, provider: str, ttl: float, h: int) -> None:
        s = self.handles[h].bind(sid, provider, ttl=ttl)
        assert (s.provider, s.ttl) == (provider, ttl)
        end = self._now() + round(ttl * US)
        self.model[sid] = (provider, ttl, end, end)

    @rule(sid=SIDS, h=st.integers(0, 1))
    def lookup(self, sid: str, h: int) -> None:
        s = self.handles[h].lookup(sid)
        self._check(sid, None if s is None else s.provider)
        if s is not None:
            provider, ttl, low, high = self.model[sid]
            now = self._now()
            self.model[sid] = (provider, ttl, max(low, now + round(0.9 * ttl * US)), max(high, now + round(ttl * US)))

    @rule(sid=SIDS, provider=PROVIDERS, expected=st.none() | PROVIDERS, h=st.integers(0, 1))
    def rebind(self, sid: str, provider: str, expected: str | None, h: int) -> None:
        before = self.handles[h].lookup(sid)  # what is bound now (a lookup: it may refresh)
        self._check(sid, None if before is None else before.provider)
        if before is not None:
            p, ttl, low, high = self.model[sid]
            now = self._now()
            self.model[sid] = (p, ttl, max(low, now + round(0.9 * ttl * US)), max(high, now + round(ttl * US)))
        s = self.handles[1 - h].rebind(sid, provider, expected=expected)
        moves = before is None or expected is None or before.provider == expected
        if moves:
            ttl = 1800.0 if before is None else before.ttl  # the handles' default, or the session's own
            assert (s.provider, s.ttl) == (provider, ttl)
            end = self._now() + round(ttl * US)
            self.model[sid] = (provider, ttl, end, end)
        else:
            assert before is not None
            assert s.provider == before.provider

    @rule(sid=SIDS, h=st.integers(0, 1))
    def unbind(self, sid: str, h: int) -> None:
        m = self.model.get(sid)
        was = self.handles[h].unbind(sid)
        if m is not None and self._now() < m[2]:
            assert was
        if m is None or self._now() >= m[3]:
            assert not was
        self.model.pop(sid, None)
        assert self.handles[1 - h].lookup(sid) is None

    @rule(seconds=st.sampled_from([1.0, 5.0, 9.5, 12.0, 95.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)


TestSessionsModel = SessionsModel.TestCase
TestSessionsModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
