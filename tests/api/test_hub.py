"""The change hub behind SSE and long polls: one watching thread per tenant, idle exit, store outages, close."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from stateline import Put
from stateline.api.hub import ChangeHub
from stateline.api.instrument import InstrumentedStore
from stateline.observability import Metrics
from tests.conftest import FlakyWatchStore


def watch_threads(tenant: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"watch-{tenant}" and t.is_alive()]


def test_many_waiters_share_one_thread_and_all_wake_on_a_commit() -> None:
    store = FlakyWatchStore()
    hub = ChangeHub(store, poll_seconds=0.05, idle_seconds=5)

    async def scenario() -> list[int]:
        waits = [asyncio.create_task(hub.wait("acme", 0, timeout=10)) for _ in range(20)]
        await asyncio.sleep(0.1)
        assert len(watch_threads("acme")) == 1
        assert not any(w.done() for w in waits)
        await asyncio.to_thread(store.commit, "acme", (), [Put("kv", "k", 1)])
        return await asyncio.gather(*waits)

    try:
        assert asyncio.run(scenario()) == [1] * 20
        # a waiter that is already behind returns at once
        assert asyncio.run(hub.wait("acme", 0, timeout=10)) == 1
    finally:
        hub.close()
    assert watch_threads("acme") == []


def test_a_tenants_thread_exits_when_nobody_waits_and_comes_back() -> None:
    store = FlakyWatchStore()
    hub = ChangeHub(store, poll_seconds=0.02, idle_seconds=0.1)
    try:
        assert asyncio.run(hub.wait("idle", 0, timeout=0.05)) == 0  # nothing happened: timed out
        deadline = time.monotonic() + 10
        while watch_threads("idle"):
            assert time.monotonic() < deadline, "the idle thread did not exit"
            time.sleep(0.01)

        async def again() -> int:
            waiting = asyncio.create_task(hub.wait("idle", 0, timeout=10))
            await asyncio.sleep(0.05)
            assert len(watch_threads("idle")) == 1
            await asyncio.to_thread(store.commit, "idle", (), [Put("kv", "k", 1)])
            return await waiting

        assert asyncio.run(again()) == 1
    finally:
        hub.close()


def test_waiters_ride_out_a_store_that_cannot_watch(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyWatchStore()
    store.commit("acme", (), [Put("kv", "k", 0)])
    hub = ChangeHub(store, poll_seconds=0.02, idle_seconds=5)

    async def scenario() -> int:
        waiting = asyncio.create_task(hub.wait("acme", 1, timeout=10))
        await asyncio.sleep(0.05)
        store.down.set()
        await asyncio.sleep(0.3)  # the watching thread meets the outage, logs it, and waits
        await asyncio.to_thread(store.commit, "acme", (), [Put("kv", "k", 1)])
        await asyncio.sleep(0.1)
        assert not waiting.done()  # the hub could not see it yet
        store.down.clear()
        return await waiting

    try:
        with caplog.at_level(logging.WARNING, logger="stateline.api.hub"):
            assert asyncio.run(scenario()) == 2
    finally:
        hub.close()
    assert store.failed.is_set()
    assert any(r.getMessage() == "change watch failed" for r in caplog.records)


def test_close_releases_every_waiter_and_stops_the_threads() -> None:
    store = FlakyWatchStore()
    hub = ChangeHub(store, poll_seconds=0.05, idle_seconds=5)

    async def scenario() -> tuple[list[int], float]:
        waits = [asyncio.create_task(hub.wait(t, 0, timeout=30)) for t in ("a", "b", "a")]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.to_thread(hub.close)
        got = await asyncio.gather(*waits)
        return got, time.monotonic() - started

    got, took = asyncio.run(scenario())
    assert got == [0, 0, 0]  # released with nothing new, long before their 30 s timeout
    assert took < 10
    assert watch_threads("a") == watch_threads("b") == []
    assert asyncio.run(hub.wait("a", 0, timeout=30)) == 0  # a closed hub answers at once


def test_the_hub_releases_its_waiters_when_the_store_is_closed_under_it(caplog: pytest.LogCaptureFixture) -> None:
    inner = FlakyWatchStore()
    store = InstrumentedStore(inner, Metrics(None), None)
    hub = ChangeHub(store, poll_seconds=0.02, idle_seconds=5)

    async def scenario() -> int:
        waiting = asyncio.create_task(hub.wait("acme", 0, timeout=30))
        await asyncio.sleep(0.05)
        inner.close()  # the wrapped store, by its owner
        assert store.closed
        return await waiting

    try:
        with caplog.at_level(logging.WARNING, logger="stateline.api.hub"):
            assert asyncio.run(asyncio.wait_for(scenario(), 10)) == 0
        deadline = time.monotonic() + 10
        while watch_threads("acme"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        hub.close()
    assert caplog.records == []
