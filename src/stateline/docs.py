"""Versioned JSON documents with optimistic locking, multi-document transactions and a transaction log.

Storage layout (all through the Store port, so every adapter behaves the same):

* A document of the default collection lives at ``(docs, <key>)``; a document of collection ``c``
  at ``(docs.c, <key>)``. The stored item value is an envelope
  ``{"value": <document>, "actor": ..., "reason": ..., "trace_id": ...}`` (absent metadata is
  omitted). The write's timestamp is the item's own ``updated_at`` (the commit time), and its
  ``version`` is the item version. The same metadata also goes into the commit's ``meta``, so the
  change feed carries it.
* The transaction log lives at ``(docs.txlog, <tx id>)``. The entry of a committed transaction is
  written **in the same commit** as its documents (guarded by an ``Absent`` check on its own key,
  which also makes a retried commit after an ambiguous failure detectable). The revision is not
  known before the commit, so it is not stored in the value: a record's ``revision`` is its item's
  ``revision``, which is the revision of the commit that wrote it, and ``committed_at`` is the item's
  ``created_at``. Entries expire after ``txlog_retention`` seconds (7 days by default).
  ``run_transaction`` that gives up after its retries writes an entry with outcome ``conflict``
  in a commit of its own (that entry touches no document).
"""

from __future__ import annotations

import builtins
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, NotFound, PayloadTooLarge, StatelineError
from stateline.store.protocol import Store
from stateline.types import (
    Absent,
    Check,
    CheckFailure,
    Delete,
    Exists,
    Item,
    NamespaceStats,
    Op,
    Put,
    StreamAt,
    VersionIs,
    check_key,
    check_list,
    check_number,
    check_tenant,
)

__all__ = [
    "DEFAULT_TXLOG_RETENTION",
    "DOCS_NAMESPACE",
    "TXLOG_NAMESPACE",
    "DocStats",
    "Document",
    "Documents",
    "Transaction",
    "TxRecord",
    "Written",
]

T = TypeVar("T")

DOCS_NAMESPACE = "docs"
TXLOG_NAMESPACE = "docs.txlog"
DEFAULT_TXLOG_RETENTION = 7 * 86400.0
_RESERVED_COLLECTIONS = frozenset({"txlog"})
_MAX_META_CHARS = 1024
_MAX_RETRIES = 1000


# ---------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class Document:
    """A document as read: its value, version (1 for a new key, +1 per write) and the last write's metadata.

    ``updated_at`` (µs since the epoch) is the time of the last write; ``revision`` is the tenant
    revision of the commit that made it. ``collection`` is ``None`` for the default collection.
    """

    key: str
    value: Any
    version: int
    revision: int
    created_at: int
    updated_at: int
    actor: str | None = None
    reason: str | None = None
    trace_id: str | None = None
    collection: str | None = None


@dataclass(frozen=True, slots=True)
class Written:
    """The result of ``Documents.put``: the version now live, the commit's revision and time (µs)."""

    key: str
    version: int
    revision: int
    updated_at: int
    collection: str | None = None


@dataclass(frozen=True, slots=True)
class TxRecord:
    """One entry of the transaction log.

    ``keys`` are the ``(collection, key)`` pairs the transaction wrote (collection ``None`` is the
    default one), ``reads`` the pairs it read. ``outcome`` is ``committed`` (written in the same
    commit as the documents) or ``conflict`` (``run_transaction`` gave up; nothing else was written).
    ``revision`` is the revision of the commit that wrote this entry.
    """

    id: str
    actor: str | None
    reason: str | None
    trace_id: str | None
    keys: tuple[tuple[str | None, str], ...]
    reads: tuple[tuple[str | None, str], ...]
    outcome: str
    attempts: int
    revision: int
    committed_at: int


@dataclass(frozen=True, slots=True)
class DocStats:
    """Counts for one tenant: documents and their encoded bytes per collection (``None``: the default
    collection), transaction-log entries, every namespace of the tenant, streams and kept events."""

    revision: int
    documents: int
    bytes: int
    collections: dict[str | None, NamespaceStats]
    txlog_entries: int
    namespaces: dict[str, NamespaceStats]
    streams: int
    events: int


