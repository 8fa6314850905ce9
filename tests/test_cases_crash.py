"""Cases under crashes and concurrent processes: a child process is SIGKILLed at each step of ``commit``.

A killed commit must leave either the old state with no new receipt or the new state with its
receipt (never a mix), and a new process must pick the case up exactly there. Two processes
committing to one case: exactly one wins each version. These tests need a store that outlives a
process (SQLite file, PostgreSQL, Redis); on memory only the in-process variant runs.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from stateline import cases as cases_module
from stateline.cases import Case, CaseConflict, Cases
from tests.conftest import Backend, settle

T = "acme"
STAGES_BEFORE = ["before_validate", "after_apply", "before_store_commit"]

CHILD = r"""
import os, signal, sys, threading, time
import stateline
from stateline import cases as cases_module
from stateline.cases import CaseConflict

url, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3]
db = stateline.open(url)
cases = db.tenant("acme").cases
case = cases.open("c1")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def batch(case):
    n = case.step_count
    case.put_ctx(f"k{n}", n).add_token(f"t{n}").increment_step_count().set_metadata("last", n)
    case.update_ctx(lambda c: {**c, "count": c.get("count", 0) + 1})

if mode == "stage":
    def hook(stage):
        if stage == arg:
            die()
    cases_module._fault_hook = hook
elif mode in ("count", "line"):
    # count (or kill at) the lines the adapter executes inside the Store commit
    adapter_file = sys.modules[type(db.store).__module__].__file__
    st = {"armed": False, "count": 0}
    target = int(arg or 0)

    def local(frame, event, _):
        if st["armed"] and event == "line":
            st["count"] += 1
            if mode == "line" and st["count"] >= target:
                die()
        return local

    def glob(frame, event, _):
        return local if frame.f_code.co_filename == adapter_file else None

    def hook(stage):
        if stage == "before_store_commit":
            st["armed"] = True
            threading.settrace(glob)
            sys.settrace(glob)
        elif stage == "after_store_commit":
            sys.settrace(None)
            threading.settrace(None)
            st["armed"] = False
            print("lines", st["count"], flush=True)
    cases_module._fault_hook = hook

if mode in ("stage", "count", "line"):
    batch(case)
    case.commit()
    print("committed", flush=True)
elif mode == "loop":
    print("started", flush=True)
    while True:
        batch(case)
        case.commit()
elif mode == "contend":
    wins = []
    while len(wins) < int(arg):
        batch(case)
        try:
            r = case.commit()
            wins.append(r.version)
        except CaseConflict:
            case.rollback()
            case.refresh()
    print("wins", " ".join(map(str, wins)), flush=True)
elif mode == "rounds":
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "open":
            case.rollback()
            case.refresh()
            batch(case)
            print("ready", case.version, flush=True)
        elif cmd == "commit":
            try:
                r = case.commit()
                print("won", r.version, flush=True)
            except CaseConflict:
                print("lost", flush=True)
        else:
            break
