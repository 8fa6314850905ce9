"""Fixtures of the HTTP tests: an app over the parametrised ``db`` (every backend) or over memory only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import stateline
from stateline import Database, FakeClock
from stateline.api import ApiSettings, create_app
from stateline.api.app import ApiContext


@dataclass
class Api:
    """An app, a client on it and a way to mint keys."""

    app: FastAPI
    client: TestClient
    clock: FakeClock
    db: Database
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def ctx(self) -> ApiContext:
        ctx: ApiContext = self.app.state.stateline
        return ctx

    def key(self, tenant: str, scopes: list[str] | None = None, **options: Any) -> dict[str, str]:
        """Headers carrying a new key of ``tenant``."""
        token, _ = self.ctx.keys.create(tenant, scopes or ["read", "write"], **options)
        return {"Authorization": f"Bearer {token}"}


def make_api(db: Database, clock: FakeClock, **settings: Any) -> Iterator[Api]:
    settings.setdefault("rate_limit", None)
    # Freezing runs a full collection at every app start (~50 ms): only the test of it turns it on.
    settings.setdefault("freeze_gc", False)
    app = create_app(db, settings=ApiSettings(**settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(app, client, clock, db)


@pytest.fixture
def api(db: Database, clock: FakeClock) -> Iterator[Api]:
    """The app over every backend in BACKENDS."""
    yield from make_api(db, clock)


@pytest.fixture
def mem_api(clock: FakeClock) -> Iterator[Api]:
    """The app over a memory store (for behaviour that does not depend on the backend)."""
    with stateline.open("memory://", clock=clock) as db:
        yield from make_api(db, clock)
