"""Running the service: the bootstrap admin key and the app factory used by ``stateline serve``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

import stateline
from stateline.api.app import ApiSettings, create_app
from stateline.api.auth import KeyStore
from stateline.database import DEFAULT_URL, Database
from stateline.observability import configure_logging

__all__ = ["app_from_env", "bootstrap_admin_key", "settings_from_env"]


def bootstrap_admin_key(db: Database, tenant: str) -> str | None:
    """Create an admin key for ``tenant`` if the store holds no usable key at all; returns the token
    (to show once) or ``None`` when keys already exist."""
    keys = KeyStore(db.store)
    if keys.has_keys():
        return None
    token, _ = keys.create(tenant, ["admin"], name="bootstrap admin key")
    return token


#: settings from the environment where 0 means off (``None``): variable, field, parser
_ZERO_IS_OFF: tuple[tuple[str, str, Callable[[str], float]], ...] = (
    ("STATELINE_RATE_LIMIT", "rate_limit", float),
    ("STATELINE_SWEEP_INTERVAL", "sweep_interval", float),
    ("STATELINE_KEEP_CHANGES", "keep_changes", int),
    ("STATELINE_AUDIT_RETENTION_DAYS", "audit_retention_days", float),
)


def settings_from_env() -> ApiSettings:
    """Service settings from ``STATELINE_RATE_LIMIT`` (0: off), ``STATELINE_SWEEP_INTERVAL`` (seconds,
    0: off), ``STATELINE_KEEP_CHANGES`` and ``STATELINE_AUDIT_RETENTION_DAYS`` (0: keep all) and
    ``STATELINE_MAX_BODY_BYTES``."""
    s = ApiSettings()
    for name, field, parse in _ZERO_IS_OFF:
        raw = os.environ.get(name)
        if raw is not None:
            setattr(s, field, parse(raw) or None)
    body = os.environ.get("STATELINE_MAX_BODY_BYTES")
    if body is not None:
        s.max_body_bytes = int(body)
    return s


def app_from_env() -> FastAPI:
    """An app over ``STATELINE_URL`` that owns its database (closed at shutdown); for worker processes."""
    configure_logging(os.environ.get("STATELINE_LOG_LEVEL", "INFO").upper())  # worker processes start afresh
    db = stateline.open(os.environ.get("STATELINE_URL", DEFAULT_URL))
    app = create_app(db, settings=settings_from_env())
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[None]:
        try:
            async with inner(a):
                yield
        finally:
            db.close()

    app.router.lifespan_context = lifespan
    return app
