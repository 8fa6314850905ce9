"""Documents, multi-document transactions, retries and the transaction log, on every backend."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from stateline import Append, Conflict, FakeClock, InvalidArgument, NewEvent, NotFound, Store, Tenant, Unavailable
from stateline.docs import DOCS_NAMESPACE, TXLOG_NAMESPACE, Documents, Transaction


@pytest.fixture
def docs(tenant: Tenant) -> Documents:
    return tenant.docs


def _no_writes(tenant: Tenant, before: int) -> None:
    assert tenant.revision() == before


# ---------------------------------------------------------------- single documents


def test_put_get_returns_value_version_and_metadata(docs: Documents, clock: FakeClock) -> None:
    w = docs.put("cfg", {"a": 1}, actor="ann", reason="init", trace_id="t-1")
    assert w.version == 1
    d = docs.get("cfg")
    assert d is not None
    assert (d.value, d.version, d.actor, d.reason, d.trace_id) == ({"a": 1}, 1, "ann", "init", "t-1")
    assert d.updated_at == d.created_at == clock.now_us()
    assert d.revision == w.revision
    clock.advance(5)
    w2 = docs.put("cfg", {"a": 2}, actor="bob")
    d2 = docs.get("cfg")
    assert d2 is not None
    assert (d2.value, d2.version, d2.actor, d2.reason) == ({"a": 2}, 2, "bob", None)
    assert d2.updated_at == clock.now_us() == w2.updated_at
    assert d2.created_at == d.created_at
    assert docs.get("missing") is None


def test_change_feed_carries_the_write_metadata(tenant: Tenant, docs: Documents) -> None:
    docs.put("cfg", 1, actor="ann", reason="because", trace_id="tr")
    change = tenant.changes()[-1]
    assert change.meta["actor"] == "ann"
    assert change.meta["reason"] == "because"
    assert change.meta["trace_id"] == "tr"
    assert change.ops[0].namespace == DOCS_NAMESPACE


def test_expected_version_conflict_names_the_found_version(tenant: Tenant, docs: Documents) -> None:
    docs.put("k", 1)
    docs.put("k", 2)
    before = tenant.revision()
    with pytest.raises(Conflict) as ei:
        docs.put("k", 3, expected_version=1)
    assert ei.value.failures[0].found == 2
    assert "found version 2" in str(ei.value)
    _no_writes(tenant, before)
    assert docs.put("k", 3, expected_version=2).version == 3
    doc = docs.get("k")
    assert doc is not None
    assert doc.value == 3


def test_must_not_exist(tenant: Tenant, docs: Documents) -> None:
    assert docs.put("new", "x", must_not_exist=True).version == 1
    before = tenant.revision()
    with pytest.raises(Conflict) as ei:
        docs.put("new", "y", must_not_exist=True)
    assert ei.value.failures[0].found == 1
    _no_writes(tenant, before)


def test_expected_version_on_a_missing_document_conflicts(docs: Documents) -> None:
    with pytest.raises(Conflict) as ei:
        docs.put("ghost", 1, expected_version=1)
    assert ei.value.failures[0].found is None
    assert not docs.exists("ghost")


def test_delete(tenant: Tenant, docs: Documents) -> None:
    docs.put("a", 1)
    docs.put("a", 2)
    assert docs.exists("a")
    before = tenant.revision()
    with pytest.raises(Conflict) as ei:
        docs.delete("a", expected_version=1)
    assert ei.value.failures[0].found == 2
    _no_writes(tenant, before)
    assert docs.delete("a", expected_version=2) is True
    assert not docs.exists("a")
    assert docs.delete("a") is False
    with pytest.raises(Conflict):
        docs.delete("a", expected_version=1)
    docs.put("b", 1)
    assert docs.delete("b", actor="ann") is True
    assert tenant.changes()[-1].meta["actor"] == "ann"
    # a deleted key that comes back starts again at version 1
    assert docs.put("a", 9).version == 1


def test_get_many_in_order_in_one_store_call(docs: Documents, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    docs.put("a", 1)
    docs.put("c", 3)
    calls: list[Any] = []
    real = store.get_many

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    def no_single_gets(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("get_many must not fall back to get")

    monkeypatch.setattr(store, "get_many", counting)
    monkeypatch.setattr(store, "get", no_single_gets)
    got = docs.get_many(["c", "b", "a"])
    assert [None if d is None else d.value for d in got] == [3, None, 1]
    assert len(calls) == 1
    assert docs.get_many([]) == []


def test_list_pages_by_prefix(docs: Documents) -> None:
    for i in range(7):
        docs.put(f"user/{i}", i)
    docs.put("other", 0)
    first = docs.list("user/", limit=3)
    assert [d.key for d in first] == ["user/0", "user/1", "user/2"]
    second = docs.list("user/", after=first[-1].key, limit=3)
    assert [d.key for d in second] == ["user/3", "user/4", "user/5"]
    third = docs.list("user/", after=second[-1].key, limit=3)
    assert [d.value for d in third] == [6]
    assert [d.key for d in docs.list()] == ["other", *(f"user/{i}" for i in range(7))]


def test_collections_are_separate_namespaces(docs: Documents) -> None:
    docs.put("k", "default")
    docs.put("k", "users", collection="users")
    a, b = docs.get("k"), docs.get("k", collection="users")
    assert a is not None
    assert b is not None
    assert (a.value, a.collection) == ("default", None)
    assert (b.value, b.collection) == ("users", "users")
    assert [d.value for d in docs.list(collection="users")] == ["users"]
    with pytest.raises(InvalidArgument) as ei:
        docs.put("k", 1, collection="txlog")
    assert ei.value.field == "collection"
    with pytest.raises(InvalidArgument):
        docs.get("k", collection="a.b")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key": ""}, "key"),
        ({"key": 5}, "key"),
        ({"value": float("nan")}, "value"),
        ({"value": {1: 2}}, "value"),
        ({"value": object()}, "value"),
        ({"expected_version": 0}, "expected_version"),
        ({"expected_version": True}, "expected_version"),
        ({"expected_version": "1"}, "expected_version"),
        ({"expected_version": 1, "must_not_exist": True}, "must_not_exist"),
        ({"must_not_exist": 1}, "must_not_exist"),
        ({"actor": 5}, "actor"),
        ({"reason": "x" * 5000}, "reason"),
        ({"trace_id": b"t"}, "trace_id"),
        ({"collection": ""}, "collection"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(
    tenant: Tenant, docs: Documents, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"key": "k", "value": 1, **kwargs}
    key, value = args.pop("key"), args.pop("value")
    before = tenant.revision()
    with pytest.raises(InvalidArgument) as ei:
        docs.put(key, value, **args)
    assert ei.value.field == field
    _no_writes(tenant, before)


def test_bad_input_on_reads(docs: Documents) -> None:
    with pytest.raises(InvalidArgument):
        docs.get("")
    with pytest.raises(InvalidArgument):
        docs.get_many("abc")
    with pytest.raises(InvalidArgument):
        docs.get_many(["a", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        docs.list(limit=0)
    with pytest.raises(InvalidArgument):
        docs.delete("k", expected_version=-1)
    with pytest.raises(InvalidArgument):
        docs.get_transaction("")


def test_two_concurrent_writers_exactly_one_wins(backend: Any, tenant: Tenant) -> None:
    tenant.docs.put("doc", {"n": 0})
    stores = [backend.open() for _ in range(2)]
    writers = [Documents(s, tenant.name) for s in stores]
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def write(i: int) -> None:
        barrier.wait()
        try:
            results[i] = writers[i].put("doc", {"n": i + 1}, expected_version=1, actor=f"w{i}")
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wins = [r for r in results if not isinstance(r, Exception)]
    losses = [r for r in results if isinstance(r, Exception)]
    assert len(wins) == 1
    assert len(losses) == 1
    assert isinstance(losses[0], Conflict)
    assert losses[0].failures[0].found == 2
    assert "found version 2" in str(losses[0])
    doc = tenant.docs.get("doc")
    assert doc is not None
    assert doc.version == 2
    assert doc.value == {"n": results.index(wins[0]) + 1}


# ---------------------------------------------------------------- transactions


def test_transaction_commits_all_in_one_commit_with_its_log_entry(tenant: Tenant, docs: Documents) -> None:
    docs.put("a", 1)
    before = tenant.revision()
    with docs.transaction(actor="ann", reason="move") as tx:
        a = tx.get("a")
        assert a is not None
        tx.put("a", a.value - 1)
        tx.put("b", 1)
        tx.delete("gone")
    assert tenant.revision() == before + 1
    assert tx.revision == before + 1
    a2, b2 = docs.get_many(["a", "b"])
    assert a2 is not None
    assert b2 is not None
    assert (a2.value, b2.value, a2.actor, b2.reason) == (0, 1, "ann", "move")
    rec = docs.get_transaction(tx.id)
    assert rec.revision == tx.revision == a2.revision
    assert rec.outcome == "committed"
    assert rec.attempts == 1
    assert set(rec.keys) == {(None, "a"), (None, "b"), (None, "gone")}
    assert rec.reads == ((None, "a"),)
    assert rec.actor == "ann"
    change = tenant.changes()[-1]
    assert change.meta["tx"] == tx.id
    assert {op.namespace for op in change.ops} == {DOCS_NAMESPACE, TXLOG_NAMESPACE}


def test_transaction_with_one_stale_expected_version_writes_none(tenant: Tenant, docs: Documents) -> None:
    for k in ("x", "y", "z"):
        docs.put(k, 0)
    docs.put("z", 1)  # z is now at version 2
    before = tenant.revision()

    def body() -> None:
        with docs.transaction() as tx:
            tx.put("x", 10, expected_version=1)
            tx.put("y", 10, expected_version=1)
            tx.put("z", 10, expected_version=1)

    with pytest.raises(Conflict) as ei:
        body()
    assert "'z'" in str(ei.value)
    assert "found version 2" in str(ei.value)
    _no_writes(tenant, before)
    assert [d.value for d in docs.get_many(["x", "y", "z"]) if d is not None] == [0, 0, 1]
    assert docs.transactions() == []


def test_transaction_read_versions_guard_the_commit(backend: Any, tenant: Tenant, docs: Documents) -> None:
    docs.put("a", 1)
    other = Documents(backend.open(), tenant.name)
    tx = docs.transaction()
    a = tx.get("a")
    assert tx.get("absent") is None
    assert a is not None
    tx.put("b", a.value + 1)
    other.put("a", 5)  # a concurrent writer changes what we read
    before = tenant.revision()
    with pytest.raises(Conflict) as ei:
        tx.commit()
    assert ei.value.failures[0].found == 2
    _no_writes(tenant, before)
    assert not docs.exists("b")


def test_transaction_absent_read_is_checked(backend: Any, tenant: Tenant, docs: Documents) -> None:
    other = Documents(backend.open(), tenant.name)

    def body() -> None:
        with docs.transaction() as tx:
            assert not tx.exists("slot")
            tx.put("slot", "mine")
            other.put("slot", "theirs")

    with pytest.raises(Conflict) as ei:
        body()
    assert ei.value.failures[0].found == 1
    doc = docs.get("slot")
    assert doc is not None
    assert doc.value == "theirs"


def test_exception_inside_block_commits_nothing(tenant: Tenant, docs: Documents) -> None:
    docs.put("a", 1)
    before = tenant.revision()
    tx = docs.transaction()

    def body() -> None:
        with tx:
            tx.put("a", 2)
            tx.put("b", 2)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        body()
    _no_writes(tenant, before)
    assert docs.get_many(["a", "b"])[1] is None
    with pytest.raises(InvalidArgument):
        tx.put("c", 1)


def test_transaction_reads_its_own_writes(docs: Documents) -> None:
    docs.put("a", 1)
    with docs.transaction() as tx:
        a = tx.get("a")
        assert a is not None
        tx.put("a", 2)
        again = tx.get("a")
        assert again is not None
        assert (again.value, again.version) == (2, 2)
        tx.delete("a")
        assert tx.get("a") is None
        tx.put("n", 1, must_not_exist=True)
        n = tx.get("n")
        assert n is not None
        assert n.version == 1
    assert not docs.exists("a")


def test_read_only_and_finished_transactions(tenant: Tenant, docs: Documents) -> None:
    docs.put("a", 1)
    before = tenant.revision()
    with docs.transaction() as tx:
        tx.get_many(["a", "b"])
    assert tx.revision is None
    _no_writes(tenant, before)
    with pytest.raises(InvalidArgument):
        tx.get("a")
    tx2 = docs.transaction()
    tx2.put("a", 2)
    tx2.rollback()
    with pytest.raises(InvalidArgument):
        tx2.commit()
    _no_writes(tenant, before)


def test_transaction_bad_input(tenant: Tenant, docs: Documents) -> None:
    before = tenant.revision()
    with docs.transaction() as tx:
        with pytest.raises(InvalidArgument):
            tx.put("a", float("inf"))
        with pytest.raises(InvalidArgument):
            tx.put("", 1)
        with pytest.raises(InvalidArgument):
            tx.delete("a", expected_version=0)
        with pytest.raises(InvalidArgument):
            tx.get_many("ab")
    _no_writes(tenant, before)
    with pytest.raises(InvalidArgument):
        docs.transaction(actor=3)  # type: ignore[arg-type]


def test_run_transaction_under_8_contending_threads_loses_no_update(backend: Any, tenant: Tenant) -> None:
    tenant.docs.put("counter", 0)
    per_thread = 5
    stores = [backend.open() for _ in range(8)] if backend.kind != "memory" else [backend.open()] * 8
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    ids: list[str] = []

    def bump(tx: Transaction) -> str:
        doc = tx.get("counter")
        assert doc is not None
        tx.put("counter", doc.value + 1)
        return tx.id

    def worker(i: int) -> None:
        docs = Documents(stores[i], tenant.name)
        barrier.wait()
        try:
            ids.extend(
                docs.run_transaction(bump, retries=200, base_delay=0.001, max_delay=0.05, actor=f"w{i}")
                for _ in range(per_thread)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    doc = tenant.docs.get("counter")
    assert doc is not None
    assert doc.value == 8 * per_thread
    records = [tenant.docs.get_transaction(i) for i in ids]
    assert all(r.outcome == "committed" for r in records)
    assert len({r.revision for r in records}) == 8 * per_thread
    assert sum(r.attempts for r in records) >= 8 * per_thread


def test_run_transaction_gives_up_with_the_last_conflict(tenant: Tenant, docs: Documents) -> None:
    docs.put("a", 1)
    docs.put("a", 2)
    calls = []

    def stale(tx: Transaction) -> None:
        calls.append(1)
        tx.put("a", 3, expected_version=1)

    with pytest.raises(Conflict) as ei:
        docs.run_transaction(stale, retries=2, base_delay=0.0, tx_id="tx-stale", actor="ann")
    assert len(calls) == 3
    assert ei.value.failures[0].found == 2
    doc = docs.get("a")
    assert doc is not None
    assert doc.value == 2
    rec = docs.get_transaction("tx-stale")
    assert (rec.outcome, rec.attempts, rec.keys, rec.actor) == ("conflict", 3, ((None, "a"),), "ann")


def test_run_transaction_never_retries_bad_input(tenant: Tenant, docs: Documents) -> None:
    calls = []

    def bad(tx: Transaction) -> None:
        calls.append(1)
        tx.put("a", {1, 2})

    before = tenant.revision()
    with pytest.raises(InvalidArgument):
        docs.run_transaction(bad, retries=5, base_delay=0.0)
    assert len(calls) == 1

    def boom(tx: Transaction) -> None:
        calls.append(1)
        tx.put("a", 1)
        raise KeyError("x")

    with pytest.raises(KeyError):
        docs.run_transaction(boom, retries=5, base_delay=0.0)
    assert len(calls) == 2
    _no_writes(tenant, before)
    for kwargs in ({"retries": -1}, {"retries": True}, {"base_delay": -1.0}, {"max_delay": "1"}):
        with pytest.raises(InvalidArgument):
            docs.run_transaction(lambda tx: None, **kwargs)
    with pytest.raises(InvalidArgument):
        docs.run_transaction("not callable")  # type: ignore[arg-type]


def test_run_transaction_retries_transient_errors(docs: Documents) -> None:
    calls = []

    def flaky(tx: Transaction) -> int:
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("the store blinked")
        tx.put("a", len(calls))
        return len(calls)

    assert docs.run_transaction(flaky, base_delay=0.0) == 3
    doc = docs.get("a")
    assert doc is not None
    assert doc.value == 3


def test_commit_with_unknown_outcome_is_not_applied_twice(
    docs: Documents, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs.put("counter", 0)
    real = store.commit
    failed = []

    def lands_then_fails(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if not failed:
            failed.append(1)
            raise Unavailable("connection lost after the commit was sent")
        return result

    monkeypatch.setattr(store, "commit", lands_then_fails)
    calls = []

    def bump(tx: Transaction) -> int:
        calls.append(1)
        doc = tx.get("counter")
        assert doc is not None
        tx.put("counter", doc.value + 1)
        return doc.value + 1

    assert docs.run_transaction(bump, base_delay=0.0) == 1
    assert len(calls) == 1
    doc = docs.get("counter")
    assert doc is not None
    assert doc.value == 1


# ---------------------------------------------------------------- log and stats


def test_transaction_log_lists_in_start_order_and_pages(docs: Documents, clock: FakeClock) -> None:
    ids = []
    for i in range(5):
        clock.advance(1)
        with docs.transaction(actor=f"a{i}") as tx:
            tx.put(f"k{i}", i)
        ids.append(tx.id)
    page = docs.transactions(limit=3)
    assert [r.id for r in page] == ids[:3]
    rest = docs.transactions(after=page[-1].id, limit=3)
    assert [r.id for r in rest] == ids[3:]
    assert [r.actor for r in page + rest] == [f"a{i}" for i in range(5)]
    revisions = [r.revision for r in page + rest]
    assert revisions == sorted(revisions)
    with pytest.raises(NotFound):
        docs.get_transaction("tx-unknown")


def test_transaction_log_entries_expire(store: Store, tenant: Tenant, clock: FakeClock) -> None:
    docs = Documents(store, tenant.name, txlog_retention=60)
    with docs.transaction() as tx:
        tx.put("a", 1)
    assert docs.get_transaction(tx.id).outcome == "committed"
    clock.advance(61)
    with pytest.raises(NotFound):
        docs.get_transaction(tx.id)
    assert docs.exists("a")
    with pytest.raises(InvalidArgument):
        Documents(store, tenant.name, txlog_retention=0)


def test_stats_counts_documents_bytes_streams_and_events(tenant: Tenant, docs: Documents) -> None:
    empty = docs.stats()
    assert (empty.documents, empty.bytes, empty.streams, empty.events) == (0, 0, 0, 0)
    docs.put("a", "x" * 100)
    docs.put("b", 1)
    docs.put("u", {"name": "ann"}, collection="users")
    with docs.transaction() as tx:
        tx.put("c", 2)
    tenant.commit([], [Append("streams:s", [NewEvent("e", 1), NewEvent("e", 2)])])
    s = docs.stats()
    assert s.documents == 4
    assert s.collections[None].items == 3
    assert s.collections["users"].items == 1
    assert s.collections[None].bytes > 100
    assert s.bytes == s.collections[None].bytes + s.collections["users"].bytes
    assert s.txlog_entries == 1
    assert s.streams == 1
    assert s.events == 2
    assert s.revision == tenant.revision()
    docs.delete("a")
    assert docs.stats().documents == 3


def test_run_transaction_when_fn_commits_by_itself(docs: Documents) -> None:
    def explicit(tx: Transaction) -> str:
        tx.put("a", 1)
        tx.commit()
        return "done"

    assert docs.run_transaction(explicit) == "done"
    doc = docs.get("a")
    assert doc is not None
    assert doc.value == 1
    assert len(docs.transactions()) == 1


def test_run_transaction_with_an_id_already_in_the_log_conflicts_at_once(tenant: Tenant, docs: Documents) -> None:
    calls = []

    def once(tx: Transaction) -> None:
        calls.append(1)
        tx.put("a", len(calls))

    docs.run_transaction(once, tx_id="order-42")
    before = tenant.revision()
    with pytest.raises(Conflict) as ei:
        docs.run_transaction(once, tx_id="order-42", base_delay=0.0)
    assert "already in the log" in str(ei.value)
    assert len(calls) == 2
    _no_writes(tenant, before)
    doc = docs.get("a")
    assert doc is not None
    assert doc.value == 1
