"""Case commits per second (5 mutations + receipt + case events per commit) beside the eventsourcing library.

One *case commit* is a quantum of work on one case: 5 buffered mutations (two ``put_ctx``, one
``update_token`` through a function, ``increment_step_count``, ``set_metadata``), validated, applied,
and written with its hash-chained receipt and 5 case events in one Store commit guarded by the case
version. The peer saves an ``eventsourcing`` aggregate with the same number of new events (5) per
save, at equal durability:

* memory: stateline ``memory://`` vs eventsourcing POPO (also: eventsourcing one-event aggregates/s);
* SQLite ``synchronous=FULL`` (both: eventsourcing leaves SQLite's default, FULL, which is printed):
  one writer, and 16 cases committed concurrently by 16 threads (16 aggregates for the peer);
  plus a single-``Put`` commit of the same number of bytes, to show what the receipt costs;
* PostgreSQL (``synchronous_commit=on``, the server default, printed) with one connection each.

Runs alternate (stateline, peer, stateline, ...) and each figure is the median of the runs.

    python bench/bench_cases.py --quick        # well under a minute
    python bench/bench_cases.py --seconds 3 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from harness import record
from stateline import Put, open_store
from stateline.cases import Case, Cases

T = "bench"
PG = "postgresql://postgres@127.0.0.1:5432/test"


# ---------------------------------------------------------------- the work


def _quantum(case: Case, i: int) -> None:
    case.put_ctx("i", i)
    case.put_ctx("last", {"step": i, "status": "ok", "note": "quantum done"})
    case.update_token("t1", position=f"node-{i % 7}")
    case.increment_step_count()
    case.set_metadata("worker", "w-1")


def _new_case(cases: Cases) -> Case:
    case = cases.create(uuid.uuid4().hex, {"order": {"id": 42, "items": [1, 2, 3]}, "customer": "acme-corp"})
    case.enter_scope("main").add_token("t1", "main", position="start").commit()
    return case


class Order(Aggregate):
    @event("Started")
    def __init__(self, customer: str) -> None:
        self.customer = customer
        self.ctx: dict[str, Any] = {}
        self.steps = 0

    @event("CtxSet")
    def put_ctx(self, key: str, value: Any) -> None:
        self.ctx[key] = value

    @event("TokenMoved")
    def move_token(self, token: str, position: str) -> None:
        self.ctx[token] = position

    @event("Stepped")
    def step(self) -> None:
        self.steps += 1

    @event("MetadataSet")
    def set_metadata(self, key: str, value: Any) -> None:
        self.ctx[key] = value


class Orders(Application[Any]):
    """The peer's application: one aggregate per case."""


def _es_classes() -> tuple[Any, Any]:
    return Orders, Order


def _es_quantum(agg: Any, i: int) -> None:
    agg.put_ctx("i", i)
    agg.put_ctx("last", {"step": i, "status": "ok", "note": "quantum done"})
    agg.move_token("t1", f"node-{i % 7}")
    agg.step()
    agg.set_metadata("worker", "w-1")


# ---------------------------------------------------------------- timing


_CPU: list[float] = [0.0]  # CPU µs per call (all threads of the process) of the last _rate


def _rate(n_threads: int, seconds: float, make: Callable[[int], Callable[[int], object]]) -> float:
    """``n_threads`` clients call their function in a loop for ``seconds``; returns calls/s in total.

    Also records the process CPU time per call in ``_CPU[0]``: on a shared, loaded machine it varies
    less than the wall-clock rate (it excludes waiting for the CPU and for fsync).
    """
    fns = [make(c) for c in range(n_threads)]
    counts = [0] * n_threads
    start = threading.Barrier(n_threads + 1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        fn = fns[c]
        start.wait()
        i = 0
        try:
            while not stop.is_set():
                fn(i)
                i += 1
        except BaseException as exc:
            errors.append(exc)
        counts[c] = i

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_threads)]
    for t in threads:
        t.start()
    start.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if errors:
        raise errors[0]
    _CPU[0] = cpu / max(1, sum(counts)) * 1e6
    return sum(counts) / elapsed


_CPU_MEDIANS: list[float] = [0.0, 0.0]  # CPU µs per call of the last _alternate: ours, peer


def _alternate(runs: int, ours: Callable[[], float], peer: Callable[[], float]) -> tuple[float, float]:
    a: list[float] = []
    b: list[float] = []
    ca: list[float] = []
    cb: list[float] = []

    def one(fn: Callable[[], float], rates: list[float], cpus: list[float]) -> None:
        rates.append(fn())
        cpus.append(_CPU[0])

    for r in range(runs):
        if r % 2 == 0:
            one(ours, a, ca)
            one(peer, b, cb)
        else:
            one(peer, b, cb)
            one(ours, a, ca)
    _CPU_MEDIANS[:] = [statistics.median(ca), statistics.median(cb)]
    return statistics.median(a), statistics.median(b)


