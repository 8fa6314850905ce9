"""In-process subscriptions: predicate filters, refused arguments, and a store whose watch fails for a while."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

import stateline
from stateline import InvalidArgument, Put
from stateline.bus.subscribe import Subscription
from stateline.store.memory import MemoryStore
from stateline.types import Change
from tests.conftest import FlakyWatchStore


def test_a_predicate_filter_picks_the_changes() -> None:
    db = stateline.Database(MemoryStore())
    got: list[int] = []
    done = threading.Event()

    def callback(change: Change) -> None:
        got.append(change.revision)
        if change.revision == 6:
            done.set()

    even = db.subscribe("acme", lambda c: c.revision % 2 == 0, callback, after=0)
    try:
        for i in range(6):
            db.store.commit("acme", ops=[Put("kv", "k", i)])
        assert done.wait(10)
    finally:
        even.close()
    assert got == [2, 4, 6]
    assert even.delivered == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"callback": "not callable"}, "callback"),
        ({"filter": 42}, "filter"),
        ({"after": -1}, "after"),
        ({"after": "1"}, "after"),
        ({"tenant": "no such tenant!"}, "tenant"),
    ],
)
def test_bad_arguments_are_refused_before_any_thread_starts(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"store": MemoryStore(), "tenant": "acme", "callback": print, **kwargs}
    before = threading.active_count()
    with pytest.raises(InvalidArgument) as caught:
        Subscription(**args)
    assert caught.value.field == field
    assert threading.active_count() == before


def test_a_subscription_rides_out_a_store_outage_without_skipping(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyWatchStore()
    got: list[int] = []
    done = threading.Event()

    def callback(change: Change) -> None:
        got.append(change.revision)
        if change.revision == 5:
            done.set()

    with caplog.at_level(logging.WARNING, logger="stateline.bus"):
        sub = Subscription(store, "acme", callback, after=0, poll_timeout=0.05)
        try:
            store.commit("acme", ops=[Put("kv", "k", 0)])
            store.down.set()
            assert store.failed.wait(10)
            for i in range(1, 5):  # committed while the subscription cannot watch
                store.commit("acme", ops=[Put("kv", "k", i)])
            store.down.clear()
            assert done.wait(10)
        finally:
            sub.close()
    assert got == [1, 2, 3, 4, 5]
    assert sub.error is None
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_closing_the_database_ends_its_subscriptions(caplog: pytest.LogCaptureFixture) -> None:
    db = stateline.Database(MemoryStore())
    subs = [db.subscribe("acme", None, lambda c: None) for _ in range(3)]
    assert all(s.running for s in subs)
    with caplog.at_level(logging.INFO, logger="stateline.bus"):
        started = time.monotonic()
        db.close()
        took = time.monotonic() - started
    assert not any(s.running for s in subs)
    assert took < 5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_subscription_ends_quietly_when_its_store_is_closed(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    with caplog.at_level(logging.INFO, logger="stateline.bus"):
        sub = Subscription(store, "acme", lambda c: None, poll_timeout=0.05)
        store.close()  # by its owner, without closing the subscription first
        deadline = time.monotonic() + 10
        while sub.running:
            assert time.monotonic() < deadline, "the subscription outlived its store"
            time.sleep(0.01)
    assert sub.error is None
    assert [r.getMessage() for r in caplog.records] == ["subscription to acme ended: its store was closed"]
