"""Cases: mutations, validation of whole batches, atomic commits with receipts, verify, snapshots (every backend)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stateline
from stateline import Append, Conflict, FakeClock, InvalidArgument, NewEvent, NotFound, Put, Store, Tenant, Unavailable
from stateline.cases import (
    GENESIS_HASH,
    AddToken,
    CancelScope,
    Case,
    CaseConflict,
    Cases,
    CommitRejected,
    EnterScope,
    ExitScope,
    IncrementStepCount,
    Receipt,
    RemoveToken,
    SetCtx,
    SetMetadata,
    UpdateCtx,
    UpdateToken,
    apply_patch,
    json_diff,
    state_hash,
)
from tests.conftest import JSON_VALUES, Backend

T = "acme"


def receipts_stream(case_id: str) -> str:
    return f"cases:{case_id}:receipts"


def events_stream(case_id: str) -> str:
    return f"cases:{case_id}:events"


def written(store: Store) -> int:
    return store.revision(T)


# ------------------------------------------------------------------ create / open


def test_create_open_and_first_receipt(tenant: Tenant, store: Store, clock: FakeClock) -> None:
    case = tenant.cases.create("c1", {"order": 7})
    assert case.case_id == "c1"
    assert case.version == 1
    assert case.ctx == {"order": 7}
    assert case.tokens == {}
    assert case.scopes == {}
    md = case.metadata
    assert md == {"schema_version": 1, "step_count": 0, "created_at": clock.now_us(), "updated_at": clock.now_us()}
    r = case.last_receipt
    assert r is not None
    assert (r.seq, r.version, r.prev_hash, r.timestamp) == (1, 1, GENESIS_HASH, clock.now_us())
    assert r.mutations[0]["op"] == "create"
    assert r.state_hash == state_hash(case.state())
    assert r.compute_hash() == r.hash
    again = tenant.cases.open("c1")
    assert again.state() == case.state()
    assert again.version == 1
    assert again.receipt_seq == 1
    assert [e.type for e in store.read_stream(T, events_stream("c1"))] == ["case.created"]
    assert tenant.cases.verify("c1").ok
    assert tenant.cases.exists("c1")
    assert not tenant.cases.exists("c2")
    auto = tenant.cases.create()
    assert len(auto.case_id) == 32
    assert tenant.cases.list_ids() == sorted(["c1", auto.case_id])


def test_create_twice_conflicts_and_open_missing_is_not_found(tenant: Tenant, store: Store) -> None:
    tenant.cases.create("c1")
    before = written(store)
    with pytest.raises(CaseConflict, match="already exists"):
        tenant.cases.create("c1", {"x": 1})
    assert written(store) == before
    assert tenant.cases.open("c1").ctx == {}
    with pytest.raises(NotFound):
        tenant.cases.open("nope")
    with pytest.raises(NotFound):
        tenant.cases.verify("nope")


@pytest.mark.parametrize("case_id", ["", "a:b", "a/b", " x", "x" * 129, 5, None.__class__])
def test_create_refuses_bad_ids(tenant: Tenant, store: Store, case_id: Any) -> None:
    with pytest.raises(InvalidArgument) as exc:
        tenant.cases.create(case_id)
    assert exc.value.field == "case_id"
    assert written(store) == 0


@pytest.mark.parametrize("ctx", [[1], "x", {"a": float("nan")}, {1: "int key"}, {"a": {1, 2}}, {"a": object()}])
def test_create_refuses_bad_ctx(tenant: Tenant, store: Store, ctx: Any) -> None:
    with pytest.raises(InvalidArgument) as exc:
        tenant.cases.create("c1", ctx)
    assert exc.value.field == "ctx"
    assert written(store) == 0
    assert not tenant.cases.exists("c1")


def test_cases_validates_its_constructor_arguments(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        Cases(store, "bad tenant!")
    with pytest.raises(InvalidArgument):
        Cases("not a store", T)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the ten mutation types


def test_all_ten_mutation_types_apply_and_are_receipted(tenant: Tenant, store: Store, clock: FakeClock) -> None:
    case = tenant.cases.create("c1", {"a": 1, "b": {"c": [1, 2]}})
    clock.advance(1)
    case.buffer(SetCtx({"a": 2, "b": {"c": [1, 2, 3]}, "gone": True}))
    case.buffer(SetCtx("v", key="k"))
    case.buffer(UpdateCtx(lambda ctx: {**ctx, "a": ctx["a"] + 1, "gone": None}))
    case.buffer(EnterScope("outer"))
    case.buffer(EnterScope("inner", parent="outer"))
    case.buffer(AddToken("t1", scope="inner", position="node-1", data={"n": 1}))
    case.buffer(AddToken("t2", scope="outer", status="waiting"))
    case.buffer(AddToken("t3"))
    case.buffer(UpdateToken("t3", lambda tok: {**tok, "position": "node-9", "data": [1]}))
    case.buffer(RemoveToken("t2"))
    case.buffer(IncrementStepCount(3))
    case.buffer(SetMetadata("owner", {"team": "x"}))
    assert len(case.pending) == 12
    r1 = case.commit()
    assert r1 is not None
    assert case.pending == ()
    assert case.version == 2
    assert case.ctx == {"a": 3, "b": {"c": [1, 2, 3]}, "gone": None, "k": "v"}
    now = clock.now_us()
    assert case.tokens == {
        "t1": {
            "id": "t1",
            "scope": "inner",
            "status": "active",
            "position": "node-1",
            "data": {"n": 1},
            "created_at": now,
        },
        "t3": {"id": "t3", "scope": None, "status": "active", "position": "node-9", "data": [1], "created_at": now},
    }
    assert case.get_scope("outer") == {"id": "outer", "parent": None, "status": "active", "tokens": []}
    assert case.get_scope("inner") == {"id": "inner", "parent": "outer", "status": "active", "tokens": ["t1"]}
    assert case.step_count == 3
    assert case.metadata["owner"] == {"team": "x"}
    assert case.metadata["updated_at"] == now
    ops = [m["op"] for m in r1.mutations]
    assert ops == [
        "set_ctx", "set_ctx", "update_ctx", "enter_scope", "enter_scope", "add_token", "add_token", "add_token",
        "update_token", "remove_token", "increment_step_count", "set_metadata",
    ]  # fmt: skip
    # a callable is recorded as the change it made (RFC 6902), never as the function
    assert r1.mutations[2]["patch"] == [
        {"op": "replace", "path": "/a", "value": 3},
        {"op": "replace", "path": "/gone", "value": None},
    ]
    assert r1.mutations[8] == {
        "op": "update_token",
        "id": "t3",
        "patch": [
            {"op": "replace", "path": "/position", "value": "node-9"},
            {"op": "replace", "path": "/data", "value": [1]},
        ],
    }

    clock.advance(1)
    case.buffer(AddToken("t4", scope="outer"))
    case.buffer(CancelScope("outer"))
    r2 = case.commit()
    assert r2 is not None
    assert r2.mutations[1] == {
        "op": "cancel_scope",
        "id": "outer",
        "scopes": ["outer", "inner"],
        "tokens": ["t4", "t1"],
    }
    assert case.get_scope("outer")["status"] == "cancelled"  # type: ignore[index]
    assert case.get_scope("inner")["status"] == "cancelled"  # type: ignore[index]
    assert case.get_token("t1")["status"] == "cancelled"  # type: ignore[index]
    assert case.get_token("t4")["status"] == "cancelled"  # type: ignore[index]
    assert case.get_token("t3")["status"] == "active"  # type: ignore[index]

    case.enter_scope("s2").add_token("t5", "s2").update_token("t5", status="completed").exit_scope("s2")
    r3 = case.commit()
    assert r3 is not None
    assert case.get_scope("s2")["status"] == "exited"  # type: ignore[index]
    assert case.get_token("t5")["status"] == "completed"  # type: ignore[index]

    # the chain links, and every receipt's revision is its commit's
    receipts = tenant.cases.receipts("c1")
    assert [r.seq for r in receipts] == [1, 2, 3, 4]
    assert [r.prev_hash for r in receipts[1:]] == [r.hash for r in receipts[:-1]]
    assert receipts[1:] == [r1, r2, r3]
    for r in receipts:
        change = store.changes(T, r.revision - 1, 1)[0]  # type: ignore[operator]
        assert {op.stream for op in change.ops if op.op == "append"} == {receipts_stream("c1"), events_stream("c1")}
    # one case event per mutation, in the same commits
    events = tenant.cases.events("c1")
    assert [e.type for e in events][:4] == ["case.created", "ctx.set", "ctx.set", "ctx.updated"]
    assert len(events) == 1 + 12 + 2 + 4
    assert {e.revision for e in events[13:15]} == {r2.revision}
    assert "scope.cancelled" in [e.type for e in events]
    assert "steps.incremented" in [e.type for e in events]
    # a new process (handle) sees exactly the committed state; replay agrees
    assert tenant.cases.open("c1").state() == case.state()
    assert tenant.cases.verify("c1").ok


def test_later_mutations_see_earlier_ones_in_the_same_batch(tenant: Tenant) -> None:
    case = tenant.cases.create("c1")
    case.enter_scope("s").add_token("t", "s").remove_token("t").add_token("t", "s").exit_scope("s")
    with pytest.raises(CommitRejected) as exc:
        case.commit()
    # only the exit fails: t was re-added and is live
    assert [(p.index, p.op) for p in exc.value.problems] == [(4, "exit_scope")]
    case.rollback()
    case.enter_scope("s").add_token("t", "s").remove_token("t").exit_scope("s")
    assert case.commit() is not None
    assert case.get_scope("s") == {"id": "s", "parent": None, "status": "exited", "tokens": []}


def test_update_token_can_move_between_active_scopes(tenant: Tenant) -> None:
    case = tenant.cases.create("c1")
    case.enter_scope("a").enter_scope("b").add_token("t", "a").update_token("t", scope="b")
    case.commit()
    assert case.get_scope("a")["tokens"] == []  # type: ignore[index]
    assert case.get_scope("b")["tokens"] == ["t"]  # type: ignore[index]
    case.update_token("t", scope=None)
    case.commit()
    assert case.get_scope("b")["tokens"] == []  # type: ignore[index]
    assert case.get_token("t")["scope"] is None  # type: ignore[index]
    assert tenant.cases.verify("c1").ok


def test_update_fns_may_change_their_argument_in_place(tenant: Tenant) -> None:
    case = tenant.cases.create("c1", {"n": 1})
    case.add_token("t").commit()

    def bump(ctx: dict[str, Any]) -> None:
        ctx["n"] += 1

    def finish(tok: dict[str, Any]) -> None:
        tok["status"] = "completed"

    seen: list[dict[str, Any]] = []
    case.update_ctx(bump).update_token("t", finish).update_ctx(lambda c: seen.append(c) or None)
    case.commit()
    assert case.ctx == {"n": 2}
    assert case.get_token("t")["status"] == "completed"  # type: ignore[index]
    seen[0]["n"] = 99  # the function got a private copy
    assert case.ctx == {"n": 2}


def test_accessors_return_copies(tenant: Tenant) -> None:
    case = tenant.cases.create("c1", {"a": {"b": 1}})
    case.add_token("t", data={"x": 1}).commit()
    case.ctx["a"]["b"] = 2
    case.tokens["t"]["data"]["x"] = 2
    tok = case.get_token("t")
    assert tok is not None
    tok["status"] = "failed"
    assert case.ctx == {"a": {"b": 1}}
    assert case.get_token("t")["data"] == {"x": 1}  # type: ignore[index]
    assert case.get_token("t")["status"] == "active"  # type: ignore[index]
    assert case.get_token("missing") is None
    assert case.get_scope("missing") is None
    r = case.last_receipt
    assert r is not None
    r.mutations[0]["token"]["data"]["x"] = 5  # a receipt's data is its own
    assert case.get_token("t")["data"] == {"x": 1}  # type: ignore[index]
    assert tenant.cases.verify("c1").ok


# ------------------------------------------------------------------ validation: every error at once


def test_invalid_batch_reports_every_error_and_changes_nothing(tenant: Tenant, store: Store) -> None:
    case = tenant.cases.create("c1", {"keep": True})
    case.enter_scope("s").add_token("t", "s").commit()
    before_state, before_rev = case.state(), written(store)

    def boom(_: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("kaput")

    batch: list[tuple[Any, str]] = [
        (SetCtx([1, 2]), "value"),  # set_ctx needs an object
        (SetCtx(1, key=""), "key"),
        (SetCtx(float("inf"), key="x"), "value"),  # not JSON
        (UpdateCtx(boom), "fn"),  # raises
        (UpdateCtx(lambda c: [c]), "fn"),  # not an object
        (UpdateCtx(lambda c: {"s": {1, 2}}), "fn result"),  # not JSON
        (UpdateCtx("not callable"), "fn"),  # type: ignore[arg-type]
        (AddToken("t"), "token_id"),  # exists
        (AddToken(7), "token_id"),  # type: ignore[arg-type]  # not a string
        (AddToken("u", scope="missing"), "scope"),
        (AddToken("v", status="completed"), "status"),
        (AddToken("w", data=object()), "data"),
        (RemoveToken("missing"), "token_id"),
        (UpdateToken("missing", lambda t: t), "token_id"),
        (UpdateToken("t", lambda t: {**t, "id": "other"}), "fn"),
        (UpdateToken("t", lambda t: {**t, "status": "bogus"}), "fn"),
        (UpdateToken("t", lambda t: {**t, "extra": 1}), "fn"),
        (UpdateToken("t", lambda t: {**t, "scope": "missing"}), "fn.scope"),
        (UpdateToken("t", boom), "fn"),
        (EnterScope("s"), "scope"),  # exists
        (EnterScope("s2", parent="missing"), "parent"),
        (EnterScope(None), "scope"),  # type: ignore[arg-type]
        (ExitScope("missing"), "scope"),
        (ExitScope("s"), "scope"),  # still has a live token
        (CancelScope("missing"), "scope"),
        (IncrementStepCount(0), "by"),
        (IncrementStepCount(True), "by"),
        (SetMetadata("step_count", 5), "key"),  # reserved
        (SetMetadata("x", float("nan")), "value"),
        (SetCtx(2**70, key="huge"), "value"),  # beyond 64 bits: not storable JSON
    ]
    for m, _ in batch:
        case.buffer(m)
    case.put_ctx("fine", 1)  # a valid one in between
    with pytest.raises(CommitRejected) as exc:
        case.commit()
    problems = exc.value.problems
    assert [p.index for p in problems] == list(range(len(batch)))
    assert [p.field for p in problems] == [f for _, f in batch]
    assert "kaput" in problems[3].message
    assert "RuntimeError" in problems[3].message
    assert isinstance(exc.value, InvalidArgument)
    assert exc.value.details["problems"][0] == problems[0].to_dict()
    assert f"{len(batch)} of {len(batch) + 1}" in exc.value.message
    assert case.state() == before_state
    assert len(case.pending) == len(batch) + 1  # the buffer is kept
    assert written(store) == before_rev  # nothing was written
    assert tenant.cases.open("c1").state() == before_state
    assert case.validate() == list(problems)
    assert case.rollback() == len(batch) + 1
    assert case.pending == ()
    assert case.commit() is None
    assert written(store) == before_rev


def test_scope_rules(tenant: Tenant) -> None:
    case = tenant.cases.create("c1")
    case.enter_scope("p").enter_scope("c", "p").commit()

    def problems(*ms: Any) -> list[str]:
        for m in ms:
            case.buffer(m)
        try:
            case.commit()
        except CommitRejected as exc:
            return [p.message for p in exc.problems]
        finally:
            case.rollback()
        return []

    assert "active nested scope" in problems(ExitScope("p"))[0]
    assert problems(ExitScope("c"), ExitScope("p")) == []
    case.refresh()
    assert case.get_scope("p")["status"] == "exited"  # type: ignore[index]
    msgs = problems(EnterScope("q", "p"), AddToken("x", "p"), CancelScope("p"), ExitScope("p"), EnterScope("p"))
    assert len(msgs) == 5
    assert "exited, not active" in msgs[0]
    assert "never reused" in msgs[4]
    case.enter_scope("r").add_token("x", "r").cancel_scope("r").commit()
    # a cancelled token cannot come back to life inside a cancelled scope
    assert "cancelled, not active" in problems(UpdateToken("x", lambda t: {**t, "status": "active"}))[0]
    assert problems(UpdateToken("x", lambda t: {**t, "status": "failed"})) == []


def test_buffer_refuses_non_mutations(tenant: Tenant) -> None:
    case = tenant.cases.create("c1")
    with pytest.raises(InvalidArgument) as exc:
        case.buffer({"op": "set_ctx"})  # type: ignore[arg-type]
    assert exc.value.field == "mutation"
    with pytest.raises(InvalidArgument):
        case.update_token("t", lambda t: t, status="done")
    with pytest.raises(InvalidArgument):
        case.update_token("t")
    assert case.pending == ()


def test_too_large_state_is_refused_and_nothing_written(backend: Backend, tenant: Tenant) -> None:
    small = Cases(backend.open(max_value_bytes=4096), T)
    case = small.create("c1")
    before = small.store.revision(T)
    case.put_ctx("big", "x" * 5000)
    with pytest.raises(Exception, match="over the limit"):
        case.commit()
    assert case.version == 1
    assert len(case.pending) == 1
    assert small.store.revision(T) == before


# ------------------------------------------------------------------ conflicts and outages


def test_conflict_keeps_old_state_and_buffer(tenant: Tenant, store: Store) -> None:
    a = tenant.cases.create("c1", {"n": 0})
    b = tenant.cases.open("c1")
    a.put_ctx("n", 1).commit()
    b.put_ctx("n", 2).increment_step_count()
    with pytest.raises(CaseConflict) as exc:
        b.commit()
    assert isinstance(exc.value, Conflict)
    assert (exc.value.expected_version, exc.value.found_version) == (1, 2)
    assert "another writer" in exc.value.message
    assert "buffered" in exc.value.message
    assert b.version == 1
    assert b.ctx == {"n": 0}
    assert len(b.pending) == 2
    b.refresh()
    assert b.version == 2
    assert b.ctx == {"n": 1}
    assert len(b.pending) == 2
    r = b.commit()
    assert r is not None
    assert r.seq == 3
    assert tenant.cases.open("c1").ctx == {"n": 2}
    assert tenant.cases.verify("c1").ok


def test_a_refused_commit_leaves_the_committed_ctx_untouched_after_any_mutation(tenant: Tenant, store: Store) -> None:
    """Mutations are applied to a working copy: one that leaves ctx as it was (an update_ctx changing
    nothing), or replaces it whole, must not let a later mutation of the batch write into the committed
    ctx or into an earlier mutation's summary."""
    case = tenant.cases.create("c1", {"n": 0})
    before = case.state()
    case.update_ctx(lambda c: c).put_ctx("added", 1).update_ctx(lambda c: 1 / 0)  # type: ignore[arg-type, return-value]
    with pytest.raises(CommitRejected) as rejected:
        case.commit()
    assert [p.index for p in rejected.value.problems] == [2]
    assert case.state() == before
    case.rollback()
    other = tenant.cases.open("c1")
    other.put_ctx("n", 5).commit()
    case.update_ctx(lambda c: c).put_ctx("added", 2)
    with pytest.raises(CaseConflict):
        case.commit()
    assert case.state() == before
    case.refresh().rollback()
    r = case.set_ctx({"a": 1}).put_ctx("b", 2).commit()
    assert r is not None
    assert r.mutations[0] == {"op": "set_ctx", "value": {"a": 1}}  # as given, not as it was after the batch
    assert case.ctx == {"a": 1, "b": 2}
    assert tenant.cases.verify("c1").ok


