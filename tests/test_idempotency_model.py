"""Idempotency keys under random use (Hypothesis state machine on a fake clock, two handles on one
store): first runs, repeats, failures (remembered or not), other fingerprints, a crashed first caller,
expiry and forget. Work runs exactly when a plain model says the key is free, and repeats get the
stored result."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import stateline
from stateline import FakeClock
from stateline.runtime import FingerprintMismatch, InProgress, PreviousFailure

KEYS = st.sampled_from(["k1", "k2"])
TTL = 60.0
LEASE = 10.0


class Boom(Exception):
    pass


class IdempotencyModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.db = stateline.open("memory://", clock=self.clock)
        self.idems = [stateline.Database(self.db.store).tenant("acme").idempotency for _ in range(2)]
        # key -> (state, value, fingerprint, until µs): state is done (value: the result), failed
        # (value: the error message) or running (a caller that crashed holding the key)
        self.model: dict[str, tuple[str, Any, str | None, int]] = {}
        self.counter = 0

    def teardown(self) -> None:
        self.db.close()

    def _entry(self, key: str) -> tuple[str, Any, str | None, int] | None:
        e = self.model.get(key)
        if e is None or e[3] <= self.clock.now_us():
            self.model.pop(key, None)
            return None
        return e

    def _until(self, seconds: float) -> int:
        return self.clock.now_us() + round(seconds * 1_000_000)

    @rule(
        key=KEYS,
        handle=st.integers(0, 1),
        fp=st.sampled_from([None, "a", "b"]),
        outcome=st.sampled_from(["ok", "ok", "boom", "boom_remembered"]),
    )
    def run(self, key: str, handle: int, fp: str | None, outcome: str) -> None:
        entry = self._entry(key)
        self.counter += 1
        ran: list[int] = []

        def work() -> int:
            ran.append(self.counter)
            if outcome.startswith("boom"):
                raise Boom(f"boom {self.counter}")
            return self.counter

        error: Exception | None = None
        result = None
        try:
            result = self.idems[handle].run(
                key, work, ttl=TTL, fingerprint=fp, remember_failures=outcome == "boom_remembered", lease=LEASE
            )
        except (FingerprintMismatch, InProgress, PreviousFailure, Boom) as exc:
            error = exc
        if isinstance(error, Boom):
            assert entry is None, "the work ran although the key was taken"
            assert ran == [self.counter]
            if outcome == "boom_remembered":
                self.model[key] = ("failed", str(error), fp, self._until(TTL))
            return
        if error is not None:
            assert ran == [], "the work ran for a refused call"
            assert entry is not None, f"a free key was refused: {error!r}"
            if isinstance(error, FingerprintMismatch):
                assert fp is not None
                assert entry[2] not in (None, fp)
            elif isinstance(error, InProgress):
                assert entry[0] == "running"
            else:
                assert entry[0] == "failed"
                assert error.details["error"]["message"] == entry[1]
            return
        if entry is None:
            assert ran == [self.counter], "a free key did not run its work"
            assert result == self.counter
            self.model[key] = ("done", result, fp, self._until(TTL))
        else:
            assert entry[0] == "done", entry
            assert ran == [], "the work ran again for a key with a result"
            assert result == entry[1]

    @rule(key=KEYS, handle=st.integers(0, 1))
    def crash_while_running(self, key: str, handle: int) -> None:
        """A first caller takes the key and dies without finishing (its claim lasts the lease)."""
        if self._entry(key) is not None:
            return
        once = self.idems[handle].once(key, ttl=TTL, lease=LEASE)
        slot = once.__enter__()
        assert slot.owner
        self.model[key] = ("running", None, None, self._until(LEASE))

    @rule(key=KEYS)
    def forget(self, key: str) -> None:
        self.idems[1].forget(key)
        self.model.pop(key, None)

    @rule(seconds=st.sampled_from([1.0, 11.0, 61.0]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def status_matches(self) -> None:
        for key in ("k1", "k2"):
            entry = self._entry(key)
            assert self.idems[0].status(key) == (None if entry is None else entry[0]), key


TestIdempotencyModel = IdempotencyModel.TestCase
TestIdempotencyModel.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
