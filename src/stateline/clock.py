"""Injectable clocks in integer microseconds since the Unix epoch."""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

from stateline.errors import InvalidArgument

__all__ = ["Clock", "FakeClock", "SystemClock", "checked_clock"]


@runtime_checkable
class Clock(Protocol):
    """Where stateline gets the time: expiry, timestamps and leases all read it."""

    def now_us(self) -> int:
        """Microseconds since the Unix epoch."""
        ...


def checked_clock(clock: object) -> Clock:
    """``clock``, or the wall clock for ``None``; ``InvalidArgument`` for anything without ``now_us()``."""
    if clock is None:
        return SystemClock()
    if not isinstance(clock, Clock):
        raise InvalidArgument("clock", f"must have a now_us() method, got {type(clock).__name__}")
    return clock


class SystemClock:
    """The wall clock."""

    __slots__ = ()

    def now_us(self) -> int:
        return time.time_ns() // 1000


class FakeClock:
    """A clock that moves only when told to, for testing TTLs and leases without sleeping."""

    __slots__ = ("_lock", "_now")

    def __init__(self, start_us: int = 1_767_225_600_000_000) -> None:
        self._now = start_us
        self._lock = threading.Lock()

    def now_us(self) -> int:
        return self._now

    def advance(self, seconds: float = 0.0, *, us: int = 0) -> int:
        """Move forward by ``seconds`` plus ``us`` microseconds; returns the new time."""
        step = round(seconds * 1_000_000) + us
        if step < 0:
            raise ValueError("a FakeClock only moves forward")
        with self._lock:
            self._now += step
            return self._now

    def set(self, now_us: int) -> None:
        """Jump to ``now_us`` (must not be earlier than the current time)."""
        with self._lock:
            if now_us < self._now:
                raise ValueError("a FakeClock only moves forward")
            self._now = now_us
