"""Bad input to the library: every public method of every layer, called with arguments of the wrong type
or out of range, either does its work or raises a ``StatelineError`` (``InvalidArgument`` and the like),
never a ``TypeError`` or ``AttributeError`` from deep inside; and a call that raises writes nothing."""

from __future__ import annotations

import inspect
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stateline
from stateline import Append, NewEvent, Put, StatelineError, StepSpec, VersionIs
from stateline.sync import (
    ConflictHistory,
    LamportClock,
    RouteHealthModel,
    SharedState,
    StoreProvider,
    VectorClock,
    Versioned,
)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


JUNK: list[Any] = [
    None, True, False, -1, 0, 1, 7, 2**70, 1.5, -0.5, math.nan, math.inf, "", "x", "a/b", "k1", "l1", "\x00", "é" * 300,
    b"x", [], [1], ["x"], [None], [{}], [("ns", "k")], [("ns",)], [("ns", 1)], {}, {"a": 1}, {"a": object()},
    {"type": "e"}, [{"type": "e"}], [object()], object(), ("a", "b"),
    [Put("ns", "k", object())], [Put("", "k", 1)], [VersionIs("ns", "k", -1)], [Append("s", ["e"])],  # type: ignore[list-item]
    [NewEvent(1)], [StepSpec("")], VectorClock({"n": 1}), Versioned(1),  # type: ignore[arg-type]
    # text that cannot be encoded, values JSON cannot hold or that nest too deep
    "\ud800", "k\u2028", "a" * 2000, {"a": "\ud800"}, {"\ud800": 1}, {1: 2}, {"n": 2**64}, {"n": -(2**63) - 1},
    {"f": math.nan}, {"b": b"x"}, {"deep": _nested(300)},
]  # fmt: skip
# Parameters that would make a call wait: only values that do not (a long wait proves nothing here).
NO_WAIT: list[Any] = [None, 0, -1, math.nan, "x", [], False]
NOT_CALLED = {"close", "start", "start_sweeper", "subscribe", "watch"}  # they block or start threads


def _callable(_: Any = None, *__: Any, **___: Any) -> dict[str, int]:
    return {"x": 1}


def _targets(url: str = "memory://") -> tuple[dict[str, object], stateline.Tenant]:
    """A database with one of everything, and the objects whose methods are called."""
    db = stateline.open(url)
    t = db.tenant("acme")
    t.docs.put("d1", {"a": 1})
    t.streams.append("s1", [{"type": "e", "data": 1}])
    t.cases.create("c1", {"a": 1}).commit()
    t.runs.create("f", [{"id": "a", "kind": "k"}])
    t.locks.acquire("l1", "o1")
    shared = SharedState(StoreProvider(db.store, "acme"), start=False)
    targets: dict[str, object] = {
        "db": db, "store": db.store, "tenant": t, "docs": t.docs, "tx": t.transaction(), "streams": t.streams,
        "cases": t.cases, "case": t.cases.open("c1"), "runs": t.runs, "locks": t.locks, "audit": t.audit,
        "sessions": t.sessions, "idempotency": t.idempotency, "deliveries": t.deliveries, "gates": t.gates,
        "cache": t.cache("c"), "limits": t.limits("l", 10, 60), "shared": shared, "routes": RouteHealthModel(shared),
        "history": ConflictHistory(), "lamport": LamportClock(), "vector": VectorClock({"n": 1}),
    }  # fmt: skip
    return targets, t


def _methods(obj: object) -> list[str]:
    public = (n for n in dir(obj) if not n.startswith("_") and n not in NOT_CALLED)
    return sorted(n for n in public if callable(getattr(obj, n)) and not inspect.isclass(getattr(obj, n)))


_NAMES = sorted(_targets()[0])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), target=st.sampled_from(_NAMES))
def test_bad_arguments_get_a_stateline_error_and_write_nothing(data: st.DataObject, target: str) -> None:
    _call_with_bad_arguments("memory://", data, target)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # a fresh file each example
)
@given(data=st.data(), target=st.sampled_from(_NAMES))
def test_bad_arguments_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: st.DataObject, target: str
) -> None:
    """The same on a SQLite file (its paths, as in ``backup``, go through the file system)."""
    monkeypatch.chdir(tmp_path)  # a relative path drawn as an argument lands here
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        _call_with_bad_arguments(f"sqlite:///{folder}/s.db", data, target)


def _call_with_bad_arguments(url: str, data: st.DataObject, target: str) -> None:
    targets, tenant = _targets(url)
    obj = targets[target]
    name = data.draw(st.sampled_from(_methods(obj)), label="method")
    method: Callable[..., Any] = getattr(obj, name)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in inspect.signature(method).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty and data.draw(st.booleans(), label=f"omit {p.name}"):
            if p.kind is not p.KEYWORD_ONLY:
                kwargs["\0"] = None  # the ones after it go by name
            continue
        pool = NO_WAIT if p.name in ("wait", "timeout") else [*JUNK, _callable]
        value = data.draw(st.sampled_from(pool), label=p.name)
        if p.kind is p.KEYWORD_ONLY or kwargs:
            kwargs[p.name] = value
        else:
            args.append(value)
    kwargs.pop("\0", None)
    before = tenant.revision()
    try:
        method(*args, **kwargs)
    except StatelineError:
        assert tenant.revision() == before, f"{target}.{name} raised after writing"
    finally:
        cast("stateline.Database", targets["db"]).close()