# ---------------------------------------------------------------- validation helpers


def _namespace(collection: object) -> str:
    if collection is None:
        return DOCS_NAMESPACE
    if type(collection) is not str:
        raise InvalidArgument("collection", f"must be a string or None, got {type(collection).__name__}")
    if (
        not collection
        or len(collection) > 100
        or not all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in collection)
    ):
        raise InvalidArgument("collection", f"{collection[:80]!r}: use 1-100 letters, digits, '_' or '-'")
    if collection in _RESERVED_COLLECTIONS:
        raise InvalidArgument("collection", f"{collection!r} is reserved")
    return f"{DOCS_NAMESPACE}.{collection}"


def _collection_of(namespace: str) -> str | None:
    return None if namespace == DOCS_NAMESPACE else namespace[len(DOCS_NAMESPACE) + 1 :]


def _opt_text(value: object, field: str) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidArgument(field, f"must be a string or None, got {type(value).__name__}")
    if len(value) > _MAX_META_CHARS:
        raise InvalidArgument(field, f"must be at most {_MAX_META_CHARS} characters")
    return value


def _expected(value: object, field: str = "expected_version") -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise InvalidArgument(field, f"must be a positive integer or None, got {value!r}")
    return value


def _flag(value: object, field: str) -> bool:
    if type(value) is not bool:
        raise InvalidArgument(field, f"must be True or False, got {value!r}")
    return value


def _meta(actor: str | None, reason: str | None, trace_id: str | None) -> dict[str, str]:
    out = {"layer": "docs"}
    if actor is not None:
        out["actor"] = actor
    if reason is not None:
        out["reason"] = reason
    if trace_id is not None:
        out["trace_id"] = trace_id
    return out


_ENVELOPED = "ops[0].value"  # how the store names the put's value (the envelope) in an error


def _value_error(exc: InvalidArgument) -> InvalidArgument:
    """An error of the store's prepare about the put's envelope, named as the caller's ``value``."""
    if exc.field.startswith(_ENVELOPED):
        details = {k: v for k, v in exc.details.items() if k != "field"}
        return InvalidArgument("value", exc.problem, details=details)
    return exc


def _value_too_large(exc: PayloadTooLarge) -> PayloadTooLarge:
    """The store's size error about the put's envelope, named as the caller's ``value``."""
    if str(exc.details.get("field", "")).startswith(_ENVELOPED):
        problem = exc.message.split(": ", 1)[-1]
        return PayloadTooLarge(f"value: {problem}", details={**exc.details, "field": "value"})
    return exc


def _envelope(value: Any, actor: str | None, reason: str | None, trace_id: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value}
    if actor is not None:
        out["actor"] = actor
    if reason is not None:
        out["reason"] = reason
    if trace_id is not None:
        out["trace_id"] = trace_id
    return out


def _document(item: Item) -> Document:
    raw = item.value
    if type(raw) is dict and "value" in raw:
        value, actor, reason, trace_id = raw["value"], raw.get("actor"), raw.get("reason"), raw.get("trace_id")
    else:  # an item written by something other than this layer: show it as it is
        value, actor, reason, trace_id = raw, None, None, None
    return Document(
        item.key,
        value,
        item.version,
        item.revision,
        item.created_at,
        item.updated_at,
        actor,
        reason,
        trace_id,
        _collection_of(item.namespace),
    )


def _describe_failure(f: CheckFailure) -> str:
    c = f.check
    if isinstance(c, StreamAt):
        return f"stream {c.stream!r}: expected seq {c.seq}, found {f.found}"
    where = c.key if c.namespace == DOCS_NAMESPACE else f"{_collection_of(c.namespace)}/{c.key}"
    found = "no document" if f.found is None else f"version {f.found}"
    if isinstance(c, VersionIs):
        return f"{where!r}: expected version {c.version}, found {found}"
    if isinstance(c, Absent):
        return f"{where!r}: expected no document, found {found}"
    return f"{where!r}: expected a document, found none"


