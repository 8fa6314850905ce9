"""Commits per second of the Redis Store beside raw redis-py doing the same work, with 1 and 8 clients.

Each client repeatedly commits a version-checked put of a small JSON document to a key of its own
(no conflicts), so every commit does: check the item's version, write the item, bump the tenant's
revision, store the change record and post the feed entry. The peers do exactly those writes:

* ``stateline``: ``RedisStore.commit(tenant, [VersionIs(...)], [Put(...)])``;
* ``raw-evalsha``: redis-py ``EVALSHA`` of a minimal Lua script doing the same reads and writes,
  with arguments prepared by hand (the floor for one atomic commit per round trip);
* ``raw-multi``: redis-py ``MULTI/EXEC`` of the same writes without the check (for scale only:
  it cannot check a version atomically without WATCH).

Runs alternate between peers; the figure is the median of the rounds; the ratio is the cost per
commit of stateline over raw EVALSHA (lower is better; the target is at most 1.25).

Usage: ``python bench/bench_redis.py [--quick] [--url redis://127.0.0.1:6379/0]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import redis

from harness import record
from stateline import Put, VersionIs, open_store
from stateline.store.redis import RedisStore

RAW_LUA = r"""
local now, want, value = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = redis.call('HGET', KEYS[1], 'n')
if (n and tonumber(n) or 0) ~= want then return {0, n} end
local ver = (n and tonumber(n) or 0) + 1
local rev = tonumber(redis.call('GET', KEYS[3]) or '0') + 1
local rev_s, ver_s = string.format('%d', rev), string.format('%d', ver)
redis.call('XADD', KEYS[5], 'MAXLEN', '1', rev_s .. '-1', 'r', rev_s)
local created = now
if n then created = redis.call('HGET', KEYS[1], 'c') end
redis.call('HSET', KEYS[1], 'v', value, 'n', ver_s, 'r', rev_s, 'c', created, 'u', now, 'e', '')
if not n then redis.call('ZADD', KEYS[2], 0, ARGV[4]) end
redis.call('SET', KEYS[3], rev_s)
redis.call('HSET', KEYS[4], rev_s, '{"at":' .. now .. ',"meta":{},"ops":[' .. ARGV[5] .. ver_s
  .. ',"value":' .. value .. ',"exp":null}]}')