def test_unavailable_store_keeps_old_state_and_buffer(backend: Backend) -> None:
    other = backend.open()
    cases = Cases(other, T)
    case = cases.create("c1", {"n": 0})
    case.put_ctx("n", 1)
    other.close()
    with pytest.raises(Unavailable) as exc:
        case.commit()
    assert "keeps its old state" in exc.value.message
    assert case.version == 1
    assert case.ctx == {"n": 0}
    assert len(case.pending) == 1
    if backend.kind != "memory":
        fresh = Cases(backend.open(), T)
        assert fresh.open("c1").version == 1
        assert fresh.verify("c1").ok


def test_threads_committing_to_one_case_one_winner_per_version(backend: Backend, tenant: Tenant) -> None:
    tenant.cases.create("c1", {"log": []})
    per_thread, n_threads = 8, 4
    wins: dict[int, list[int]] = {i: [] for i in range(n_threads)}
    conflicts = [0] * n_threads
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def worker(i: int) -> None:
        try:
            cases = Cases(backend.open(), T) if backend.kind != "memory" else tenant.cases
            case = cases.open("c1")
            start.wait()
            while len(wins[i]) < per_thread:
                case.update_ctx(lambda c: {"log": [*c["log"], i]}).increment_step_count()
                try:
                    r = case.commit()
                except CaseConflict:
                    conflicts[i] += 1
                    case.rollback()
                    case.refresh()
                    continue
                assert r is not None
                wins[i].append(r.version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    versions = sorted(v for vs in wins.values() for v in vs)
    assert versions == list(range(2, 2 + per_thread * n_threads))  # every version won exactly once
    final = tenant.cases.open("c1")
    assert final.step_count == per_thread * n_threads
    # each winner's update is in the log, in version order
    owner = {v: i for i, vs in wins.items() for v in vs}
    assert final.ctx["log"] == [owner[v] for v in versions]
    assert tenant.cases.verify("c1").ok


# ------------------------------------------------------------------ receipts and verify


class Tamper:
    """Edit the stored data of one backend directly, behind the Store's back."""

    def __init__(self, backend: Backend, store: Store) -> None:
        self.kind = backend.kind
        self.store = store
        self.url = backend.url

    def _pg(self) -> tuple[psycopg.Connection[Any], str]:
        schema = parse_qs(urlsplit(self.url).query)["schema"][0]
        return psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True), schema

    def _redis(self) -> tuple[redis.Redis, str]:
        prefix = parse_qs(urlsplit(self.url).query)["prefix"][0]
        return redis.Redis(host="127.0.0.1", port=6379, db=0), f"{prefix}:{{{T}}}:"

    def set_event_data(self, stream: str, seq: int, data: Any) -> None:
        raw = orjson.dumps(data)
        if self.kind == "memory":
            events = self.store._data[T].streams[stream].events  # type: ignore[attr-defined]
            i = next(i for i, e in enumerate(events) if e[0] == seq)
            e = events[i]
            events[i] = (e[0], e[1], raw, *e[3:])
        elif self.kind == "sqlite":
            with sqlite3.connect(self.store.path) as con:  # type: ignore[attr-defined]
                n = con.execute(
                    "UPDATE sl_events SET data = ? WHERE tenant = ? AND stream = ? AND seq = ?", (raw, T, stream, seq)
                ).rowcount
            assert n == 1
        elif self.kind == "postgresql":
            con, schema = self._pg()
            with con:
                cur = con.execute(
                    f'UPDATE "{schema}".events SET data = %s WHERE tenant = %s AND stream = %s AND seq = %s',
                    (raw, T, stream, seq),
                )
                assert cur.rowcount == 1
        elif self.kind == "redis":
            client, t = self._redis()
            key = f"{t}s:{stream}"
            (member,) = client.zrangebyscore(key, seq, seq)
            row = orjson.loads(member)
            row[4] = data
            client.zrem(key, member)
            client.zadd(key, {orjson.dumps(row): seq})
            client.close()
        else:
            raise AssertionError(self.kind)

    def delete_event(self, stream: str, seq: int) -> None:
        if self.kind == "memory":
            events = self.store._data[T].streams[stream].events  # type: ignore[attr-defined]
            del events[next(i for i, e in enumerate(events) if e[0] == seq)]
        elif self.kind == "sqlite":
            with sqlite3.connect(self.store.path) as con:  # type: ignore[attr-defined]
                con.execute("DELETE FROM sl_events WHERE tenant = ? AND stream = ? AND seq = ?", (T, stream, seq))
        elif self.kind == "postgresql":
            con, schema = self._pg()
            with con:
                con.execute(
                    f'DELETE FROM "{schema}".events WHERE tenant = %s AND stream = %s AND seq = %s', (T, stream, seq)
                )
        elif self.kind == "redis":
            client, t = self._redis()
            assert client.zremrangebyscore(f"{t}s:{stream}", seq, seq) == 1
            client.close()
        else:
            raise AssertionError(self.kind)

    def set_item(self, namespace: str, key: str, value: Any) -> None:
        raw = orjson.dumps(value)
        if self.kind == "memory":
            self.store._data[T].spaces[namespace].recs[key].value = raw  # type: ignore[attr-defined]
        elif self.kind == "sqlite":
            with sqlite3.connect(self.store.path) as con:  # type: ignore[attr-defined]
                con.execute(
                    "UPDATE sl_items SET value = ? WHERE tenant = ? AND ns = ? AND key = ?", (raw, T, namespace, key)
                )
        elif self.kind == "postgresql":
            con, schema = self._pg()
            with con:
                con.execute(
                    f'UPDATE "{schema}".items SET value = %s WHERE tenant = %s AND ns = %s AND key = %s',
                    (raw, T, namespace, key),
                )
        elif self.kind == "redis":
            client, t = self._redis()
            client.hset(f"{t}i:{namespace}|{key}", "v", raw)
            client.close()
        else:
            raise AssertionError(self.kind)


