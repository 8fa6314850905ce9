"""Scaling: commit latency against the number of keys in a tenant, load time against history length, memory per case.

Run: ``python bench/bench_scaling.py [--quick] [--backends memory,sqlite,postgresql]``.

* Commit latency with 1 thousand, 100 thousand and 1 million keys in one tenant (``--quick``: up to
  100 thousand), on memory, SQLite (``synchronous=FULL`` for the measured commits; the keys are
  preloaded in commits of 10,000 puts at ``synchronous=NORMAL`` to be quick) and PostgreSQL (a schema
  of its own at ``--pg``, dropped afterwards; beside the measured tenant it holds 5,000 small tenants
  and its statistics are up to date, so that prepared statements are planned for tenants of average
  size, as in a shared deployment). The figure at N keys is compared with the same commits on a
  tenant of 1,000 keys in another store, the two taking turns: the ratio should stay near 1 (flat).
  Each commit puts a random existing key the handle has not written, so the store reads its version.
* Load time against history length: ``t.streams.load`` (latest snapshot, every 100 events, plus the
  events after it) beside a full replay of the same stream, for 100, 1,000 and 10,000 events; and
  ``t.cases.open`` of a case after 10 and after 1,000 commits (a case's state is stored whole, so
  opening it does not depend on its history).
* Memory per case held in memory: ``tracemalloc`` over 1,000 opened ``Case`` handles of a case with
  a small context, one token and one scope.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import psycopg

from harness import alternate, latencies, record, timed_loop
from stateline import Database, Event, Put, open_store
from stateline.store.protocol import MAX_OPS, Store
from stateline.streams import Projection

TENANT = "bench"
NS = "docs"
PG = "postgresql://postgres@127.0.0.1:5432/test"
SMALL_TENANTS = 5000  # PostgreSQL: the other tenants of the schema, 2 keys each


def _value(i: int) -> dict[str, Any]:
    return {"n": i, "status": "running", "payload": "x" * 60}


class Target:
    """One store and tenant holding ``size`` keys; reopened at FULL for the measured commits."""

    def __init__(self, kind: str, directory: Path, pg: str = PG) -> None:
        self.kind = kind
        self.path = directory / f"scale-{uuid.uuid4().hex[:8]}.db"
        self.pg, self.schema = pg, f"bench_scale_{uuid.uuid4().hex[:8]}"
        self.size = 0
        self.store: Store = open_store(self._url("NORMAL"))
        if kind == "postgresql":
            for t in range(SMALL_TENANTS):
                self.store.commit(f"small-{t}", (), [Put(NS, f"k{i}", _value(i)) for i in range(2)])

    def _url(self, synchronous: str) -> str:
        if self.kind == "postgresql":
            return f"{self.pg}?schema={self.schema}"
        return "memory://" if self.kind == "memory" else f"sqlite:///{self.path}?synchronous={synchronous}"

    def grow(self, size: int) -> None:
        if self.kind == "sqlite":
            self.store.close()
            self.store = open_store(self._url("NORMAL"))
        while self.size < size:
            n = min(MAX_OPS, size - self.size)
            self.store.commit(TENANT, (), [Put(NS, f"k{i:08d}", _value(i)) for i in range(self.size, self.size + n)])
            self.size += n
        if self.kind == "sqlite":
            self.store.close()
            self.store = open_store(self._url("FULL"))
        if self.kind == "postgresql":
            with psycopg.connect(self.pg, autocommit=True) as conn:
                conn.execute(f"ANALYZE {self.schema}.items")

    def run(self, seconds: float) -> tuple[float, list[float]]:
        commit, size, rnd = self.store.commit, self.size, random.Random(self.size)

        def one(i: int) -> None:
            k = rnd.randrange(size)
            commit(TENANT, (), (Put(NS, f"k{k:08d}", _value(i)),))

        return timed_loop(one, seconds)

    def close(self) -> None:
        self.store.close()
        if self.kind == "postgresql":
            with contextlib.suppress(psycopg.Error), psycopg.connect(self.pg, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def bench_keys(kind: str, directory: Path, sizes: list[int], seconds: float, runs: int, pg: str = PG) -> None:
    small, big = Target(kind, directory, pg), Target(kind, directory, pg)
    durability = {"memory": "in process", "sqlite": "synchronous=FULL, WAL"}.get(kind, "synchronous_commit=on")
    try:
        small.grow(1000)
        for size in sizes:
            t0 = time.perf_counter()
            big.grow(size)
            grown = time.perf_counter() - t0
            (rate, p50, p99), (base, b50, b99), ratio = alternate(
                runs, lambda: big.run(seconds), lambda: small.run(seconds)
            )
            print(
                f"[{kind}] {size:>9,} keys: {rate:>8,.0f} commits/s, p50 {p50:.3f} ms, p99 {p99:.3f} ms; "
                f"1,000 keys in the same rounds {base:,.0f}/s (p50 {b50:.3f} ms): ratio {ratio:.2f} "
                f"(preload {grown:.1f} s)"
            )
            record(
                bench="scaling",
                name=f"single-put commit, {size:,} keys in the tenant",
                backend=kind,
                unit="commits/s",
                value=rate,
                peer="same with 1,000 keys",
                peer_value=base,
                ratio=ratio,
                target=0.8,
                p50_ms=p50,
                p99_ms=p99,
                peer_p50_ms=b50,
                peer_p99_ms=b99,
                runs=runs,
                seconds=seconds,
                durability=durability,
                peer_durability=durability,
            )
    finally:
        small.close()
        big.close()


def _reduce(state: dict[str, int], e: Event) -> dict[str, int]:
    state["n"] += 1
    state["total"] += e.data["amount"]
    return state


PROJ = Projection({"n": 0, "total": 0}, _reduce, name="counter")


def _times(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_history(kind: str, directory: Path, lengths: list[int], case_commits: list[int], reps: int) -> None:
    path = directory / f"hist-{uuid.uuid4().hex[:8]}.db"
    store = open_store("memory://" if kind == "memory" else f"sqlite:///{path}?synchronous=NORMAL")
    try:
        tenant = Database(store).tenant(TENANT)
        streams = tenant.streams
        for length in lengths:
            name = f"s{length}"
            done = 0
            while done < length:
                n = min(1000, length - done)
                batch = [{"type": "added", "data": {"amount": done + i}} for i in range(n)]
                streams.append(name, batch, expected_seq=done, projection=PROJ)
                done += n
            assert streams.load(name, PROJ) == streams.replay(name, PROJ)
            load_t: list[float] = []
            replay_t: list[float] = []
            for r in range(3):
                for side in (0, 1) if r % 2 == 0 else (1, 0):
                    if side == 0:
                        load_t += _times(lambda name=name: streams.load(name, PROJ), reps)
                    else:
                        replay_t += _times(lambda name=name: streams.replay(name, PROJ), max(1, reps // 10))
            l50, l99 = latencies(load_t)
            r50, r99 = latencies(replay_t)
            print(
                f"[{kind}] stream of {length:>6,} events: load with snapshots p50 {l50:.3f} ms (p99 {l99:.3f}), "
                f"full replay p50 {r50:.3f} ms (p99 {r99:.3f}) -> {r50 / l50:.1f}x"
            )
            record(
                bench="scaling",
                name=f"stream load, {length:,} events (snapshot every 100)",
                backend=kind,
                unit="ms",
                value=l50,
                peer="full replay, no snapshot",
                peer_value=r50,
                p50_ms=l50,
                p99_ms=l99,
                peer_p50_ms=r50,
                peer_p99_ms=r99,
                runs=3,
                durability="read only",
            )
        cases = tenant.cases
        opens: dict[int, float] = {}
        for commits in case_commits:
            case = cases.create(f"c{commits}", {"order": {"id": 42, "items": [1, 2, 3]}, "customer": "acme"})
            case.enter_scope("main").add_token("t1", "main", position="start").commit()
            for i in range(commits - 1):
                case.put_ctx("i", i).update_token("t1", position=f"node-{i % 7}").increment_step_count().commit()
            times = []
            for _ in range(3):
                times += _times(lambda commits=commits: cases.open(f"c{commits}"), reps)
            p50, p99 = latencies(times)
            opens[commits] = p50
            base = opens[case_commits[0]]
            print(f"[{kind}] case open after {commits:>5,} commits: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
            record(
                bench="scaling",
                name=f"case open after {commits:,} commits",
                backend=kind,
                unit="ms",
                value=p50,
                peer=None if commits == case_commits[0] else f"case open after {case_commits[0]} commits",
                peer_value=None if commits == case_commits[0] else base,
                p50_ms=p50,
                p99_ms=p99,
                runs=3,
                durability="read only",
            )
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def bench_case_memory(n: int) -> None:
    store = open_store("memory://")
    cases = Database(store).tenant(TENANT).cases
    case = cases.create("mem", {"order": {"id": 42, "items": [1, 2, 3]}, "customer": "acme-corp"})
    case.enter_scope("main").add_token("t1", "main", position="start").commit()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = [cases.open("mem") for _ in range(n)]
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in after.compare_to(before, "filename"))
    per = used / len(held)
    print(f"memory per opened case (small context, one token, one scope): {per:,.0f} bytes ({n:,} handles)")
    record(
        bench="scaling",
        name="memory per case held in memory (tracemalloc)",
        backend="memory",
        unit="bytes",
        value=per,
        notes=f"{n:,} handles",
    )
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="up to 100,000 keys and short runs (about 30 s)")
    parser.add_argument("--backends", default="memory,sqlite,postgresql")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one measured run")
    parser.add_argument("--runs", type=int, default=3, help="runs per size (alternating with the 1,000-key store)")
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite files go (default: a temp dir)")
    parser.add_argument("--pg", default=PG, help="PostgreSQL server for the postgresql backend")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.backends.split(",") if k.strip() in ("memory", "sqlite", "postgresql")]
    seconds, runs = (0.5, 3) if args.quick else (args.seconds, args.runs)
    sizes = [1000, 100_000] if args.quick else [1000, 100_000, 1_000_000]
    lengths = [100, 1000, 10_000]
    case_commits = [10, 200] if args.quick else [10, 1000]
    reps = 20 if args.quick else 100
    print(
        f"bench_scaling: {os.cpu_count()} cores; commit figures: median of {runs} alternating runs of {seconds:g} s; "
        f"latencies p50 / p99 over every call"
    )
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-scaling-") as tmp:
        for kind in kinds:
            bench_keys(kind, Path(tmp), sizes, seconds, runs, args.pg)
        for kind in kinds:
            if kind == "postgresql":
                continue  # history and case loads: memory and SQLite only
            bench_history(kind, Path(tmp), lengths, case_commits, reps)
    bench_case_memory(1000)


if __name__ == "__main__":
    main()
