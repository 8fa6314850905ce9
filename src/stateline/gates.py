"""Placeholder for the gates layer (being written)."""

from __future__ import annotations

from typing import TypeVar

from stateline.store.protocol import Store

T = TypeVar("T")


class Gates:
    def __init__(self, store: Store) -> None:
        raise NotImplementedError
