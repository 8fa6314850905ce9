"""Event streams: append, read, snapshots in the same commit, load, state_at, export, cleanup, check."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stateline import (
    Conflict,
    Database,
    Event,
    FakeClock,
    InvalidArgument,
    NewEvent,
    NotFound,
    PayloadTooLarge,
    Put,
    Tenant,
)
from stateline.streams import SNAPSHOT_NAMESPACE, Projection, Streams


def _sum(state: int, e: Event) -> int:
    return state + int(e.data)


SUM = Projection(0, _sum)


def _log(state: list[Any], e: Event) -> list[Any]:
    state.append([e.seq, e.type, e.data])
    return state


LOG = Projection([], _log, name="log")


def _streams(tenant: Tenant, every: int = 10, keep: int = 3) -> Streams:
    return Streams(tenant.store, tenant.name, snapshot_every=every, keep_snapshots=keep)


def _snapshot_keys(tenant: Tenant) -> list[str]:
    return [i.key for i in tenant.scan(SNAPSHOT_NAMESPACE, limit=1000)]


def _fold(projection: Projection, events: list[Event]) -> Any:
    state = projection.start()
    for e in events:
        state = projection.reducer(state, e)
    return state


# ---------------------------------------------------------------- append and read


def test_append_and_read(tenant: Tenant, clock: FakeClock) -> None:
    s = tenant.streams
    a = s.append("orders/1", [NewEvent("created", {"n": 1}), {"type": "paid", "data": 5, "meta": {"by": "ann"}}])
    assert (a.first_seq, a.last_seq, a.snapshot_seq) == (1, 2, None)
    b = s.append("orders/1", [{"type": "shipped"}], expected_seq=2)
    assert (b.first_seq, b.last_seq) == (3, 3)
    assert b.revision > a.revision
    events = s.read("orders/1")
    assert [(e.seq, e.type, e.data, e.stream) for e in events] == [
        (1, "created", {"n": 1}, "orders/1"),
        (2, "paid", 5, "orders/1"),
        (3, "shipped", None, "orders/1"),
    ]
    assert events[1].meta == {"by": "ann"}
    assert events[0].recorded_at == clock.now_us()
    assert [e.seq for e in s.read("orders/1", 2, 3)] == [2, 3]
    assert [e.seq for e in s.read("orders/1", 1, limit=2)] == [1, 2]
    assert s.read("orders/1", 4) == []
    assert s.info("orders/1").last_seq == 3
    assert s.exists("orders/1")
    assert not s.exists("orders/2")
    assert [i.stream for i in s.list("orders/")] == ["orders/1"]
    # the store keeps the stream under the layer's prefix
    assert tenant.stream_info("streams:orders/1").last_seq == 3


def test_expected_seq_conflict_names_the_found_seq(tenant: Tenant) -> None:
    s = tenant.streams
    s.append("s", [{"type": "a", "data": 1}], expected_seq=0)
    before = tenant.revision()
    with pytest.raises(Conflict) as ei:
        s.append("s", [{"type": "b"}], expected_seq=0)
    assert ei.value.failures[0].found == 1
    assert "found 1" in str(ei.value)
    with pytest.raises(Conflict):
        s.append("s", [{"type": "b"}], expected_seq=0, projection=SUM)
    with pytest.raises(Conflict) as ei:  # beyond the stream, with a snapshot due
        s.append("s", [{"type": "b", "data": 1}], expected_seq=99, projection=SUM)
    assert ei.value.failures[0].found == 1
    assert tenant.revision() == before


def test_unknown_stream_and_out_of_range(tenant: Tenant) -> None:
    s = tenant.streams
    for call in (
        lambda: s.read("nope"),
        lambda: s.info("nope"),
        lambda: s.load("nope", SUM),
        lambda: s.state_at("nope", SUM, seq=0),
        lambda: s.read_between("nope"),
        lambda: s.export("nope", io.StringIO()),
        lambda: s.check("nope"),
        lambda: s.cleanup("nope", 1),
    ):
        with pytest.raises(NotFound):
            call()
    s.append("s", [{"type": "a", "data": 1}] * 3)
    with pytest.raises(InvalidArgument) as ei:
        s.read("s", 5)
    assert ei.value.field == "from_seq"
    with pytest.raises(InvalidArgument) as ei:
        s.read("s", 1, 4)
    assert ei.value.field == "to_seq"
    with pytest.raises(InvalidArgument):
        s.read("s", 0)
    with pytest.raises(InvalidArgument) as ei:
        s.state_at("s", SUM, seq=4)
    assert ei.value.field == "seq"
    with pytest.raises(InvalidArgument):
        s.state_at("s", SUM)
    with pytest.raises(InvalidArgument):
        s.state_at("s", SUM, seq=1, time=1)
    with pytest.raises(InvalidArgument):
        s.state_at("s", SUM, seq=-1)


@pytest.mark.parametrize(
    ("events", "kwargs", "field"),
    [
        ([], {}, "events"),
        ("abc", {}, "events"),
        ([{"data": 1}], {}, "events[0]"),
        ([{"type": "a", "extra": 1}], {}, "events[0]"),
        ([42], {}, "events[0]"),
        ([{"type": ""}], {}, "ops[0].events[0].type"),
        ([{"type": "a", "data": float("nan")}], {}, "ops[0].events[0].data"),
        ([{"type": "a"}], {"expected_seq": -1}, "expected_seq"),
        ([{"type": "a"}], {"expected_seq": True}, "expected_seq"),
        ([{"type": "a"}], {"projection": "sum"}, "projection"),
    ],
)
def test_bad_appends_write_nothing(tenant: Tenant, events: Any, kwargs: dict[str, Any], field: str) -> None:
    s = tenant.streams
    s.append("s", [{"type": "a", "data": 1}])
    before = tenant.revision()
    with pytest.raises(InvalidArgument) as ei:
        s.append("s", events, **kwargs)
    assert ei.value.field == field
    assert tenant.revision() == before
    with pytest.raises(InvalidArgument):
        s.append("", [{"type": "a"}])


def test_bad_projection_and_options() -> None:
    with pytest.raises(InvalidArgument):
        Projection(0, "not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Projection(float("nan"), _sum)
    with pytest.raises(InvalidArgument):
        Projection(0, _sum, name="a/b")


def test_bad_streams_options(tenant: Tenant) -> None:
    with pytest.raises(InvalidArgument):
        Streams(tenant.store, tenant.name, snapshot_every=0)
    with pytest.raises(InvalidArgument):
        Streams(tenant.store, tenant.name, keep_snapshots=0)


def test_read_between_by_recorded_time(tenant: Tenant, clock: FakeClock) -> None:
    s = tenant.streams
    times = []
    for i in range(20):
        s.append("s", [{"type": "tick", "data": i}])
        times.append(clock.now_us())
        clock.advance(1)
    got = s.read_between("s", times[5], times[9])
    assert [e.data for e in got] == [5, 6, 7, 8]
    assert [e.data for e in s.read_between("s", times[5] + 1, times[9] + 1)] == [6, 7, 8, 9]
    assert [e.data for e in s.read_between("s", to_time=times[2])] == [0, 1]
    assert [e.data for e in s.read_between("s", times[18])] == [18, 19]
    assert s.read_between("s", times[19] + 10) == []
    assert len(s.read_between("s")) == 20
    with pytest.raises(InvalidArgument):
        s.read_between("s", times[5], times[4])
    with pytest.raises(InvalidArgument):
        s.read_between("s", -1)


# ---------------------------------------------------------------- snapshots


def test_snapshot_is_written_in_the_same_commit_as_the_crossing_event(tenant: Tenant) -> None:
    s = _streams(tenant, every=10, keep=3)
    for _ in range(9):
        assert s.append("s", [{"type": "add", "data": 1}], projection=SUM).snapshot_seq is None
    r = s.append("s", [{"type": "add", "data": 1}], projection=SUM)
    assert r.snapshot_seq == 10
    item = tenant.get(SNAPSHOT_NAMESPACE, "s/default/" + "0" * 18 + "10")
    assert item is not None
    assert item.value["state"] == 10
    assert item.revision == r.revision == s.read("s", 10, 10)[0].revision


def test_batch_crossing_several_thresholds_snapshots_at_the_last_multiple(tenant: Tenant) -> None:
    s = _streams(tenant, every=10, keep=3)
    s.append("s", [{"type": "add", "data": 1}] * 5, projection=LOG)
    r = s.append("s", [{"type": "add", "data": i} for i in range(30)], projection=LOG)
    assert r.snapshot_seq == 30
    loaded = s.load_state("s", LOG)
    assert loaded.snapshot_seq == 30
    assert loaded.replayed == 5
    assert loaded.state == s.replay("s", LOG)


def test_newest_k_snapshots_are_kept(tenant: Tenant) -> None:
    s = _streams(tenant, every=5, keep=3)
    for _ in range(12):
        s.append("s", [{"type": "add", "data": 2}] * 3, projection=SUM)  # 36 events
    keys = _snapshot_keys(tenant)
    assert [int(k.rsplit("/", 1)[1]) for k in keys] == [25, 30, 35]
    assert s.load_state("s", SUM).snapshot_seq == 35
    assert s.load("s", SUM) == 72


def test_projections_keep_their_own_snapshots(tenant: Tenant) -> None:
    s = _streams(tenant, every=4, keep=2)
    for i in range(10):
        s.append("s", [{"type": "add", "data": i}], projection=SUM if i % 2 else LOG)
    keys = _snapshot_keys(tenant)
    assert keys
    assert all(k.startswith(("s/default/", "s/log/")) for k in keys)
    assert s.load("s", SUM) == sum(range(10))
    assert s.load("s", LOG) == s.replay("s", LOG)
    assert s.check("s", SUM).ok
    assert s.check("s", LOG).ok


def test_stream_names_with_slashes_do_not_share_snapshots(tenant: Tenant) -> None:
    s = _streams(tenant, every=2, keep=2)
    s.append("a", [{"type": "add", "data": 1}] * 2, projection=SUM)
    s.append("a/b", [{"type": "add", "data": 100}] * 2, projection=SUM)
    s.append("a%2Fb", [{"type": "add", "data": 7}] * 2, projection=SUM)
    assert s.load("a", SUM) == 2
    assert s.load("a/b", SUM) == 200
    assert s.load("a%2Fb", SUM) == 14
    assert s.check("a", SUM).snapshots_checked == 1


def test_explicit_snapshot(tenant: Tenant) -> None:
    s = _streams(tenant, every=1000, keep=2)
    s.append("s", [{"type": "add", "data": 3}] * 7)
    assert s.snapshot("s", SUM) == 7
    assert s.snapshot("s", SUM) == 7
    assert s.load_state("s", SUM) == s.load_state("s", SUM)
    assert s.load_state("s", SUM).snapshot_seq == 7
    s.append("s", [{"type": "add", "data": 1}])
    s.snapshot("s", SUM)
    s.append("s", [{"type": "add", "data": 1}])
    s.snapshot("s", SUM)
    assert len(_snapshot_keys(tenant)) == 2
    assert s.check("s", SUM).ok


def test_reducer_that_raises_writes_nothing(tenant: Tenant) -> None:
    def picky(state: int, e: Event) -> int:
        if e.data == "bad":
            raise ValueError("cannot add 'bad'")
        return state + 1

    proj = Projection(0, picky)
    s = _streams(tenant, every=5)
    s.append("s", [{"type": "add", "data": 1}] * 3, projection=proj)
    before = tenant.revision()
    with pytest.raises(InvalidArgument) as ei:
        s.append("s", [{"type": "add", "data": 1}, {"type": "add", "data": "bad"}], projection=proj)
    assert ei.value.field == "reducer"
    assert "ValueError" in str(ei.value)
    assert ei.value.details["seq"] == 5
    assert tenant.revision() == before
    assert s.info("s").last_seq == 3
    assert _snapshot_keys(tenant) == []
    s.append("s", [{"type": "add", "data": "bad"}])  # without a projection the event is just data
    with pytest.raises(InvalidArgument):
        s.load("s", proj)
    with pytest.raises(InvalidArgument):
        s.state_at("s", proj, seq=4)


def test_state_that_is_not_json_writes_nothing(tenant: Tenant) -> None:
    proj = Projection(0, lambda state, e: {1, 2})
    s = _streams(tenant, every=2)
    before = tenant.revision()
    with pytest.raises(InvalidArgument):
        s.append("s", [{"type": "a"}] * 2, projection=proj)
    assert tenant.revision() == before
    assert not s.exists("s")


def test_failed_snapshot_commit_leaves_neither_events_nor_snapshot(backend: Any, clock: FakeClock) -> None:
    # a snapshot over the store's value limit makes the whole commit fail: the events must not land either
    store = backend.open(max_value_bytes=2000)
    t = Database(store).tenant("acme")
    s = Streams(store, t.name, snapshot_every=10, keep_snapshots=2)
    big = [{"type": "add", "data": "x" * 250}]
    s.append("s", big * 9, projection=LOG)
    before = t.revision()
    with pytest.raises(PayloadTooLarge):
        s.append("s", big, projection=LOG)
    assert t.revision() == before
    assert s.info("s").last_seq == 9
    assert [i.key for i in t.scan(SNAPSHOT_NAMESPACE)] == []


def test_concurrent_appends_with_a_projection_keep_snapshots_consistent(backend: Any, tenant: Tenant) -> None:
    stores = [backend.open() for _ in range(4)] if backend.kind != "memory" else [backend.open()] * 4
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        s = Streams(stores[i], tenant.name, snapshot_every=7, keep_snapshots=3)
        barrier.wait()
        try:
            for _ in range(10):
                s.append("s", [{"type": "add", "data": 1}, {"type": "add", "data": i}], projection=SUM)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    s = _streams(tenant, every=7)
    assert s.info("s").last_seq == 80
    assert s.load("s", SUM) == 40 + 10 * sum(range(4)) == s.replay("s", SUM)
    report = s.check("s", SUM)
    assert report.ok, report.issues
    assert report.snapshots_checked == 3


# ---------------------------------------------------------------- load, state_at (property-based)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.lists(st.integers(-50, 50), min_size=1, max_size=9), min_size=1, max_size=10),
    every=st.integers(1, 12),
    keep=st.integers(1, 4),
    probes=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
)
def test_load_via_snapshots_equals_full_replay(
    tenant: Tenant, batches: list[list[int]], every: int, keep: int, probes: list[int]
) -> None:
    s = Streams(tenant.store, tenant.name, snapshot_every=every, keep_snapshots=keep)
    name = f"h/{time.perf_counter_ns()}"
    for batch in batches:
        s.append(name, [{"type": "n", "data": v} for v in batch], projection=LOG)
    events = s.read(name)
    last = len(events)
    assert s.load(name, LOG) == s.replay(name, LOG) == _fold(LOG, events)
    assert s.load_state(name, LOG).replayed < every + max(len(b) for b in batches)
    for p in probes:
        seq = p % (last + 1)
        assert s.state_at(name, LOG, seq=seq) == _fold(LOG, events[:seq])
    assert s.check(name, LOG).ok


def test_state_at_equals_the_state_after_exactly_that_many_events(tenant: Tenant, clock: FakeClock) -> None:
    s = _streams(tenant, every=10, keep=10)
    times = []
    for i in range(1, 46):
        s.append("s", [{"type": "add", "data": i}], projection=SUM)
        times.append(clock.now_us())
        clock.advance(2)
    for seq in (0, 1, 9, 10, 11, 29, 30, 31, 45):
        assert s.state_at("s", SUM, seq=seq) == sum(range(1, seq + 1))
    assert s.state_at("s", SUM, time=times[0] - 1) == 0
    assert s.state_at("s", SUM, time=times[0]) == 1
    assert s.state_at("s", SUM, time=times[19] + 1) == sum(range(1, 21))
    assert s.state_at("s", SUM, time=times[-1] + 1000) == sum(range(1, 46))


# ---------------------------------------------------------------- export, cleanup, check


def test_export_json_lines(tenant: Tenant, tmp_path: Path) -> None:
    s = tenant.streams
    s.append("s", [{"type": "a", "data": {"x": 1}}, {"type": "b", "data": [1, "é"], "meta": {"m": True}}])
    path = tmp_path / "s.jsonl"
    assert s.export("s", path) == 2
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [(r["stream"], r["seq"], r["type"], r["data"]) for r in lines] == [
        ("s", 1, "a", {"x": 1}),
        ("s", 2, "b", [1, "é"]),
    ]
    assert lines[1]["meta"] == {"m": True}
    assert lines[0]["revision"] > 0
    assert lines[0]["recorded_at"] > 0
    text = io.StringIO()
    assert s.export("s", text) == 2
    assert text.getvalue().encode() == path.read_bytes()
    raw = io.BytesIO()
    assert s.export("s", raw, from_seq=2) == 1
    assert orjson.loads(raw.getvalue())["seq"] == 2
    with pytest.raises(InvalidArgument):
        s.export("s", 42)  # type: ignore[arg-type]


def test_cleanup_removes_only_events_a_kept_snapshot_covers(tenant: Tenant, clock: FakeClock) -> None:
    s = _streams(tenant, every=10, keep=2)
    s.append("plain", [{"type": "add", "data": 1}] * 5)
    assert s.cleanup("plain", clock.now_us() + 1) == 0  # no snapshot covers anything
    for i in range(1, 46):
        s.append("s", [{"type": "add", "data": i}], projection=SUM)
        clock.advance(1)
    assert [int(k.rsplit("/", 1)[1]) for k in _snapshot_keys(tenant)] == [30, 40]
    cut_at_20 = s.read("s", 21, 21)[0].recorded_at
    assert s.cleanup("s", cut_at_20) == 20  # older than the time, and covered
    assert s.info("s").first_seq == 21
    assert s.cleanup("s", clock.now_us() + 1) == 10  # never past the oldest kept snapshot (30)
    assert s.info("s").first_seq == 31
    assert s.cleanup("s", clock.now_us() + 1) == 0
    assert s.load("s", SUM) == sum(range(1, 46))
    for seq in (30, 31, 40, 45):
        assert s.state_at("s", SUM, seq=seq) == sum(range(1, seq + 1))
    with pytest.raises(NotFound):
        s.state_at("s", SUM, seq=29)
    with pytest.raises(NotFound):
        s.read("s", 1, 5)
    assert [e.seq for e in s.read("s")][:1] == [31]
    report = s.check("s", SUM)
    assert report.ok, report.issues
    assert report.snapshots_unverified == 1
    assert report.snapshots_checked == 1
    with pytest.raises(NotFound):
        s.replay("s", SUM)
    with pytest.raises(NotFound):
        s.load("s", LOG)  # a projection without snapshots cannot be rebuilt after cleanup
    assert s.state_at("s", SUM, time=s.read("s", 31, 31)[0].recorded_at - 1) == sum(range(1, 31))
    with pytest.raises(InvalidArgument):
        s.cleanup("s", "yesterday")  # type: ignore[arg-type]


def test_check_reports_a_snapshot_that_disagrees_with_a_replay(tenant: Tenant) -> None:
    s = _streams(tenant, every=5, keep=5)
    s.append("s", [{"type": "add", "data": 1}] * 12, projection=SUM)
    s.append("s", [{"type": "add", "data": 1}] * 3, projection=SUM)
    good = s.check("s", SUM)
    assert good.ok
    assert (good.events, good.first_seq, good.last_seq) == (15, 1, 15)
    assert good.snapshots_checked == 2
    key = "s/default/" + "0" * 18 + "10"
    tenant.commit([], [Put(SNAPSHOT_NAMESPACE, key, {"stream": "s", "projection": "default", "seq": 10, "state": 99})])
    bad = s.check("s", SUM)
    assert not bad.ok
    assert [(i.kind, i.seq) for i in bad.issues] == [("snapshot_mismatch", 10)]
    # a snapshot without its event is reported too
    ghost = "s/default/" + "0" * 18 + "99"
    tenant.commit([], [Put(SNAPSHOT_NAMESPACE, ghost, {"stream": "s", "projection": "default", "seq": 99, "state": 1})])
    kinds = {i.kind for i in s.check("s", SUM).issues}
    assert kinds == {"snapshot_mismatch", "snapshot_beyond_stream"}
    assert s.check("s").snapshots_unverified == 3


def test_killed_appender_never_leaves_a_snapshot_without_its_event(process_backend: Any) -> None:
    backend = process_backend
    script = textwrap.dedent(
        """
        import sys
        from stateline import open_store
        from stateline.streams import Projection, Streams

        def log(state, e):
            state.append(e.data)
            return state

        store = open_store(sys.argv[1])
        s = Streams(store, "acme", snapshot_every=3, keep_snapshots=2)
        proj = Projection([], log, name="log")
        i = 0
        while True:
            s.append("crash", [{"type": "n", "data": i}, {"type": "n", "data": i + 1}], projection=proj)
            i += 2
            if i == 20:
                print("ready", flush=True)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, backend.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line.strip() != b"ready":
                child.kill()
                _, err = child.communicate()
                pytest.fail(f"the child did not get going: {err.decode(errors='replace')}")
            time.sleep(0.2)  # let it append more, then kill it mid-flight
        finally:
            child.kill()
            child.communicate()
    store = backend.open()
    s = Streams(store, "acme", snapshot_every=3, keep_snapshots=2)
    proj = Projection([], lambda state, e: [*state, e.data], name="log")
    info = s.info("crash")
    assert info.last_seq >= 20
    snaps = [int(i.key.rsplit("/", 1)[1]) for i in store.scan("acme", SNAPSHOT_NAMESPACE, "crash/")]
    assert snaps
    assert all(seq <= info.last_seq for seq in snaps)
    report = s.check("crash", proj)
    assert report.ok, report.issues
    assert s.load("crash", proj) == list(range(info.last_seq))


