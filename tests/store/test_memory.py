"""The memory adapter keeps what it stores at its own size (orjson hands back over-allocated buffers)."""

from __future__ import annotations

import gc
import tracemalloc

from stateline import Append, NewEvent, Put, open_store

N = 2000


def _growth_per_commit(commit: object) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(N):
            commit(i)  # type: ignore[operator]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / N


def test_small_values_cost_about_their_size() -> None:
    store = open_store("memory://")
    per = _growth_per_commit(lambda i: store.commit("t", ops=[Put("ns", f"k{i:05d}", {"n": i, "s": "x" * 20})]))
    # a key, a record, a value of ~30 bytes and a change record; an orjson buffer alone would be 4 KB
    assert per < 1500, f"{per:.0f} bytes kept per small put"


def test_events_and_change_records_cost_about_their_size() -> None:
    store = open_store("memory://")
    per = _growth_per_commit(
        lambda i: store.commit(
            "t",
            ops=[Put("ns", "k", {"n": i}), Append("s", [NewEvent("e", {"i": i}), NewEvent("e", {"i": -i})])],
        )
    )
    assert per < 2500, f"{per:.0f} bytes kept per commit of a put and two events"


def test_the_change_feed_it_keeps_is_not_tracked_by_the_garbage_collector() -> None:
    # a feed of plain tuples is left out of every collection; containers the collector must track
    # would make each collection slower as the feed grows. One collection must be enough: a tuple
    # met young is examined once or twice before it reaches the oldest generation, and a tuple of
    # tuples there stays tracked (memory case commits lost a third of their rate over 160k commits)
    store = open_store("memory://")
    store.commit("t", ops=[Put("ns", "k", 0), Append("s", [NewEvent("e", 0)])])
    gc.collect()
    before = len(gc.get_objects())
    for i in range(N):
        store.commit("t", ops=[Put("ns", "k", i)])
        store.commit(
            "t",
            ops=[
                Put("ns", "k", {"n": i}),
                Append("s", [NewEvent("e", {"i": i}), NewEvent("f", {"i": -i})]),
                Append("u", [NewEvent("e", i)]),
            ],
        )
    gc.collect()
    assert (len(gc.get_objects()) - before) / N < 0.1
    assert store.revision("t") == 2 * N + 1