"""


def child(backend: Backend, mode: str, arg: object = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, backend.url, mode, str(arg)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def fresh(backend: Backend) -> Cases:
    """A new handle, as a restarted process would get (for memory, the same store)."""
    return Cases(backend.open(clock=None), T)


def batch(case: Case) -> None:
    n = case.step_count
    case.put_ctx(f"k{n}", n).add_token(f"t{n}").increment_step_count().set_metadata("last", n)
    case.update_ctx(lambda c: {**c, "count": c.get("count", 0) + 1})


def setup_case(backend: Backend, commits: int = 2) -> Cases:
    cases = fresh(backend)
    case = cases.create("c1", {"count": 0})
    for _ in range(commits):
        batch(case)
        case.commit()
    return cases


def outcome(cases: Cases, before: dict[str, Any]) -> str:
    """``old`` or ``new`` after one interrupted commit starting from snapshot ``before``; fails on anything else."""
    settle(cases.store, T)
    case = cases.open("c1")
    v = cases.verify("c1")
    assert v.ok, v
    receipts = cases.receipts("c1")
    events = cases.events("c1")
    assert receipts[-1].seq == case.receipt_seq == case.version
    assert len(events) == 1 + 5 * (case.version - 1)  # the case events went with their commits
    old_v = before["version"]
    if case.version == old_v:
        assert case.state() == before["state"]
        return "old"
    assert case.version == old_v + 1
    n = before["state"]["metadata"]["step_count"]
    assert case.ctx == {**before["state"]["ctx"], f"k{n}": n, "count": before["state"]["ctx"]["count"] + 1}
    assert f"t{n}" in case.tokens
    assert case.step_count == n + 1
    assert case.metadata["last"] == n
    assert receipts[-1].mutations[-1]["op"] == "update_ctx"
    return "new"


def resume(cases: Cases) -> None:
    """After a crash a new process picks the case up and commits on top of it."""
    case = cases.open("c1")
    v = case.version
    batch(case)
    r = case.commit()
    assert r is not None
    assert r.version == v + 1
    assert cases.verify("c1").ok


# ------------------------------------------------------------------ in-process faults (every backend)


@pytest.mark.parametrize("stage", [*STAGES_BEFORE, "after_store_commit"])
def test_an_exception_at_each_stage_leaves_old_or_new_state(
    backend: Backend, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = setup_case(backend)
    case = cases.open("c1")
    before = case.snapshot()

    def hook(at: str) -> None:
        if at == stage:
            raise RuntimeError(f"fault at {at}")

    monkeypatch.setattr(cases_module, "_fault_hook", hook)
    batch(case)
    with pytest.raises(RuntimeError, match="fault at"):
        case.commit()
    monkeypatch.setattr(cases_module, "_fault_hook", None)
    # the handle never shows a state its commit did not finish
    assert case.snapshot() == before
    assert len(case.pending) == 5
    got = outcome(fresh(backend), before)
    assert got == ("new" if stage == "after_store_commit" else "old")
    if got == "new":
        with pytest.raises(CaseConflict):  # the stale handle cannot write over the landed commit
            case.commit()
        case.rollback()
        case.refresh()
    resume(fresh(backend))


# ------------------------------------------------------------------ killed child processes


@pytest.mark.parametrize("stage", [*STAGES_BEFORE, "after_store_commit"])
def test_a_process_killed_at_each_stage_leaves_old_or_new_state(process_backend: Backend, stage: str) -> None:
    backend = process_backend
    cases = setup_case(backend)
    before = cases.open("c1").snapshot()
    proc = child(backend, "stage", stage)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "committed" not in proc.stdout
    assert outcome(fresh(backend), before) == ("new" if stage == "after_store_commit" else "old")
    resume(fresh(backend))


def test_a_process_killed_inside_the_store_commit_leaves_old_or_new_state(process_backend: Backend) -> None:
    backend = process_backend
    cases = setup_case(backend)
    # how many adapter lines run inside one Store commit?
    probe = child(backend, "count")
    assert probe.returncode == 0, probe.stderr
    lines = int(probe.stdout.split("lines")[1].split()[0])
    assert lines > 0
    targets = sorted({1, max(1, lines // 3), max(1, 2 * lines // 3), lines})
    seen = []
    for k in targets:
        before = fresh(backend).open("c1").snapshot()
        proc = child(backend, "line", k)
        assert proc.returncode == -signal.SIGKILL, (k, proc.stdout, proc.stderr)
        seen.append(outcome(fresh(backend), before))
    assert seen[0] == "old"  # killed at the first line of the Store commit: nothing can have landed
    resume(fresh(backend))
    assert cases.verify("c1").ok


def test_processes_killed_at_random_moments_never_leave_a_mix(process_backend: Backend) -> None:
    backend = process_backend
    setup_case(backend)
    rng = random.Random(7)
    for _ in range(3):
        before = fresh(backend).open("c1").version
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, backend.url, "loop", ""], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "started"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            if proc.stdout is not None:
                proc.stdout.close()
        cases = fresh(backend)
        settle(cases.store, T)
        case = cases.open("c1")
        assert case.version >= before
        assert cases.verify("c1").ok
        assert cases.store.stream_info(T, "cases:c1:events").last_seq == 1 + 5 * (case.version - 1)
        assert case.step_count == case.version - 1
        assert case.ctx["count"] == case.version - 1
    resume(fresh(backend))


# ------------------------------------------------------------------ two processes, one case


def test_two_processes_exactly_one_wins_each_version(process_backend: Backend) -> None:
    backend = process_backend
    setup_case(backend, commits=0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, backend.url, "rounds", ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]

    def send(p: subprocess.Popen[str], line: str) -> None:
        assert p.stdin is not None
        p.stdin.write(line + "\n")
        p.stdin.flush()

    def read(p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        return p.stdout.readline().strip()

    try:
        version = 1
        for _ in range(4):
            for p in procs:
                send(p, "open")
            assert [read(p) for p in procs] == [f"ready {version}"] * 2  # both hold the same version
            for p in procs:
                send(p, "commit")
            results = sorted(read(p) for p in procs)
            assert results == ["lost", f"won {version + 1}"], results
            version += 1
    finally:
        for p in procs:
            send(p, "quit")
            p.wait(timeout=60)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
    cases = fresh(backend)
    assert cases.open("c1").version == version
    assert cases.verify("c1").ok


def test_two_processes_contending_share_the_versions_without_overlap(process_backend: Backend) -> None:
    backend = process_backend
    setup_case(backend, commits=0)
    per_process = 10
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, backend.url, "contend", str(per_process)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    wins = [[int(v) for v in out.split("wins")[1].split()] for out, _ in outs]
    assert not set(wins[0]) & set(wins[1])
    assert sorted(wins[0] + wins[1]) == list(range(2, 2 + 2 * per_process))
    cases = fresh(backend)
    case = cases.open("c1")
    assert case.version == 1 + 2 * per_process
    assert case.ctx["count"] == 2 * per_process
    assert cases.verify("c1").ok
    assert json.loads(json.dumps(case.snapshot())) == case.snapshot()
