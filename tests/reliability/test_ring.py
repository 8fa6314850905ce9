"""Invariant under contention: a ring of N keys, each pointing to the next. Transactions read three
consecutive keys a -> b -> c and rewire them to a -> c -> b under version checks. After every step,
and after a writer process is killed mid-run, the ring is still one cycle of length N."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import stateline
from stateline import Conflict, Put, Store, VersionIs
from tests.conftest import Backend
from tests.reliability import scale
from tests.reliability.conftest import record

T = "ring"
NS = "ring"


def make_ring(store: Store, n: int) -> None:
    store.commit(T, ops=[Put(NS, f"n{i}", f"n{(i + 1) % n}") for i in range(n)])


def assert_one_cycle(store: Store, n: int) -> None:
    items = {i.key: i.value for i in store.scan(T, NS, limit=10_000)}
    assert len(items) == n
    seen, node = set(), "n0"
    for _ in range(n):
        assert node not in seen
        seen.add(node)
        node = items[node]
    assert node == "n0"
    assert len(seen) == n


def rewire(store: Store, rng: random.Random, n: int) -> bool:
    """One transaction: a -> b -> c -> d becomes a -> c -> b -> d. False if it lost a race."""
    a = f"n{rng.randrange(n)}"
    item_a = store.get(T, NS, a)
    assert item_a is not None
    item_b = store.get(T, NS, item_a.value)
    assert item_b is not None
    item_c = store.get(T, NS, item_b.value)
    assert item_c is not None
    b, c, d = item_a.value, item_b.value, item_c.value
    if len({a, b, c}) < 3:
        return False
    try:
        store.commit(
            T,
            checks=[
                VersionIs(NS, a, item_a.version),
                VersionIs(NS, b, item_b.version),
                VersionIs(NS, c, item_c.version),
            ],
            ops=[Put(NS, a, c), Put(NS, c, b), Put(NS, b, d)],
        )
    except Conflict:
        return False
    return True


def test_ring_stays_one_cycle_under_contending_threads(backend: Backend) -> None:
    store = backend.open()
    n = 12
    make_ring(store, n)
    applied = [0] * 8

    def worker(w: int) -> None:
        rng = random.Random(w)
        for _ in range(scale(40, 400)):
            applied[w] += rewire(store, rng, n)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert sum(applied) > 0
    assert_one_cycle(store, n)
    assert store.revision(T) == 1 + sum(applied)
    record(ring_transactions=sum(applied), operations_checked=sum(applied))


WRITER = """
import random, sys
import stateline
from tests.reliability.test_ring import rewire
store = stateline.open_store(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
done = 0
while True:
    done += rewire(store, rng, int(sys.argv[3]))
    if done == 1:
        print("running", flush=True)
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_ring_survives_writer_processes_killed_mid_run(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import make_backend  # noqa: PLC0415 - a backend of a chosen kind, not the fixture's

    backend = make_backend(kind, tmp_path, stateline.FakeClock())
    request.addfinalizer(backend.close_all)
    store = backend.open(clock=None)
    n = 10
    make_ring(store, n)
    rng = random.Random(3)
    root = str(Path(__file__).resolve().parents[2])
    for round_ in range(scale(3, 30)):
        children = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, backend.url, str(round_ * 10 + i), str(n)],
                cwd=root,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(3)
        ]
        for child in children:  # each has committed at least once: the kill lands mid-run
            assert child.stdout is not None
            assert child.stdout.readline() == "running\n"
        time.sleep(rng.uniform(0.05, 0.5))
        for child in children:
            child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait(30)
            assert child.stdout is not None
            child.stdout.close()
        assert_one_cycle(store, n)
        record(kills=3, ring_checks_after_kill=1)
    assert store.revision(T) > 1
