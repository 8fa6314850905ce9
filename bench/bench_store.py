"""Store commit throughput: memory, SQLite beside raw sqlite3 doing the same statements, and group commit.

Run: ``python bench/bench_store.py`` (``--quick`` for a run well under a minute).

What it measures (medians of several rounds; compared systems alternate so that a busy machine
hurts both alike):

* memory: single-put commits per second on one thread.
* SQLite (``synchronous=FULL``, and ``NORMAL`` for reference): stateline's single-put commit beside
  raw ``sqlite3`` executing the same statements (same schema, same upserts of the item and the
  tenant revision and the same change row, one transaction per commit) with the same durability.
  Both have a file open at once and take turns in blocks of commits. The ratio is stateline's
  cost per commit over raw's (target: at most 1.5).
* 16 threads committing to different keys at ``FULL`` against one thread (target: at least 5x),
  with the commits each write transaction (one flush of the log) carried, beside the raw
  ``fsync`` rate of the disk measured in the same rounds.
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
from pathlib import Path
from typing import Protocol

import orjson

from harness import record
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
    """Fresh database files with stateline's schema, removed at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def fresh(self) -> Path:
        self.count += 1
        path = self.directory / f"run{self.count}.db"
        SQLiteStore(str(path)).close()  # the schema, created the way stateline creates it
        return path

    @staticmethod
    def remove(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


class Runner(Protocol):
    def run(self, n: int) -> float: ...

    def close(self) -> None: ...


class StatelineRunner:
    """Single-put commits through ``Store.commit``."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.store = open_store(f"sqlite:///{path}?synchronous={synchronous}")
        self.i = 0

    def run(self, n: int) -> float:
        commit = self.store.commit
        i = self.i
        start = time.perf_counter()
        for i in range(self.i, self.i + n):
            commit(TENANT, (), (Put("bench", f"k{i % KEYS}", {"i": i}),))
        elapsed = time.perf_counter() - start
        self.i = i + 1
        return elapsed

    def close(self) -> None:
        self.store.close()


class RawRunner:
    """The same statements through the sqlite3 module directly, with the same pragmas and the same encoding."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, cached_statements=256)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.cur = self.conn.cursor()
        self.i = 0

    def run(self, n: int) -> float:
        cur = self.cur
        dumps = orjson.dumps
        fragment = orjson.Fragment
        i = self.i
        start = time.perf_counter()
        for i in range(self.i, self.i + n):
            key = f"k{i % KEYS}"
            value = dumps({"i": i})
            now = time.time_ns() // 1000
            cur.execute(SQL_BEGIN)
            revision = cur.execute(SQL_BUMP_REVISION, (TENANT,)).fetchone()[0]
            version = cur.execute(SQL_PUT, (TENANT, revision, now, "bench", key, value, None)).fetchone()[0]
            op = {"op": "put", "ns": "bench", "key": key, "version": version, "value": fragment(value), "exp": None}
            cur.execute(SQL_INSERT_CHANGE, (TENANT, revision, dumps({"at": now, "meta": {}, "ops": [op]})))
            cur.execute(SQL_COMMIT)
        elapsed = time.perf_counter() - start
        self.i = i + 1
        return elapsed

    def close(self) -> None:
        self.conn.close()


def interleaved(files: Files, synchronous: str, blocks: int, block: int) -> tuple[float, float]:
    """Commits/s of stateline and of raw sqlite3, each on its own file, taking turns in blocks of commits."""
    paths = [files.fresh(), files.fresh()]
    runners: list[Runner] = [StatelineRunner(paths[0], synchronous), RawRunner(paths[1], synchronous)]
    spent = [0.0, 0.0]
    try:
        for runner in runners:
            runner.run(50)  # warm caches and statements
        for b in range(blocks):
            for k in (0, 1) if b % 2 == 0 else (1, 0):
                spent[k] += runners[k].run(block)
    finally:
        for runner in runners:
            runner.close()
        for path in paths:
            files.remove(path)
    n = blocks * block
    return n / spent[0], n / spent[1]


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


def single_rate(path: Path, n: int) -> float:
    runner = StatelineRunner(path, "FULL")
    try:
        runner.run(50)
        return n / runner.run(n)
    finally:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and commits (well under a minute)")
    parser.add_argument("--dir", type=Path, default=None, help="where the database files go (default: a temp dir)")
    args = parser.parse_args()
    quick = args.quick
    rounds = 3 if quick else 7
    n_memory = 50_000 if quick else 300_000
    blocks, block = (10, 50) if quick else (20, 150)
    threads, per_thread, n_single = 16, (40 if quick else 150), (400 if quick else 1500)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="stateline-bench-") as tmp:
        directory = Path(tmp)
        files = Files(directory)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, load average {load:.1f}, "
            f"files in {directory}"
        )
        print(f"each figure: median of {rounds} rounds; compared systems alternate\n")

        mems = [memory_rate(n_memory) for _ in range(rounds)]
        mem, mem_cpu = statistics.median(m[0] for m in mems), statistics.median(m[1] for m in mems)
        print(f"memory        1 thread : {mem:>9,.0f} commits/s (target >= 100,000; {mem_cpu:,.0f} /s of CPU time)")
        record(
            bench="store",
            name="single-put commit, 1 thread",
            backend="memory",
            unit="commits/s",
            value=mem,
            target=100_000,
            runs=rounds,
            durability="in process",
            notes=f"{mem_cpu:,.0f} /s of CPU time",
        )

        for synchronous in ("FULL", "NORMAL"):
            pairs = [interleaved(files, synchronous, blocks, block) for _ in range(rounds)]
            ours, raw = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[1] / p[0] for p in pairs)
            target = " (target <= 1.5)" if synchronous == "FULL" else ""
            print(
                f"sqlite {synchronous:<6} 1 thread : stateline {ours:>7,.0f} commits/s, raw sqlite3 {raw:>7,.0f} /s, "
                f"cost ratio {ratio:.2f}{target}"
            )
            record(
                bench="store",
                name=f"single-put commit, 1 thread, synchronous={synchronous}",
                backend="sqlite",
                unit="commits/s",
                value=ours,
                peer="raw sqlite3, same statements",
                peer_value=raw,
                ratio=1 / ratio,
                target=1 / 1.5 if synchronous == "FULL" else None,
                runs=rounds,
                durability=f"synchronous={synchronous}, WAL",
                peer_durability=f"synchronous={synchronous}, WAL",
            )

        singles: list[float] = []
        multis: list[float] = []
        per_batches: list[float] = []
        fsyncs: list[float] = []
        for r in range(rounds):
            fsyncs.append(fsync_rate(directory, 0.2 if quick else 0.5))
            for which in ("one", "many") if r % 2 == 0 else ("many", "one"):
                path = files.fresh()
                try:
                    if which == "one":
                        singles.append(single_rate(path, n_single))
                    else:
                        rate, per_batch = threaded_rate(path, threads, per_thread)
                        multis.append(rate)
                        per_batches.append(per_batch)
                finally:
                    files.remove(path)
        one, many, fsync = statistics.median(singles), statistics.median(multis), statistics.median(fsyncs)
        print(
            f"sqlite FULL  {threads} threads: {many:>9,.0f} commits/s vs 1 thread {one:,.0f} /s = {many / one:.1f}x "
            f"(target >= 5x)"
        )
        print(
            f"  commits per write transaction (one fsync of the log each): {statistics.median(per_batches):.1f}; "
            f"raw fsync of this disk: {fsync:,.0f} /s, so {many / fsync:.1f} commits per raw fsync"
        )
        record(
            bench="store",
            name=f"single-put commit, {threads} threads",
            backend="sqlite",
            unit="commits/s",
            value=many,
            peer="stateline, 1 thread",
            peer_value=one,
            target=5.0,
            runs=rounds,
            durability="synchronous=FULL, WAL",
            peer_durability="synchronous=FULL, WAL",
            notes=f"{statistics.median(per_batches):.1f} commits per flush; raw fsync {fsync:,.0f}/s",
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
