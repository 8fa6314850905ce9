"""The bus: subjects and envelopes, in-process subscriptions, the JetStream relay (exactly once, in order,
through relay crashes and NATS outages) and the consumer helper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

import stateline
from stateline import Append, Change, FakeClock, InvalidArgument, NewEvent, Put, Store, Sweeper
from stateline.bus import Relay, consume, envelope_of, subject_of
from stateline.bus.envelope import alias_messages
from stateline.store.memory import MemoryStore
from tests.conftest import Backend, require_service
from tests.faultproxy import FaultProxy

NATS_URL = "nats://127.0.0.1:4222"


# ------------------------------------------------------------------ envelopes (no NATS needed)


def test_subject_and_envelope_of_a_run_event() -> None:
    store = stateline.open_store("memory://", clock=FakeClock())
    store.commit(
        "acme.eu",
        ops=[Append("runs:r1", [NewEvent("step.assigned", {"step_id": "s1", "worker_id": "w"}, {"flow_id": "f"})])],
        meta={"run_id": "r1", "trace_id": "t-9"},
    )
    (change,) = store.changes("acme.eu")
    assert subject_of(change) == "stateline.acme_eu.runs.step_assigned"
    env = envelope_of(change)
    assert env["id"] == "acme.eu:1"
    assert env["tenant_id"] == "acme.eu"
    assert (env["run_id"], env["trace_id"], env["flow_id"], env["step_id"]) == ("r1", "t-9", "f", "s1")
    assert "idempotency_key" not in env
    (alias,) = alias_messages(change, "x.")
    assert alias[0] == "x.caf.exec.assigned.v1"
    assert alias[1] == "acme.eu:1:1:caf.exec.assigned.v1"
    assert alias[2]["step_id"] == "s1"


def test_subject_of_item_ops() -> None:
    store = stateline.open_store("memory://")
    store.commit("t", ops=[Put("docs.txlog", "k", 1)])
    (change,) = store.changes("t")
    assert subject_of(change, "p") == "p.t.docs.put"


# ------------------------------------------------------------------ in-process subscriptions


def test_subscription_delivers_matching_changes_in_order(backend: Backend) -> None:
    store = backend.open(clock=None)
    db = stateline.Database(store)
    store.commit("acme", ops=[Put("docs", "before", 1)])
    got: list[int] = []
    done = threading.Event()

    def callback(change: Change) -> None:
        if change.revision == 3:
            raise RuntimeError("a failing callback does not stop the subscription")
        got.append(change.revision)
        if change.revision >= 6:
            done.set()

    with db.subscribe("acme", "docs", callback) as sub:
        for i in range(5):
            store.commit("acme", ops=[Put("docs", f"k{i}", i)])
        store.commit("acme", ops=[Put("other", "x", 1)])
        store.commit("umbrella", ops=[Put("docs", "x", 1)])
        assert done.wait(20)
    assert got == [2, 4, 5, 6]
    assert sub.cursor >= 6


# ------------------------------------------------------------------ relay


@dataclass
class JetStreamTarget:
    stream: str
    prefix: str
    alias_prefix: str


@pytest.fixture
def jetstream() -> Iterator[JetStreamTarget]:
    require_service("nats")
    tag = uuid.uuid4().hex[:10]
    target = JetStreamTarget(f"SLT_{tag}", f"slt{tag}", f"sla{tag}.")
    yield target

    async def cleanup() -> None:
        nc = await nats.connect(NATS_URL)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(target.stream)
        await nc.close()

    asyncio.run(cleanup())


def _read_stream(target: JetStreamTarget, expected: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every message of the test's JetStream stream under its main prefix, in stream order."""

    async def main() -> list[dict[str, Any]]:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        out: list[dict[str, Any]] = []
        sub = await js.pull_subscribe(f"{target.prefix}.>", stream=target.stream)
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(1000, timeout=1)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for m in msgs:
                out.append(orjson.loads(m.data))
                await m.ack()
        # anything beyond what was expected would be a duplicate: look once more
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            out.extend(orjson.loads(m.data) for m in await sub.fetch(100, timeout=0.5))
        await nc.close()
        return out

    return asyncio.run(main())


