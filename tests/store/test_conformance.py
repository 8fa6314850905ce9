"""The Store conformance suite: every adapter passes these tests unchanged (see ``BACKENDS`` in conftest)."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from stateline import (
    Absent,
    Append,
    ChangesTrimmed,
    Conflict,
    Delete,
    Exists,
    FakeClock,
    Incr,
    InvalidArgument,
    NewEvent,
    PayloadTooLarge,
    Put,
    Store,
    StreamAt,
    Trim,
    Unavailable,
    VersionIs,
    open_store,
)
from tests.conftest import Backend

T = "acme"
U = "umbrella"

# ------------------------------------------------------------------ basic writes and reads


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(2**63) + 1, 2**63 - 1, 1.5, "", 'héllo "quoted" % _', [], [1, [2, {"a": None}]], {"k": {"n": 1}}],
)
def test_put_get_round_trips_exactly(store: Store, value: Any) -> None:
    store.commit(T, ops=[Put("ns", "k", value)])
    item = store.get(T, "ns", "k")
    assert item is not None
    assert item.value == value
    assert type(item.value) is type(value)


def test_unknown_options_and_a_clock_without_now_us_are_refused(backend: Backend) -> None:
    for options, field in [({"bogus": 1}, "bogus"), ({"clock": 5}, "clock"), ({"clock": object()}, "clock")]:
        with pytest.raises(InvalidArgument) as err:
            open_store(backend.url, **options)
        assert err.value.field == field
    url = backend.url + ("&" if "?" in backend.url else "?") + "bogus=1"
    with pytest.raises(InvalidArgument, match="bogus"):  # in the URL too
        open_store(url)


def test_versions_and_revisions(store: Store, clock: FakeClock) -> None:
    assert store.revision(T) == 0
    c1 = store.commit(T, ops=[Put("ns", "a", 1)])
    clock.advance(1)
    c2 = store.commit(T, ops=[Put("ns", "a", 2), Put("ns", "b", 1)])
    assert (c1.revision, c2.revision) == (1, 2)
    assert c2.versions == {("ns", "a"): 2, ("ns", "b"): 1}
    a = store.get(T, "ns", "a")
    assert a is not None
    assert (a.version, a.revision, a.value) == (2, 2, 2)
    assert a.created_at == c1.committed_at
    assert a.updated_at == c2.committed_at > a.created_at
    assert a.expires_at is None
    assert store.revision(T) == 2


def test_commit_returns_counters_and_seqs(store: Store) -> None:
    c = store.commit(T, ops=[Incr("ns", "n", 5), Incr("ns", "n", -2), Append("s", [NewEvent("x"), NewEvent("y")])])
    assert c.counters == {("ns", "n"): 3}
    assert c.versions[("ns", "n")] == 2
    assert c.seqs == {"s": 2}


def test_get_many_keeps_order_and_reports_missing(store: Store) -> None:
    store.commit(T, ops=[Put("a", "1", "one"), Put("b", "2", "two")])
    items = store.get_many(T, [("b", "2"), ("a", "missing"), ("a", "1")])
    assert [None if i is None else i.value for i in items] == ["two", None, "one"]
    assert store.get_many(T, []) == []


def test_get_many_of_hundreds_of_keys(store: Store, clock: FakeClock) -> None:
    # more keys than adapters read with one statement, with gaps, repeats and an expired key
    store.commit(T, ops=[Put("ns", f"k{i:03d}", i) for i in range(0, 250, 2)])
    store.commit(T, ops=[Put("ns", "short", "lived", ttl=1)])
    clock.advance(2)
    keys = [("ns", f"k{i:03d}") for i in range(250)] + [("ns", "k004"), ("ns", "short"), ("other", "k000")]
    items = store.get_many(T, keys)
    assert [None if i is None else i.value for i in items] == [i if i % 2 == 0 else None for i in range(250)] + [
        4,
        None,
        None,
    ]
    assert all(i is None or (i.namespace, i.key) == k for i, k in zip(items, keys, strict=True))


def test_delete_then_recreate_starts_at_version_one(store: Store) -> None:
    store.commit(T, ops=[Put("ns", "k", 1)])
    store.commit(T, ops=[Put("ns", "k", 2)])
    c = store.commit(T, ops=[Delete("ns", "k")])
    assert c.versions == {("ns", "k"): 0}
    assert store.get(T, "ns", "k") is None
    store.commit(T, ops=[Delete("ns", "never-there")])  # deleting an absent key is allowed
    c = store.commit(T, ops=[Put("ns", "k", 3)])
    assert c.versions == {("ns", "k"): 1}


def test_ops_in_one_commit_apply_in_order(store: Store) -> None:
    c = store.commit(T, ops=[Put("ns", "k", 1), Put("ns", "k", 2), Delete("ns", "k"), Incr("ns", "k", 7)])
    item = store.get(T, "ns", "k")
    assert item is not None
    assert (item.value, item.version) == (7, 1)
    assert c.versions[("ns", "k")] == 1


# ------------------------------------------------------------------ checks


def test_version_check_passes_and_fails(store: Store) -> None:
    store.commit(T, ops=[Put("ns", "k", "v1")])
    store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", "v2")])
    with pytest.raises(Conflict) as exc:
        store.commit(T, checks=[VersionIs("ns", "k", 1)], ops=[Put("ns", "k", "v3")])
    assert len(exc.value.failures) == 1
    assert exc.value.failures[0].found == 2
    assert exc.value.details["failures"][0] == {
        "check": "version_is", "namespace": "ns", "key": "k", "expected": 1, "found": 2,
    }  # fmt: skip
    with pytest.raises(Conflict) as exc:
        store.commit(T, checks=[VersionIs("ns", "absent", 1)], ops=[Put("ns", "x", 1)])
    assert exc.value.failures[0].found is None


def test_absent_and_exists_checks(store: Store) -> None:
    store.commit(T, checks=[Absent("ns", "k")], ops=[Put("ns", "k", 1)])
    with pytest.raises(Conflict) as exc:
        store.commit(T, checks=[Absent("ns", "k")], ops=[Put("ns", "k", 2)])
    assert exc.value.failures[0].found == 1
    store.commit(T, checks=[Exists("ns", "k")], ops=[Put("ns", "k", 2)])
    with pytest.raises(Conflict) as exc:
        store.commit(T, checks=[Exists("ns", "nope")], ops=[Put("ns", "k", 3)])
    assert exc.value.failures[0].found is None
    item = store.get(T, "ns", "k")
    assert item is not None
    assert item.value == 2


def test_stream_at_check(store: Store) -> None:
    store.commit(T, checks=[StreamAt("s", 0)], ops=[Append("s", [NewEvent("a")])])
    store.commit(T, checks=[StreamAt("s", 1)], ops=[Append("s", [NewEvent("b"), NewEvent("c")])])
    with pytest.raises(Conflict) as exc:
        store.commit(T, checks=[StreamAt("s", 1)], ops=[Append("s", [NewEvent("d")])])
    assert exc.value.failures[0].found == 3
    assert [e.type for e in store.read_stream(T, "s")] == ["a", "b", "c"]


def test_atomicity_one_failing_check_writes_nothing_and_lists_every_failure(store: Store) -> None:
    store.commit(T, ops=[Put("ns", "a", 1), Put("ns", "b", 1), Append("s", [NewEvent("e")])])
    before = store.revision(T)
    changes_before = store.changes(T)
    with pytest.raises(Conflict) as exc:
        store.commit(
            T,
            checks=[VersionIs("ns", "a", 1), VersionIs("ns", "b", 9), Absent("ns", "a"), StreamAt("s", 0)],
            ops=[
                Put("ns", "a", 2),
                Delete("ns", "b"),
                Put("ns", "c", 1),
                Incr("ns", "n"),
                Append("s", [NewEvent("x")]),
            ],
        )
    found = [(type(f.check).__name__, f.found) for f in exc.value.failures]
    assert found == [("VersionIs", 1), ("Absent", 1), ("StreamAt", 1)]
    assert store.revision(T) == before
    assert store.changes(T) == changes_before
    a, b, c, n = store.get_many(T, [("ns", "a"), ("ns", "b"), ("ns", "c"), ("ns", "n")])
    assert a is not None
    assert b is not None
    assert (a.value, a.version, b.value, c, n) == (1, 1, 1, None, None)
    assert store.stream_info(T, "s").last_seq == 1


def test_incr_on_non_integer_writes_nothing(store: Store) -> None:
    store.commit(T, ops=[Put("ns", "text", "abc"), Put("ns", "float", 1.5), Put("ns", "bool", True)])
    before = store.revision(T)
    for key in ("text", "float", "bool"):
        with pytest.raises(InvalidArgument):
            store.commit(T, ops=[Put("ns", "side", 1), Incr("ns", key, 1)])
    assert store.revision(T) == before
    assert store.get(T, "ns", "side") is None


def test_incr_overflow_is_refused(store: Store) -> None:
    store.commit(T, ops=[Incr("ns", "n", 2**63 - 2)])
    with pytest.raises(InvalidArgument):
        store.commit(T, ops=[Incr("ns", "n", 5)])
    item = store.get(T, "ns", "n")
    assert item is not None
    assert item.value == 2**63 - 2


# ------------------------------------------------------------------ tenants


def test_tenant_isolation(store: Store) -> None:
    store.commit(T, ops=[Put("ns", "k", "acme"), Append("s", [NewEvent("a")])])
    store.commit(U, ops=[Put("ns", "k", "umbrella")])
    store.commit(U, ops=[Put("ns", "k2", "only-umbrella"), Append("s", [NewEvent("u1"), NewEvent("u2")])])
    t_item, u_item = store.get(T, "ns", "k"), store.get(U, "ns", "k")
    assert t_item is not None
    assert u_item is not None
    assert (t_item.value, t_item.version, u_item.value, u_item.version) == ("acme", 1, "umbrella", 1)
    assert store.get(T, "ns", "k2") is None
    assert [i.key for i in store.scan(T, "ns")] == ["k"]
    assert [e.type for e in store.read_stream(T, "s")] == ["a"]
    assert store.stream_info(T, "s").last_seq == 1
    assert [c.revision for c in store.changes(T)] == [1]
    assert [c.revision for c in store.changes(U)] == [1, 2]
    assert all(c.tenant == U for c in store.changes(U))
    assert store.revision(T) == 1
    assert store.revision(U) == 2
    assert store.get_many(T, [("ns", "k2")]) == [None]
    assert store.tenants() == [T, U]
    assert store.tenants(after=T) == [U]
    # a check in one tenant never sees the other's keys
    store.commit(T, checks=[Absent("ns", "k2")], ops=[Put("ns", "k2", "acme too")])


# ------------------------------------------------------------------ TTL


def test_ttl_expiry_is_immediate_for_every_read(store: Store, clock: FakeClock) -> None:
    c = store.commit(T, ops=[Put("ns", "k", "v", ttl=10), Put("ns", "keep", 1)])
    item = store.get(T, "ns", "k")
    assert item is not None
    assert item.expires_at == c.committed_at + 10_000_000
    clock.advance(9.999)
    assert store.get(T, "ns", "k") is not None
    clock.advance(0.001)
    assert store.get(T, "ns", "k") is None
    assert store.get_many(T, [("ns", "k")]) == [None]
    assert [i.key for i in store.scan(T, "ns")] == ["keep"]
    assert store.stats(T).namespaces["ns"].items == 1
    with pytest.raises(Conflict):
        store.commit(T, checks=[Exists("ns", "k")], ops=[Put("ns", "x", 1)])
    store.commit(T, checks=[Absent("ns", "k")], ops=[Put("ns", "k", "again")])
    again = store.get(T, "ns", "k")
    assert again is not None
    assert (again.version, again.expires_at) == (1, None)


def test_several_checks_in_one_commit_see_expiry_and_repeats(store: Store, clock: FakeClock) -> None:
    store.commit(T, ops=[Put("ns", "a", 1, ttl=1), Put("ns", "b", 1), Put("other", "a", 1)])
    clock.advance(1)  # ns/a has expired: it counts as absent for every check
    store.commit(T, checks=[Absent("ns", "a"), VersionIs("ns", "b", 1), Exists("other", "a")], ops=[Put("ns", "c", 1)])
    with pytest.raises(Conflict) as exc:
        store.commit(
            T,
            checks=[Exists("ns", "a"), VersionIs("ns", "b", 1), VersionIs("ns", "a", 1), Absent("other", "a")],
            ops=[Put("ns", "c", 2)],
        )
    found = [(type(f.check).__name__, f.check.namespace, f.found) for f in exc.value.failures]  # type: ignore[union-attr]
    assert found == [("Exists", "ns", None), ("VersionIs", "ns", None), ("Absent", "other", 1)]
    assert store.get(T, "ns", "c").version == 1  # type: ignore[union-attr]


def test_several_puts_in_one_commit_version_each_key(store: Store, clock: FakeClock) -> None:
    first = store.commit(T, ops=[Put("ns", "a", 1, ttl=1), Put("ns", "b", 1), Put("ns", "d", 1)])
    clock.advance(1)  # ns/a has expired: writing it again starts it over
    c = store.commit(T, ops=[Put("ns", "a", 2), Put("ns", "b", 2, ttl=5), Delete("ns", "d"), Put("ns", "c", 2)])
    assert c.versions == {("ns", "a"): 1, ("ns", "b"): 2, ("ns", "c"): 1, ("ns", "d"): 0}
    a, b, cc = store.get_many(T, [("ns", "a"), ("ns", "b"), ("ns", "c")])
    assert a is not None
    assert b is not None
    assert cc is not None
    assert (a.version, a.created_at, a.expires_at) == (1, c.committed_at, None)
    assert (b.version, b.created_at, b.expires_at) == (2, first.committed_at, c.committed_at + 5_000_000)
    assert (cc.value, cc.revision, b.revision, b.updated_at) == (2, c.revision, c.revision, c.committed_at)
    assert store.get(T, "ns", "d") is None
    ops = store.changes(T, after_revision=first.revision)[0].ops
    expected = [("put", "a", 1), ("put", "b", 2), ("delete", "d", 1), ("put", "c", 1)]
    assert [(o.op, o.key, o.version) for o in ops] == expected


def test_sweep_removes_expired_items(store: Store, clock: FakeClock) -> None:
    store.commit(T, ops=[Put("ns", f"k{i}", i, ttl=1) for i in range(5)] + [Put("ns", "stay", 1)])
    assert store.sweep() == 0
    clock.advance(2)
    assert store.sweep() == 5
    assert store.sweep() == 0
    assert [i.key for i in store.scan(T, "ns")] == ["stay"]
    revision = store.revision(T)
    assert revision == 1  # sweeping is not a commit


def test_sweep_follows_later_writes(store: Store, clock: FakeClock) -> None:
    first = [Put("ns", k, 1, ttl=1) for k in ("longer", "forever", "gone", "batch1", "batch2", "batch3")]
    store.commit(T, ops=[*first, Put("ns", "shorter", 1, ttl=10), Incr("ns", "n", 1, ttl=1)])
    store.commit(
        T,
        ops=[
            Put("ns", "longer", 2, ttl=5),
            Put("ns", "shorter", 2, ttl=2),
            Put("ns", "forever", 2),
            Delete("ns", "gone"),
            Incr("ns", "n", 1),  # keeps its expiry
        ],
    )
    clock.advance(3)  # expired: shorter, n and the three batch items; longer lives until 5 s
    assert store.sweep(limit=2) == 2
    assert store.sweep(limit=2) == 2
    assert store.sweep() == 1
    assert store.sweep() == 0
    assert [i.key for i in store.scan(T, "ns")] == ["forever", "longer"]
    clock.advance(3)
    assert store.sweep() == 1
    assert [i.key for i in store.scan(T, "ns")] == ["forever"]
    store.commit(T, ops=[Put("ns", "again", 1, ttl=1)])
    clock.advance(2)
    assert store.sweep() == 1
    assert store.get(T, "ns", "forever") is not None
    assert store.revision(T) == 3


def test_trimming_the_change_feed_never_lets_a_reader_skip(store: Store) -> None:
    for i in range(10):
        store.commit(T, ops=[Put("ns", "k", i)])
    assert store.first_change(T) == 1
    assert store.trim_changes(T, 4) == 3  # revisions 1 to 3
    assert store.first_change(T) == 4
    assert [c.revision for c in store.changes(T, 3)] == list(range(4, 11))
    with pytest.raises(ChangesTrimmed) as err:
        store.changes(T, 2)
    assert err.value.details == {"tenant": T, "after_revision": 2, "first_available": 4}
    with pytest.raises(ChangesTrimmed):
        store.changes(T)
    with pytest.raises(ChangesTrimmed):
        store.watch(T, 0, timeout=5)
    assert store.trim_changes(T, 8, limit=2) == 2  # the oldest first: 4 and 5
    assert store.first_change(T) == 6
    assert store.trim_changes(T, 3) == 0
    assert store.trim_changes(T, 1000) == 5  # 6 to 10: never past the last revision
    assert store.first_change(T) == 11
    assert store.changes(T, 10) == []
    assert store.watch(T, 10, timeout=0) == []
    with pytest.raises(ChangesTrimmed):
        store.changes(T, 9)
    item = store.get(T, "ns", "k")
    assert item is not None
    assert (store.revision(T), item.value) == (10, 9)  # data and revision untouched
    assert store.commit(T, ops=[Put("ns", "k", 10)]).revision == 11
    assert [c.revision for c in store.changes(T, 10)] == [11]
    assert store.first_change(T) == 11
    store.commit("other", ops=[Put("ns", "k", 1)])
    assert [c.revision for c in store.changes("other")] == [1]
    assert (store.first_change("other"), store.first_change("never"), store.trim_changes("never", 5)) == (1, 1, 0)


def test_a_watcher_behind_the_trimmed_feed_is_told_and_one_after_it_is_woken(store: Store) -> None:
    for i in range(3):
        store.commit(T, ops=[Put("ns", "k", i)])
    store.trim_changes(T, 4)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(store.watch(T, 3, timeout=10)))
    waiter.start()
    store.commit(T, ops=[Put("ns", "k", 3)])
    waiter.join(15)
    assert [c.revision for c in got[0]] == [4]


@pytest.mark.parametrize(
    ("args", "field"),
    [((-1,), "before_revision"), (("5",), "before_revision"), ((5, 0), "limit"), ((5, 10_001), "limit")],
)
def test_trim_changes_refuses_bad_arguments(store: Store, args: tuple[Any, ...], field: str) -> None:
    store.commit(T, ops=[Put("ns", "k", 1)])
    with pytest.raises(InvalidArgument) as err:
        store.trim_changes(T, *args)
    assert err.value.field == field
    with pytest.raises(InvalidArgument):
        store.trim_changes("bad tenant!", 5)
    assert store.first_change(T) == 1


def test_incr_ttl_applies_only_on_create(store: Store, clock: FakeClock) -> None:
    c1 = store.commit(T, ops=[Incr("ns", "n", 1, ttl=10)])
    clock.advance(5)
    store.commit(T, ops=[Incr("ns", "n", 1, ttl=10)])
    item = store.get(T, "ns", "n")
    assert item is not None
    assert (item.value, item.expires_at) == (2, c1.committed_at + 10_000_000)
    clock.advance(5)
    assert store.get(T, "ns", "n") is None
    c3 = store.commit(T, ops=[Incr("ns", "n", 1, ttl=10)])
    assert c3.counters[("ns", "n")] == 1
    assert c3.versions[("ns", "n")] == 1


def test_put_without_ttl_clears_expiry(store: Store, clock: FakeClock) -> None:
    store.commit(T, ops=[Put("ns", "k", 1, ttl=5)])
    store.commit(T, ops=[Put("ns", "k", 2)])
    clock.advance(10)
    item = store.get(T, "ns", "k")
    assert item is not None
    assert (item.value, item.version) == (2, 2)


# ------------------------------------------------------------------ scan


def test_scan_order_prefix_and_paging(store: Store) -> None:
    keys = ["b", "a", "ab", "a/1", "a/2", "a/10", "é", "z", "Z", "a\u00ff", "a\U0001f600"]
    store.commit(T, ops=[Put("ns", k, k) for k in keys] + [Put("other", "a", 0)])
    assert [i.key for i in store.scan(T, "ns", limit=100)] == sorted(keys)
    assert [i.key for i in store.scan(T, "ns", prefix="a/")] == ["a/1", "a/10", "a/2"]
    assert [i.key for i in store.scan(T, "ns", prefix="a")] == sorted(k for k in keys if k.startswith("a"))
    page1 = store.scan(T, "ns", limit=4)
    page2 = store.scan(T, "ns", after=page1[-1].key, limit=4)
    page3 = store.scan(T, "ns", after=page2[-1].key, limit=4)
    assert [i.key for i in page1 + page2 + page3] == sorted(keys)
    assert [i.key for i in store.scan(T, "ns", prefix="a/", after="a/10")] == ["a/2"]
    assert [i.key for i in store.scan(T, "ns", prefix="a/", after="0")] == ["a/1", "a/10", "a/2"]
    assert store.scan(T, "ns", prefix="a/", after="a/2") == []
    assert store.scan(T, "missing") == []


# ------------------------------------------------------------------ streams


def test_stream_seqs_are_contiguous_and_ranges_read(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        clock.advance(1)
        store.commit(T, ops=[Append("s", [NewEvent("t", {"i": i * 2}, {"m": 1}), NewEvent("t", {"i": i * 2 + 1})])])
    events = store.read_stream(T, "s")
    assert [e.seq for e in events] == list(range(1, 11))
    assert [e.data["i"] for e in events] == list(range(10))
    assert events[0].meta == {"m": 1}
    assert events[1].meta == {}
    assert [e.revision for e in events] == [r for r in range(1, 6) for _ in range(2)]
    assert events[2].recorded_at > events[1].recorded_at
    assert [e.seq for e in store.read_stream(T, "s", 3, 6)] == [3, 4, 5, 6]
    assert [e.seq for e in store.read_stream(T, "s", 8)] == [8, 9, 10]
    assert [e.seq for e in store.read_stream(T, "s", 2, limit=3)] == [2, 3, 4]
    assert store.read_stream(T, "s", 11) == []
    assert store.read_stream(T, "nope") == []
    info = store.stream_info(T, "s")
    assert (info.first_seq, info.last_seq) == (1, 10)
    assert store.stream_info(T, "nope").last_seq == 0


def test_two_appends_to_one_stream_in_one_commit(store: Store) -> None:
    c = store.commit(T, ops=[Append("s", [NewEvent("a")]), Append("s", [NewEvent("b")])])
    assert c.seqs == {"s": 2}
    assert [(e.seq, e.type) for e in store.read_stream(T, "s")] == [(1, "a"), (2, "b")]


def test_appends_to_several_streams_in_one_commit(store: Store) -> None:
    store.commit(T, ops=[Append("a", [NewEvent("a1")])])
    c = store.commit(
        T,
        checks=[StreamAt("a", 1)],
        ops=[
            Append("b", [NewEvent("b1"), NewEvent("b2")]),
            Append("a", [NewEvent("a2")]),
            Put("ns", "k", 1),
            Append("b", [NewEvent("b3")]),
            Append("a", [NewEvent("a3"), NewEvent("a4")]),
        ],
    )
    assert c.seqs == {"a": 4, "b": 3}
    assert [(e.seq, e.type) for e in store.read_stream(T, "a")] == [(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4")]
    assert [(e.seq, e.type) for e in store.read_stream(T, "b")] == [(1, "b1"), (2, "b2"), (3, "b3")]
    with pytest.raises(Conflict):  # a refused commit reserves no sequence numbers
        store.commit(T, checks=[StreamAt("a", 3)], ops=[Append("a", [NewEvent("x")]), Append("c", [NewEvent("x")])])
    c = store.commit(T, ops=[Append("a", [NewEvent("a5")]), Append("c", [NewEvent("c1")])])
    assert c.seqs == {"a": 5, "c": 1}
    assert store.stream_info(T, "c").last_seq == 1


def test_trim_keeps_last_seq(store: Store) -> None:
    store.commit(T, ops=[Append("s", [NewEvent("e", i) for i in range(10)])])
    store.commit(T, ops=[Trim("s", 6)])
    assert [e.seq for e in store.read_stream(T, "s")] == [6, 7, 8, 9, 10]
    info = store.stream_info(T, "s")
    assert (info.first_seq, info.last_seq) == (6, 10)
    store.commit(T, ops=[Trim("s", 100)])
    info = store.stream_info(T, "s")
    assert (info.first_seq, info.last_seq) == (11, 10)
    c = store.commit(T, checks=[StreamAt("s", 10)], ops=[Append("s", [NewEvent("next")])])
    assert c.seqs == {"s": 11}
    assert [e.seq for e in store.read_stream(T, "s")] == [11]


def test_list_streams(store: Store) -> None:
    store.commit(T, ops=[Append(name, [NewEvent("e")]) for name in ["runs:2", "runs:1", "cases:1"]])
    assert [s.stream for s in store.list_streams(T)] == ["cases:1", "runs:1", "runs:2"]
    assert [s.stream for s in store.list_streams(T, prefix="runs:")] == ["runs:1", "runs:2"]
    assert [s.stream for s in store.list_streams(T, after="runs:1")] == ["runs:2"]
    assert store.list_streams(U) == []


def test_stats(store: Store) -> None:
    store.commit(T, ops=[Put("a", "1", "x"), Put("a", "2", [1, 2]), Put("b", "1", None), Append("s", [NewEvent("e")])])
    store.commit(T, ops=[Append("s2", [NewEvent("e"), NewEvent("e")])])
    stats = store.stats(T)
    assert stats.revision == 2
    assert stats.namespaces["a"].items == 2
    assert stats.namespaces["a"].bytes == len(b'"x"') + len(b"[1,2]")
    assert stats.namespaces["b"].items == 1
    assert (stats.streams, stats.events) == (2, 3)
    assert store.stats(U).revision == 0


# ------------------------------------------------------------------ change feed


def test_change_feed_records_every_commit_in_order(store: Store, clock: FakeClock) -> None:
    store.commit(T, ops=[Put("ns", "k", {"a": 1}, ttl=60)], meta={"actor": "alice", "trace_id": "t1"})
    clock.advance(1)
    store.commit(T, ops=[Incr("ns", "n", 3), Delete("ns", "k"), Append("s", [NewEvent("made", {"x": 1}, {"m": 2})])])
    store.commit(T, ops=[Trim("s", 2)])
    changes = store.changes(T)
    assert [c.revision for c in changes] == [1, 2, 3]
    first = changes[0]
    assert first.meta == {"actor": "alice", "trace_id": "t1"}
    (put,) = first.ops
    assert (put.op, put.namespace, put.key, put.version, put.value) == ("put", "ns", "k", 1, {"a": 1})
    assert put.expires_at == first.committed_at + 60_000_000
    incr, delete, append = changes[1].ops
    assert (incr.op, incr.value, incr.version) == ("incr", 3, 1)
    assert (delete.op, delete.key, delete.version) == ("delete", "k", 1)
    assert append.op == "append"
    assert append.stream == "s"
    (event,) = append.events
    assert (event.seq, event.type, event.data, event.meta, event.revision) == (1, "made", {"x": 1}, {"m": 2}, 2)
    assert changes[1].committed_at > first.committed_at
    assert changes[1].meta == {}
    (trim,) = changes[2].ops
    assert (trim.op, trim.stream, trim.before_seq) == ("trim", "s", 2)
    assert [c.revision for c in store.changes(T, after_revision=1)] == [2, 3]
    assert [c.revision for c in store.changes(T, after_revision=1, limit=1)] == [2]
    assert store.changes(T, after_revision=3) == []


def test_failed_commits_leave_no_change_record(store: Store) -> None:
    store.commit(T, ops=[Put("ns", "k", 1)])
    for _ in range(3):
        with pytest.raises(Conflict):
            store.commit(T, checks=[Absent("ns", "k")], ops=[Put("ns", "k", 2)])
    store.commit(T, ops=[Put("ns", "k", 3)])
    assert [c.revision for c in store.changes(T)] == [1, 2]


def test_watch_wakes_on_commit_and_times_out_empty(store: Store) -> None:
    assert store.watch(T, 0, timeout=0.05) == []
    got: list[list[int]] = []

    def waiter() -> None:
        got.append([c.revision for c in store.watch(T, 0, timeout=20)])

    th = threading.Thread(target=waiter)
    th.start()
    store.commit(T, ops=[Put("ns", "k", 1)])
    th.join(30)
    assert not th.is_alive()
    assert got == [[1]]
    assert [c.revision for c in store.watch(T, 0, timeout=1)] == [1]  # already there: returns at once
    assert store.watch(T, 1, timeout=0.05) == []


def test_watch_ignores_other_tenants(store: Store) -> None:
    got: list[list[str]] = []

    def waiter() -> None:
        got.append([c.tenant for c in store.watch(T, 0, timeout=3)])

    th = threading.Thread(target=waiter)
    th.start()
    store.commit(U, ops=[Put("ns", "k", 1)])
    th.join(30)
    assert got == [[]]


# ------------------------------------------------------------------ bad input


def _bad_commits() -> list[tuple[str, Any, Any, Any]]:
    return [
        ("", [], [Put("ns", "k", 1)], None),
        ("bad tenant", [], [Put("ns", "k", 1)], None),
        ("x" * 65, [], [Put("ns", "k", 1)], None),
        (T, [], [], None),
        (T, [], [Put("", "k", 1)], None),
        (T, [], [Put("n s", "k", 1)], None),
        (T, [], [Put("ns", "", 1)], None),
        (T, [], [Put("ns", "a\x00b", 1)], None),
        (T, [], [Put("ns", "a\nb", 1)], None),
        (T, [], [Put("ns", "k" * 1025, 1)], None),
        (T, [], [Put("ns", "k", {1, 2})], None),
        (T, [], [Put("ns", "k", b"bytes")], None),
        (T, [], [Put("ns", "k", math.nan)], None),
        (T, [], [Put("ns", "k", {"a": math.inf})], None),
        (T, [], [Put("ns", "k", {1: "non-string key"})], None),
        (T, [], [Put("ns", "k", 2**64)], None),
        (T, [], [Put("ns", "k", 1, ttl=-1)], None),
        (T, [], [Put("ns", "k", 1, ttl=0)], None),
        (T, [], [Put("ns", "k", 1, ttl=math.nan)], None),
        (T, [], [Put("ns", "k", 1, ttl=True)], None),
        (T, [], [Incr("ns", "k", 1.5)], None),  # type: ignore[arg-type]
        (T, [], [Append("s", [])], None),
        (T, [], [Append("s", ["not an event"])], None),  # type: ignore[list-item]
        (T, [], [Append("s", [NewEvent("bad type!")])], None),
        (T, [], [Trim("s", 0)], None),
        (T, ["not a check"], [Put("ns", "k", 1)], None),
        (T, [VersionIs("ns", "k", 0)], [Put("ns", "k", 1)], None),
        (T, [StreamAt("s", -1)], [Put("ns", "k", 1)], None),
        (T, [], ["not an op"], None),
        (T, [], [Put("ns", "k", 1)], {"meta": {1, 2}}),
        (T, [], [Put("ns", "k", 1)], "not a mapping"),
    ]


@pytest.mark.parametrize(("tenant", "checks", "ops", "meta"), _bad_commits())
def test_bad_input_is_refused_and_writes_nothing(store: Store, tenant: Any, checks: Any, ops: Any, meta: Any) -> None:
    store.commit(T, ops=[Put("ns", "seed", 1)])
    with pytest.raises(InvalidArgument) as exc:
        store.commit(tenant, checks, [*ops, Put("ns", "after", 1)] if ops else ops, meta)
    assert exc.value.field
    assert store.revision(T) == 1
    assert store.get(T, "ns", "after") is None
    assert len(store.changes(T)) == 1


def test_value_size_limit(backend: Backend) -> None:
    store = backend.open(max_value_bytes=1000)
    store.commit(T, ops=[Put("ns", "ok", "x" * 990)])
    with pytest.raises(PayloadTooLarge):
        store.commit(T, ops=[Put("ns", "big", "x" * 1000)])
    assert store.get(T, "ns", "big") is None
    assert store.revision(T) == 1


def test_bad_read_arguments(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        store.get(T, "ns", "")
    with pytest.raises(InvalidArgument):
        store.scan(T, "ns", limit=0)
    with pytest.raises(InvalidArgument):
        store.scan(T, "ns", limit=10_001)
    with pytest.raises(InvalidArgument):
        store.read_stream(T, "s", from_seq=0)
    with pytest.raises(InvalidArgument):
        store.changes(T, after_revision=-1)
    with pytest.raises(InvalidArgument):
        store.watch(T, 0, timeout=-1)
    with pytest.raises(InvalidArgument):
        store.get_many(T, ["not a pair"])  # type: ignore[list-item]


def test_closed_store_raises_unavailable(backend: Backend) -> None:
    store = backend.open(max_value_bytes=2000)  # a handle of its own, even on memory://
    assert not store.closed
    store.close()
    store.close()
    assert store.closed
    with pytest.raises(Unavailable):
        store.get(T, "ns", "k")
    with pytest.raises(Unavailable):
        store.commit(T, ops=[Put("ns", "k", 1)])


# ------------------------------------------------------------------ concurrency


def _increment_with_retry(store: Store, key: str, times: int) -> int:
    conflicts = 0
    for _ in range(times):
        while True:
            item = store.get(T, "ns", key)
            if item is None:
                checks: list[Any] = [Absent("ns", key)]
                value = 0
            else:
                checks, value = [VersionIs("ns", key, item.version)], item.value
            try:
                store.commit(T, checks=checks, ops=[Put("ns", key, value + 1)])
                break
            except Conflict:
                conflicts += 1
    return conflicts


def test_concurrent_writers_with_retry_end_at_exact_total(backend: Backend) -> None:
    threads, per_thread = 8, 40
    stores = [backend.open() for _ in range(2)]  # two handles on the same data where the adapter allows it
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            _increment_with_retry(stores[i % 2], "counter", per_thread)
        except BaseException as exc:
            errors.append(exc)

    ths = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(120)
    assert errors == []
    item = stores[0].get(T, "ns", "counter")
    assert item is not None
    assert item.value == threads * per_thread
    assert item.version == threads * per_thread
    assert stores[0].revision(T) == threads * per_thread
    revisions = [c.revision for c in stores[1].changes(T, limit=10_000)]
    assert revisions == list(range(1, threads * per_thread + 1))


def test_concurrent_incr_and_appends_lose_nothing(store: Store) -> None:
    def work(i: int) -> None:
        for j in range(25):
            store.commit(T, ops=[Incr("ns", "hits"), Append("log", [NewEvent("hit", {"w": i, "j": j})])])

    ths = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(120)
    item = store.get(T, "ns", "hits")
    assert item is not None
    assert item.value == 200
    events = store.read_stream(T, "log")
    assert [e.seq for e in events] == list(range(1, 201))
    assert sorted((e.data["w"], e.data["j"]) for e in events) == [(i, j) for i in range(8) for j in range(25)]
    assert [e.revision for e in events] == sorted(e.revision for e in events)


# ------------------------------------------------------------------ model-based (Hypothesis)

KEYS = st.sampled_from(["a", "b", "c", "a/1", "é"])
NAMESPACES = st.sampled_from(["n1", "n2"])
TENANTS = st.sampled_from([T, U])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False, width=64),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def test_model_based_random_commits(backend: Backend) -> None:
    store = backend.open()
    clock = backend.clock
    counter = iter(range(10**9))

    class Model(RuleBasedStateMachine):
        """Random commits against the adapter and a plain-dict model; every read is compared."""

        def __init__(self) -> None:
            super().__init__()
            # each example gets fresh tenants so runs do not see each other's data
            run = next(counter)
            self.tenants = {T: f"m{run}-a", U: f"m{run}-b"}
            self.items: dict[tuple[str, str, str], tuple[Any, int, int | None]] = {}
            self.streams: dict[tuple[str, str], list[str]] = {}
            self.revisions = dict.fromkeys(self.tenants.values(), 0)
            self.first = dict.fromkeys(self.tenants.values(), 1)  # first kept change record

        def _live(self, tenant: str, ns: str, key: str) -> tuple[Any, int, int | None] | None:
            rec = self.items.get((tenant, ns, key))
            if rec is None or (rec[2] is not None and rec[2] <= clock.now_us()):
                return None
            return rec

        @rule(
            tenant=TENANTS,
            writes=st.lists(
                st.tuples(st.sampled_from(["put", "delete", "incr", "append"]), NAMESPACES, KEYS, JSON_VALUES,
                          st.sampled_from([None, 1, 5])),
                min_size=1, max_size=4,
            ),
            wanted=st.lists(
                st.tuples(st.sampled_from(["version", "absent", "exists", "stream"]), KEYS), max_size=3
            ),
        )  # fmt: skip
        def commit(self, tenant: str, writes: list[Any], wanted: list[tuple[str, str]]) -> None:
            tn = self.tenants[tenant]
            checks: list[Any] = []
            ok = True
            for check, check_key in wanted:  # several checks, which the adapters may read together
                rec = self._live(tn, "n1", check_key)
                if check == "version":
                    version = rec[1] if rec is not None else 1
                    checks.append(VersionIs("n1", check_key, version))
                    ok = ok and rec is not None
                elif check == "absent":
                    checks.append(Absent("n1", check_key))
                    ok = ok and rec is None
                elif check == "exists":
                    checks.append(Exists("n1", check_key))
                    ok = ok and rec is not None
                else:
                    checks.append(StreamAt("s", len(self.streams.get((tn, "s"), []))))
            ops: list[Any] = []
            staged = dict(self.items)
            new_events: list[str] = []
            now = clock.now_us()
            for kind, ns, key, value, ttl in writes:
                cur = staged.get((tn, ns, key))
                if cur is not None and cur[2] is not None and cur[2] <= now:
                    cur = None
                version = 1 if cur is None else cur[1] + 1
                if kind == "put":
                    ops.append(Put(ns, key, value, ttl=ttl))
                    staged[(tn, ns, key)] = (value, version, None if ttl is None else now + ttl * 1_000_000)
                elif kind == "delete":
                    ops.append(Delete(ns, key))
                    staged.pop((tn, ns, key), None)
                elif kind == "incr":
                    if cur is not None and type(cur[0]) is not int:
                        continue  # the adapter would refuse the whole commit; covered by its own test
                    ops.append(Incr(ns, key, 2, ttl=ttl))
                    exp = (None if ttl is None else now + ttl * 1_000_000) if cur is None else cur[2]
                    staged[(tn, ns, key)] = ((0 if cur is None else cur[0]) + 2, version, exp)
                else:
                    ops.append(Append("s", [NewEvent("e", value)]))
                    new_events.append(orjson_roundtrip(value))
            if not ops:
                return
            if ok:
                c = store.commit(tn, checks, ops)
                self.revisions[tn] += 1
                assert c.revision == self.revisions[tn]
                self.items = staged
                self.streams.setdefault((tn, "s"), []).extend(new_events)
            else:
                with pytest.raises(Conflict):
                    store.commit(tn, checks, ops)

        @rule(seconds=st.sampled_from([0.5, 1, 3]))
        def tick(self, seconds: float) -> None:
            clock.advance(seconds)

        @rule()
        def sweep(self) -> None:
            store.sweep()

        @rule(tenant=TENANTS, back=st.integers(0, 4), limit=st.integers(1, 3))
        def trim(self, tenant: str, back: int, limit: int) -> None:
            tn = self.tenants[tenant]
            before = max(0, self.revisions[tn] + 1 - back)
            removed = max(0, min(before - self.first[tn], limit))
            assert store.trim_changes(tn, before, limit) == removed
            self.first[tn] += removed

        @invariant()
        def reads_match(self) -> None:
            for tn in self.tenants.values():
                assert store.revision(tn) == self.revisions[tn]
                for ns in ("n1", "n2"):
                    expected = sorted(
                        (k, rec[0], rec[1])
                        for (t, n, k), rec in self.items.items()
                        if t == tn and n == ns and self._live(tn, ns, k) is not None
                    )
                    got = [(i.key, i.value, i.version) for i in store.scan(tn, ns, limit=100)]
                    assert got == expected
                    for key in ("a", "é"):
                        item = store.get(tn, ns, key)
                        rec = self._live(tn, ns, key)
                        assert (None if item is None else (item.value, item.version)) == (
                            None if rec is None else (rec[0], rec[1])
                        )
                events = store.read_stream(tn, "s")
                assert [e.data for e in events] == self.streams.get((tn, "s"), [])
                first = self.first[tn]
                assert store.first_change(tn) == first
                kept = store.changes(tn, first - 1, limit=1000)
                assert [c.revision for c in kept] == list(range(first, self.revisions[tn] + 1))
                if first > 1:
                    with pytest.raises(ChangesTrimmed):
                        store.changes(tn, first - 2)

    run_state_machine_as_test(
        Model,
        settings=settings(
            max_examples=20,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


def orjson_roundtrip(value: Any) -> Any:
    import orjson  # noqa: PLC0415 - only this helper needs it

    return orjson.loads(orjson.dumps(value))


def test_object_key_order_is_kept(store: Store) -> None:
    value = {"z": 1, "a": {"y": 2, "b": 3}, "m": [{"k2": 1, "k1": 2}]}
    store.commit(T, ops=[Put("ns", "k", value), Append("s", [NewEvent("e", value, {"z": 1, "a": 2})])])
    item = store.get(T, "ns", "k")
    assert item is not None
    assert list(item.value) == ["z", "a", "m"]
    assert list(item.value["a"]) == ["y", "b"]
    (event,) = store.read_stream(T, "s")
    assert list(event.data) == ["z", "a", "m"]
    assert list(event.meta) == ["z", "a"]
    (change,) = store.changes(T)
    assert list(change.ops[0].value) == ["z", "a", "m"]


def test_a_tenant_whose_commits_all_failed_is_not_listed(store: Store) -> None:
    with pytest.raises(Conflict):
        store.commit(U, checks=[Exists("ns", "k")], ops=[Put("ns", "k", 1)])
    with pytest.raises(InvalidArgument):
        store.commit(U, ops=[Put("ns", "k", "text"), Incr("ns", "k")])
    assert store.tenants() == []
    assert store.tenant_revisions() == []
    assert store.revision(U) == 0
    store.commit(T, ops=[Put("ns", "k", 1)])
    assert store.tenants() == [T]
    assert store.all_revisions() == {T: 1}


def test_tenant_revisions_pages_tenants_with_their_last_revision(store: Store) -> None:
    names = [f"t{i:04d}" for i in range(1203)]  # over one page of all_revisions
    for i, name in enumerate(names):
        store.commit(name, ops=[Put("ns", "k", i)])
    for i in range(0, 1203, 100):
        store.commit(names[i], ops=[Append("s", [NewEvent("e")])])
    store.trim_changes(names[0], 2)  # a trimmed feed keeps its revision
    expected = {name: 2 if i % 100 == 0 else 1 for i, name in enumerate(names)}
    assert store.all_revisions() == expected
    assert list(store.all_revisions()) == names == store.all_tenants()
    assert store.tenant_revisions(limit=3) == [(n, expected[n]) for n in names[:3]]
    assert store.tenant_revisions(after="t0099", limit=2) == [("t0100", 2), ("t0101", 1)]
    assert store.tenant_revisions(after=names[-1]) == []
    assert store.tenants(after="t0099", limit=2) == ["t0100", "t0101"]
    assert all(store.revision(n) == r for n, r in store.tenant_revisions(after="t0595", limit=10))
    for bad in ({"limit": 0}, {"limit": "3"}, {"after": ""}, {"after": 7}):
        with pytest.raises(InvalidArgument):
            store.tenant_revisions(**bad)  # type: ignore[arg-type]


def test_trim_then_append_in_one_commit_applies_in_order(store: Store) -> None:
    store.commit(T, ops=[Append("s", [NewEvent("e", i) for i in range(5)])])
    c = store.commit(T, ops=[Trim("s", 6), Append("s", [NewEvent("new")])])
    assert c.seqs == {"s": 6}
    assert [(e.seq, e.type) for e in store.read_stream(T, "s")] == [(6, "new")]
    c = store.commit(T, ops=[Append("s", [NewEvent("x"), NewEvent("y")]), Trim("s", 8)])
    assert [(e.seq, e.type) for e in store.read_stream(T, "s")] == [(8, "y")]
    info = store.stream_info(T, "s")
    assert (info.first_seq, info.last_seq) == (8, 8)
