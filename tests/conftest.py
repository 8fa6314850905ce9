"""Shared fixtures: one parametrised backend fixture that every conformance and layer test runs on.

Adding an adapter to every suite is one line in ``BACKENDS``. PostgreSQL, Redis and NATS are
real services on 127.0.0.1; without them the tests that need them skip with one line, except
under ``CI=true``, where a missing service fails the run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import strategies as st

from stateline import Database, FakeClock, Store, Tenant, Unavailable, open_store
from stateline.store.memory import MemoryStore
from stateline.types import Change

BACKENDS = ["memory", "sqlite", "redis", "postgresql"]
# STATELINE_TEST_BACKENDS=memory,sqlite narrows a local run; CI always runs every backend.
if os.environ.get("STATELINE_TEST_BACKENDS") and os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
    BACKENDS = [b for b in BACKENDS if b in os.environ["STATELINE_TEST_BACKENDS"].split(",")]

SERVICES = {
    "postgresql": ("127.0.0.1", 5432, "PostgreSQL on 127.0.0.1:5432 (Debian: apt-get install postgresql)"),
    "redis": ("127.0.0.1", 6379, "Redis on 127.0.0.1:6379 (Debian: apt-get install redis-server)"),
    "nats": ("127.0.0.1", 4222, "NATS with JetStream on 127.0.0.1:4222 (Debian: apt-get install nats-server)"),
}

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str) -> None:
    """Skip (or, under CI=true, fail) unless the named service answers on its port."""
    host, port, what = SERVICES[name]
    if _reachable(host, port):
        return
    if IN_CI:
        pytest.fail(f"CI=true and {what} is not reachable", pytrace=False)
    pytest.skip(f"needs {what}")


# Any JSON value, small: what tamper and damage tests write over stored data.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


class FlakyWatchStore(MemoryStore):
    """A memory store whose ``watch`` fails while ``down`` is set (commits still work); ``failed`` is
    set at the first failure."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.down = threading.Event()
        self.failed = threading.Event()

    def _watch(self, tenant: str, after_revision: int, timeout: float, limit: int) -> list[Change]:
        if self.down.is_set():
            self.failed.set()
            raise Unavailable("watch is down")
        return super()._watch(tenant, after_revision, timeout, limit)


@dataclass
class Backend:
    """One backend under test: its kind, a URL that reaches a fresh, private keyspace, and cleanup."""

    kind: str
    url: str
    clock: FakeClock
    cleanup: Callable[[], None] = lambda: None
    opened: list[Store] = field(default_factory=list)

    def open(self, clock: Any = "default", **options: Any) -> Store:
        """Open (another handle on) this backend's store. ``memory://`` always returns the same store."""
        if self.kind == "memory" and self.opened and not options:
            return self.opened[0]
        store = open_store(self.url, clock=self.clock if clock == "default" else clock, **options)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for s in self.opened:
            with contextlib.suppress(Exception):
                s.close()
        self.cleanup()


def make_backend(kind: str, tmp_path: Path, clock: FakeClock) -> Backend:
    """A fresh, isolated backend of ``kind`` (each test gets its own database file / schema / key prefix)."""
    suffix = uuid.uuid4().hex[:12]
    if kind == "memory":
        return Backend(kind, "memory://", clock)
    if kind == "sqlite":
        return Backend(kind, f"sqlite:///{tmp_path / f'sl-{suffix}.db'}", clock)
    if kind == "redis":
        require_service("redis")
        prefix = f"sl-{suffix}"

        def drop_redis_keys() -> None:
            client = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_timeout=10)
            try:
                batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for i in range(0, len(batch), 500):
                    client.unlink(*batch[i : i + 500])
            finally:
                client.close()

        return Backend(kind, f"redis://127.0.0.1:6379/0?prefix={prefix}", clock, cleanup=drop_redis_keys)
    if kind == "postgresql":
        require_service("postgresql")
        schema = f"sl_{suffix}"

        def drop_pg_schema() -> None:
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True, connect_timeout=10) as c:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        return Backend(
            kind, f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}", clock, cleanup=drop_pg_schema
        )
    raise AssertionError(f"unknown backend kind {kind!r}")


def settle(store: Store, tenant: str, quiet: float = 0.2, timeout: float = 15.0) -> int:
    """After a writer was killed, wait until ``tenant``'s revision stops moving and return it.

    A server may still finish a killed client's last COMMIT a moment after the kill (PostgreSQL
    does), so reads that must agree with each other wait for that first.
    """
    deadline = time.monotonic() + timeout
    last, since = store.revision(tenant), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = store.revision(tenant)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return last


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Backend]:
    b = make_backend(request.param, tmp_path, clock)
    try:
        yield b
    finally:
        b.close_all()


# Backends that several processes can open at once (the memory store lives in one process).
PROCESS_BACKENDS = [b for b in BACKENDS if b != "memory"]


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Backend]:
    """Like ``backend``, for tests whose child processes open the same store."""
    b = make_backend(request.param, tmp_path, clock)
    try:
        yield b
    finally:
        b.close_all()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


@pytest.fixture
def db(store: Store) -> Database:
    return Database(store)


@pytest.fixture
def tenant(db: Database) -> Tenant:
    return db.tenant("acme")