def _line(label: str, ours: float, peer: float, peer_name: str, target: float | None) -> None:
    ratio = ours / peer if peer else float("inf")
    goal = "" if target is None else f"  (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})"
    print(f"  {label:<44} stateline {ours:>9,.0f}/s   {peer_name} {peer:>9,.0f}/s   ratio {ratio:5.2f}x{goal}")
    ca, cb = _CPU_MEDIANS
    print(f"  {'':<44} CPU per call: stateline {ca:,.0f} µs, {peer_name} {cb:,.0f} µs ({cb / ca:4.2f}x)")


def _rec(
    backend: str,
    label: str,
    ours: float,
    peer: float | None,
    peer_name: str | None,
    target: float | None,
    runs: int,
    seconds: float,
    durability: str,
    peer_durability: str = "",
) -> None:
    """Hand one figure to bench/run.py (no-op when run by hand)."""
    record(
        bench="cases",
        name=label,
        backend=backend,
        unit="commits/s",
        value=ours,
        peer=peer_name,
        peer_value=peer,
        target=target,
        runs=runs,
        seconds=seconds,
        durability=durability,
        peer_durability=peer_durability,
    )


# ---------------------------------------------------------------- scenarios


def bench_memory(seconds: float, runs: int) -> None:
    print("memory (one thread)")
    cases = Cases(open_store("memory://"), T)
    Orders, Order = _es_classes()  # noqa: N806 - classes
    app = Orders(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})

    def ours() -> float:
        case = _new_case(cases)
        return _rate(1, seconds, lambda _: lambda i: (_quantum(case, i), case.commit()))

    def peer() -> float:
        agg = Order("acme-corp")
        app.save(agg)
        return _rate(1, seconds, lambda _: lambda i: (_es_quantum(agg, i), app.save(agg)))

    def peer_one_event() -> float:
        return _rate(1, seconds, lambda _: lambda i: app.save(Order("acme-corp")))

    a, b = _alternate(runs, ours, peer)
    _line("case commit, 5 mutations + receipt", a, b, "eventsourcing 5-event save", None)
    mem = ("in process", "POPO, in process")
    _rec("memory", "case commit, 5 mutations + receipt", a, b, "eventsourcing 5-event save", None, runs, seconds, *mem)
    one = statistics.median(peer_one_event() for _ in range(runs))
    _rec("memory", "case commit", a, one, "eventsourcing one-event aggregate", 2.0, runs, seconds, *mem)
    _rec("memory", "case commit (absolute)", a, None, None, 50_000, runs, seconds, mem[0])
    print(
        f"  {'eventsourcing one-event aggregates':<44} {one:>19,.0f}/s   stateline/that {a / one:5.2f}x  (target >= 2x)"
    )
    print(f"  {'absolute target 50,000/s':<44} stateline {a:>9,.0f}/s   {'met' if a >= 50_000 else 'NOT met'}")


