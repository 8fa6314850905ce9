"""Benchmark: stream loading with snapshots, full replay rate, and rebuild / append+reload beside `eventsourcing`.

Run:  python bench/bench_streams.py [--quick] [--backends memory,sqlite,postgresql] [--json out.json]

1. load of a 10,000-event stream with snapshots every 100 vs a full replay (stateline only);
   full replay rate in events/s.
2. rebuilding a 100-event stream (no snapshot) vs `eventsourcing`'s ``repository.get`` of a
   100-event aggregate, on the same database type.
3. appending 5 events to a new stream (expected seq 0, snapshot-maintaining projection) and
   reloading it vs `eventsourcing` saving a new aggregate with 5 events and getting it back.

Same database type on both sides: memory vs eventsourcing's POPO store, SQLite (WAL,
``synchronous=FULL`` on both sides, checked) and PostgreSQL (``synchronous_commit`` read from the
server and printed; 127.0.0.1:5432, user postgres, db test). Each round runs both sides, the order
alternating between rounds; figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from harness import record
from stateline import Event, open_store
from stateline.store.protocol import Store
from stateline.streams import Projection, Streams

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
TENANT = "bench"


# ---------------------------------------------------------------- stateline side


def _reduce(state: dict[str, int], e: Event) -> dict[str, int]:
    state["n"] += 1
    state["total"] += e.data["amount"]
    return state


PROJ = Projection({"n": 0, "total": 0}, _reduce, name="counter")


@contextlib.contextmanager
def stateline_store(kind: str, tmp: Path) -> Iterator[Store]:
    if kind == "memory":
        store = open_store("memory://")
        yield store
        store.close()
        return
    if kind == "sqlite":
        store = open_store(f"sqlite:///{tmp / f'sl-{uuid.uuid4().hex[:8]}.db'}")
        sync = getattr(store, "synchronous", "?")
        assert sync == "FULL", f"stateline SQLite runs synchronous={sync}"
        yield store
        store.close()
        return
    if kind == "postgresql":
        schema = f"bench_sl_{uuid.uuid4().hex[:8]}"
        store = open_store(f"{PG_DSN}?schema={schema}")
        try:
            yield store
        finally:
            store.close()
            _pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return
    if kind == "redis":
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        store = open_store(f"redis://127.0.0.1:6379/0?prefix={prefix}")
        try:
            yield store
        finally:
            store.close()
            import redis  # noqa: PLC0415  # only when benchmarking Redis

            client = redis.Redis(host="127.0.0.1", port=6379)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 500):
                client.unlink(*keys[i : i + 500])
            client.close()
        return
    raise SystemExit(f"unknown backend {kind!r}")


def _pg_exec(sql: str) -> Any:
    import psycopg  # noqa: PLC0415  # only when benchmarking PostgreSQL

    with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=10) as c:
        cur = c.execute(sql)
        return cur.fetchone() if cur.description else None


# ---------------------------------------------------------------- eventsourcing side


@functools.cache
def _es_classes() -> tuple[type, type]:
    from eventsourcing.application import Application  # noqa: PLC0415  # optional peer
    from eventsourcing.domain import Aggregate, event  # noqa: PLC0415

    class Counter(Aggregate):  # type: ignore[misc]
        def __init__(self) -> None:
            self.n = 1
            self.total = 0

        @event("Added")  # type: ignore[misc]
        def add(self, amount: int) -> None:
            self.n += 1
            self.total += amount

    class Counters(Application):  # type: ignore[misc]
        pass

    return Counter, Counters


def _force_es_sqlite_full() -> None:
    """Make every eventsourcing SQLite connection run ``PRAGMA synchronous=FULL`` (explicit, not assumed)."""
    from eventsourcing import sqlite as es_sqlite  # noqa: PLC0415

    pool_cls = es_sqlite.SQLiteConnectionPool
    if getattr(pool_cls, "_bench_full", False):
        return
    original = pool_cls._create_connection

    def create(self: Any) -> Any:
        conn = original(self)
        conn._sqlite_conn.execute("PRAGMA synchronous=FULL")
        return conn

    pool_cls._create_connection = create
    pool_cls._bench_full = True


@contextlib.contextmanager
def es_app(kind: str, tmp: Path) -> Iterator[Any]:
    _, counters = _es_classes()
    if kind == "memory":
        app = counters(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        yield app
        app.close()
        return
    if kind == "sqlite":
        _force_es_sqlite_full()
        path = tmp / f"es-{uuid.uuid4().hex[:8]}.db"
        app = counters(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)})
        with app.recorder.datastore.get_connection(commit=False) as conn:
            mode = conn._sqlite_conn.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == 2, f"eventsourcing SQLite runs synchronous={mode}"  # 2 = FULL
        yield app
        app.close()
        return
    if kind == "postgresql":
        schema = f"bench_es_{uuid.uuid4().hex[:8]}"
        _pg_exec(f'CREATE SCHEMA "{schema}"')
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": "test",
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": "5432",
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "",
            "POSTGRES_SCHEMA": schema,
        }
        app = counters(env=env)
        try:
            yield app
        finally:
            app.close()
            _pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return
    raise SystemExit(f"eventsourcing has no {kind!r} store here")


# ---------------------------------------------------------------- timing


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def bench_load_vs_replay(kind: str, tmp: Path, quick: bool) -> dict[str, Any]:
    n_events = 10_000
    with stateline_store(kind, tmp) as store:
        s = Streams(store, TENANT, snapshot_every=100, keep_snapshots=5)
        for b in range(n_events // 100):
            s.append(
                "big",
                [{"type": "added", "data": {"amount": b * 100 + i}} for i in range(100)],
                expected_seq=b * 100,
                projection=PROJ,
            )
        s.append("big", [{"type": "added", "data": {"amount": 1}}] * 37, expected_seq=n_events, projection=PROJ)
        total = n_events + 37
        expected = s.replay("big", PROJ)
        assert s.load("big", PROJ) == expected
        assert s.load_state("big", PROJ).replayed == 37
        rounds = 5 if quick else 9
        load_t, replay_t = [], []
        for r in range(rounds):
            pair = [("load", lambda: s.load("big", PROJ)), ("replay", lambda: s.replay("big", PROJ))]
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                if name == "load":
                    load_t.append(_median_time(fn, 20 if quick else 50))
                else:
                    replay_t.append(_median_time(fn, 1 if quick else 3))
        load, replay = statistics.median(load_t), statistics.median(replay_t)
    return {
        "events": total,
        "load_s": load,
        "replay_s": replay,
        "speedup": replay / load,
        "replay_events_per_s": total / replay,
    }


def bench_rebuild_100(kind: str, tmp: Path, quick: bool) -> dict[str, Any]:
    counter_cls, _ = _es_classes()
    rounds = 5 if quick else 9
    reps = 30 if quick else 100
    with stateline_store(kind, tmp) as store, es_app(kind, tmp) as app:
        s = Streams(store, TENANT)
        s.append("plain100", [{"type": "added", "data": {"amount": i}} for i in range(100)], expected_seq=0)
        s.append("snap100", [{"type": "added", "data": {"amount": i}} for i in range(100)], projection=PROJ)
        agg = counter_cls()
        for i in range(99):
            agg.add(i)
        app.save(agg)
        assert app.repository.get(agg.id).n == 100
        assert s.load("plain100", PROJ)["n"] == 100
        sl, sl_snap, es = [], [], []
        for r in range(rounds):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for side in order:
                if side == 0:
                    sl.append(_median_time(lambda: s.load("plain100", PROJ), reps))
                    sl_snap.append(_median_time(lambda: s.load("snap100", PROJ), reps))
                else:
                    es.append(_median_time(lambda: app.repository.get(agg.id), reps))
    a, b, c = statistics.median(sl), statistics.median(sl_snap), statistics.median(es)
    return {"stateline_replay_s": a, "stateline_snapshot_s": b, "eventsourcing_s": c, "ratio": c / a}


def bench_append_reload(kind: str, tmp: Path, quick: bool, threads: int = 1) -> dict[str, Any]:
    """Append 5 events to a new stream and load it back, from ``threads`` concurrent clients per side."""
    counter_cls, _ = _es_classes()
    rounds = 3 if quick else 5
    ops = max(10, (40 if quick else 150) // threads)
    with stateline_store(kind, tmp) as store, es_app(kind, tmp) as app:
        s = Streams(store, TENANT, snapshot_every=100, keep_snapshots=5)
        batch = [{"type": "added", "data": {"amount": i}} for i in range(5)]

        def stateline_op() -> None:
            name = uuid.uuid4().hex
            s.append(name, batch, expected_seq=0, projection=PROJ)
            assert s.load(name, PROJ)["n"] == 5

        def es_op() -> None:
            agg = counter_cls()
            for i in range(4):
                agg.add(i)
            app.save(agg)
            assert app.repository.get(agg.id).n == 5

        def run(fn: Callable[[], None]) -> float:
            errors: list[BaseException] = []

            def client() -> None:
                try:
                    for _ in range(ops):
                        fn()
                except BaseException as exc:
                    errors.append(exc)

            pool = [threading.Thread(target=client) for _ in range(threads)]
            t0 = time.perf_counter()
            for th in pool:
                th.start()
            for th in pool:
                th.join()
            elapsed = time.perf_counter() - t0
            if errors:
                raise errors[0]
            return ops * threads / elapsed

        stateline_op()
        es_op()
        sl, es = [], []
        for r in range(rounds):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for side in order:
                (sl if side == 0 else es).append(run(stateline_op if side == 0 else es_op))
    a, b = statistics.median(sl), statistics.median(es)
    return {"threads": threads, "stateline_ops_per_s": a, "eventsourcing_ops_per_s": b, "ratio": a / b}


# ---------------------------------------------------------------- main


def _reachable_pg() -> bool:
    try:
        _pg_exec("SELECT 1")
    except Exception:
        return False
    return True


def _record(kind: str, r: dict[str, Any], quick: bool, pg_sync: str) -> None:
    """Hand this backend's figures to bench/run.py (no-op when run by hand)."""
    dur = {"memory": "in process", "sqlite": "synchronous=FULL, WAL"}.get(kind, f"synchronous_commit={pg_sync}")
    peer_dur = {"memory": "POPO, in process", "sqlite": "synchronous=FULL (checked)"}.get(kind, dur)
    a = r["load_vs_replay"]
    record(
        bench="streams",
        name=f"load {a['events']:,}-event stream (snapshot + 37 events)",
        backend=kind,
        unit="ms",
        value=a["load_s"] * 1e3,
        peer="stateline full replay",
        peer_value=a["replay_s"] * 1e3,
        runs=5 if quick else 9,
        durability="read only",
    )
    if "rebuild_100" in r:
        b = r["rebuild_100"]
        record(
            bench="streams",
            name="rebuild a 100-event stream (no snapshot)",
            backend=kind,
            unit="ms",
            value=b["stateline_replay_s"] * 1e3,
            peer="eventsourcing repository.get",
            peer_value=b["eventsourcing_s"] * 1e3,
            runs=5 if quick else 9,
            durability="read only",
        )
    for threads in (1, 4):
        c = r.get(f"append_reload_{threads}")
        if c:
            record(
                bench="streams",
                name=f"append 5 events + reload, {threads} thread(s)",
                backend=kind,
                unit="ops/s",
                value=c["stateline_ops_per_s"],
                peer="eventsourcing save + get",
                peer_value=c["eventsourcing_ops_per_s"],
                runs=3 if quick else 5,
                durability=dur,
                peer_durability=peer_dur,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer rounds: finishes well under a minute")
    ap.add_argument("--backends", default="memory,sqlite,postgresql", help="comma-separated backends")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    if "postgresql" in kinds and not _reachable_pg():
        print("PostgreSQL is not reachable on 127.0.0.1:5432: skipping it")
        kinds.remove("postgresql")
    from importlib.metadata import version  # noqa: PLC0415

    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"eventsourcing {version('eventsourcing')}; {'quick' if args.quick else 'full'} run"
    )
    pg_sync = "?"
    if "postgresql" in kinds:
        pg_sync = _pg_exec("SHOW synchronous_commit")[0]
        print(f"PostgreSQL synchronous_commit={pg_sync}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as d:
        tmp = Path(d)
        for kind in kinds:
            r: dict[str, Any] = {}
            a = r["load_vs_replay"] = bench_load_vs_replay(kind, tmp, args.quick)
            print(
                f"[{kind}] 10,037-event stream: load (snapshot + {37} events) {_fmt_s(a['load_s'])}, "
                f"full replay {_fmt_s(a['replay_s'])} -> {a['speedup']:.0f}x; "
                f"replay {a['replay_events_per_s']:,.0f} events/s"
            )
            if kind in ("memory", "sqlite", "postgresql"):
                b = r["rebuild_100"] = bench_rebuild_100(kind, tmp, args.quick)
                print(
                    f"[{kind}] rebuild 100 events: stateline {_fmt_s(b['stateline_replay_s'])} "
                    f"(from a snapshot: {_fmt_s(b['stateline_snapshot_s'])}), "
                    f"eventsourcing repository.get {_fmt_s(b['eventsourcing_s'])} -> {b['ratio']:.1f}x"
                )
                for threads in (1, 4):
                    c = r[f"append_reload_{threads}"] = bench_append_reload(kind, tmp, args.quick, threads)
                    print(
                        f"[{kind}] append 5 + reload, {threads} client thread(s) per side: "
                        f"stateline {c['stateline_ops_per_s']:,.0f} ops/s, "
                        f"eventsourcing save+get {c['eventsourcing_ops_per_s']:,.0f} ops/s -> {c['ratio']:.2f}x"
                    )
            results[kind] = r
            _record(kind, r, args.quick, pg_sync)
            sys.stdout.flush()
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
