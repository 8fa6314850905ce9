"""Store commit throughput: memory, SQLite beside raw sqlite3 doing the same statements, and group commit.

Run: ``python bench/bench_store.py`` (``--quick`` for a run well under a minute).

What it measures, each figure the median of several rounds, the rounds of compared systems
alternating so that a busy machine hurts both alike:

* memory: single-put commits per second on one thread.
* SQLite (``synchronous=FULL``, and ``NORMAL`` for reference): stateline's single-put commit beside
  raw ``sqlite3`` executing the same statements (same schema, same upserts of the item and the
  tenant revision and the same change row, one transaction per commit) with the same durability.
  The ratio is stateline's cost per commit over raw's (target: at most 1.5).
* 16 threads committing to different keys at ``FULL`` against one thread (target: at least 5x),
  with the commits each write transaction (one flush of the log) carried, beside the raw
  ``fsync`` rate of this machine's disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from stateline import Put, open_store
from stateline.store.sqlite import (
    SQL_BEGIN,
    SQL_BUMP_REVISION,
    SQL_COMMIT,
    SQL_INSERT_CHANGE,
    SQL_PUT,
    SQLiteStore,
)

TENANT = "bench"
KEYS = 1000


def fsync_rate(directory: Path, seconds: float) -> float:
    """Flushes per second of a 4 KiB overwrite in ``directory`` (what one durable commit must wait for)."""
    path = directory / "fsync.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        block = b"x" * 4096
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.pwrite(fd, block, (n % 16) * 4096)
            os.fsync(fd)
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()


def memory_rate(n: int) -> tuple[float, float]:
    """Single-put commits/s on the memory adapter: by the wall clock and by this thread's CPU time."""
    store = open_store("memory://")
    start, cpu = time.perf_counter(), time.thread_time()
    commit = store.commit
    for i in range(n):
        commit(TENANT, (), (Put("bench", f"k{i % KEYS}", {"i": i}),))
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    store.close()
    return n / elapsed, n / cpu


class Files:
    """Fresh database files, one per run, removed at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def fresh(self) -> Path:
        self.count += 1
        path = self.directory / f"run{self.count}.db"
        # the schema, created the way stateline creates it, so both systems write the same tables
        SQLiteStore(str(path)).close()
        return path

    def remove(self, path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def stateline_rate(path: Path, synchronous: str, n: int) -> float:
    store = open_store(f"sqlite:///{path}?synchronous={synchronous}")
    commit = store.commit
    start = time.perf_counter()
    for i in range(n):
        commit(TENANT, (), (Put("bench", f"k{i % KEYS}", {"i": i}),))
    elapsed = time.perf_counter() - start
    store.close()
    return n / elapsed


def raw_rate(path: Path, synchronous: str, n: int) -> float:
    """The same statements through the sqlite3 module directly, with the same pragmas."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, cached_statements=256)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    cur = conn.cursor()
    dumps = orjson.dumps
    fragment = orjson.Fragment
    start = time.perf_counter()
    for i in range(n):
        key = f"k{i % KEYS}"
        value = dumps({"i": i})
        now = time.time_ns() // 1000
        cur.execute(SQL_BEGIN)
        revision = cur.execute(SQL_BUMP_REVISION, (TENANT,)).fetchone()[0]
        version = cur.execute(SQL_PUT, (TENANT, "bench", key, value, revision, now, None)).fetchone()[0]
        body = dumps(
            {
                "at": now,
                "meta": {},
                "ops": [
                    {"op": "put", "ns": "bench", "key": key, "version": version, "value": fragment(value), "exp": None}
                ],
            }
        )
        cur.execute(SQL_INSERT_CHANGE, (TENANT, revision, body))
        cur.execute(SQL_COMMIT)
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def threaded_rate(path: Path, threads: int, per_thread: int) -> tuple[float, float]:
    """Commits/s of ``threads`` threads putting to their own keys at FULL, and commits per transaction."""
    store = open_store(f"sqlite:///{path}")
    assert isinstance(store, SQLiteStore)
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            commit = store.commit
            for i in range(per_thread):
                commit(TENANT, (), (Put("bench", f"t{t}-{i % 100}", {"i": i}),))
        except BaseException as exc:
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in ths:
        th.join()
    elapsed = time.perf_counter() - start
    assert not errors, errors
    per_batch = store.batched_commits / store.batches
    store.close()
    return threads * per_thread / elapsed, per_batch


def alternate(rounds: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Run each named system once per round, in alternating order; return each one's median."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(runs[name]())
    return {name: statistics.median(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and commits (well under a minute)")
    parser.add_argument("--dir", type=Path, default=None, help="where the database files go (default: a temp dir)")
    args = parser.parse_args()
    quick = args.quick
    rounds = 3 if quick else 7
    n_memory = 50_000 if quick else 300_000
    n_full = 600 if quick else 3000
    n_normal = 2000 if quick else 10_000
    threads, per_thread = 16, (60 if quick else 300)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="stateline-bench-") as tmp:
        directory = Path(tmp)
        files = Files(directory)

        def on_file(fn: Callable[[Path], float]) -> Callable[[], float]:
            def run() -> float:
                path = files.fresh()
                try:
                    return fn(path)
                finally:
                    files.remove(path)

            return run

        print(
            f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, files in {directory}"
        )
        print(f"rounds per figure: {rounds} (median; compared systems alternate)\n")

        fsyncs = statistics.median(fsync_rate(directory, 0.3 if quick else 1.0) for _ in range(3))
        print(f"raw fsync (4 KiB overwrite + fsync):            {fsyncs:>10,.0f} /s")

        mems = [memory_rate(n_memory) for _ in range(rounds)]
        mem, mem_cpu = statistics.median(m[0] for m in mems), statistics.median(m[1] for m in mems)
        print(
            f"memory, 1 thread, single-put commits:          {mem:>10,.0f} /s   (target >= 100,000; "
            f"{mem_cpu:,.0f} /s of CPU time)"
        )

        for synchronous, n in (("FULL", n_full), ("NORMAL", n_normal)):
            med = alternate(
                rounds,
                {
                    "stateline": on_file(lambda p, s=synchronous, n=n: stateline_rate(p, s, n)),
                    "raw": on_file(lambda p, s=synchronous, n=n: raw_rate(p, s, n)),
                },
            )
            ratio = med["raw"] / med["stateline"]
            target = "   (target <= 1.5)" if synchronous == "FULL" else ""
            print(
                f"sqlite {synchronous:<6} 1 thread: stateline {med['stateline']:>8,.0f} /s, "
                f"raw sqlite3 {med['raw']:>8,.0f} /s, cost ratio {ratio:.2f}{target}"
            )

        singles: list[float] = []
        multis: list[float] = []
        per_batches: list[float] = []
        for r in range(rounds):
            order = ("one", "many") if r % 2 == 0 else ("many", "one")
            for which in order:
                if which == "one":
                    singles.append(on_file(lambda p: stateline_rate(p, "FULL", n_full))())
                else:
                    path = files.fresh()
                    try:
                        rate, per_batch = threaded_rate(path, threads, per_thread)
                    finally:
                        files.remove(path)
                    multis.append(rate)
                    per_batches.append(per_batch)
        one, many = statistics.median(singles), statistics.median(multis)
        print(
            f"sqlite FULL   {threads} threads: {many:>8,.0f} /s vs 1 thread {one:>8,.0f} /s = "
            f"{many / one:.1f}x   (target >= 5x)"
        )
        print(
            f"  commits per transaction (= per fsync of the log): {statistics.median(per_batches):.1f}; "
            f"commits per raw fsync of this disk: {many / fsyncs:.2f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