def _es_sqlite(path: str) -> Any:
    Orders, _ = _es_classes()  # noqa: N806
    app = Orders(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": "30",
        }
    )
    with app.recorder.datastore.transaction(commit=False) as cur:  # type: ignore[attr-defined]
        cur.execute("PRAGMA synchronous")
        sync = cur.fetchone()[0]
        cur.execute("PRAGMA journal_mode")
        mode = cur.fetchone()[0]
    return app, {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[sync], mode


def bench_sqlite(seconds: float, runs: int, workdir: str) -> None:
    print("SQLite, synchronous=FULL, file on", workdir)
    store = open_store(f"sqlite:///{os.path.join(workdir, 'cases.db')}", synchronous="FULL")
    cases = Cases(store, T)
    _, Order = _es_classes()  # noqa: N806
    app, sync, mode = _es_sqlite(os.path.join(workdir, "es.db"))
    print(f"  eventsourcing SQLite: synchronous={sync}, journal_mode={mode}; stateline: synchronous=FULL, WAL")

    # the bytes one case commit writes: state + receipt + case events
    probe = _new_case(cases)
    _quantum(probe, 1)
    r = probe.commit()
    assert r is not None
    item = store.get(T, "cases", probe.case_id)
    assert item is not None
    size = len(orjson.dumps(item.value))
    size += len(orjson.dumps(store.read_stream(T, f"cases:{probe.case_id}:receipts", r.seq, r.seq)[0].data))
    size += sum(len(orjson.dumps(e.data)) for e in store.read_stream(T, f"cases:{probe.case_id}:events")[-5:])
    blob = {"blob": "x" * (size - 11)}
    assert len(orjson.dumps(blob)) == size

    def ours_1() -> float:
        case = _new_case(cases)
        return _rate(1, seconds, lambda _: lambda i: (_quantum(case, i), case.commit()))

    def put_1() -> float:
        key = uuid.uuid4().hex
        return _rate(1, seconds, lambda _: lambda i: store.commit(T, ops=[Put("bench", key, blob)]))

    def peer_1() -> float:
        agg = Order("acme-corp")
        app.save(agg)
        return _rate(1, seconds, lambda _: lambda i: (_es_quantum(agg, i), app.save(agg)))

    def ours_16() -> float:
        handles = [_new_case(cases) for _ in range(16)]
        return _rate(16, seconds, lambda c: lambda i: (_quantum(handles[c], i), handles[c].commit()))

    def peer_16() -> float:
        aggs = [Order("acme-corp") for _ in range(16)]
        app.save(*aggs)
        return _rate(16, seconds, lambda c: lambda i: (_es_quantum(aggs[c], i), app.save(aggs[c])))

    a, p = _alternate(runs, ours_1, put_1)
    print(
        f"  {'case commit vs single Put of the same bytes':<44} case {a:>9,.0f}/s   put ({size} B) {p:>9,.0f}/s   "
        f"cost ratio {p / a:5.2f}x  (target <= 1.3x: {'met' if p / a <= 1.3 else 'NOT met'})"
    )
    ca, cp = _CPU_MEDIANS
    print(f"  {'':<44} CPU per call: case commit {ca:,.0f} µs, single Put {cp:,.0f} µs")
    dur = ("synchronous=FULL, WAL", f"synchronous={sync}, journal_mode={mode}")
    _rec("sqlite", "case commit", a, p, f"stateline single Put of the same {size} B", 1 / 1.3, runs, seconds, dur[0])
    a, b = _alternate(runs, ours_1, peer_1)
    _line("one writer", a, b, "eventsourcing", 1.6)
    _rec("sqlite", "case commit, one writer", a, b, "eventsourcing 5-event save", 1.6, runs, seconds, *dur)
    flushes, carried = store.batches, store.batched_commits  # type: ignore[attr-defined]
    a, b = _alternate(runs, ours_16, peer_16)
    _line("16 cases, 16 threads", a, b, "eventsourcing", 6.0)
    _rec("sqlite", "case commit, 16 cases, 16 threads", a, b, "eventsourcing 5-event save", 6.0, runs, seconds, *dur)
    per_flush = (store.batched_commits - carried) / max(1, store.batches - flushes)  # type: ignore[attr-defined]
    print(f"  {'':<44} stateline group commit: {per_flush:.1f} commits per flush")
    store.close()


def bench_postgres(seconds: float, runs: int) -> None:
    try:
        with psycopg.connect(PG, autocommit=True, connect_timeout=3) as con:
            row = con.execute("SHOW synchronous_commit").fetchone()
            sync = row[0] if row else "?"
    except psycopg.OperationalError as exc:
        print(f"PostgreSQL: skipped ({exc})")
        return
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    print(f"PostgreSQL, synchronous_commit={sync}, one connection each")
    with psycopg.connect(PG, autocommit=True) as con:
        con.execute(f'CREATE SCHEMA "{schema}_es"')
    store = open_store(f"{PG}?schema={schema}", pool_min=1, pool_max=1)
    cases = Cases(store, T)
    Orders, Order = _es_classes()  # noqa: N806
    app = Orders(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": "test",
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": "5432",
            "POSTGRES_USER": "postgres",
            "POSTGRES_PASSWORD": "",
            "POSTGRES_SCHEMA": schema + "_es",
            "POSTGRES_POOL_SIZE": "1",
            "POSTGRES_MAX_OVERFLOW": "0",
        }
    )
    try:

        def ours() -> float:
            case = _new_case(cases)
            return _rate(1, seconds, lambda _: lambda i: (_quantum(case, i), case.commit()))

        def peer() -> float:
            agg = Order("acme-corp")
            app.save(agg)
            return _rate(1, seconds, lambda _: lambda i: (_es_quantum(agg, i), app.save(agg)))

        a, b = _alternate(runs, ours, peer)
        _line("one writer, one connection", a, b, "eventsourcing", 2.0)
        dur = f"synchronous_commit={sync}"
        _rec("postgresql", "case commit, one writer", a, b, "eventsourcing 5-event save", 2.0, runs, seconds, dur, dur)
    finally:
        store.close()
        app.close()
        with psycopg.connect(PG, autocommit=True) as con:
            con.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            con.execute(f'DROP SCHEMA IF EXISTS "{schema}_es" CASCADE')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short runs (well under a minute)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one run")
    ap.add_argument("--runs", type=int, default=5, help="runs per contender (alternating); medians are reported")
    ap.add_argument("--only", choices=["memory", "sqlite", "postgresql"], action="append")
    args = ap.parse_args()
    seconds, runs = (0.6, 3) if args.quick else (args.seconds, args.runs)
    only = set(args.only or ["memory", "sqlite", "postgresql"])
    print(
        f"bench_cases: {runs} alternating runs of {seconds:g} s each, medians; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if "memory" in only:
        bench_memory(seconds, runs)
    if "sqlite" in only:
        workdir = tempfile.mkdtemp(prefix="bench-cases-", dir=os.environ.get("BENCH_DIR") or os.getcwd())
        try:
            bench_sqlite(seconds, runs, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if "postgresql" in only:
        bench_postgres(seconds, runs)


if __name__ == "__main__":
    main()