return {1, rev, ver}
"""

TENANT = "bench"


def doc(i: int) -> dict[str, Any]:
    return {"n": i, "status": "running", "owner": "worker-7", "tags": ["a", "b"], "payload": "x" * 100}


def stateline_client(store: RedisStore, client_id: int) -> Callable[[int], None]:
    key = f"k{client_id}"
    version = [0]

    def one(i: int) -> None:
        checks = [VersionIs("docs", key, version[0])] if version[0] else []
        c = store.commit(TENANT, checks, [Put("docs", key, doc(i))])
        version[0] = c.versions[("docs", key)]

    return one


def raw_evalsha_client(r: redis.Redis, prefix: str, client_id: int) -> Callable[[int], None]:
    script = r.register_script(RAW_LUA)
    t = f"{prefix}:{{{TENANT}}}:"
    key = f"k{client_id}"
    keys = [f"{t}i:docs|{key}", f"{t}z:docs", t + "rev", t + "c", t + "feed"]
    head = b'{"op":"put","ns":"docs","key":%s,"version":' % orjson.dumps(key)
    version = [0]

    def one(i: int) -> None:
        now = time.time_ns() // 1000
        out = script(keys=keys, args=[now, version[0], orjson.dumps(doc(i)), key, head])
        if out[0] != 1:
            raise RuntimeError("raw check failed")
        version[0] = int(out[2])

    return one


def raw_multi_client(r: redis.Redis, prefix: str, client_id: int) -> Callable[[int], None]:
    t = f"{prefix}:{{{TENANT}}}:"
    key = f"k{client_id}"
    hk = f"{t}i:docs|{key}"
    version = [0]

    def one(i: int) -> None:
        now = time.time_ns() // 1000
        value = orjson.dumps(doc(i))
        version[0] += 1
        pipe = r.pipeline(transaction=True)
        pipe.incr(t + "rev")
        pipe.hset(hk, mapping={"v": value, "n": version[0], "r": 0, "c": now, "u": now, "e": ""})
        pipe.zadd(t + "z:docs", {key: 0})
        pipe.hset(t + "c", str(now), b'{"at":%d,"meta":{},"ops":[]}' % now)
        pipe.xadd(t + "feed", {"r": "1"}, maxlen=1)
        pipe.execute()

    return one


def run(clients: list[Callable[[int], None]], seconds: float) -> tuple[float, float]:
    """Run every client on its own thread for ``seconds``; return commits/s and client CPU µs per commit."""
    stop = threading.Event()
    counts = [0] * len(clients)
    errors: list[BaseException] = []

    def loop(idx: int) -> None:
        fn = clients[idx]
        i = 0
        try:
            while not stop.is_set():
                fn(i)
                i += 1
        except BaseException as exc:
            errors.append(exc)
        counts[idx] = i

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(clients))]
    t0, c0 = time.perf_counter(), time.process_time()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if errors:
        raise errors[0]
    total = max(1, sum(counts))
    return total / elapsed, cpu / total * 1e6


PEERS = ["stateline", "raw-evalsha", "raw-multi"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short rounds (well under a minute)")
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    seconds, rounds = (0.3, 9) if args.quick else (1.0, 21)
    host_url = args.url.split("?")[0]
    prefix = f"slbench-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(host_url)
    info = raw.info("server")
    persistence = raw.config_get("appendonly") | raw.config_get("appendfsync") | raw.config_get("save")
    print(f"redis {info['redis_version']} {persistence}; threads in one process; {rounds} alternating rounds of")
    print(f"{seconds} s per peer; figures are medians; the ratio is the median of per-round raw/stateline rates")
    rates: dict[tuple[str, int], list[float]] = {}
    cpus: dict[tuple[str, int], list[float]] = {}
    ratios: dict[int, list[float]] = {}
    setups: dict[str, tuple[list[Callable[[int], None]], Callable[[], None]]] = {}
    try:
        for n in (1, 8):
            for peer in PEERS:
                sub = f"{prefix}-{peer}-{n}"
                if peer == "stateline":
                    store = open_store(f"{host_url}?prefix={sub}")
                    assert isinstance(store, RedisStore)
                    setups[peer] = ([stateline_client(store, k) for k in range(n)], store.close)
                else:
                    r = redis.Redis.from_url(host_url, max_connections=64)
                    make = raw_evalsha_client if peer == "raw-evalsha" else raw_multi_client
                    setups[peer] = ([make(r, sub, k) for k in range(n)], r.close)
                for c in setups[peer][0]:  # warm up: connections, script load, first write
                    c(-1)
            for rnd in range(rounds):
                got: dict[str, float] = {}
                for peer in PEERS if rnd % 2 == 0 else list(reversed(PEERS)):
                    rate, cpu = run(setups[peer][0], seconds)
                    got[peer] = rate
                    rates.setdefault((peer, n), []).append(rate)
                    cpus.setdefault((peer, n), []).append(cpu)
                ratios.setdefault(n, []).append(got["raw-evalsha"] / got["stateline"])
            for _, close in setups.values():
                close()
    finally:
        for k in raw.scan_iter(match=f"{prefix}-*", count=1000):
            raw.unlink(k)
    print(f"{'clients':>7}  {'peer':<12} {'commits/s':>10} {'client CPU µs/commit':>21}")
    for n in (1, 8):
        for peer in PEERS:
            rate = statistics.median(rates[(peer, n)])
            print(f"{n:>7}  {peer:<12} {rate:>10,.0f} {statistics.median(cpus[(peer, n)]):>21.0f}")
        ratio = statistics.median(ratios[n])
        of_medians = statistics.median(rates[("raw-evalsha", n)]) / statistics.median(rates[("stateline", n)])
        print(
            f"{n:>7}  cost of a stateline commit / raw EVALSHA = {ratio:.2f}x (target <= 1.25; "
            f"ratio of the medians: {of_medians:.2f}x)"
        )
        durability = ", ".join(f"{k}={v}" for k, v in persistence.items() if k != "save")
        for peer, target in (("raw-evalsha", 1 / 1.25), ("raw-multi", None)):
            record(
                bench="redis",
                name=f"version-checked put commit, {n} client(s)",
                backend="redis",
                unit="commits/s",
                value=statistics.median(rates[("stateline", n)]),
                peer=f"redis-py {peer}",
                peer_value=statistics.median(rates[(peer, n)]),
                ratio=1 / ratio if peer == "raw-evalsha" else None,
                target=target,
                runs=rounds,
                seconds=seconds,
                durability=durability,
                peer_durability=durability,
                notes="" if target else "MULTI without the check, for scale",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
