"""Runs: claim+complete cycles per second beside the adapter's single-put commit rate, and 10-step
workflows beside DBOS Transact on the same database at the same durability.

Run: ``python bench/bench_runs.py`` (``--quick`` for a run well under a minute; ``--backends
sqlite,postgresql``; ``--no-dbos`` to skip the peer). Needs ``pip install dbos`` for the peer.

What it measures, each figure the median of several rounds, the rounds of compared systems
alternating so that a busy machine hurts both alike:

* single-put commits per second of the adapter, with 1 thread and with 8 threads (group commit
  helps the 8-thread figure, so the cycle rate below is compared with it, like with like).
* claim+complete cycles per second with 8 worker threads draining independent ready steps;
  "cost" is how many single-put commits one cycle is worth (target: at most 3).
* a workflow of 10 sequential steps (each step depends on the one before), run one at a time
  and 8 at a time, beside DBOS Transact running a ``@DBOS.workflow`` of 10 ``@DBOS.step`` calls on
  the same database (a fresh SQLite file in WAL mode with ``synchronous=FULL``, like stateline's
  default; or PostgreSQL with its default durable commits), in a child process. Like is compared
  with like:

  - latency per step: the median latency of stateline's ``complete`` (recording a step's
    completion), of ``complete_and_claim`` (recording it and holding the next step) and of
    ``complete`` + ``claim``, beside DBOS's median time from the start of one step of a workflow to
    the start of its next one (recording the step's output and starting the next step). Both are
    measured per workflow while the others run. Target: stateline's ``complete`` at least 5x faster.
  - wall time per step: the wall time of all the workflows over all their steps, on both sides
    (run creation and finishing included).

  Earlier versions set DBOS's wall time over all steps, divided by 10 per workflow, beside the
  latency of one ``complete`` call. At 1 at a time that charged DBOS with starting and finishing
  its workflow; at 8 at a time it set a throughput (an eighth of what one workflow waits) beside a
  latency. Each recorded completion ends with a flush to disk on both sides, so at 1 at a time
  the ratio shrinks when the disk is slow to flush (both then mostly wait for it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg

from harness import record
from stateline import Database, Put, open_store
from stateline.runs import Claim, Runs, StepSpec

TENANT = "bench"
PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


# ---------------------------------------------------------------- backends


class Backend:
    """A fresh keyspace of one adapter per measurement, removed afterwards."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.directory = directory
        self.made: list[str] = []

    def url(self) -> str:
        tag = uuid.uuid4().hex[:10]
        if self.kind == "sqlite":
            return f"sqlite:///{self.directory / f'runs-{tag}.db'}"
        schema = f"sl_bench_runs_{tag}"
        self.made.append(schema)
        return f"{PG_BASE}?schema={schema}"

    def cleanup(self) -> None:
        if self.kind == "postgresql" and self.made:
            with psycopg.connect(PG_BASE, autocommit=True) as conn:
                for schema in self.made:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            self.made.clear()

    def dbos_url(self) -> str:
        tag = uuid.uuid4().hex[:10]
        if self.kind == "sqlite":
            path = self.directory / f"dbos-{tag}.sqlite"
            with sqlite3.connect(path) as conn:  # WAL is a property of the file: same journal as stateline
                conn.execute("PRAGMA journal_mode=WAL")
            return f"sqlite:///{path}"
        return f"postgresql://postgres@127.0.0.1:5432/sl_dbos_bench_{tag}"

    def drop_dbos(self, url: str) -> None:
        if self.kind == "postgresql":
            name = url.rsplit("/", 1)[1]
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def threaded(n: int, fn: Callable[[int], None]) -> float:
    """Run ``fn(i)`` on ``n`` threads started together; returns the wall time."""
    barrier = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


# ---------------------------------------------------------------- stateline measurements