def _history(tenant: Tenant, case_id: str = "c1", commits: int = 5) -> Case:
    case = tenant.cases.create(case_id, {"n": 0})
    for i in range(commits):
        case.update_ctx(lambda c, i=i: {**c, "n": c["n"] + i}).add_token(f"t{i}").increment_step_count()
        case.commit()
    assert tenant.cases.verify(case_id).ok
    return case


def _receipt_data(store: Store, case_id: str, seq: int) -> dict[str, Any]:
    (e,) = store.read_stream(T, receipts_stream(case_id), seq, seq)
    return dict(e.data)


def test_verify_catches_an_edited_receipt(backend: Backend, tenant: Tenant, store: Store) -> None:
    _history(tenant)
    data = _receipt_data(store, "c1", 3)
    data["timestamp"] += 1
    Tamper(backend, store).set_event_data(receipts_stream("c1"), 3, data)
    v = tenant.cases.verify("c1")
    assert (v.ok, v.first_bad_seq, v.reason) == (False, 3, "edited")
    assert not v


def test_verify_catches_an_edited_receipt_with_a_recomputed_hash(
    backend: Backend, tenant: Tenant, store: Store
) -> None:
    _history(tenant)
    data = _receipt_data(store, "c1", 4)
    data["mutations"][0]["patch"][0]["value"] = 1000  # claim a different change...
    body = {k: v for k, v in data.items() if k != "hash"}
    r = Receipt(**body, hash="", revision=None)  # type: ignore[arg-type]
    data["hash"] = r.compute_hash()  # ... and cover it with a fresh hash
    Tamper(backend, store).set_event_data(receipts_stream("c1"), 4, data)
    v = tenant.cases.verify("c1")
    assert (v.ok, v.first_bad_seq) == (False, 4)
    assert v.reason == "state_mismatch"  # replaying the claimed change does not give the recorded state


