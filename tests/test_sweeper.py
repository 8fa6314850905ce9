"""The sweeper removes expired items in batches, on its own thread, and outlives a failing store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

import stateline
from stateline import (
    ChangesTrimmed,
    Database,
    Delete,
    FakeClock,
    InvalidArgument,
    NotFound,
    Put,
    Store,
    Sweeper,
    Swept,
    Unavailable,
)
from stateline.api.server import settings_from_env
from stateline.audit import AuditLog
from stateline.bus import Relay
from stateline.cli import app
from stateline.store.memory import MemoryStore
from stateline.types import RELAY_CURSORS, SYSTEM_TENANT

from .api.conftest import make_api


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _fill(store: Store, tenants: tuple[str, ...] = ("a", "b"), n: int = 25) -> None:
    for t in tenants:
        store.commit(t, ops=[*(Put("ns", f"k{i:02d}", i, ttl=1) for i in range(n)), Put("ns", "stay", 0)])


def test_a_run_removes_every_expired_item_in_batches(store: Store, clock: FakeClock) -> None:
    _fill(store)
    swept: list[int] = []
    sweeper = Sweeper(store, batch=10, on_swept=swept.append)
    assert sweeper.run_once() == Swept(0, 0)
    clock.advance(2)
    assert sweeper.run_once() == Swept(50, 0)
    assert sweeper.run_once() == Swept(0, 0)
    assert (sweeper.swept, sweeper.trimmed, sweeper.runs, sweeper.failures, sweeper.last_error) == (50, 0, 3, 0, None)
    assert swept == [50]  # called for runs that removed something
    for t in ("a", "b"):
        assert [i.key for i in store.scan(t, "ns")] == ["stay"]
        assert store.revision(t) == 1  # sweeping is not a commit
    assert store.sweep() == 0


def test_a_run_stops_at_max_per_run(store: Store, clock: FakeClock) -> None:
    _fill(store)
    clock.advance(2)
    sweeper = Sweeper(store, batch=10, max_per_run=20)
    assert sweeper.run_once().items == 20
    assert sweeper.run_once().items == 20
    assert sweeper.run_once().items == 10
    assert sweeper.swept == 50


def test_the_thread_sweeps_every_interval_until_stopped(store: Store, clock: FakeClock) -> None:
    _fill(store, n=5)
    clock.advance(2)
    with Sweeper(store, interval=0.02, batch=3) as sweeper:
        assert sweeper.running
        _wait_for(lambda: sweeper.swept == 10)
        _fill(store, ("c",), n=4)  # written after the first runs, expired later
        clock.advance(2)
        _wait_for(lambda: sweeper.swept == 14)
        assert sweeper.runs >= 2
    assert not sweeper.running
    assert [i.key for i in store.scan("c", "ns")] == ["stay"]
    sweeper.stop()  # twice is allowed


class _Flaky(MemoryStore):
    """A memory store whose first ``fail`` sweeps raise ``Unavailable`` (the backend down)."""

    def __init__(self, fail: int, **options: Any) -> None:
        super().__init__(**options)
        self.fail = fail

    def _sweep(self, limit: int) -> int:
        if self.fail > 0:
            self.fail -= 1
            raise Unavailable("connection refused")
        return super()._sweep(limit)


def test_a_failing_run_is_counted_logged_and_tried_again(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    store = _Flaky(2, clock=clock)
    _fill(store, ("a",), n=5)
    clock.advance(2)
    with pytest.raises(Unavailable):
        Sweeper(store).run_once()
    caplog.set_level(logging.WARNING, logger="stateline.sweeper")
    with Sweeper(store, interval=0.02) as sweeper:
        _wait_for(lambda: sweeper.swept == 5)
        assert sweeper.running
    assert sweeper.failures == 1
    assert sweeper.last_error == "Unavailable: connection refused"
    assert any("connection refused" in r.getMessage() for r in caplog.records)


def test_a_sweeper_ends_quietly_when_its_store_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    store = stateline.open_store("memory://")
    caplog.set_level(logging.INFO, logger="stateline.sweeper")
    sweeper = Sweeper(store, interval=0.02).start()
    store.close()  # by its owner, without stopping the sweeper first
    _wait_for(lambda: not sweeper.running)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
        "sweeper ended: its store was closed"
    ]


def test_a_failing_callback_does_not_stop_the_thread(clock: FakeClock) -> None:
    store = stateline.open_store("memory://", clock=clock)
    calls = threading.Event()

    def callback(n: int) -> None:
        calls.set()
        raise RuntimeError(f"metrics broke on {n}")

    with Sweeper(store, interval=0.02, on_swept=callback) as sweeper:
        _fill(store, ("a",), n=3)
        clock.advance(2)
        _wait_for(calls.is_set)
        _fill(store, ("b",), n=2)
        clock.advance(2)
        _wait_for(lambda: sweeper.swept == 5)
        assert sweeper.running
    assert sweeper.failures == 0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"interval": 0}, "interval"),
        ({"interval": -1}, "interval"),
        ({"interval": float("nan")}, "interval"),
        ({"interval": "5"}, "interval"),
        ({"interval": True}, "interval"),
        ({"interval": 86_401}, "interval"),
        ({"batch": 0}, "batch"),
        ({"batch": 10_001}, "batch"),
        ({"batch": 1.5}, "batch"),
        ({"batch": 100, "max_per_run": 99}, "max_per_run"),
        ({"on_swept": 3}, "on_swept"),
        ({"on_trimmed": "x"}, "on_trimmed"),
        ({"keep_changes": 0}, "keep_changes"),
        ({"keep_changes": 2.5}, "keep_changes"),
        ({"keep_changes": True}, "keep_changes"),
        ({"audit_retention_days": 0}, "audit_retention_days"),
        ({"audit_retention_days": -1.0}, "audit_retention_days"),
        ({"audit_retention_days": float("nan")}, "audit_retention_days"),
        ({"audit_retention_days": "7"}, "audit_retention_days"),
        ({"audit_retention_days": True}, "audit_retention_days"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        Sweeper(stateline.open_store("memory://"), **options)
    assert err.value.details["field"] == field


def test_it_needs_a_store() -> None:
    with pytest.raises(InvalidArgument, match="must be a Store"):
        Sweeper("memory://")  # type: ignore[arg-type]


def test_a_database_runs_one_sweeper_and_stops_it_when_closed(clock: FakeClock) -> None:
    db = stateline.open("memory://", clock=clock)
    sweeper = db.start_sweeper(0.02, batch=2)
    with pytest.raises(InvalidArgument, match="already runs one"):
        db.start_sweeper()
    with pytest.raises(InvalidArgument, match="already running"):
        sweeper.start()
    _fill(db.store, ("a",), n=3)
    clock.advance(2)
    _wait_for(lambda: sweeper.swept == 3)
    db.close()
    assert not sweeper.running


def test_the_service_sweeps_while_it_runs_and_counts_it(clock: FakeClock) -> None:
    db = stateline.open("memory://", clock=clock)
    for api in make_api(db, clock, sweep_interval=0.02):
        sweeper = api.ctx.sweeper
        assert sweeper is not None
        assert sweeper.running
        _fill(db.store, ("a",), n=4)
        clock.advance(2)
        _wait_for(lambda s=sweeper: s.swept == 4)
        assert "stateline_swept_items_total 4.0" in api.client.get("/metrics").text
    assert not sweeper.running  # stopped at shutdown
    for api in make_api(db, clock, sweep_interval=None):
        assert api.ctx.sweeper is None
    with pytest.raises(InvalidArgument):
        next(make_api(db, clock, sweep_interval=0))
    db.close()


def test_database_start_sweeper_checks_its_arguments() -> None:
    with Database(stateline.open_store("memory://")) as db, pytest.raises(InvalidArgument):
        db.start_sweeper(-5)


# ---------------------------------------------------------------- change-feed retention


def _commits(store: Store, tenant: str, n: int) -> None:
    for i in range(n):
        store.commit(tenant, ops=[Put("ns", "k", i)])


def test_retention_keeps_the_last_records_and_what_relays_have_not_published(store: Store) -> None:
    _commits(store, "a", 10)
    _commits(store, "b", 3)
    _commits(store, "c", 5)
    cursors = [Put(RELAY_CURSORS, "MAIN/a", 4), Put(RELAY_CURSORS, "OTHER/a", 6), Put(RELAY_CURSORS, "MAIN/b", 3)]
    store.commit(SYSTEM_TENANT, ops=cursors)
    trimmed: list[int] = []
    sweeper = Sweeper(store, batch=2, keep_changes=2, on_trimmed=trimmed.append)
    # a: keeps 9 and 10, and 5 to 8 for the relay at 4; b: keeps 2 and 3 (MAIN published them, but
    # OTHER has not started on b); c: no relay has started on it, it keeps all; system: its 1 record
    assert sweeper.run_once() == Swept(0, 4)
    assert [store.first_change(t) for t in ("a", "b", "c", SYSTEM_TENANT)] == [5, 1, 1, 1]
    assert [c.revision for c in store.changes("a", 4)] == [5, 6, 7, 8, 9, 10]
    with pytest.raises(ChangesTrimmed):
        store.changes("a", 3)
    cursors = [Put(RELAY_CURSORS, f"{r}/{t}", n) for r in ("MAIN", "OTHER") for t, n in (("a", 10), ("b", 3), ("c", 5))]
    store.commit(SYSTEM_TENANT, ops=cursors)
    # both relays are past everything: a: 5 to 8; b: 1; c: 1 to 3; system: its last 2 are kept
    assert sweeper.run_once() == Swept(0, 8)
    assert [store.first_change(t) for t in ("a", "b", "c", SYSTEM_TENANT)] == [9, 2, 4, 1]
    assert (sweeper.trimmed, trimmed) == (12, [4, 8])
    item = store.get("a", "ns", "k")
    assert item is not None
    assert (store.revision("a"), item.value) == (10, 9)


def test_retention_stops_at_max_per_run(store: Store) -> None:
    _commits(store, "a", 30)
    sweeper = Sweeper(store, batch=4, max_per_run=8, keep_changes=5)
    assert [sweeper.run_once().changes for _ in range(4)] == [8, 8, 8, 1]
    assert store.first_change("a") == 26


def test_a_subscriber_that_retention_overtook_stops_with_the_error(clock: FakeClock) -> None:
    db = stateline.open("memory://", clock=clock)
    _commits(db.store, "a", 5)
    db.store.trim_changes("a", 4)
    seen: list[int] = []
    sub = db.subscribe("a", None, lambda c: seen.append(c.revision), after=1)
    try:
        _wait_for(lambda: not sub.running)
        assert isinstance(sub.error, ChangesTrimmed)
        assert sub.error.first_available == 4
        assert seen == []
    finally:
        sub.close()
        db.close()


def test_the_service_trims_with_its_sweeps_and_refuses_trimmed_reads(clock: FakeClock) -> None:
    db = stateline.open("memory://", clock=clock)
    for api in make_api(db, clock, sweep_interval=0.02, keep_changes=3):
        h = api.key("acme")
        for i in range(8):
            assert api.client.put(f"/v1/items/docs/k{i}", json=i, headers=h).status_code < 300
        last = db.store.revision("acme")
        _wait_for(lambda last=last: db.store.first_change("acme") == last - 2)
        r = api.client.get("/v1/changes", params={"after": 0}, headers=h)
        assert r.status_code == 410
        assert r.json()["error"]["code"] == "changes_trimmed"
        assert r.json()["error"]["details"]["first_available"] == last - 2
        ok = api.client.get("/v1/changes", params={"after": last - 3}, headers=h).json()
        assert [c["revision"] for c in ok["changes"]] == [last - 2, last - 1, last]
        sse = api.client.get("/v1/watch", headers={**h, "Last-Event-ID": "1"})
        assert sse.status_code == 410
        assert "stateline_trimmed_changes_total" in api.client.get("/metrics").text
    db.close()


# ---------------------------------------------------------------- audit retention


def test_audit_retention_removes_old_entries_and_keeps_the_chain_verifiable(store: Store, clock: FakeClock) -> None:
    old, recent = AuditLog(store, "a"), AuditLog(store, "b")
    for i in range(3):
        old.log("u", "write", "doc", f"d{i}")
    recent.log("u", "write", "doc", "x")
    clock.advance(2 * 86400)
    old.log("u", "write", "doc", "new")
    recent.log("u", "write", "doc", "y")
    sweeper = Sweeper(store, audit_retention_days=1)
    # a: its 3 entries of two days ago go; b: its old entry goes
    assert sweeper.run_once() == Swept(0, 0, 4)
    assert sweeper.run_once() == Swept(0, 0, 0)
    assert sweeper.audit_removed == 4
    for log, kept in ((old, ["new"]), (recent, ["y"])):
        assert [e.resource_id for e in log.query().entries] == kept
        assert log.verify().ok


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATELINE_SWEEP_INTERVAL", "15")
    monkeypatch.setenv("STATELINE_KEEP_CHANGES", "5000")
    monkeypatch.setenv("STATELINE_AUDIT_RETENTION_DAYS", "30")
    s = settings_from_env()
    assert (s.sweep_interval, s.keep_changes, s.audit_retention_days) == (15.0, 5000, 30.0)
    for name in ("STATELINE_SWEEP_INTERVAL", "STATELINE_KEEP_CHANGES", "STATELINE_AUDIT_RETENTION_DAYS"):
        monkeypatch.setenv(name, "0")
    s = settings_from_env()
    assert (s.sweep_interval, s.keep_changes, s.audit_retention_days) == (None, None, None)


def test_the_sweep_command_runs_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with stateline.open(url) as db:
        db.store.commit("a", ops=[Put("ns", "gone", 1, ttl=0.001), Put("ns", "stay", 1)])
        _commits(db.store, "a", 5)
        AuditLog(db.store, "a").log("u", "write", "doc")
    time.sleep(0.01)
    runner = CliRunner()
    done = runner.invoke(app, ["sweep", "--url", url, "--keep-changes", "2", "--audit-retention-days", "30"])
    assert done.exit_code == 0, done.output
    assert "removed 1 expired item(s), 5 change record(s), 0 audit entries" in done.output
    with stateline.open(url) as db:
        assert [i.key for i in db.store.scan("a", "ns")] == ["k", "stay"]
        assert db.store.first_change("a") == db.store.revision("a") - 1
    assert runner.invoke(app, ["sweep", "--url", url, "--keep-changes", "-1"]).exit_code != 0


def test_a_relay_that_has_published_nothing_yet_holds_retention_back(clock: FakeClock) -> None:
    store = stateline.open_store("memory://", clock=clock)
    _commits(store, "a", 6)
    relay = Relay(store, "nats://127.0.0.1:1", stream="NOWHERE")  # nothing listens there: it never publishes
    relay.start()
    try:
        # registered before start() returns: retention that starts after it keeps everything
        assert Sweeper(store, keep_changes=2).run_once() == Swept(0, 0)
        assert store.first_change("a") == 1
    finally:
        relay.stop()
    store.commit(SYSTEM_TENANT, ops=[Delete(RELAY_CURSORS, "NOWHERE/")])  # the relay retired
    assert Sweeper(store, keep_changes=2).run_once() == Swept(0, 4)


def test_a_retired_relay_is_named_in_a_warning_and_forgotten(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    _commits(store, "a", 10)
    _commits(store, "b", 4)
    cursors = [Put(RELAY_CURSORS, "OLD/", 0), Put(RELAY_CURSORS, "OLD/a", 2), Put(RELAY_CURSORS, "LIVE/a", 10)]
    store.commit(SYSTEM_TENANT, ops=[*cursors, Put(RELAY_CURSORS, "LIVE/b", 4)])
    assert stateline.relay_positions(store) == {"OLD": {"a": 2}, "LIVE": {"a": 10, "b": 4}}
    sweeper = Sweeper(store, keep_changes=3)
    with caplog.at_level(logging.WARNING, logger="stateline.sweeper"):
        assert sweeper.run_once() == Swept(0, 2)  # a keeps 3 to 10 for OLD; b: OLD has not started on it
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "up to 5 more records in 2 tenant(s) for relay 'OLD'" in warning
    assert "stateline relays forget OLD" in warning
    assert "LIVE" not in warning  # published up to the head: holds nothing back

    with pytest.raises(NotFound, match="GONE"):
        stateline.forget_relay(store, "GONE")
    for bad in ("", "OLD/a", None, 7):
        with pytest.raises(InvalidArgument):
            stateline.forget_relay(store, bad)  # type: ignore[arg-type]
    assert stateline.relay_positions(store)["OLD"] == {"a": 2}  # refused calls removed nothing

    assert stateline.forget_relay(store, "OLD") == 2
    assert stateline.relay_positions(store) == {"LIVE": {"a": 10, "b": 4}}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stateline.sweeper"):
        assert sweeper.run_once() == Swept(0, 5 + 1)
    assert caplog.records == []
    assert [store.first_change(t) for t in ("a", "b")] == [8, 2]


def test_the_relays_commands_list_and_forget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    runner = CliRunner()
    assert "no relays" in runner.invoke(app, ["relays", "list", "--url", url]).output
    with stateline.open(url) as db:
        _commits(db.store, "a", 5)
        _commits(db.store, "b", 2)
        db.store.commit(SYSTEM_TENANT, ops=[Put(RELAY_CURSORS, "OLD/", 0), Put(RELAY_CURSORS, "OLD/a", 3)])
    listed = runner.invoke(app, ["relays", "list", "--url", url])
    assert listed.exit_code == 0, listed.output
    assert orjson.loads(listed.output) == {"stream": "OLD", "tenants_published": 1, "behind": {"a": 2, "b": 2}}
    missing = runner.invoke(app, ["relays", "forget", "NOPE", "--url", url])
    assert isinstance(missing.exception, NotFound)  # `stateline` prints it as "error not_found: ..."
    forgot = runner.invoke(app, ["relays", "forget", "OLD", "--url", url])
    assert forgot.exit_code == 0, forgot.output
    assert "forgot relay 'OLD' (2 cursor(s))" in forgot.output
    with stateline.open(url) as db:
        assert stateline.relay_positions(db.store) == {}


def test_retention_trims_only_the_feeds_that_moved(clock: FakeClock) -> None:
    trims: list[str] = []

    class Counting(MemoryStore):
        def _trim_changes(self, tenant: str, before_revision: int, limit: int) -> int:
            trims.append(tenant)
            return super()._trim_changes(tenant, before_revision, limit)

    store = Counting(clock=clock)
    for t in ("a", "b", "c"):
        _commits(store, t, 6)
    _commits(store, "d", 2)  # under the limit: nothing to trim, never asked
    sweeper = Sweeper(store, keep_changes=3)
    assert sweeper.run_once() == Swept(0, 9)
    assert sorted(trims) == ["a", "b", "c"]
    trims.clear()
    assert sweeper.run_once() == Swept(0, 0)
    assert trims == []
    _commits(store, "b", 2)
    assert sweeper.run_once() == Swept(0, 2)
    assert trims == ["b"]
    assert [store.first_change(t) for t in ("a", "b", "c", "d")] == [4, 6, 4, 1]
