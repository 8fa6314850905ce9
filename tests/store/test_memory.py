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
