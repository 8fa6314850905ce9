"""Placeholder for the docs layer (being written)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from stateline.store.protocol import Store

T = TypeVar("T")


class Documents:
    def __init__(self, store: Store, tenant: str) -> None:
        raise NotImplementedError

    def transaction(self) -> Transaction:
        raise NotImplementedError

    def run_transaction(self, fn: Callable[[Transaction], T], **options: Any) -> T:
        raise NotImplementedError


class Transaction:
    def __init__(self) -> None:
        raise NotImplementedError
