"""The result format every benchmark script can emit, so that ``bench/run.py`` gathers them into one report.

A script records each figure with :func:`record`. When the environment variable ``STATELINE_BENCH_JSON``
names a file (``bench/run.py`` sets it when it starts a script), every record is appended to that file
as one JSON line; otherwise :func:`record` does nothing, so a script run by hand behaves as before.

Ratios are always *speed* ratios, stateline over its peer: above 1 stateline is faster (more operations
per second, or less time per operation). ``target`` is a minimum of that ratio (a script whose own
target is a cost, "stateline costs at most 1.5x the peer", records ``target=1 / 1.5``); for a figure
with no peer it is a minimum rate, or a maximum time when ``unit`` is a time.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

ENV = "STATELINE_BENCH_JSON"

#: units where a smaller figure is better; every other unit is a rate (bigger is better)
TIME_UNITS = ("s", "ms", "µs", "us", "ns")


@dataclass
class Result:
    """One figure: stateline's value and, when there is one, its peer's measured in the same run.

    ``value`` / ``peer_value`` are medians in ``unit``; ``runs`` how many runs each median is over and
    ``seconds`` roughly how long one run lasted; ``p50_ms`` / ``p99_ms`` per-operation latency of
    stateline (and ``peer_p50_ms`` / ``peer_p99_ms`` of the peer) where the script measures it.
    ``durability`` says what an acknowledged write survives, on stateline's side and on the peer's.
    """

    bench: str  # the script, e.g. "store"
    name: str  # the figure, e.g. "single-put commit, 1 thread"
    backend: str  # memory | sqlite | postgresql | redis | none
    unit: str  # "ops/s", "commits/s", "ms", ...
    value: float
    peer: str | None = None
    peer_value: float | None = None
    ratio: float | None = None  # speed ratio stateline / peer (> 1: stateline faster)
    target: float | None = None  # minimum speed ratio; with no peer, minimum rate or maximum time
    met: bool | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peer_p50_ms: float | None = None
    peer_p99_ms: float | None = None
    runs: int | None = None
    seconds: float | None = None
    durability: str = ""
    peer_durability: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.peer_value:
            self.ratio = speed_ratio(self.value, self.peer_value, self.unit)
        if self.met is None and self.target is not None:
            if self.peer is not None:
                self.met = self.ratio is not None and self.ratio >= self.target
            elif self.unit in TIME_UNITS:
                self.met = self.value <= self.target  # a time with no peer: the target is a maximum
            else:
                self.met = self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON (NaN and infinities as null)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out


def speed_ratio(value: float, peer_value: float, unit: str) -> float:
    """How many times faster stateline is than its peer, given both figures in ``unit``."""
    if unit in TIME_UNITS:
        return peer_value / value if value else math.inf
    return value / peer_value if peer_value else math.inf


def record(result: Result | None = None, /, **fields: Any) -> None:
    """Append one result to the file named by ``STATELINE_BENCH_JSON`` (no-op when it is unset).

    Takes a :class:`Result` or its fields as keywords. Never raises: a script's own output matters more
    than the machine-readable copy, so a failure is printed and ignored.
    """
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        r = result if result is not None else Result(**fields)
        with open(path, "ab") as f:
            f.write(orjson.dumps(r.to_json()) + b"\n")
    except Exception as exc:
        print(f"(bench harness: could not record a result: {exc!r})")


def load(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The results a script recorded into ``path`` (one JSON object a line)."""
    try:
        with open(path, "rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def latencies(samples: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds of per-operation times given in seconds."""
    if not samples:
        return math.nan, math.nan
    s = sorted(samples)
    p99 = s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]
    return statistics.median(s) * 1e3, p99 * 1e3


def timed_loop(fn: Callable[[int], object], seconds: float, max_samples: int = 200_000) -> tuple[float, list[float]]:
    """Call ``fn(i)`` for ``seconds``; returns calls/s and the time of each call (at most ``max_samples`` kept)."""
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    i = 0
    t = start
    while t < deadline:
        fn(i)
        now = clock()
        if i < max_samples:
            times.append(now - t)
        t = now
        i += 1
    return i / (t - start), times


def alternate(
    runs: int, ours: Callable[[], tuple[float, list[float]]], peer: Callable[[], tuple[float, list[float]]]
) -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
    """Run ``ours`` and ``peer`` ``runs`` times each, alternating which goes first.

    Each callable returns (rate, per-op times in s). Returns (median rate, p50 ms, p99 ms) for each side,
    the latencies over all runs pooled, and the median of the per-run speed ratios.
    """
    a_rates: list[float] = []
    b_rates: list[float] = []
    a_times: list[float] = []
    b_times: list[float] = []
    for r in range(runs):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            rate, times = (ours if side == 0 else peer)()
            (a_rates if side == 0 else b_rates).append(rate)
            (a_times if side == 0 else b_times).extend(times)
    ratio = statistics.median(a / b for a, b in zip(a_rates, b_rates, strict=True))
    return (
        (statistics.median(a_rates), *latencies(a_times)),
        (statistics.median(b_rates), *latencies(b_times)),
        ratio,
    )