def test_verify_catches_a_deleted_receipt(backend: Backend, tenant: Tenant, store: Store) -> None:
    _history(tenant)
    Tamper(backend, store).delete_event(receipts_stream("c1"), 2)
    v = tenant.cases.verify("c1")
    assert (v.ok, v.first_bad_seq, v.reason) == (False, 2, "missing")


def test_verify_catches_a_deleted_last_receipt(backend: Backend, tenant: Tenant, store: Store) -> None:
    _history(tenant)
    Tamper(backend, store).delete_event(receipts_stream("c1"), 6)
    v = tenant.cases.verify("c1")
    assert (v.ok, v.first_bad_seq, v.reason) == (False, 6, "missing")


def test_verify_catches_swapped_receipts(backend: Backend, tenant: Tenant, store: Store) -> None:
    _history(tenant)
    a, b = _receipt_data(store, "c1", 2), _receipt_data(store, "c1", 3)
    tamper = Tamper(backend, store)
    tamper.set_event_data(receipts_stream("c1"), 2, b)
    tamper.set_event_data(receipts_stream("c1"), 3, a)
    v = tenant.cases.verify("c1")
    assert (v.ok, v.first_bad_seq, v.reason) == (False, 2, "reordered")


def test_verify_catches_an_edited_state(backend: Backend, tenant: Tenant, store: Store) -> None:
    _history(tenant)
    item = store.get(T, "cases", "c1")
    assert item is not None
    value = dict(item.value)
    value["ctx"] = {"n": -1}
    Tamper(backend, store).set_item("cases", "c1", value)
    v = tenant.cases.verify("c1")
    assert (v.ok, v.first_bad_seq, v.reason) == (False, None, "state_edited")