def _conflict(exc: Conflict, prefix: str = "") -> Conflict:
    """Re-raise a Store conflict with a message naming each key, what was expected and what was found."""
    failures = [f for f in exc.failures if isinstance(f, CheckFailure)]
    if not failures:
        return exc
    text = "; ".join(_describe_failure(f) for f in failures)
    return Conflict(f"{prefix}{text}", failures=failures)


def _new_tx_id(store: Store) -> str:
    # sortable by start time, unique by the random tail
    return f"tx-{store.clock.now_us():016d}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- documents


class Documents:
    """Versioned JSON documents of one tenant (``t.docs``).

    Every write records change metadata (actor, reason, trace id; the timestamp is the commit
    time). Optimistic locking: ``put``/``delete`` take an ``expected_version`` (or
    ``must_not_exist``) and raise ``Conflict`` naming the version found when it does not hold.
    Bad input raises ``InvalidArgument`` naming the field and writes nothing. Thread-safe.
    """

    def __init__(self, store: Store, tenant: str, *, txlog_retention: float | None = DEFAULT_TXLOG_RETENTION) -> None:
        if not isinstance(store, Store):
            raise InvalidArgument("store", "must be a Store")
        self.store = store
        self.tenant = check_tenant(tenant)
        self.txlog_retention = (
            None
            if txlog_retention is None
            else check_number(txlog_retention, "txlog_retention", 1.0, 100 * 365 * 86400.0)
        )

    # ------------------------------------------------------------ single documents

    def get(self, key: str, *, collection: str | None = None) -> Document | None:
        """The document at ``key``, or ``None`` if there is none."""
        ns = _namespace(collection)
        item = self.store.get(self.tenant, ns, check_key(key))
        return None if item is None else _document(item)

    def exists(self, key: str, *, collection: str | None = None) -> bool:
        """Whether a document exists at ``key``."""
        return self.get(key, collection=collection) is not None

    def get_many(self, keys: Iterable[str], *, collection: str | None = None) -> builtins.list[Document | None]:
        """The documents at ``keys`` (``None`` where absent), in the order asked, in one round trip."""
        ns = _namespace(collection)
        pairs = [(ns, check_key(k, f"keys[{i}]")) for i, k in enumerate(check_list(keys, "keys"))]
        return [None if it is None else _document(it) for it in self.store.get_many(self.tenant, pairs)]

    def put(
        self,
        key: str,
        value: Any,
        *,
        expected_version: int | None = None,
        must_not_exist: bool = False,
        collection: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        trace_id: str | None = None,
    ) -> Written:
        """Write ``value`` (any JSON value) at ``key``; returns the new version and the commit's revision.

        With ``expected_version`` the write happens only if the live version is exactly that;
        with ``must_not_exist`` only if there is no document. Otherwise raises ``Conflict``
        whose message and ``failures`` name the version found (``None``: no document).
        """
        ns = _namespace(collection)
        key = check_key(key)
        expected = _expected(expected_version)
        if _flag(must_not_exist, "must_not_exist") and expected is not None:
            raise InvalidArgument("must_not_exist", "cannot be combined with expected_version")
        actor, reason, trace_id = (
            _opt_text(actor, "actor"),
            _opt_text(reason, "reason"),
            _opt_text(trace_id, "trace_id"),
        )
        checks: list[Check] = []
        if expected is not None:
            checks.append(VersionIs(ns, key, expected))
        elif must_not_exist:
            checks.append(Absent(ns, key))
        try:
            # the value is checked (and encoded) once, inside the envelope, by the store's prepare
            c = self.store.commit(
                self.tenant,
                checks,
                [Put(ns, key, _envelope(value, actor, reason, trace_id))],
                _meta(actor, reason, trace_id),
            )
        except Conflict as exc:
            raise _conflict(exc) from None
        except InvalidArgument as exc:
            raise _value_error(exc) from None
        except PayloadTooLarge as exc:
            raise _value_too_large(exc) from None
        return Written(key, c.versions[(ns, key)], c.revision, c.committed_at, collection)

    def delete(
        self,
        key: str,
        *,
        expected_version: int | None = None,
        collection: str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        trace_id: str | None = None,
    ) -> bool:
        """Delete the document at ``key``; ``True`` if one was deleted, ``False`` if there was none.

        With ``expected_version``, deletes only that version and raises ``Conflict`` (naming the
        version found) otherwise, including when there is no document.
        """
        ns = _namespace(collection)
        key = check_key(key)
        expected = _expected(expected_version)
        actor, reason, trace_id = (
            _opt_text(actor, "actor"),
            _opt_text(reason, "reason"),
            _opt_text(trace_id, "trace_id"),
        )
        check: Check = Exists(ns, key) if expected is None else VersionIs(ns, key, expected)
        try:
            self.store.commit(self.tenant, [check], [Delete(ns, key)], _meta(actor, reason, trace_id))
        except Conflict as exc:
            if expected is None and all(isinstance(f, CheckFailure) and f.found is None for f in exc.failures):
                return False
            raise _conflict(exc) from None
        return True

    def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, collection: str | None = None
    ) -> builtins.list[Document]:
        """Documents whose keys start with ``prefix``, in key order, after key ``after``, at most ``limit``
        (1..10,000). Page through by passing the last key of a page as ``after``."""
        ns = _namespace(collection)
        return [_document(it) for it in self.store.scan(self.tenant, ns, prefix, after, limit)]

    # ------------------------------------------------------------ transactions

    def transaction(
        self,
        *,
        actor: str | None = None,
        reason: str | None = None,
        trace_id: str | None = None,
        tx_id: str | None = None,
    ) -> Transaction:
        """A new multi-document transaction, used as a context manager (see ``Transaction``)."""
        return Transaction(self, actor=actor, reason=reason, trace_id=trace_id, tx_id=tx_id)

    def run_transaction(
        self,
        fn: Callable[[Transaction], T],
        *,
        retries: int = 10,
        base_delay: float = 0.01,
        max_delay: float = 1.0,
        actor: str | None = None,
        reason: str | None = None,
        trace_id: str | None = None,
        tx_id: str | None = None,
    ) -> T:
        """Run ``fn(tx)`` in a transaction and commit it; on ``Conflict`` or a transient error, run it again.

        Up to ``retries`` re-runs (so at most ``retries + 1`` attempts), each after a sleep drawn
        uniformly from ``[0, min(max_delay, base_delay * 2**n)]`` (exponential backoff, 10 ms to 1 s
        by default, full jitter). When the bound is reached the last ``Conflict`` (or transient error)
        is raised and the log records outcome ``conflict``. Any other error (``InvalidArgument``, an
        exception of ``fn``) is raised at once and nothing is written. Returns what ``fn`` returned on
        the attempt that committed. ``fn`` may run several times, so it should have no other effects.

        If a commit's outcome is unknown (a transient error while committing), the next attempt first
        looks for this transaction's log entry, so a commit that did land is never applied twice.
        A ``tx_id`` that is already in the log raises ``Conflict`` at once (the transaction ran before).
        """
        if not callable(fn):
            raise InvalidArgument("fn", "must be callable")
        if type(retries) is not int or not 0 <= retries <= _MAX_RETRIES:
            raise InvalidArgument("retries", f"must be an integer from 0 to {_MAX_RETRIES}, got {retries!r}")
        base = check_number(base_delay, "base_delay", 0.0, 60.0)
        cap = check_number(max_delay, "max_delay", 0.0, 600.0)
        actor, reason, trace_id = (
            _opt_text(actor, "actor"),
            _opt_text(reason, "reason"),
            _opt_text(trace_id, "trace_id"),
        )
        tx_id = _new_tx_id(self.store) if tx_id is None else check_key(tx_id, "tx_id")
        last: StatelineError | None = None
        keys: builtins.list[tuple[str, str]] = []
        pending: tuple[T] | None = None  # fn's result of an attempt whose commit outcome is unknown
        for attempt in range(1, retries + 2):
            if attempt > 1:
                time.sleep(random.uniform(0.0, min(cap, base * 2 ** (attempt - 2))))
            if pending is not None:
                try:
                    if self.store.get(self.tenant, TXLOG_NAMESPACE, tx_id) is not None:
                        return pending[0]
                except StatelineError as exc:
                    if not exc.transient:
                        raise
                    last = exc
                    continue
                pending = None
            tx = Transaction(self, actor=actor, reason=reason, trace_id=trace_id, tx_id=tx_id, attempt=attempt)
            try:
                result = fn(tx)
            except StatelineError as exc:
                if isinstance(exc, Conflict) or exc.transient:
                    last = exc
                    continue
                raise
            if tx._state != "open":  # fn committed or rolled back by itself
                return result
            keys = [(ns, k) for ns, k in tx._writes]
            try:
                tx.commit()
            except Conflict as exc:
                if any(isinstance(f, CheckFailure) and f.check == Absent(TXLOG_NAMESPACE, tx_id) for f in exc.failures):
                    raise Conflict(
                        f"transaction {tx_id!r} is already in the log: it committed before", failures=exc.failures
                    ) from None
                last = exc
                continue
            except StatelineError as exc:
                if not exc.transient:
                    raise
                last = exc
                pending = (result,)
                continue
            return result
        assert last is not None
        self._log_give_up(tx_id, actor, reason, trace_id, keys, retries + 1, last)
        raise last

    def _log_give_up(
        self,
        tx_id: str,
        actor: str | None,
        reason: str | None,
        trace_id: str | None,
        keys: builtins.list[tuple[str, str]],
        attempts: int,
        error: StatelineError,
    ) -> None:
        entry = {
            "id": tx_id,
            "actor": actor,
            "reason": reason,
            "trace_id": trace_id,
            "keys": [[_collection_of(ns), k] for ns, k in keys],
            "reads": [],
            "outcome": "conflict",
            "attempts": attempts,
            "error": error.code,
        }
        try:
            self.store.commit(
                self.tenant,
                [Absent(TXLOG_NAMESPACE, tx_id)],
                [Put(TXLOG_NAMESPACE, tx_id, entry, ttl=self.txlog_retention)],
                _meta(actor, reason, trace_id),
            )
        except StatelineError:
            # the log entry of a failed transaction is best effort: the caller gets the real error
            return

    # ------------------------------------------------------------ transaction log

    def get_transaction(self, tx_id: str) -> TxRecord:
        """The log entry of transaction ``tx_id``; ``NotFound`` if there is none (or it expired)."""
        item = self.store.get(self.tenant, TXLOG_NAMESPACE, check_key(tx_id, "tx_id"))
        if item is None:
            raise NotFound(f"no transaction {tx_id!r} in the log", details={"tx_id": tx_id})
        return _tx_record(item)

    def transactions(self, *, after: str | None = None, limit: int = 100) -> builtins.list[TxRecord]:
        """Log entries in transaction id order (ids start with the start time), after id ``after``,
        at most ``limit``. Page through by passing the last id of a page as ``after``."""
        return [_tx_record(it) for it in self.store.scan(self.tenant, TXLOG_NAMESPACE, "", after, limit)]

    # ------------------------------------------------------------ stats

    def stats(self) -> DocStats:
        """Document count and bytes per collection, every namespace, streams and kept events of the tenant."""
        s = self.store.stats(self.tenant)
        collections: dict[str | None, NamespaceStats] = {}
        for ns, st in s.namespaces.items():
            if ns == DOCS_NAMESPACE or (ns.startswith(DOCS_NAMESPACE + ".") and ns != TXLOG_NAMESPACE):
                collections[_collection_of(ns)] = st
        txlog = s.namespaces.get(TXLOG_NAMESPACE)
        return DocStats(
            revision=s.revision,
            documents=sum(v.items for v in collections.values()),
            bytes=sum(v.bytes for v in collections.values()),
            collections=collections,
            txlog_entries=0 if txlog is None else txlog.items,
            namespaces=dict(s.namespaces),
            streams=s.streams,
            events=s.events,
        )


