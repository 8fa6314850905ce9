"""Commits per second of the PostgreSQL adapter beside raw psycopg doing the same statements.

Each client commits one small document (``Put`` of ~120 bytes) per commit, in a loop, for a fixed
time. The peer is raw psycopg running the adapter's own SQL for that commit, statement for statement:
(read the item and the tenant's revision), then (one statement, a transaction of its own, that sets
the next revision if it is still the one read, upserts the item and inserts the change record), then
NOTIFY, with ``synchronous_commit=on``. Like the adapter, a client skips the read when it made the
tenant's last commit and wrote that item before (the revision guard tells if that view was stale). Short runs of the two
alternate back to back, and every round runs every scenario (the machine's load drifts); rates are
medians over the rounds, the cost ratio and the scaling are medians of the per-round ratios.

Scenarios: 1 client; 8 clients on 8 tenants; 8 clients on 1 tenant (here raw psycopg clients race
for the tenant's revision and read again when they lose, and stateline's group commit is what
scales); 8 clients on 8 tenants with ``group_commit=all`` (one transaction may carry commits of
several tenants). Clients are threads of one process, sharing one store (stateline) or holding one
connection each (raw).

    python bench/bench_postgres.py --quick          # well under a minute
    python bench/bench_postgres.py --seconds 1 --runs 11
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from harness import record
from stateline import Put, open_store
from stateline.clock import SystemClock
from stateline.store.postgres import PostgresStore, _Plan, _Queries, _write_one

NS = "bench"


def _value(i: int) -> dict[str, Any]:
    return {"n": i, "status": "running", "payload": "x" * 80}


def _run_clients(n: int, seconds: float, make: Callable[[int], Callable[[int], None]]) -> float:
    """Start ``n`` clients; each calls its commit function in a loop for ``seconds``. Returns commits/s."""
    fns = [make(c) for c in range(n)]
    counts = [0] * n
    start = threading.Barrier(n + 1)
    stop = threading.Event()

    def client(c: int) -> None:
        fn = fns[c]
        start.wait()
        i = 0
        while not stop.is_set():
            fn(i)
            i += 1
        counts[c] = i

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


class Raw:
    """Raw psycopg: one connection per client, the adapter's statements for one Put, same round trips."""

    def __init__(self, dsn: str, schema: str, channel: str) -> None:
        self.dsn = dsn
        self.q = _Queries(f'"{schema}"')
        self.channel = channel
        self.clock = SystemClock()
        self.conns: list[psycopg.Connection[Any]] = []

    def client(self, tenant: str, c: int) -> Callable[[int], None]:
        conn = psycopg.connect(self.dsn, autocommit=True)
        self.conns.append(conn)
        q = self.q

        # like the adapter, a client remembers the revision it wrote last and the rows it wrote, and
        # writes a row it remembers without reading it first (the revision guard tells if that was stale)
        known: dict[str, tuple[int, int]] = {}  # key -> (version, created_at) as of known_rev
        known_rev: list[int | None] = [None]

        def commit(i: int) -> None:
            key = f"k{c}-{i % 100}"
            value = orjson.dumps(_value(i))
            while True:  # clients sharing a tenant may lose the race: read again, like the adapter
                now = self.clock.now_us()
                rev_known = known_rev[0]
                if rev_known is not None and key in known:
                    rev = rev_known
                    version, created = known[key][0] + 1, known[key][1]
                else:
                    rows = conn.execute(
                        q.read_one, ([NS], [key], [False], tenant, [], tenant, tenant), binary=True
                    ).fetchall()
                    rev = next((r[3] for r in rows if r[0] is None), 0)
                    row = next((r for r in rows if r[1] is not None), None)  # ns, key, value, version, created, expires
                    live = row is not None and (row[5] is None or row[5] > now)
                    version = row[3] + 1 if live and row is not None else 1
                    created = row[4] if live and row is not None else now
                    if rev_known != rev:
                        known.clear()
                body = orjson.dumps(
                    {
                        "at": now,
                        "meta": orjson.Fragment(b"{}"),
                        "ops": [
                            {
                                "op": "put",
                                "ns": NS,
                                "key": key,
                                "version": version,
                                "value": orjson.Fragment(value),
                                "exp": None,
                            }
                        ],
                    }
                )
                plan = _Plan(tenant, rev, now)
                plan.items[(NS, key)] = (value, version, rev + 1, created, None)
                plan.changes.append((rev + 1, body))
                statement, params = _write_one(q, plan, guarded=True)
                wrote = conn.execute(statement, params).fetchone()
                assert wrote is not None
                if wrote[0]:
                    known[key] = (version, created)
                    known_rev[0] = rev + 1
                    break
                known.clear()
                known_rev[0] = None
            conn.execute("SELECT pg_notify(%s, %s)", (self.channel, tenant))

        return commit

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--quick", action="store_true", help="short runs (about 40 s in all)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one run")
    parser.add_argument("--runs", type=int, default=11, help="rounds (each runs every scenario and contender once)")
    args = parser.parse_args()
    seconds, runs = (0.5, 5) if args.quick else (args.seconds, args.runs)

    schema = f"sl_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        settings = [
            admin.execute(f"SHOW {name}").fetchone() for name in ("server_version", "synchronous_commit", "fsync")
        ]
    version, sync, fsync = (row[0] if row else "?" for row in settings)
    print(
        f"PostgreSQL {version}, synchronous_commit={sync}, fsync={fsync}; "
        f"{runs} rounds of every scenario, {seconds:g} s per run; medians"
    )

    scenarios = [
        ("1 client", 1, False, ""),
        ("8 clients, 8 tenants", 8, False, ""),
        ("8 clients, 1 tenant", 8, True, ""),
        ("8 clients, 8 tenants, all", 8, False, "&group_commit=all"),
    ]
    rates: dict[str, dict[str, list[float]]] = {name: {"stateline": [], "raw": []} for name, *_ in scenarios}
    stores: dict[str, PostgresStore] = {}
    try:
        for name, _n, _shared, extra in scenarios:
            # a store per scenario, so that its pool holds the connections that scenario needs
            store = open_store(f"{args.dsn}?schema={schema}&pool_max=16{extra}")
            assert isinstance(store, PostgresStore)
            stores[name] = store
        channel = stores["1 client"]._channel
        # Every round runs every scenario, stateline and raw back to back (alternating which goes first),
        # so that the machine's drifting load hits all figures alike; the first round only warms up.
        for r in range(runs + 1):
            for name, n, shared, _extra in scenarios:
                store = stores[name]
                run_id = uuid.uuid4().hex[:6]

                def tenant(c: int, run_id: str = run_id, shared: bool = shared) -> str:
                    return f"{run_id}-0" if shared else f"{run_id}-{c}"

                def make_sl(c: int, store: PostgresStore = store, tenant: Callable[[int], str] = tenant) -> Any:
                    t = tenant(c)
                    return lambda i: store.commit(t, ops=[Put(NS, f"k{c}-{i % 100}", _value(i))])

                raw = Raw(args.dsn, schema, channel)
                raw_fns = [raw.client(tenant(c), c) for c in range(n)]

                def make_raw(c: int, raw_fns: list[Callable[[int], None]] = raw_fns) -> Callable[[int], None]:
                    return raw_fns[c]

                try:
                    for fn in raw_fns:  # connections warm: statements prepared, as in the store's pool
                        for j in range(6):
                            fn(j)
                    order = ("stateline", "raw") if r % 2 == 0 else ("raw", "stateline")
                    for who in order:
                        rate = _run_clients(n, seconds if r else 0.2, make_sl if who == "stateline" else make_raw)
                        if r:
                            rates[name][who].append(rate)
                finally:
                    raw.close()
    finally:
        for store in stores.values():
            store.close()
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    med = {name: {who: statistics.median(v) for who, v in res.items()} for name, res in rates.items()}
    ratios = {
        name: statistics.median(raw / sl for sl, raw in zip(res["stateline"], res["raw"], strict=True))
        for name, res in rates.items()
    }
    print(f"{'scenario':<24}{'stateline c/s':>15}{'raw c/s':>12}{'cost ratio':>12}")
    for name, m in med.items():
        print(f"{name:<24}{m['stateline']:>15.0f}{m['raw']:>12.0f}{ratios[name]:>11.2f}x")
        record(
            bench="postgres",
            name=f"single-put commit, {name}",
            backend="postgresql",
            unit="commits/s",
            value=m["stateline"],
            peer="raw psycopg, same statements",
            peer_value=m["raw"],
            target=1 / 1.25,
            runs=runs,
            seconds=seconds,
            durability=f"synchronous_commit={sync}",
            peer_durability=f"synchronous_commit={sync}",
        )
    single = rates["1 client"]
    for name in med:
        if name == "1 client":
            continue
        scale = {
            who: statistics.median(m / s for m, s in zip(rates[name][who], single[who], strict=True))
            for who in ("stateline", "raw")
        }
        print(
            f"scaling {name}: stateline {scale['stateline']:.1f}x, raw {scale['raw']:.1f}x "
            "of its 1-client rate (median over rounds)"
        )
    print(
        "cost ratio = median over back-to-back pairs of (stateline time per commit / raw time per commit); "
        "target <= 1.25x. Scaling target >= 3x."
    )


if __name__ == "__main__":
    main()