def test_verify_catches_a_receipt_the_state_does_not_know(tenant: Tenant, store: Store) -> None:
    case = _history(tenant)
    # a raw commit that appends a (well-formed) receipt without moving the state
    r = case.last_receipt
    assert r is not None
    body = {**r.body(), "seq": r.seq + 1, "prev_hash": r.hash, "mutations": [], "version": r.version + 1}
    fake = Receipt(**body, hash="", revision=None)  # type: ignore[arg-type]
    store.commit(T, ops=[Append(receipts_stream("c1"), [NewEvent("receipt", {**body, "hash": fake.compute_hash()})])])
    v = tenant.cases.verify("c1")
    assert v.ok is False
    assert v.reason in {"unexpected", "state_edited"}


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_verify_never_passes_a_tampered_history_and_never_raises(data: st.DataObject) -> None:
    store = stateline.open_store("memory://")
    tenant = stateline.Database(store).tenant(T)
    _history(tenant, commits=4)  # receipts 1..5
    tamper = Tamper(Backend("memory", "memory://", FakeClock()), store)
    stream = receipts_stream("c1")
    how = data.draw(st.sampled_from(["edit", "add_field", "delete", "swap", "retype", "state", "state_field"]))
    seq = data.draw(st.integers(1, 5))
    if how == "edit":
        receipt = _receipt_data(store, "c1", seq)
        field = data.draw(st.sampled_from(sorted(receipt)))
        value = data.draw(JSON_VALUES.filter(lambda v: v != receipt[field]))
        tamper.set_event_data(stream, seq, {**receipt, field: value})
    elif how == "add_field":
        receipt = _receipt_data(store, "c1", seq)
        field = data.draw(st.text(min_size=1, max_size=6).filter(lambda f: f not in receipt))
        tamper.set_event_data(stream, seq, {**receipt, field: data.draw(JSON_VALUES)})
    elif how == "delete":
        tamper.delete_event(stream, seq)
    elif how == "swap":
        other = data.draw(st.integers(1, 5).filter(lambda o: o != seq))
        a, b = _receipt_data(store, "c1", seq), _receipt_data(store, "c1", other)
        tamper.set_event_data(stream, seq, b)
        tamper.set_event_data(stream, other, a)
    elif how == "retype":
        events = store._data[T].streams[stream].events  # type: ignore[attr-defined]
        i = next(i for i, e in enumerate(events) if e[0] == seq)
        events[i] = (events[i][0], data.draw(st.text(max_size=8).filter(lambda t: t != "receipt")), *events[i][2:])
    elif how == "state":
        item = store.get(T, "cases", "c1")
        assert item is not None
        tamper.set_item("cases", "c1", data.draw(JSON_VALUES.filter(lambda v: v != item.value)))
    else:
        item = store.get(T, "cases", "c1")
        assert item is not None
        state = dict(item.value)
        field = data.draw(st.sampled_from(sorted(state)))
        if data.draw(st.booleans()):
            del state[field]
        else:
            state[field] = data.draw(JSON_VALUES.filter(lambda v: v != item.value[field]))
        tamper.set_item("cases", "c1", state)
    v = tenant.cases.verify("c1")
    assert not v.ok, (how, seq)
    assert v.reason is not None
    assert not tenant.cases.verify("c1")  # the same answer again: reading changed nothing