def single_put_rate(url: str, n: int, threads: int) -> float:
    store = open_store(url)
    try:
        store.commit(TENANT, (), (Put("bench", "warm", 0),))
        per = max(1, n // threads)

        def work(i: int) -> None:
            for j in range(per):
                store.commit(TENANT, (), (Put("bench", f"k{i}-{j % 100}", {"i": j}),))

        return threads * per / threaded(threads, work)
    finally:
        store.close()


def cycle_rate(url: str, steps: int, workers: int, eager: bool) -> float:
    """claim+complete cycles/s with ``workers`` threads over ``steps`` independent ready steps.

    With ``eager`` a worker completes with ``complete_and_claim`` (its next step assigned in the
    same commit) and calls ``claim`` only when that found nothing."""
    store = open_store(url)
    try:
        runs = Database(store).tenant(TENANT).runs
        per_run = 50
        for i in range(0, steps, per_run):
            runs.create("bench", [StepSpec(f"s{j:03d}") for j in range(min(per_run, steps - i))])
        done = [0] * workers

        def work(i: int) -> None:
            idle = 0
            while idle < 2:
                got = runs.claim(f"w{i}", lease=300)
                if not got:
                    idle += 1
                    continue
                idle = 0
                c: Claim | None = got[0]
                while c is not None:
                    if eager:
                        _, c = runs.complete_and_claim(c, c.lease_token, {"ok": True})
                    else:
                        runs.complete(c, c.lease_token, {"ok": True})
                        c = None
                    done[i] += 1

        elapsed = threaded(workers, work)
        assert sum(done) == steps, (sum(done), steps)
        return sum(done) / elapsed
    finally:
        store.close()


def chain(n: int = 10, kind: str = "default") -> list[StepSpec]:
    return [StepSpec(f"s{i}", kind=kind, depends_on=[f"s{i - 1}"] if i else []) for i in range(n)]


def workflows(url: str, count: int, concurrency: int, eager: bool) -> dict[str, float]:
    """``count`` runs of 10 chained steps, ``concurrency`` at a time, each driven by one worker.

    Returns, in ms: the wall time per step over all the runs (create + 10 claim/complete cycles of
    each), the median latency of the call that records a step's completion, and the median time
    from that call to holding the run's next step (the completion call plus, without ``eager``, the
    ``claim`` after it). With ``eager`` the worker uses ``complete_and_claim``, which assigns it the
    next step in the same commit."""
    store = open_store(url)
    try:
        runs: Runs = Database(store).tenant(TENANT).runs
        runs.create("warm", chain(2))
        completes: list[float] = []
        gaps: list[float] = []
        per = max(1, count // concurrency)

        def work(i: int) -> None:
            mine: list[float] = []
            my_gaps: list[float] = []
            kinds = [f"k{i}"]
            for _ in range(per):
                # each worker drives its own workflow: its steps are of a kind only it claims
                run = runs.create("wf", chain(10, kind=kinds[0]))
                c: Claim | None = runs.claim(f"w{i}", lease=300, kinds=kinds)[0]
                for step_id in run.step_ids:
                    assert c is not None
                    assert (c.run_id, c.step_id) == (run.run_id, step_id)
                    t = time.perf_counter()
                    if eager:
                        _, nxt = runs.complete_and_claim(c, c.lease_token, {"step": step_id}, kinds=kinds)
                    else:
                        runs.complete(c, c.lease_token, {"step": step_id})
                    done = time.perf_counter()
                    mine.append(done - t)
                    if eager:
                        c = nxt
                    elif step_id != run.step_ids[-1]:
                        c = runs.claim(f"w{i}", lease=300, kinds=kinds)[0]
                    if step_id != run.step_ids[-1]:
                        my_gaps.append(time.perf_counter() - t)
            completes.extend(mine)
            gaps.extend(my_gaps)

        elapsed = threaded(concurrency, work)
        steps = per * concurrency * 10
        return {
            "wall_ms_per_step": elapsed / steps * 1000,
            "complete_ms": statistics.median(completes) * 1000,
            "step_ms": statistics.median(gaps) * 1000,
        }
    finally:
        store.close()


# ---------------------------------------------------------------- DBOS (in a child process)

DBOS_CHILD = r"""
import json, statistics, sys, threading, time, logging
from dbos import DBOS
url, plan = sys.argv[1], json.loads(sys.argv[2])
DBOS(config={"name": "slbench", "system_database_url": url, "log_level": "WARNING"})
logging.getLogger("dbos").setLevel(logging.WARNING)
local = threading.local()

@DBOS.step()
def step(i):
    local.marks.append(time.perf_counter())
    return {"step": i}

@DBOS.workflow()
def flow(n):
    out = []
    for i in range(n):
        out.append(step(i))
    return len(out)

DBOS.launch()
local.marks = []
flow(2)  # warm up
result = {}
for concurrency, count in plan:
    per = max(1, count // concurrency)
    barrier = threading.Barrier(concurrency + 1)
    gaps = []
    def work():
        local.marks = []
        mine = []
        barrier.wait()
        for _ in range(per):
            local.marks.clear()
            assert flow(10) == 10
            mine += [b - a for a, b in zip(local.marks, local.marks[1:])]
        gaps.extend(mine)
    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    result[str(concurrency)] = {
        "wall_ms_per_step": wall / (per * concurrency * 10) * 1000,
        "step_ms": statistics.median(gaps) * 1000,
    }
print(json.dumps(result))
DBOS.destroy()
"""


def dbos_workflows(backend: Backend, plan: list[tuple[int, int]]) -> dict[str, dict[str, float]] | str:
    """For each (concurrency, count) of ``plan``: DBOS's wall time per step over all its workflows, and
    the median time from the start of one step of a workflow to the start of its next step."""
    url = backend.dbos_url()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", DBOS_CHILD, url, json.dumps(plan)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            return f"DBOS failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        result: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    finally:
        backend.drop_dbos(url)


def dbos_available() -> str | None:
    if importlib.util.find_spec("dbos") is None:
        return "dbos is not installed (pip install dbos)"
    return None


# ---------------------------------------------------------------- main


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def run_backend(kind: str, directory: Path, args: argparse.Namespace, with_dbos: bool) -> None:
    b = Backend(kind, directory)
    q = args.quick
    rounds = 3 if q else 5
    puts = 120 if q else 1000
    steps = 120 if q else 1000
    wf_seq = 2 if q else 10
    wf_par = 8 if q else 32
    figures: dict[str, list[float]] = {}
    notes: list[str] = []

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    try:
        for r in range(rounds):
            add("put1", single_put_rate(b.url(), puts, 1))
            add("put8", single_put_rate(b.url(), puts, 8))
            add("cycle8", cycle_rate(b.url(), steps, 8, eager=False))
            add("eager8", cycle_rate(b.url(), steps, 8, eager=True))
            b.cleanup()
            order = ("stateline", "dbos") if r % 2 == 0 else ("dbos", "stateline")
            for who in order:
                if who == "stateline":
                    for conc, count in (("1", wf_seq), ("8", wf_par)):
                        plain = workflows(b.url(), count, int(conc), eager=False)
                        eager = workflows(b.url(), count, int(conc), eager=True)
                        add(f"sl_wall{conc}", plain["wall_ms_per_step"])
                        add(f"sl_complete{conc}", plain["complete_ms"])
                        add(f"sl_eager_wall{conc}", eager["wall_ms_per_step"])
                        add(f"sl_eager_complete{conc}", eager["complete_ms"])
                        add(f"sl_step{conc}", plain["step_ms"])
                    b.cleanup()
                elif with_dbos:
                    d = dbos_workflows(b, [(1, wf_seq), (8, wf_par)])
                    if isinstance(d, str):
                        notes.append(d)
                        with_dbos = False
                        continue
                    for conc in ("1", "8"):
                        add(f"dbos_wall{conc}", d[conc]["wall_ms_per_step"])
                        add(f"dbos_step{conc}", d[conc]["step_ms"])
    finally:
        b.cleanup()

    m = {k: med(v) for k, v in figures.items()}
    print(f"\n== {kind} ({rounds} rounds, medians) ==")
    print(f"single-put commits/s: {m['put1']:9.0f} (1 thread)   {m['put8']:9.0f} (8 threads)")
    for key, label in (("cycle8", "claim() + complete()"), ("eager8", "complete_and_claim()")):
        print(
            f"cycles/s, 8 workers, {label:22s} {m[key]:7.0f} -> one cycle costs "
            f"{m['put8'] / m[key]:.2f} single-put commits at 8 threads, "
            f"{m['put1'] / m[key]:.2f} at 1 thread (target <= 3)"
        )
    print("10-step workflows, ms (x: how many times faster stateline is; like is compared with like):")
    for conc in ("1", "8"):
        print(f"  {conc} workflow(s) at a time:")
        step, wall = m.get(f"dbos_step{conc}"), m.get(f"dbos_wall{conc}")
        for label, key, peer in (
            ("latency: complete()", "sl_complete", step),
            ("latency: complete_and_claim()", "sl_eager_complete", step),
            ("latency: complete() + claim()", "sl_step", step),
            ("wall time per step: claim+complete", "sl_wall", wall),
            ("wall time per step: complete_and_claim", "sl_eager_wall", wall),
        ):
            v = m[f"{key}{conc}"]
            vs = f"   DBOS {peer:7.3f} ms  {peer / v:5.1f}x" if peer else ""
            print(f"    stateline {label:40s} {v:7.3f} ms{vs}")
    for n in notes:
        print("note:", n)
    _record(kind, m, rounds)
    sys.stdout.flush()


def _record(kind: str, m: dict[str, float], rounds: int) -> None:
    """Hand the figures to bench/run.py (no-op when run by hand)."""
    dur = "synchronous=FULL, WAL" if kind == "sqlite" else "server default (durable commit)"
    for key, label in (("cycle8", "claim() + complete()"), ("eager8", "complete_and_claim()")):
        record(
            bench="runs",
            name=f"cycle {label}, 8 workers",
            backend=kind,
            unit="cycles/s",
            value=m[key],
            peer="stateline single-put commit, 8 threads",
            peer_value=m["put8"],
            target=1 / 3,
            runs=rounds,
            durability=dur,
            peer_durability=dur,
        )
    for conc in ("1", "8"):
        step, wall = m.get(f"dbos_step{conc}"), m.get(f"dbos_wall{conc}")
        for key, label, peer, peer_label, target in (
            (f"sl_complete{conc}", "complete() per step", step, "step to next step", 5.0),
            (f"sl_eager_complete{conc}", "complete_and_claim() per step", step, "step to next step", None),
            (f"sl_eager_wall{conc}", "complete_and_claim, wall per step", wall, "wall time per step", None),
            (f"sl_wall{conc}", "claim+complete, wall per step", wall, "wall time per step", None),
        ):
            record(
                bench="runs",
                name=f"10-step workflow, {conc} at a time: {label}",
                backend=kind,
                unit="ms",
                value=m[key],
                p50_ms=m[key] if "complete()" in label else None,
                peer=f"DBOS Transact, {peer_label}" if peer else None,
                peer_value=peer,
                target=target if peer else None,
                runs=rounds,
                durability=dur,
                peer_durability=dur if peer else "",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (well under a minute)")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--no-dbos", action="store_true", help="skip the DBOS Transact peer")
    args = parser.parse_args()
    why = None if args.no_dbos else dbos_available()
    print(
        f"bench_runs: python {platform.python_version()}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.1f}, quick={args.quick}"
    )
    if why:
        print("DBOS skipped:", why)
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        for name in args.backends.split(","):
            kind = name.strip()
            if kind not in ("sqlite", "postgresql"):
                raise SystemExit(f"unknown backend {kind!r}")
            run_backend(kind, Path(tmp), args, with_dbos=not args.no_dbos and why is None)


if __name__ == "__main__":
    main()
