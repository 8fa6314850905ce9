"""Faults: a TCP proxy the test controls sits between stateline and PostgreSQL / Redis and cuts, delays,
blackholes and refuses connections while writers commit. Calls fail with ``Unavailable`` during an
outage and succeed after it; nothing acknowledged is lost and nothing is applied twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import stateline
from stateline import Append as AppendOp
from stateline import FakeClock, Incr, NewEvent, Unavailable
from tests.conftest import make_backend
from tests.faultproxy import FaultProxy
from tests.reliability import scale
from tests.reliability.conftest import record

T = "faults"
PORTS = {"postgresql": 5432, "redis": 6379}


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_outages_lose_and_duplicate_nothing(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, FakeClock())
    request.addfinalizer(backend.close_all)
    direct = backend.open(clock=None)
    direct.commit(T, ops=[Incr("f", "n", 0)])
    port = PORTS[kind]
    with FaultProxy("127.0.0.1", port) as proxy:
        store = stateline.open_store(backend.url.replace(f":{port}", f":{proxy.port}"))
        request.addfinalizer(store.close)
        acked: list[tuple[int, int]] = []
        unknown: list[tuple[int, int]] = []
        slowest_failure = [0.0]
        stop = threading.Event()
        lock = threading.Lock()

        def writer(w: int) -> None:
            j = 0
            while not stop.is_set():
                j += 1
                t0 = time.monotonic()
                try:
                    store.commit(T, ops=[Incr("f", "n"), AppendOp("log", [NewEvent("inc", {"w": w, "j": j})])])
                except Unavailable:
                    with lock:
                        unknown.append((w, j))
                        slowest_failure[0] = max(slowest_failure[0], time.monotonic() - t0)
                    time.sleep(0.02)
                    continue
                with lock:
                    acked.append((w, j))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for th in threads:
            th.start()
        faults = 0
        try:
            for _ in range(scale(1, 10)):
                for fault in (proxy.cut, proxy.refuse, proxy.blackhole, lambda: proxy.delay(0.05)):
                    time.sleep(0.4)
                    fault()
                    faults += 1
                    time.sleep(0.8)
                    proxy.restore()
            # A cut only fails a call whose statement is in flight (a lost idle connection is retried),
            # and a busy machine can leave none in flight at the moment of a cut: cut again until one is.
            for _ in range(50):
                with lock:
                    if unknown:
                        break
                time.sleep(0.2)
                proxy.cut()
                faults += 1
                time.sleep(0.1)
                proxy.restore()
            time.sleep(0.5)
            before = len(acked)
            deadline = time.monotonic() + 90  # a blackholed connection is given up after op_timeout
            while len(acked) == before and time.monotonic() < deadline:  # it works again after the outages
                time.sleep(0.05)
            assert len(acked) > before
        finally:
            stop.set()
            for th in threads:
                th.join(60)
    assert faults >= 4
    assert unknown, "the outages should have made some calls fail"
    assert slowest_failure[0] < 20, "a call during an outage must fail, not hang"
    final = direct.get(T, "f", "n")
    assert final is not None
    events = []
    while batch := direct.read_stream(T, "log", from_seq=len(events) + 1):  # pages of at most 10,000
        events.extend(batch)
    applied = [(e.data["w"], e.data["j"]) for e in events]
    assert len(applied) == len(set(applied)), "a commit was applied twice"
    assert final.value == len(applied), "the counter and the stream were committed together"
    assert set(acked) <= set(applied), "an acknowledged commit is missing"
    assert set(applied) <= set(acked) | set(unknown)
    record(faults_injected=faults, operations_checked=len(acked) + len(unknown), lost=0, duplicated=0)
