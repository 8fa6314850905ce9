"""The physical floor: this machine's fsync rate, loopback TCP round trip, and PostgreSQL / Redis ping round trips.

Run: ``python bench/floor.py [--quick]``. No durable commit can be faster than one flush of the disk,
and no client/server call faster than one round trip; every figure of the other benchmarks can be
read as a fraction of these limits.

* fsync: write a 4 KiB block and ``fsync`` it, in a loop, in the directory the benchmarks put their
  SQLite files in (the temporary directory, and the current directory when it is another filesystem).
* loopback: a TCP echo of 64 bytes on 127.0.0.1 (a thread echoes; ``TCP_NODELAY`` on both sides).
* PostgreSQL: ``SELECT 1`` on one psycopg connection; Redis: ``PING`` on one redis-py connection.

Each figure is the median of several runs; latencies are p50 and p99 over every call.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from harness import latencies, record, timed_loop

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def _runs(fn: Callable[[int], object], seconds: float, runs: int) -> tuple[float, float, float]:
    rates: list[float] = []
    times: list[float] = []
    for _ in range(runs):
        rate, t = timed_loop(fn, seconds)
        rates.append(rate)
        times.extend(t)
    return (statistics.median(rates), *latencies(times))


def fsync_floor(directory: Path, seconds: float, runs: int) -> tuple[float, float, float]:
    """Flushes per second of a 4 KiB overwrite in ``directory``, p50 and p99 in ms."""
    path = directory / f"floor-{os.getpid()}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"x" * 4096
    try:

        def one(i: int) -> None:
            os.pwrite(fd, block, (i % 16) * 4096)
            os.fsync(fd)

        return _runs(one, seconds, runs)
    finally:
        os.close(fd)
        path.unlink()


def loopback_floor(seconds: float, runs: int) -> tuple[float, float, float]:
    """Round trips per second of a 64-byte TCP echo on 127.0.0.1, p50 and p99 in ms."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    client = socket.create_connection(server.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"p" * 64
    try:

        def one(_: int) -> None:
            client.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(client.recv(4096))

        return _runs(one, seconds, runs)
    finally:
        client.close()
        th.join(timeout=2)
        server.close()


def postgres_floor(seconds: float, runs: int) -> tuple[float, float, float] | str:
    try:
        import psycopg  # noqa: PLC0415  # only when PostgreSQL is measured

        conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3)
    except Exception as exc:
        return f"PostgreSQL not reachable: {exc}"
    try:
        return _runs(lambda _: conn.execute("SELECT 1").fetchone(), seconds, runs)
    finally:
        conn.close()


def redis_floor(seconds: float, runs: int) -> tuple[float, float, float] | str:
    try:
        import redis  # noqa: PLC0415  # only when Redis is measured

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
    except Exception as exc:
        return f"Redis not reachable: {exc}"
    try:
        return _runs(lambda _: client.ping(), seconds, runs)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a few seconds in all)")
    parser.add_argument("--dir", type=Path, default=None, help="where the fsync file goes (default: the temp dir)")
    args = parser.parse_args()
    seconds, runs = (0.3, 3) if args.quick else (2.0, 3)
    print(f"physical floor: {os.cpu_count()} cores; median of {runs} runs of {seconds:g} s; p50 / p99 over all calls")

    dirs = [Path(args.dir or tempfile.gettempdir())]
    cwd = Path.cwd()
    if args.dir is None and os.stat(cwd).st_dev != os.stat(dirs[0]).st_dev:
        dirs.append(cwd)
    for d in dirs:
        rate, p50, p99 = fsync_floor(d, seconds, runs)
        where = "temp dir" if d == dirs[0] and args.dir is None else str(d)
        print(f"fsync of 4 KiB ({where}): {rate:>10,.0f} /s   p50 {p50:.3f} ms   p99 {p99:.3f} ms")
        record(
            bench="floor",
            name=f"fsync 4 KiB ({'temp dir' if d == dirs[0] else 'working dir'})",
            backend="disk",
            unit="fsync/s",
            value=rate,
            p50_ms=p50,
            p99_ms=p99,
            runs=runs,
            seconds=seconds,
            durability="write + fsync of the file",
        )

    rate, p50, p99 = loopback_floor(seconds, runs)
    print(f"TCP echo 64 B on 127.0.0.1: {rate:>10,.0f} /s   p50 {p50:.3f} ms   p99 {p99:.3f} ms")
    record(
        bench="floor",
        name="TCP echo 64 B, 127.0.0.1",
        backend="loopback",
        unit="round trips/s",
        value=rate,
        p50_ms=p50,
        p99_ms=p99,
        runs=runs,
        seconds=seconds,
    )

    for backend, label, fn in (
        ("postgresql", "PostgreSQL SELECT 1", postgres_floor),
        ("redis", "Redis PING", redis_floor),
    ):
        got = fn(seconds, runs)
        if isinstance(got, str):
            print(f"{label}: skipped ({got})")
            continue
        rate, p50, p99 = got
        print(f"{label}: {rate:>10,.0f} /s   p50 {p50:.3f} ms   p99 {p99:.3f} ms")
        record(
            bench="floor",
            name=f"{label} round trip",
            backend=backend,
            unit="round trips/s",
            value=rate,
            p50_ms=p50,
            p99_ms=p99,
            runs=runs,
            seconds=seconds,
        )


if __name__ == "__main__":
    main()