def test_receipt_from_event_refuses_malformed_data(tenant: Tenant, store: Store) -> None:
    _history(tenant, commits=1)
    (e,) = store.read_stream(T, receipts_stream("c1"), 2, 2)
    assert Receipt.from_event(e).seq == 2
    for bad in [[], {"seq": 2}, {**e.data, "seq": "2"}, {**e.data, "extra": 1}, {**e.data, "mutations": [1]}]:
        with pytest.raises(ValueError, match="receipt"):
            Receipt.from_event(type(e)(e.stream, e.seq, e.type, bad, e.meta, e.revision, e.recorded_at))


# ------------------------------------------------------------------ snapshot / restore


def test_snapshot_restore_round_trips(tenant: Tenant, store: Store) -> None:
    case = _history(tenant, commits=3)
    case.enter_scope("s").add_token("x", "s", data={"deep": [1, {"a": None}]}).set_metadata("m", [1]).commit()
    snap = case.snapshot()
    assert orjson.loads(orjson.dumps(snap)) == snap  # JSON-serialisable
    assert snap["schema_version"] == 1
    assert snap["version"] == case.version
    copy = tenant.cases.restore(snap, case_id="c2")
    assert copy.state() == case.state()
    assert tenant.cases.open("c2").state() == case.state()
    assert copy.snapshot()["state"] == snap["state"]
    assert tenant.cases.verify("c2").ok
    # restoring into an existing case rewinds it, with a receipt
    before = case.snapshot()
    case.put_ctx("later", 1).remove_token("x").commit()
    r = case.restore(before)
    assert r.mutations[0]["op"] == "restore"
    assert case.state()["ctx"] == before["state"]["ctx"]
    assert case.tokens == before["state"]["tokens"]
    assert tenant.cases.open("c1").ctx == before["state"]["ctx"]
    assert tenant.cases.verify("c1").ok
    with pytest.raises(CaseConflict):
        tenant.cases.restore(snap)  # c1 exists


