"""Rate limits beside the ``limits`` library, and idempotency checks for already-seen keys.

Rate limits: stateline's ``t.limits(...)`` and ``limits`` with the same algorithm (fixed window:
``FixedWindowRateLimiter``; sliding window: ``SlidingWindowCounterRateLimiter``, the same two-bucket
weighted counter) on the same backend: in-process memory (``memory://`` vs ``MemoryStorage``) and
Redis on 127.0.0.1:6379 (stateline's Redis adapter vs ``RedisStorage``). One thread calls ``hit``
in a loop over 64 keys for a fixed time. Two workloads: ``admit`` (a limit never reached: every hit
is counted) and ``refuse`` (10 per minute: after the first hits almost every hit is refused).
Runs of the two alternate (order swapped each run); each figure is the median of the runs.

A third contender is stateline's limiter with ``batch=64`` (``RateLimiter(..., batch=N)``): it
takes permits from the Store 64 at a time (capped at the limit), so one process admits most hits
without a round trip; it never over-admits, but is not exact across processes (see its docs).

Idempotency: ``t.idempotency.run(key, fn)`` and ``with t.idempotency.once(key)`` for keys that
already hold a result (the repeat path), on memory (target: at least 50,000/s).

    python bench/bench_runtime.py --quick          # well under a minute
    python bench/bench_runtime.py --seconds 2 --runs 5
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage, RedisStorage, Storage
from limits.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter

import stateline
from harness import record
from stateline.runtime import RateLimiter
from stateline.store.protocol import Store

KEYS = [f"user-{i}" for i in range(64)]
PEERS: dict[str, type[Any]] = {
    "fixed_window": FixedWindowRateLimiter,
    "sliding_window": SlidingWindowCounterRateLimiter,
}
WORKLOADS = {"admit": 10**9, "refuse": 10}


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1.0):
            return True
    except OSError:
        return False


def _rate(fn: Callable[[str], Any], seconds: float) -> float:
    """Calls per second of ``fn(key)`` over ``seconds``, keys cycling."""
    n = 0
    keys = KEYS
    nk = len(keys)
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        for _ in range(64):
            fn(keys[n % nk])
            n += 1
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


class Backend:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tag = uuid.uuid4().hex[:10]
        if kind == "memory":
            self.store: Store = stateline.open_store("memory://")
            self.peer: Storage = MemoryStorage()
        else:
            self.store = stateline.open_store(f"redis://127.0.0.1:6379/0?prefix=bench-sl-{self.tag}")
            self.peer = RedisStorage("redis://127.0.0.1:6379/0", key_prefix=f"bench-limits-{self.tag}")
        self.db = stateline.Database(self.store)

    def close(self) -> None:
        self.store.close()
        if self.kind == "redis":
            import redis  # noqa: PLC0415 - only needed to clean up after the Redis runs

            client = redis.Redis(host="127.0.0.1", port=6379, db=0)
            for pattern in (f"bench-sl-{self.tag}:*", f"bench-limits-{self.tag}*"):
                batch = list(client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(batch), 500):
                    client.unlink(*batch[i : i + 500])
            client.close()


def bench_limits(
    backend: Backend, algorithm: str, workload: str, seconds: float, runs: int, batch: int
) -> tuple[float, float, float]:
    amount = WORKLOADS[workload]
    run_id = uuid.uuid4().hex[:6]
    tenant = backend.db.tenant("bench")
    ours = tenant.limits(f"{algorithm}-{workload}-{run_id}", amount, 60.0, algorithm)
    batched = RateLimiter(
        backend.store, "bench", f"b-{algorithm}-{workload}-{run_id}", amount, 60.0, algorithm, batch=min(batch, amount)
    )
    peer = PEERS[algorithm](backend.peer)
    item = RateLimitItemPerMinute(amount, namespace=f"{algorithm}-{workload}-{run_id}")

    def stateline_hit(key: str) -> None:
        ours.hit(key)

    def batched_hit(key: str) -> None:
        batched.hit(key)

    def limits_hit(key: str) -> None:
        peer.hit(item, key)

    contenders = [stateline_hit, batched_hit, limits_hit]
    for fn in contenders:  # warm up (connections, scripts, first windows)
        _rate(fn, 0.05)
    out: list[list[float]] = [[], [], []]
    for r in range(runs):
        order = list(range(3)) if r % 2 == 0 else [2, 1, 0]
        for i in order:
            out[i].append(_rate(contenders[i], seconds))
    a, b, c = (statistics.median(x) for x in out)
    return a, b, c


def bench_idempotency(backend: Backend, seconds: float, runs: int) -> tuple[float, float]:
    idem = backend.db.tenant("bench").idempotency
    for k in KEYS:
        idem.run(k, lambda: {"status": 200, "body": "ok"})
    calls = 0

    def work() -> None:
        nonlocal calls
        calls += 1

    def via_run(key: str) -> None:
        idem.run(key, work)

    def via_with(key: str) -> None:
        with idem.once(key) as slot:
            if slot.done:
                return
            slot.set(None)

    a = [_rate(via_run, seconds) for _ in range(runs)]
    b = [_rate(via_with, seconds) for _ in range(runs)]
    assert calls == 0, "a repeat ran the work"
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (well under a minute)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=5, help="runs per contender (median reported)")
    parser.add_argument("--backends", default="memory,redis")
    parser.add_argument("--batch", type=int, default=64, help="permits per Store commit for the batched limiter")
    args = parser.parse_args()
    seconds, runs = (0.25, 3) if args.quick else (args.seconds, args.runs)
    kinds = [k for k in args.backends.split(",") if k]
    if "redis" in kinds and not _redis_up():
        print("Redis is not reachable on 127.0.0.1:6379: skipping the Redis runs")
        kinds.remove("redis")
    print(f"python {platform.python_version()}, {seconds:g} s per run, median of {runs} alternating runs, 1 thread")
    print(
        f"{'backend':8} {'algorithm':15} {'workload':8} {'stateline/s':>12} {f'batch={args.batch}/s':>12} "
        f"{'limits/s':>12} {'ratio':>6} {'ratio(batch)':>12}"
    )
    for kind in kinds:
        backend = Backend(kind)
        try:
            for algorithm, strategy in PEERS.items():
                for workload in WORKLOADS:
                    ours, batched, peer = bench_limits(backend, algorithm, workload, seconds, runs, args.batch)
                    print(
                        f"{kind:8} {algorithm:15} {workload:8} {ours:12,.0f} {batched:12,.0f} {peer:12,.0f} "
                        f"{ours / peer:6.2f} {batched / peer:12.2f}"
                    )
                    peer_name = f"limits {strategy.__name__} ({type(backend.peer).__name__})"
                    common = {"bench": "runtime", "backend": kind, "unit": "hits/s", "runs": runs, "seconds": seconds}
                    record(
                        name=f"{algorithm} hit, {workload} workload, 1 thread",
                        value=ours,
                        peer=peer_name,
                        peer_value=peer,
                        ratio=ours / peer,
                        target=1.0,
                        met=ours >= peer,
                        notes="t.limits(...): every admitted hit is one Store commit (exact across processes)",
                        **common,
                    )
                    record(
                        name=f"{algorithm} hit batch={args.batch}, {workload} workload, 1 thread",
                        value=batched,
                        peer=peer_name,
                        peer_value=peer,
                        ratio=batched / peer,
                        notes="RateLimiter(batch=N): permits taken N per commit; never over-admits, "
                        "exact for one process only",
                        **common,
                    )
        finally:
            backend.close()
    backend = Backend("memory")
    try:
        via_run, via_with = bench_idempotency(backend, seconds, runs)
    finally:
        backend.close()
    print(f"idempotency repeat (memory): run() {via_run:,.0f}/s, with once() {via_with:,.0f}/s (target >= 50,000/s)")
    for name, value in (("run()", via_run), ("with once()", via_with)):
        record(
            bench="runtime",
            name=f"idempotency repeat of a seen key via {name}, 1 thread",
            backend="memory",
            unit="checks/s",
            value=value,
            target=50_000.0,
            met=value >= 50_000,
            runs=runs,
            seconds=seconds,
        )


if __name__ == "__main__":
    main()