def _tx_record(item: Item) -> TxRecord:
    v = item.value
    return TxRecord(
        id=item.key,
        actor=v.get("actor"),
        reason=v.get("reason"),
        trace_id=v.get("trace_id"),
        keys=tuple((c, k) for c, k in v.get("keys", [])),
        reads=tuple((c, k) for c, k in v.get("reads", [])),
        outcome=v.get("outcome", "committed"),
        attempts=v.get("attempts", 1),
        revision=item.revision,
        committed_at=item.created_at,
    )


# ---------------------------------------------------------------- transactions


class Transaction:
    """A multi-document transaction: reads record the versions seen, writes are buffered.

    Use it as a context manager: leaving the block normally commits every buffered write, plus the
    transaction's log entry, in ONE Store commit guarded by the version of every document read
    (a document read as absent must still be absent). If any of them changed, ``Conflict`` is
    raised (naming each key and the version found) and nothing is written. An exception inside
    the block rolls back: nothing is written. A transaction that wrote nothing commits nothing.
    Reads see the transaction's own buffered writes. Not thread-safe: one thread per transaction.
    """

    def __init__(
        self,
        docs: Documents,
        *,
        actor: str | None = None,
        reason: str | None = None,
        trace_id: str | None = None,
        tx_id: str | None = None,
        attempt: int = 1,
    ) -> None:
        self._docs = docs
        self.actor = _opt_text(actor, "actor")
        self.reason = _opt_text(reason, "reason")
        self.trace_id = _opt_text(trace_id, "trace_id")
        self.id = _new_tx_id(docs.store) if tx_id is None else check_key(tx_id, "tx_id")
        if type(attempt) is not int or attempt < 1:
            raise InvalidArgument("attempt", "must be a positive integer")
        self.attempt = attempt
        self._reads: dict[tuple[str, str], int | None] = {}
        self._expect: builtins.list[Check] = []
        self._writes: dict[tuple[str, str], Any] = {}  # value envelope, or _DELETED
        self._state = "open"
        self.revision: int | None = None

    # ------------------------------------------------------------ reads

    def _check_open(self) -> None:
        if self._state != "open":
            raise InvalidArgument("transaction", f"is already {self._state}")

    def _pending(self, ns: str, key: str) -> Document | None:
        env = self._writes[(ns, key)]
        if env is _DELETED:
            return None
        version = 0  # unknown: a blind write
        if (ns, key) in self._reads:
            version = (self._reads[(ns, key)] or 0) + 1
        for c in self._expect:
            if isinstance(c, VersionIs | Absent) and (c.namespace, c.key) == (ns, key):
                version = c.version + 1 if isinstance(c, VersionIs) else 1
        return Document(
            key,
            env["value"],
            version,
            0,
            0,
            0,
            self.actor,
            self.reason,
            self.trace_id,
            _collection_of(ns),
        )

    def get(self, key: str, *, collection: str | None = None) -> Document | None:
        """The document at ``key`` (or ``None``), as this transaction sees it; the version read is
        checked at commit. After a buffered write, returns that write (version = the one it will get
        if known, revision 0)."""
        return self.get_many([key], collection=collection)[0]

    def exists(self, key: str, *, collection: str | None = None) -> bool:
        """Whether a document exists at ``key`` (the absence or version seen is checked at commit)."""
        return self.get(key, collection=collection) is not None

    def get_many(self, keys: Iterable[str], *, collection: str | None = None) -> builtins.list[Document | None]:
        """Several documents in one round trip, each recorded like ``get``."""
        self._check_open()
        ns = _namespace(collection)
        wanted = [check_key(k, f"keys[{i}]") for i, k in enumerate(check_list(keys, "keys"))]
        fetch = [(ns, k) for k in wanted if (ns, k) not in self._writes]
        fetched: dict[str, Item | None] = {}
        if fetch:
            for (_, k), it in zip(fetch, self._docs.store.get_many(self._docs.tenant, fetch), strict=True):
                fetched[k] = it
                self._reads.setdefault((ns, k), None if it is None else it.version)
        out: builtins.list[Document | None] = []
        for k in wanted:
            if (ns, k) in self._writes:
                out.append(self._pending(ns, k))
            else:
                it = fetched[k]
                out.append(None if it is None else _document(it))
        return out

    # ------------------------------------------------------------ writes

    def put(
        self,
        key: str,
        value: Any,
        *,
        expected_version: int | None = None,
        must_not_exist: bool = False,
        collection: str | None = None,
    ) -> None:
        """Buffer a write of ``value`` at ``key``; ``expected_version`` / ``must_not_exist`` add checks."""
        self._check_open()
        ns = _namespace(collection)
        key = check_key(key)
        expected = _expected(expected_version)
        if _flag(must_not_exist, "must_not_exist") and expected is not None:
            raise InvalidArgument("must_not_exist", "cannot be combined with expected_version")
        codec.encode(value, "value", self._docs.store.max_value_bytes)
        if expected is not None:
            self._expect.append(VersionIs(ns, key, expected))
        elif must_not_exist:
            self._expect.append(Absent(ns, key))
        self._writes.pop((ns, key), None)  # keep the order of last writes
        self._writes[(ns, key)] = _envelope(value, self.actor, self.reason, self.trace_id)

    def delete(self, key: str, *, expected_version: int | None = None, collection: str | None = None) -> None:
        """Buffer a delete of ``key`` (deleting an absent document is allowed unless a version is expected)."""
        self._check_open()
        ns = _namespace(collection)
        key = check_key(key)
        expected = _expected(expected_version)
        if expected is not None:
            self._expect.append(VersionIs(ns, key, expected))
        self._writes.pop((ns, key), None)
        self._writes[(ns, key)] = _DELETED

    # ------------------------------------------------------------ ending

    def commit(self) -> int | None:
        """Commit the buffered writes and the log entry in one Store commit; returns its revision
        (``None`` if nothing was written). Raises ``Conflict`` if a version read or expected changed."""
        self._check_open()
        if not self._writes:
            self._state = "committed"
            return None
        docs = self._docs
        checks: builtins.list[Check] = [
            VersionIs(ns, k, v) if v is not None else Absent(ns, k) for (ns, k), v in self._reads.items()
        ]
        checks.extend(self._expect)
        checks.append(Absent(TXLOG_NAMESPACE, self.id))
        ops: builtins.list[Op] = [
            Delete(ns, k) if env is _DELETED else Put(ns, k, env) for (ns, k), env in self._writes.items()
        ]
        entry = {
            "id": self.id,
            "actor": self.actor,
            "reason": self.reason,
            "trace_id": self.trace_id,
            "keys": [[_collection_of(ns), k] for ns, k in self._writes],
            "reads": [[_collection_of(ns), k] for ns, k in self._reads],
            "outcome": "committed",
            "attempts": self.attempt,
        }
        ops.append(Put(TXLOG_NAMESPACE, self.id, entry, ttl=docs.txlog_retention))
        meta = {**_meta(self.actor, self.reason, self.trace_id), "tx": self.id}
        try:
            c = docs.store.commit(docs.tenant, checks, ops, meta)
        except Conflict as exc:
            self._state = "failed"
            raise _conflict(exc, f"transaction {self.id}: ") from None
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"
        self.revision = c.revision
        return c.revision

    def rollback(self) -> None:
        """Drop every buffered write; nothing is written. Allowed once, on an open transaction."""
        self._check_open()
        self._writes.clear()
        self._state = "rolled back"

    def __enter__(self) -> Transaction:
        self._check_open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state != "open":
            return
        if exc_type is not None:
            self.rollback()
            return
        self.commit()


_DELETED: Any = object()