def _malformed(snap: dict[str, Any]) -> list[tuple[str, Any]]:
    def edit(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        s = orjson.loads(orjson.dumps(snap))
        fn(s)
        return s

    return [
        ("not an object", [snap]),
        ("missing key", edit(lambda s: s.pop("state"))),
        ("extra key", edit(lambda s: s.update(extra=1))),
        ("extra state key", edit(lambda s: s["state"].update(version=3))),
        ("future schema", edit(lambda s: s.update(schema_version=2))),
        ("bool schema", edit(lambda s: s.update(schema_version=True))),
        ("bad id", edit(lambda s: s.update(case_id="a:b"))),
        ("bad version", edit(lambda s: s.update(version=0))),
        ("ctx not object", edit(lambda s: s["state"].update(ctx=[]))),
        ("metadata schema", edit(lambda s: s["state"]["metadata"].update(schema_version=0))),
        ("negative steps", edit(lambda s: s["state"]["metadata"].update(step_count=-1))),
        ("token key mismatch", edit(lambda s: s["state"]["tokens"]["x"].update(id="y"))),
        ("token extra field", edit(lambda s: s["state"]["tokens"]["x"].update(extra=1))),
        ("token bad status", edit(lambda s: s["state"]["tokens"]["x"].update(status="zombie"))),
        ("token unknown scope", edit(lambda s: s["state"]["tokens"]["x"].update(scope="nope"))),
        ("scope not listing token", edit(lambda s: s["state"]["scopes"]["s"].update(tokens=[]))),
        ("scope listing stranger", edit(lambda s: s["state"]["scopes"]["p"].update(tokens=["x"]))),
        ("scope unknown parent", edit(lambda s: s["state"]["scopes"]["s"].update(parent="nope"))),
        ("scope cycle", edit(lambda s: s["state"]["scopes"]["p"].update(parent="s"))),
        ("scope bad status", edit(lambda s: s["state"]["scopes"]["s"].update(status="open"))),
        ("active under cancelled", edit(lambda s: s["state"]["scopes"]["p"].update(status="cancelled"))),
        ("tokens not object", edit(lambda s: s["state"].update(tokens=[]))),
        ("not JSON", edit(lambda s: s["state"]["ctx"].update(x=float("nan")))),
    ]


def test_restore_refuses_malformed_data(tenant: Tenant, store: Store) -> None:
    case = tenant.cases.create("c1")
    case.enter_scope("p").enter_scope("s", "p").add_token("x", "s").commit()
    snap = case.snapshot()
    assert tenant.cases.restore(snap, "ok").state() == case.state()  # the base is valid
    before = written(store)
    for label, bad in _malformed(snap):
        with pytest.raises(InvalidArgument) as exc:
            tenant.cases.restore(bad, "c2")
        assert exc.value.field.startswith("data"), label
        with pytest.raises(InvalidArgument):
            case.restore(bad)
    assert written(store) == before
    assert not tenant.cases.exists("c2")
    case.put_ctx("x", 1)
    with pytest.raises(InvalidArgument, match="buffer"):
        case.restore(snap)
    assert len(case.pending) == 1


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_restore_of_a_randomly_damaged_snapshot_refuses_it_or_restores_a_sound_case(data: st.DataObject) -> None:
    store = stateline.open_store("memory://")
    tenant = stateline.Database(store).tenant(T)
    case = tenant.cases.create("c1", {"order": {"id": 7, "items": [1, 2]}})
    case.enter_scope("p").enter_scope("s", "p").add_token("x", "s", data={"k": [1]}).increment_step_count().commit()
    snap = orjson.loads(orjson.dumps(case.snapshot()))
    path = data.draw(st.sampled_from(_paths(snap)[1:]))
    parent = snap
    for p in path[:-1]:
        parent = parent[p]
    how = data.draw(st.sampled_from(["replace", "delete", "add_beside"]))
    if how == "replace":
        parent[path[-1]] = data.draw(JSON_VALUES)
    elif how == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        key = data.draw(st.text(max_size=5))
        parent[key] = data.draw(JSON_VALUES)
    else:
        parent.append(data.draw(JSON_VALUES))
    before = store.revision(T)
    try:
        copy = tenant.cases.restore(snap, "c2")
    except InvalidArgument as exc:
        refused: InvalidArgument | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.field.startswith("data"), refused
        assert store.revision(T) == before  # nothing written
        assert not tenant.cases.exists("c2")
        return
    # accepted: a sound case, which reopens as restored and verifies
    assert tenant.cases.verify("c2").ok
    assert tenant.cases.open("c2").state() == copy.state()
    copy.put_ctx("after", 1).commit()
    assert tenant.cases.verify("c2").ok


# ------------------------------------------------------------------ JSON Patch


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "b", "~", "/", "c/~1"]), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_json_diff_then_apply_patch_gives_the_target(a: Any, b: Any) -> None:
    before = orjson.dumps(a)
    patch = json_diff(a, b)
    out = apply_patch(a, patch)
    canon = orjson.OPT_SORT_KEYS
    assert orjson.dumps(out, option=canon) == orjson.dumps(b, option=canon)  # exact: 1, 1.0 and true differ
    assert orjson.dumps(a) == before  # the input is untouched
    if orjson.dumps(a, option=canon) == orjson.dumps(b, option=canon):
        assert patch == []


def test_apply_patch_refuses_patches_that_do_not_fit() -> None:
    for doc, patch in [
        ({}, [{"op": "remove", "path": "/x"}]),
        ({}, [{"op": "replace", "path": "/x", "value": 1}]),
        ([], [{"op": "add", "path": "/1", "value": 1}]),
        ([1], [{"op": "add", "path": "/01", "value": 1}]),
        (1, [{"op": "add", "path": "/x", "value": 1}]),
        ({}, [{"op": "move", "path": "/x", "from": "/y"}]),
        ({}, [{"op": "add", "path": "x", "value": 1}]),
        ({}, [{"op": "add", "path": "/x"}]),
        ({}, "not a list"),
    ]:
        with pytest.raises(ValueError):  # noqa: PT011 - each message differs
            apply_patch(doc, patch)  # type: ignore[arg-type]
    assert apply_patch([1], [{"op": "add", "path": "/-", "value": 2}]) == [1, 2]


# ------------------------------------------------------------------ model-based: random batches vs a plain model

TOKENS = ["a", "b", "c"]
SCOPES = ["s", "t", "u"]
LIVE = {"active", "waiting"}


class Model:
    """The case semantics, written plainly and independently of the implementation."""

    def __init__(self) -> None:
        self.ctx: dict[str, Any] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.scopes: dict[str, dict[str, Any]] = {}
        self.steps = 0
        self.meta: dict[str, Any] = {}

    def copy(self) -> Model:
        m = Model()
        m.__dict__ = orjson.loads(orjson.dumps(self.__dict__))
        return m

    def active(self, scope: str | None) -> bool:
        return scope in self.scopes and self.scopes[scope]["status"] == "active"

    def apply(self, op: tuple[Any, ...]) -> bool:
        kind = op[0]
        if kind == "set_ctx":
            self.ctx = dict(op[1])
        elif kind in {"put_ctx", "update_ctx"}:
            self.ctx[op[1]] = op[2]
        elif kind == "update_ctx_raises":
            return False
        elif kind == "add_token":
            _, tid, scope, status = op
            if tid in self.tokens or (scope is not None and not self.active(scope)):
                return False
            self.tokens[tid] = {"scope": scope, "status": status, "data": None}
            if scope is not None:
                self.scopes[scope]["tokens"].append(tid)
        elif kind == "remove_token":
            tok = self.tokens.pop(op[1], None)
            if tok is None:
                return False
            if tok["scope"] is not None:
                self.scopes[tok["scope"]]["tokens"].remove(op[1])
        elif kind == "update_token":
            _, tid, status, data = op
            tok = self.tokens.get(tid)
            if tok is None or (status in LIVE and tok["scope"] is not None and not self.active(tok["scope"])):
                return False
            tok["status"], tok["data"] = status, data
        elif kind == "enter_scope":
            _, sid, parent = op
            if sid in self.scopes or (parent is not None and not self.active(parent)):
                return False
            self.scopes[sid] = {"parent": parent, "status": "active", "tokens": []}
        elif kind == "exit_scope":
            sid = op[1]
            if not self.active(sid):
                return False
            if any(self.tokens[t]["status"] in LIVE for t in self.scopes[sid]["tokens"]):
                return False
            if any(s["parent"] == sid and s["status"] == "active" for s in self.scopes.values()):
                return False
            self.scopes[sid]["status"] = "exited"
        elif kind == "cancel_scope":
            sid = op[1]
            if not self.active(sid):
                return False
            doomed = {sid}
            grew = True
            while grew:
                more = {k for k, s in self.scopes.items() if s["parent"] in doomed and s["status"] == "active"}
                grew = not more <= doomed
                doomed |= more
            for s in doomed:
                self.scopes[s]["status"] = "cancelled"
                for t in self.scopes[s]["tokens"]:
                    if self.tokens[t]["status"] in LIVE:
                        self.tokens[t]["status"] = "cancelled"
        elif kind == "increment":
            if op[1] < 1:
                return False
            self.steps += op[1]
        elif kind == "set_metadata":
            if op[1] == "step_count":
                return False
            self.meta[op[1]] = op[2]
        else:
            raise AssertionError(kind)
        return True


