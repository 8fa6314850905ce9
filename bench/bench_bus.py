"""Bus and sync: relay throughput to JetStream, commit -> consumer latency, and SharedState reads.

Run: ``python bench/bench_bus.py`` (``--quick`` for a short pass). Needs NATS with JetStream on
127.0.0.1:4222.

* Relay throughput: commits are made first, then the relay drains them; changes acknowledged by
  JetStream per second (target >= 5,000/s), beside raw nats-py ``publish_async`` of the same
  envelopes with the same ``Nats-Msg-Id`` headers (the floor the relay can approach).
* End-to-end latency: a commit, the relay, JetStream, and a push consumer; median and p99 of
  (consumer receive time - commit time) over spaced commits (target: median <= 20 ms), on memory
  and SQLite (``synchronous=FULL``); again beside 300 idle tenants, which the relay polls too.
* ``SharedState.get`` reads per second on one thread (target >= 1,000,000/s), beside a bare
  ``dict.get`` of the same data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import nats
import orjson

from harness import record
from stateline import Put, open_store
from stateline.bus import Relay, envelope_of, subject_of
from stateline.store.protocol import Store
from stateline.sync import InMemoryHub, SharedState

NATS_URL = "nats://127.0.0.1:4222"


async def _delete_stream(name: str) -> None:
    nc = await nats.connect(NATS_URL)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(name)
    await nc.close()


def relay_throughput(store: Store, commits: int) -> tuple[float, float]:
    """(relay changes/s, raw publish_async envelopes/s) for the same changes."""
    tag = uuid.uuid4().hex[:8]
    tenants = [f"t{i}" for i in range(4)]
    for i in range(commits):
        store.commit(tenants[i % 4], ops=[Put("docs", f"k{i % 100}", {"i": i, "pad": "x" * 64})])
    relay = Relay(store, NATS_URL, stream=f"BENCH_{tag}", prefix=f"bench{tag}", aliases=False, batch=1000)
    t0 = time.perf_counter()
    relay.start()
    while sum(relay.lag().values()) > 0:
        time.sleep(0.005)
    relay_rate = commits / (time.perf_counter() - t0)
    relay.stop()
    asyncio.run(_delete_stream(f"BENCH_{tag}"))

    changes = [c for t in tenants for c in store.changes(t, 0, 10_000)][:commits]

    async def raw() -> float:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        name = f"BENCHRAW_{tag}"
        await js.add_stream(name=name, subjects=[f"benchraw{tag}.>"], duplicate_window=120)
        t0 = time.perf_counter()
        futures = [
            await js.publish_async(
                subject_of(c, f"benchraw{tag}"),
                orjson.dumps(envelope_of(c)),
                headers={"Nats-Msg-Id": f"{c.tenant}:{c.revision}"},
            )
            for c in changes
        ]
        await asyncio.gather(*futures)
        rate = len(changes) / (time.perf_counter() - t0)
        await js.delete_stream(name)
        await nc.close()
        return rate

    return relay_rate, asyncio.run(raw())


def end_to_end_latency(store: Store, samples: int) -> list[float]:
    """Milliseconds from just before a commit to its arrival at a JetStream push consumer."""
    tag = uuid.uuid4().hex[:8]
    relay = Relay(store, NATS_URL, stream=f"BENCHLAT_{tag}", prefix=f"benchlat{tag}", aliases=False)
    relay.start()
    store.commit("lat", ops=[Put("docs", "warm", 0)])
    while relay.lag().get("lat", 1) > 0:
        time.sleep(0.01)
    latencies: list[float] = []

    async def consume(sent: dict[int, float], ready: asyncio.Event, done: asyncio.Event) -> None:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            body = orjson.loads(msg.data)
            t = sent.get(body["revision"])
            if t is not None:
                latencies.append((time.perf_counter() - t) * 1000)
            if len(latencies) >= samples:
                done.set()

        await js.subscribe(f"benchlat{tag}.>", cb=on_msg, deliver_policy=nats.js.api.DeliverPolicy.NEW)
        ready.set()
        await done.wait()
        await nc.close()

    async def main() -> None:
        sent: dict[int, float] = {}
        ready, done = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(consume(sent, ready, done))
        # commits start once the consumer exists (it takes new messages only): a fixed pause lost the
        # first samples on a loaded machine, and the run then waited for samples that never came
        await asyncio.wait_for(ready.wait(), 30)
        for i in range(samples):
            t = time.perf_counter()
            c = await asyncio.to_thread(store.commit, "lat", [], [Put("docs", "k", i)])
            sent[c.revision] = t
            await asyncio.sleep(0.01)
        await asyncio.wait_for(task, 60)

    asyncio.run(main())
    relay.stop()
    asyncio.run(_delete_stream(f"BENCHLAT_{tag}"))
    return latencies


def shared_state_reads(n: int) -> tuple[float, float]:
    """(SharedState.get reads/s, dict.get reads/s) on one thread."""
    state = SharedState(InMemoryHub().provider(), start=False)
    keys = [f"route-{i}" for i in range(100)]
    plain: dict[str, dict[str, float]] = {}
    for k in keys:
        state.update(k, {"latency": 1.0, "errors": 0.0})
        plain[k] = {"latency": 1.0, "errors": 0.0}
    seq = keys * (n // len(keys))
    get = state.get
    t0 = time.perf_counter()
    for k in seq:
        get(k)
    ours = len(seq) / (time.perf_counter() - t0)
    pget = plain.get
    t0 = time.perf_counter()
    for k in seq:
        pget(k)
    return ours, len(seq) / (time.perf_counter() - t0)


IDLE_TENANTS = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 3
    commits = 5_000 if args.quick else 20_000
    samples = 100 if args.quick else 500

    reads = [shared_state_reads(1_000_000 if args.quick else 5_000_000) for _ in range(rounds)]
    ours, bare = statistics.median(r[0] for r in reads), statistics.median(r[1] for r in reads)
    print(f"SharedState.get: {ours:,.0f} reads/s (dict.get {bare:,.0f}/s, ratio {bare / ours:.2f}x cost)")
    record(
        bench="bus",
        name="SharedState.get, 1 thread",
        backend="memory",
        unit="reads/s",
        value=ours,
        peer="dict.get of the same data",
        peer_value=bare,
        runs=rounds,
        durability="in process",
    )

    with tempfile.TemporaryDirectory(prefix="bench-bus-") as tmp:
        for kind, url in (("memory", "memory://"), ("sqlite", f"sqlite:///{Path(tmp) / 'bus.db'}")):
            results = []
            for _ in range(rounds):
                store = open_store(url if kind == "memory" else url.replace("bus.db", f"bus-{uuid.uuid4().hex}.db"))
                results.append(relay_throughput(store, commits))
                store.close()
            relay_rate = statistics.median(r[0] for r in results)
            raw_rate = statistics.median(r[1] for r in results)
            print(
                f"relay throughput [{kind}]: {relay_rate:,.0f} changes/s "
                f"(raw publish_async of the same envelopes {raw_rate:,.0f}/s, relay at {relay_rate / raw_rate:.0%})"
            )
            record(
                bench="bus",
                name="relay to JetStream",
                backend=kind,
                unit="changes/s",
                value=relay_rate,
                peer="raw nats-py publish_async, same envelopes",
                peer_value=raw_rate,
                runs=rounds,
                durability="synchronous=FULL, WAL" if kind == "sqlite" else "in process",
                peer_durability="JetStream acknowledged",
            )
            for idle in (0, IDLE_TENANTS):
                store = open_store(url if kind == "memory" else url.replace("bus.db", f"bus-{uuid.uuid4().hex}.db"))
                for i in range(idle):  # tenants that had one commit and then nothing: the relay has to poll them
                    store.commit(f"idle-{i:04d}", ops=[Put("docs", "k", i)])
                lat = sorted(end_to_end_latency(store, samples))
                store.close()
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                beside = f", {idle} idle tenants" if idle else ""
                print(
                    f"commit -> consumer latency [{kind}{beside}]: median {statistics.median(lat):.2f} ms, "
                    f"p99 {p99:.2f} ms"
                )
                record(
                    bench="bus",
                    name=f"commit -> JetStream consumer latency{beside}",
                    backend=kind,
                    unit="ms",
                    value=statistics.median(lat),
                    p50_ms=statistics.median(lat),
                    p99_ms=p99,
                    notes=f"{len(lat)} spaced commits",
                    durability="synchronous=FULL, WAL" if kind == "sqlite" else "in process",
                )


if __name__ == "__main__":
    main()