def test_check_reports_gaps_and_revisions_going_backwards(tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Store port never loses an event, so a damaged stream is shown to ``check`` by filtering what it reads.
    s = _streams(tenant)
    for i in range(8):
        s.append("s", [{"type": "add", "data": i}])
    real = tenant.store.read_stream

    def damaged(*args: Any, **kwargs: Any) -> list[Event]:
        out = []
        for e in real(*args, **kwargs):
            if e.seq == 5:
                continue  # a lost event
            if e.seq == 7:  # an older revision
                out.append(Event(e.stream, e.seq, e.type, e.data, e.meta, 1, e.recorded_at))
            else:
                out.append(e)
        return out

    monkeypatch.setattr(tenant.store, "read_stream", damaged)
    report = s.check("s")
    assert not report.ok
    assert [(i.kind, i.seq) for i in report.issues] == [("gap", 6), ("revision_not_monotonic", 7)]
    assert report.events == 7


def test_list_and_info_of_streams(tenant: Tenant) -> None:
    s = tenant.streams
    for name in ("b", "a/1", "a/2", "a/3"):
        s.append(name, [{"type": "x"}])
    page = s.list("a/", limit=2)
    assert [i.stream for i in page] == ["a/1", "a/2"]
    assert [i.stream for i in s.list("a/", after=page[-1].stream)] == ["a/3"]
    assert [i.stream for i in s.list()] == ["a/1", "a/2", "a/3", "b"]
    info = s.info("b")
    assert (info.stream, info.first_seq, info.last_seq) == ("b", 1, 1)
    with pytest.raises(InvalidArgument):
        s.list(limit=0)


def test_cleanup_for_one_projection_respects_only_its_snapshots(tenant: Tenant, clock: FakeClock) -> None:
    s = _streams(tenant, every=5, keep=1)
    s.append("s", [{"type": "add", "data": 1}] * 5, projection=LOG)  # LOG keeps its snapshot at 5
    s.append("s", [{"type": "add", "data": 1}] * 10, projection=SUM)  # SUM keeps its snapshot at 15
    clock.advance(1)
    assert s.cleanup("s", clock.now_us()) == 5  # the oldest kept snapshot of any projection is at 5
    assert s.load("s", LOG) == s.state_at("s", LOG, seq=15)
    assert s.cleanup("s", clock.now_us(), projection=SUM) == 10  # only SUM's snapshot counts now
    assert s.load("s", SUM) == 15
    with pytest.raises(NotFound):
        s.load("s", LOG)
    assert [i.kind for i in s.check("s", LOG).issues] == ["history_missing"]
    with pytest.raises(InvalidArgument):
        s.cleanup("s", clock.now_us(), projection=3)  # type: ignore[arg-type]


def test_reducer_sees_pending_events_as_a_replay_does(tenant: Tenant) -> None:
    def kinds(state: list[str], e: Event) -> list[str]:
        state.append(type(e.data).__name__)
        return state

    proj = Projection([], kinds, name="kinds")
    s = _streams(tenant, every=2)
    s.append("s", [NewEvent("t", (1, 2)), NewEvent("t", (3,))], projection=proj)  # tuples are stored as lists
    report = s.check("s", proj)
    assert report.ok, report.issues
    assert s.load("s", proj) == ["list", "list"] == s.replay("s", proj)