def _to_mutation(op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "set_ctx":
        return SetCtx(op[1])
    if kind == "put_ctx":
        return SetCtx(op[2], key=op[1])
    if kind == "update_ctx":
        return UpdateCtx(lambda c, k=op[1], v=op[2]: {**c, k: v})
    if kind == "update_ctx_raises":

        def boom(_: dict[str, Any]) -> None:
            raise KeyError("nope")

        return UpdateCtx(boom)
    if kind == "add_token":
        return AddToken(op[1], scope=op[2], status=op[3])
    if kind == "remove_token":
        return RemoveToken(op[1])
    if kind == "update_token":
        return UpdateToken(op[1], lambda t, s=op[2], d=op[3]: {**t, "status": s, "data": d})
    if kind == "enter_scope":
        return EnterScope(op[1], op[2])
    if kind == "exit_scope":
        return ExitScope(op[1])
    if kind == "cancel_scope":
        return CancelScope(op[1])
    if kind == "increment":
        return IncrementStepCount(op[1])
    if kind == "set_metadata":
        return SetMetadata(op[1], op[2])
    raise AssertionError(kind)


small_json = st.none() | st.integers(-3, 3) | st.text(max_size=2) | st.lists(st.integers(0, 2), max_size=2)
keys = st.sampled_from(["k", "l", "m"])
ops = st.one_of(
    st.tuples(st.just("set_ctx"), st.dictionaries(keys, small_json, max_size=2)),
    st.tuples(st.just("put_ctx"), keys, small_json),
    st.tuples(st.just("update_ctx"), keys, small_json),
    st.tuples(st.just("update_ctx_raises")),
    st.tuples(
        st.just("add_token"),
        st.sampled_from(TOKENS),
        st.sampled_from([None, *SCOPES]),
        st.sampled_from(["active", "waiting"]),
    ),
    st.tuples(st.just("remove_token"), st.sampled_from(TOKENS)),
    st.tuples(
        st.just("update_token"),
        st.sampled_from(TOKENS),
        st.sampled_from(["active", "waiting", "completed", "failed"]),
        small_json,
    ),
    st.tuples(st.just("enter_scope"), st.sampled_from(SCOPES), st.sampled_from([None, *SCOPES])),
    st.tuples(st.just("exit_scope"), st.sampled_from(SCOPES)),
    st.tuples(st.just("cancel_scope"), st.sampled_from(SCOPES)),
    st.tuples(st.just("increment"), st.integers(0, 3)),
    st.tuples(st.just("set_metadata"), st.sampled_from(["owner", "step_count"]), small_json),
)


def _compare(case: Case, model: Model) -> None:
    assert case.ctx == model.ctx
    assert {
        k: {"scope": t["scope"], "status": t["status"], "data": t["data"]} for k, t in case.tokens.items()
    } == model.tokens
    assert {
        k: {"parent": s["parent"], "status": s["status"], "tokens": s["tokens"]} for k, s in case.scopes.items()
    } == model.scopes
    md = case.metadata
    assert md.pop("step_count") == model.steps
    for k in ("schema_version", "created_at", "updated_at"):
        md.pop(k)
    assert md == model.meta


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(batches=st.lists(st.lists(ops, min_size=1, max_size=5), min_size=1, max_size=6))
def test_random_batches_match_a_plain_model(tenant: Tenant, batches: list[list[tuple[Any, ...]]]) -> None:
    case = tenant.cases.create()
    model = Model()
    for batch in batches:
        trial = model.copy()
        expected_bad = [i for i, op in enumerate(batch) if not trial.apply(op)]
        for op in batch:
            case.buffer(_to_mutation(op))
        if expected_bad:
            with pytest.raises(CommitRejected) as exc:
                case.commit()
            assert [p.index for p in exc.value.problems] == expected_bad
            assert len(case.pending) == len(batch)
            case.rollback()
        else:
            r = case.commit()
            assert r is not None
            assert len(r.mutations) == len(batch)
            model = trial
        _compare(case, model)
    _compare(tenant.cases.open(case.case_id), model)
    assert tenant.cases.verify(case.case_id).ok


def test_direct_store_writes_to_the_case_key_are_seen_as_tampering(tenant: Tenant, store: Store) -> None:
    case = _history(tenant, commits=1)
    item = store.get(T, "cases", "c1")
    assert item is not None
    store.commit(T, ops=[Put("cases", "c1", {**item.value, "ctx": {"rogue": True}})])
    v = tenant.cases.verify("c1")
    assert (v.ok, v.reason) == (False, "state_edited")
    with pytest.raises(CaseConflict):  # the stale handle cannot overwrite the rogue write silently
        case.put_ctx("x", 1).commit()
    store.commit(T, ops=[Put("cases", "c1", ["not", "a", "case"])])
    with pytest.raises(Conflict, match="not a case state"):
        tenant.cases.open("c1")
    v = tenant.cases.verify("c1")
    assert (v.ok, v.reason) == (False, "state_edited")
