"""Placeholder for the audit layer (being written)."""

from __future__ import annotations

from typing import TypeVar

from stateline.store.protocol import Store

T = TypeVar("T")


class AuditLog:
    def __init__(self, store: Store, tenant: str) -> None:
        raise NotImplementedError
