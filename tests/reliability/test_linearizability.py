"""Linearizability: 8 concurrent clients run random get / put / compare-and-set / transactions on a few
keys against each adapter; the recorded history must be linearizable."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from stateline import Absent, Conflict, Put, Store, Unavailable, VersionIs
from tests.conftest import Backend
from tests.reliability import scale
from tests.reliability.conftest import record
from tests.reliability.linearizability import Op, check

T = "lin"
NS = "reg"
KEYS = ["x", "y", "z"]


def test_checker_accepts_a_linearizable_history_and_rejects_a_stale_read() -> None:
    ok = [
        Op(0, "put", "x", 1, None, 0, 2),
        Op(1, "get", "x", None, 1, 1, 3),  # overlaps the put: may see it
        Op(2, "cas", "x", (1, 2), True, 4, 5),
        Op(0, "get", "x", None, 2, 6, 7),
    ]
    assert check(ok)
    stale = [Op(0, "put", "x", 1, None, 0, 1), Op(1, "get", "x", None, None, 2, 3)]  # read after the put returned
    assert not check(stale)
    lost = [Op(0, "put", "x", 1, None, 0, 1), Op(1, "put", "x", 2, None, 2, 3), Op(2, "get", "x", None, 1, 4, 5)]
    assert not check(lost)
    maybe = [Op(0, "put", "x", 1, None, 0, 1, ok=None), Op(1, "get", "x", None, None, 2, 3)]
    assert check(maybe)  # a timed-out put may not have applied
    txn = [
        Op(0, "txn", "x", (("x", None, 1), ("y", None, 1)), True, 0, 1),
        Op(1, "get", "y", None, None, 2, 3),  # after the transaction returned: must see y == 1
    ]
    assert not check(txn)


def _cas(store: Store, key: str, expected: Any, new: Any) -> bool:
    while True:
        item = store.get(T, NS, key)
        current = None if item is None else item.value
        if current != expected:
            return False
        check_ = Absent(NS, key) if item is None else VersionIs(NS, key, item.version)
        try:
            store.commit(T, checks=[check_], ops=[Put(NS, key, new)])
            return True
        except Conflict:
            continue


def _txn(store: Store, triples: tuple[tuple[str, Any, Any], ...]) -> bool:
    while True:
        items = store.get_many(T, [(NS, k) for k, _, _ in triples])
        if any((None if i is None else i.value) != exp for i, (_, exp, _) in zip(items, triples, strict=True)):
            return False
        checks: list[Any] = [
            Absent(NS, k) if i is None else VersionIs(NS, k, i.version)
            for i, (k, _, _) in zip(items, triples, strict=True)
        ]
        try:
            store.commit(T, checks=checks, ops=[Put(NS, k, new) for k, _, new in triples])
            return True
        except Conflict:
            continue


def run_clients(store: Store, clients: int, ops_per_client: int, seed: int) -> list[Op]:
    history: list[Op] = []
    lock = threading.Lock()
    counter = iter(range(1, 10**9))
    counter_lock = threading.Lock()

    def fresh() -> int:
        with counter_lock:
            return next(counter)

    def client(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        for _ in range(ops_per_client):
            kind = rng.choice(["get", "get", "put", "cas", "txn"])
            key = rng.choice(KEYS)
            t0 = time.monotonic()
            ok: bool | None = True
            arg: Any = None
            out: Any = None
            try:
                if kind == "get":
                    item = store.get(T, NS, key)
                    out = None if item is None else item.value
                elif kind == "put":
                    arg = fresh()
                    store.commit(T, ops=[Put(NS, key, arg)])
                elif kind == "cas":
                    item = store.get(T, NS, key)
                    expected = None if item is None or rng.random() < 0.2 else item.value
                    arg = (expected, fresh())
                    out = _cas(store, key, *arg)
                else:
                    k2 = rng.choice([k for k in KEYS if k != key])
                    items = store.get_many(T, [(NS, key), (NS, k2)])
                    arg = tuple(
                        (k, None if i is None else i.value, fresh()) for k, i in zip((key, k2), items, strict=True)
                    )
                    out = _txn(store, arg)
            except Unavailable:
                ok = None
            t1 = time.monotonic()
            with lock:
                history.append(Op(cid, kind, key, arg, out, t0, t1, ok))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return history


@pytest.mark.parametrize("seed", range(scale(2, 20)))
def test_store_histories_are_linearizable(backend: Backend, seed: int) -> None:
    store = backend.open()
    history = run_clients(store, clients=8, ops_per_client=scale(8, 15), seed=seed)
    assert len(history) == 8 * scale(8, 15)
    assert check(history)
    record(linearizability_histories=1, operations_checked=len(history))
