"""Placeholder for the runtime layer (being written)."""

from __future__ import annotations

from typing import Any, TypeVar

from stateline.store.protocol import Store

T = TypeVar("T")


class Cache:
    def __init__(self, store: Store, tenant: str, name: str, **options: Any) -> None:
        raise NotImplementedError


class Sessions:
    def __init__(self, store: Store, tenant: str) -> None:
        raise NotImplementedError


class RateLimiter:
    def __init__(self, store: Store, tenant: str, name: str, rate: int, per: float, algorithm: str) -> None:
        raise NotImplementedError


class Idempotency:
    def __init__(self, store: Store, tenant: str) -> None:
        raise NotImplementedError


class Deliveries:
    def __init__(self, store: Store, tenant: str) -> None:
        raise NotImplementedError