def _assert_exactly_once_in_order(messages: list[dict[str, Any]], expected: dict[str, int]) -> None:
    per_tenant: dict[str, list[int]] = {}
    for m in messages:
        per_tenant.setdefault(m["tenant_id"], []).append(m["revision"])
    assert {t: len(r) for t, r in per_tenant.items()} == expected
    for tenant, revisions in per_tenant.items():
        assert revisions == list(range(1, expected[tenant] + 1)), tenant


def _wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_relay_delivers_10000_commits_exactly_once_in_order(jetstream: JetStreamTarget) -> None:
    store = stateline.open_store("memory://")
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    relay.start()
    try:
        tenants = ["acme", "umbrella", "initech"]
        for i in range(10_000):
            store.commit(tenants[i % 3], ops=[Put("docs", f"k{i % 50}", i)])
        _wait_for(lambda: sum(relay.lag().values()) == 0)
    finally:
        relay.stop()
    messages = _read_stream(jetstream, 10_000)
    _assert_exactly_once_in_order(messages, {"acme": 3334, "umbrella": 3333, "initech": 3333})
    assert relay.cursor("acme") == 3334


def test_a_relay_ends_quietly_when_its_store_is_closed(
    jetstream: JetStreamTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = stateline.open_store("memory://")
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    caplog.set_level(logging.INFO, logger="stateline.bus")
    relay.start()
    try:
        for i in range(3):
            store.commit("acme", ops=[Put("docs", "k", i)])
        _wait_for(lambda: relay.cursor("acme") == 3)
        assert relay.running
        store.close()  # by its owner, without stopping the relay first
        _wait_for(lambda: not relay.running)
    finally:
        relay.stop()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "relay ended: its store was closed" in [r.getMessage() for r in caplog.records]
    assert len(_read_stream(jetstream, 3)) == 3


def test_relay_skips_and_counts_what_was_trimmed_before_it_published(
    jetstream: JetStreamTarget, caplog: pytest.LogCaptureFixture
) -> None:
    store = stateline.open_store("memory://")
    for i in range(5):
        store.commit("acme", ops=[Put("docs", "k", i)])
        store.commit("umbrella", ops=[Put("docs", "k", i)])
    store.trim_changes("acme", 4)  # by hand: a Sweeper would have kept them for the relay
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    relay.start()
    try:
        _wait_for(lambda: relay.cursor("acme") == 5 and relay.cursor("umbrella") == 5)
    finally:
        relay.stop()
    assert relay.lost == 3
    messages = _read_stream(jetstream, 7)
    assert [m["revision"] for m in messages if m["tenant_id"] == "acme"] == [4, 5]
    assert [m["revision"] for m in messages if m["tenant_id"] == "umbrella"] == [1, 2, 3, 4, 5]
    assert any("were trimmed before they were published" in r.getMessage() for r in caplog.records)


def test_retention_running_beside_a_relay_loses_nothing(jetstream: JetStreamTarget) -> None:
    store = stateline.open_store("memory://")
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    sweeper = Sweeper(store, interval=0.005, batch=7, keep_changes=3)
    for i in range(100):  # before the relay ever ran: retention may take none of it
        store.commit("acme", ops=[Put("docs", "k", i)])
    relay.start()  # registered when it returns
    sweeper.start()
    try:
        for i in range(1000):
            store.commit(("acme", "umbrella")[i % 2], ops=[Put("docs", f"k{i % 10}", i)])
        _wait_for(lambda: relay.cursor("acme") == 600 and relay.cursor("umbrella") == 500)
        _wait_for(lambda: store.first_change("acme") > 500)  # retention caught up behind the relay
    finally:
        sweeper.stop()
        relay.stop()
    assert relay.lost == 0
    assert sweeper.trimmed > 0
    _assert_exactly_once_in_order(_read_stream(jetstream, 1100), {"acme": 600, "umbrella": 500})


class _CountingStore(MemoryStore):
    """A memory store that counts the change-feed reads made of each tenant."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, int] = {}

    def _changes(self, tenant: str, after_revision: int, limit: int) -> list[Change]:
        self.reads[tenant] = self.reads.get(tenant, 0) + 1
        return super()._changes(tenant, after_revision, limit)


def test_an_idle_relay_reads_only_the_feeds_that_moved(jetstream: JetStreamTarget) -> None:
    store = _CountingStore()
    tenants = [f"t{i:03d}" for i in range(60)]
    for t in tenants:
        store.commit(t, ops=[Put("docs", "k", t)])
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    relay.start()
    try:
        _wait_for(lambda: relay.published == 60)
        store.reads.clear()
        time.sleep(0.3)  # dozens of polls
        assert store.reads == {}  # nothing moved, nothing read
        store.commit("t007", ops=[Put("docs", "k", 2)])
        _wait_for(lambda: relay.published == 61)
        assert set(store.reads) == {"t007"}
    finally:
        relay.stop()
    _assert_exactly_once_in_order(_read_stream(jetstream, 61), {**dict.fromkeys(tenants, 1), "t007": 2})


def test_relay_keeps_commits_flowing_through_a_nats_outage(
    jetstream: JetStreamTarget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = stateline.open_store("memory://")
    with FaultProxy("127.0.0.1", 4222) as proxy:
        relay = Relay(
            store, f"nats://{proxy.host}:{proxy.port}", stream=jetstream.stream, prefix=jetstream.prefix,
            alias_prefix=jetstream.alias_prefix, ack_timeout=1.0,
        )  # fmt: skip
        relay.start()
        try:
            for i in range(300):
                store.commit("acme", ops=[Put("docs", "k", i)])
            _wait_for(lambda: relay.lag()["acme"] == 0)
            proxy.refuse()
            for i in range(700):  # commits keep succeeding while NATS is unreachable
                store.commit("acme", ops=[Put("docs", "k", i)])
            time.sleep(1.5)  # the client tries to reconnect every 0.25 s meanwhile
            assert relay.lag()["acme"] > 0
            proxy.restore()
            _wait_for(lambda: relay.lag()["acme"] == 0)
        finally:
            relay.stop()
    assert relay.errors >= 0
    _assert_exactly_once_in_order(_read_stream(jetstream, 1000), {"acme": 1000})
    # the outage is one warning (and its end one info line), not a traceback per reconnect attempt
    assert [r for r in caplog.records if r.exc_info] == []
    outage = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage) == 1, outage
    assert any("is back" in r.getMessage() for r in caplog.records)


def test_a_relay_with_a_short_max_age_creates_its_stream(jetstream: JetStreamTarget) -> None:
    """JetStream refuses a duplicate window longer than the stream's max age: the relay's (120 s by
    default) is cut to the max age, or the stream is never created."""
    store = stateline.open_store("memory://")
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix,
        max_age=30,
    )  # fmt: skip
    relay.start()
    try:
        for i in range(3):
            store.commit("acme", ops=[Put("docs", "k", i)])
        _wait_for(lambda: relay.cursor("acme") == 3, timeout=20)
    finally:
        relay.stop()

    async def config() -> Any:
        nc = await nats.connect(NATS_URL)
        try:
            return (await nc.jetstream().stream_info(jetstream.stream)).config
        finally:
            await nc.close()

    got = asyncio.run(config())
    assert (got.max_age, got.duplicate_window) == (30, 30)


def test_a_relay_says_when_the_stream_it_finds_differs_from_what_it_asks(
    jetstream: JetStreamTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """JetStream keeps an existing stream's settings: a relay started with another max age or prefix
    says so once, instead of silently keeping the old age or publishing where the stream does not listen."""
    store = stateline.open_store("memory://")
    names = {"stream": jetstream.stream, "alias_prefix": jetstream.alias_prefix}
    caplog.set_level(logging.WARNING, logger="stateline.bus")
    for max_age in (30, 30, 60):  # the second finds the stream as it asks: nothing to say
        relay = Relay(store, NATS_URL, prefix=jetstream.prefix, max_age=max_age, **names)
        relay.start()
        try:
            store.commit("acme", ops=[Put("docs", "k", max_age)])
            _wait_for(lambda: relay.lag().get("acme", 1) == 0, timeout=20)  # noqa: B023 - used at once
        finally:
            relay.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "max_age 30.0, not 60" in warnings[0]


RELAY_CHILD = """
import sys, time
import stateline
from stateline.bus import Relay
store = stateline.open_store(sys.argv[1])
relay = Relay(store, sys.argv[2], stream=sys.argv[3], prefix=sys.argv[4], alias_prefix=sys.argv[5], batch=50)
relay.start()
while True:
    time.sleep(1)
"""


def test_relay_killed_at_random_points_still_delivers_exactly_once(jetstream: JetStreamTarget, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    store: Store = stateline.open_store(url)
    rng = random.Random(7)
    args = [
        sys.executable,
        "-c",
        RELAY_CHILD,
        url,
        NATS_URL,
        jetstream.stream,
        jetstream.prefix,
        jetstream.alias_prefix,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    total = 0
    for _round in range(4):
        child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
        try:
            for _ in range(rng.randint(150, 400)):
                total += 1
                store.commit("acme", ops=[Put("docs", "k", total)])
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
    try:
        relay = Relay(store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix)
        _wait_for(lambda: relay.cursor("acme") == total, timeout=120)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        store.close()
    _assert_exactly_once_in_order(_read_stream(jetstream, total), {"acme": total})


# ------------------------------------------------------------------ consumer helper


def test_consume_redelivers_then_dead_letters(jetstream: JetStreamTarget) -> None:
    store = stateline.open_store("memory://")
    relay = Relay(
        store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    relay.start()
    seen: dict[int, int] = {}
    dead: list[dict[str, Any]] = []
    durable = f"c{uuid.uuid4().hex[:8]}"
    dlq = f"sldlq{uuid.uuid4().hex[:8]}"
    stop = threading.Event()

    def handler(delivery: Any) -> None:
        rev = delivery.data["revision"]
        seen[rev] = delivery.num_delivered
        if rev == 2 and delivery.num_delivered < 2:
            raise RuntimeError("fails once, then succeeds")
        if rev == 3:
            raise RuntimeError("always fails")

    async def watch_dlq(ready: threading.Event) -> None:
        nc = await nats.connect(NATS_URL)
        sub = await nc.subscribe(dlq)
        ready.set()
        deadline = time.monotonic() + 30
        while not dead and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            dead.append({"data": orjson.loads(msg.data), "headers": msg.headers})
        await nc.close()

    ready = threading.Event()
    dlq_thread = threading.Thread(target=lambda: asyncio.run(watch_dlq(ready)), daemon=True)
    dlq_thread.start()
    assert ready.wait(10)
    consumer = threading.Thread(
        target=consume,
        args=(f"{jetstream.prefix}.>", handler),
        kwargs={"durable": durable, "stop": stop, "max_deliver": 3, "dead_letter_subject": dlq, "retry_delay": 0.05},
        daemon=True,
    )
    try:
        for i in range(4):
            store.commit("acme", ops=[Put("docs", "k", i)])
        _wait_for(lambda: relay.lag()["acme"] == 0)
        consumer.start()
        dlq_thread.join(40)
        _wait_for(lambda: seen.get(4) is not None and seen.get(2, 0) >= 2)
    finally:
        stop.set()
        relay.stop()
        consumer.join(20)
    assert seen[1] == 1
    assert seen[2] == 2
    assert seen[3] == 3
    assert len(dead) == 1
    assert dead[0]["data"]["revision"] == 3
    assert dead[0]["headers"]["Stateline-Deliveries"] == "3"


def test_run_events_reach_the_seed_subjects(jetstream: JetStreamTarget) -> None:
    db = stateline.open("memory://")
    runs = db.tenant("acme").runs
    relay = Relay(
        db.store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix, alias_prefix=jetstream.alias_prefix
    )
    relay.start()
    try:
        runs.create("flow-1", [{"id": "s1", "kind": "llm"}], run_id="r1", trace_id="trace-7")
        (claim,) = runs.claim("worker-1")
        runs.complete(claim, claim.lease_token, {"answer": 42}, usage={"tokens": 10, "cost_usd": 0.5})
        _wait_for(lambda: relay.lag()["acme"] == 0)
    finally:
        relay.stop()

    async def read_aliases() -> dict[str, list[dict[str, Any]]]:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        out: dict[str, list[dict[str, Any]]] = {}
        for seed in ("caf.exec.assigned.v1", "caf.exec.result.v1", "beamline.usage.v1.metered"):
            sub = await js.pull_subscribe(f"{jetstream.alias_prefix}{seed}", stream=jetstream.stream)
            msgs = await sub.fetch(10, timeout=5)
            out[seed] = [orjson.loads(m.data) for m in msgs]
        await nc.close()
        return out

    got = asyncio.run(read_aliases())
    (assigned,) = got["caf.exec.assigned.v1"]
    (result,) = got["caf.exec.result.v1"]
    (metered,) = got["beamline.usage.v1.metered"]
    for body in (assigned, result, metered):
        assert (body["tenant_id"], body["run_id"], body["step_id"], body["flow_id"]) == ("acme", "r1", "s1", "flow-1")
        assert body["trace_id"] == "trace-7"
    assert assigned["data"]["worker_id"] == "worker-1"
    assert result["data"]["status"] == "success"
    assert metered["data"]["tokens_used"] == 10


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("stream", "a.b"), ("prefix", ""), ("prefix", "a.*"), ("alias_prefix", "x.>"), ("retention", "x"), ("batch", 0),
        ("batch", 1.5), ("max_age", -5), ("max_age", math.nan), ("max_age", "60"), ("ack_timeout", 0),
        ("duplicate_window", math.inf), ("poll_interval", -1),
    ],
)  # fmt: skip
def test_relay_refuses_bad_arguments(option: str, value: object) -> None:
    store = stateline.open_store("memory://")
    with pytest.raises(InvalidArgument) as err:
        Relay(store, NATS_URL, **{option: value})
    assert err.value.field == option


async def _claim_default_alias_subjects(name: str) -> bool:
    """Create a stream holding the run events' default subjects, as a default relay beside ours would;
    False if another stream holds them already (which blocks them just the same)."""
    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().add_stream(name=name, subjects=["caf.exec.>", "beamline.usage.>"])
    except nats.js.errors.BadRequestError:
        return False
    finally:
        await nc.close()
    return True


async def _delete_stream(name: str) -> None:
    nc = await nats.connect(NATS_URL)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await nc.jetstream().delete_stream(name)
    await nc.close()


def test_relay_command_relays_and_stops_on_sigterm(jetstream: JetStreamTarget, tmp_path: Path) -> None:
    # another stream already holds the default alias subjects: with its own --alias-prefix the
    # relay still creates its stream (without it, NATS refuses the overlap and the relay never starts)
    blocker = f"{jetstream.stream}_DEFAULT"
    created = asyncio.run(_claim_default_alias_subjects(blocker))
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = stateline.open_store(url)
    for i in range(25):
        store.commit("acme", ops=[Put("docs", "k", i)])
    exe = Path(sys.executable).with_name("stateline")
    args = [
        str(exe),
        "relay",
        "--url",
        url,
        "--nats",
        NATS_URL,
        "--stream",
        jetstream.stream,
        "--prefix",
        jetstream.prefix,
        "--alias-prefix",
        jetstream.alias_prefix,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        relay = Relay(store, NATS_URL, stream=jetstream.stream, prefix=jetstream.prefix)
        _wait_for(lambda: relay.cursor("acme") == 25)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        store.close()
        if created:
            asyncio.run(_delete_stream(blocker))
    assert proc.returncode == 0, err
    assert "relaying" in out
    _assert_exactly_once_in_order(_read_stream(jetstream, 25), {"acme": 25})
