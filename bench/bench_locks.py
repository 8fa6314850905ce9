"""Lock acquire + release on Redis: stateline's ``t.locks`` beside ``python-redis-lock`` and ``pottery``'s Redlock.

Run: ``python bench/bench_locks.py [--quick] [--seconds 5 --runs 3]``. Needs Redis on 127.0.0.1:6379
and ``pip install python-redis-lock pottery`` (both are in the ``bench`` extra).

One thread takes and releases uncontended locks in a loop, cycling over 64 lock names, for a fixed
time. Every contender uses the same Redis server and a TTL of 30 s:

* stateline: ``t.locks.acquire(name, owner, ttl=30)`` then ``t.locks.release(lease)`` on the Redis
  adapter (each a version-checked commit; a lease carries a fencing token that only increases);
* python-redis-lock: ``Lock(conn, name, expire=30).acquire(blocking=False)`` then ``release()``;
* pottery: ``Redlock(key=name, masters={conn}, auto_release_time=30).acquire(blocking=False)`` then
  ``release()`` (one master).

Runs rotate the order of the contenders; figures are medians of the runs, latencies p50 / p99 of
one acquire + release over every call.
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from collections.abc import Callable

import redis

import stateline
from harness import latencies, record, timed_loop

URL = "redis://127.0.0.1:6379/0"
NAMES = [f"lock-{i}" for i in range(64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 10 s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender (median reported)")
    args = parser.parse_args()
    seconds, runs = (0.5, 3) if args.quick else (args.seconds, args.runs)

    import pottery  # noqa: PLC0415  # optional peers: a clear error if missing
    import redis_lock  # noqa: PLC0415

    tag = uuid.uuid4().hex[:8]
    conn = redis.Redis.from_url(URL)
    persistence = conn.config_get("appendonly") | conn.config_get("appendfsync")
    durability = ", ".join(f"{k}={v}" for k, v in persistence.items())
    store = stateline.open_store(f"{URL}?prefix=bench-locks-sl-{tag}")
    locks = stateline.Database(store).tenant("bench").locks
    prefix = f"bench-locks-{tag}"

    def ours(i: int) -> None:
        lease = locks.acquire(NAMES[i % 64], owner="bench", ttl=30.0)
        locks.release(lease)

    def rl(i: int) -> None:
        lock = redis_lock.Lock(conn, f"{prefix}-rl-{NAMES[i % 64]}", expire=30)
        if not lock.acquire(blocking=False):
            raise RuntimeError("python-redis-lock: lock unexpectedly held")
        lock.release()

    masters = {conn}

    def redlock(i: int) -> None:
        lock = pottery.Redlock(key=f"{prefix}-pot-{NAMES[i % 64]}", masters=masters, auto_release_time=30)
        if not lock.acquire(blocking=False):
            raise RuntimeError("pottery: lock unexpectedly held")
        lock.release()

    contenders: dict[str, Callable[[int], None]] = {
        "stateline": ours,
        "python-redis-lock": rl,
        "pottery Redlock": redlock,
    }
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    order = list(contenders)
    try:
        for fn in contenders.values():  # warm up: connections, scripts
            timed_loop(fn, 0.05)
        for r in range(runs):
            for name in order[r % 3 :] + order[: r % 3]:
                rate, t = timed_loop(contenders[name], seconds)
                rates[name].append(rate)
                times[name].extend(t)
    finally:
        store.close()
        for pattern in (f"bench-locks-sl-{tag}*", f"{prefix}*", f"*{prefix}*"):
            keys = list(conn.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                conn.unlink(*keys[i : i + 500])
        conn.close()

    print(
        f"lock acquire + release on Redis ({durability}), 1 thread, 64 names, TTL 30 s; "
        f"median of {runs} rotating runs of {seconds:g} s"
    )
    ours_rate = statistics.median(rates["stateline"])
    o50, o99 = latencies(times["stateline"])
    print(f"  {'stateline t.locks':<20} {ours_rate:>9,.0f} /s   p50 {o50:.3f} ms   p99 {o99:.3f} ms")
    for peer in ("python-redis-lock", "pottery Redlock"):
        rate = statistics.median(rates[peer])
        p50, p99 = latencies(times[peer])
        print(
            f"  {peer:<20} {rate:>9,.0f} /s   p50 {p50:.3f} ms   p99 {p99:.3f} ms   "
            f"stateline/{peer} {ours_rate / rate:.2f}x"
        )
        record(
            bench="locks",
            name="lock acquire + release, 1 thread",
            backend="redis",
            unit="ops/s",
            value=ours_rate,
            peer=peer,
            peer_value=rate,
            p50_ms=o50,
            p99_ms=o99,
            peer_p50_ms=p50,
            peer_p99_ms=p99,
            runs=runs,
            seconds=seconds,
            durability=durability + "; fencing token, owner check",
            peer_durability=durability,
        )


if __name__ == "__main__":
    main()
