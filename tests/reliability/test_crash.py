"""Crash: a child process commits multi-key transactions and case commits as fast as it can, reporting
each acknowledged commit over a pipe, and is killed with SIGKILL at a random moment, many times.
After each kill: every acknowledged commit is present, no multi-key commit is partly present, the
case's receipt chain verifies, and the change feed has no gap."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stateline
from stateline import FakeClock
from tests.conftest import make_backend, settle
from tests.reliability import scale
from tests.reliability.conftest import record

T = "crash"
PAIRS = 5

CHILD = """
import sys
import stateline
from stateline import Put
db = stateline.open(sys.argv[1])
t = db.tenant("crash")
case = t.cases.open("case-1")
i = int(sys.argv[2])
while True:
    i += 1
    k = i % 5
    c = t.commit(ops=[Put("pairs", f"a{k}", {"i": i}), Put("pairs", f"b{k}", {"i": i}), Put("pairs", "last", i)])
    print("T", k, i, c.versions[("pairs", f"a{k}")], c.revision, flush=True)
    case.put_ctx("n", i)
    case.increment_step_count()
    case.commit()
    print("C", i, case.version, flush=True)
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_acknowledged_commits_survive_sigkill(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    backend = make_backend(kind, tmp_path, FakeClock())
    request.addfinalizer(backend.close_all)
    db = stateline.Database(backend.open(clock=None))
    t = db.tenant(T)
    t.cases.create("case-1", {"n": 0})
    rng = random.Random(11)
    root = str(Path(__file__).resolve().parents[2])
    acked_pairs: dict[int, tuple[int, int]] = {}
    acked_case = 0
    kills = 0
    start = 0
    for _ in range(scale(6, 60)):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, backend.url, str(start)], cwd=root, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None
        first = child.stdout.readline()  # the child is committing: now kill it at a random moment
        assert first.startswith("T ")
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        kills += 1
        for line in [first, *child.stdout.read().splitlines()]:
            parts = line.split()
            if len(parts) == 5 and parts[0] == "T":
                acked_pairs[int(parts[1])] = (int(parts[2]), int(parts[3]))
            elif len(parts) == 3 and parts[0] == "C":
                acked_case = max(acked_case, int(parts[2]))
        child.stdout.close()

        settle(t.store, T)  # the server may still finish the killed child's last COMMIT
        items = {i.key: i for i in t.scan("pairs", limit=100)}
        for k, (i, version) in acked_pairs.items():
            a, b = items[f"a{k}"], items[f"b{k}"]
            assert a.value == b.value, "a multi-key commit is partly present"
            assert a.value["i"] >= i, "an acknowledged commit is missing"
            assert a.version >= version
        start = items["last"].value
        case = t.cases.open("case-1")
        assert case.version >= acked_case
        assert t.cases.verify("case-1").ok
        revisions: list[int] = []
        while batch := t.changes(revisions[-1] if revisions else 0, limit=10_000):
            revisions.extend(c.revision for c in batch)
        assert revisions == list(range(1, t.revision() + 1))  # no gap in the change feed
    assert kills == scale(6, 60)
    assert acked_pairs
    record(kills=kills, acknowledged_commits_checked=len(acked_pairs) + acked_case, lost=0)
