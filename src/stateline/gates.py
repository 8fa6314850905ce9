"""Feature gates: which capabilities the deployment's checkpoint switches on, with a safe baseline fallback."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from stateline.errors import InvalidArgument
from stateline.store.protocol import Store
from stateline.types import check_number

__all__ = ["BASELINE", "CHECKPOINTS", "ENV_VAR", "FEATURES", "GateStatus", "Gates"]

log = logging.getLogger("stateline.gates")

ENV_VAR = "STATELINE_CHECKPOINT"
SYSTEM_TENANT = "system"
NAMESPACE = "gates"
KEY = "checkpoint"
MAX_WARNINGS = 256  # distinct warnings a Gates object logs before it stops naming each one

#: Checkpoints in order: each one includes every feature of the ones before it.
CHECKPOINTS: tuple[str, ...] = ("CP1-LC", "CP2-LC", "CP3-LC")

#: Which checkpoint each feature needs (``None``: the baseline, always available).
FEATURES: Mapping[str, str | None] = MappingProxyType(
    {
        # baseline: what a deployment can always do, even with no (or a broken) checkpoint
        "basic_routing": None,
        "local_audit": None,
        "basic_metrics": None,
        "single_tenant": None,
        # CP1-LC: runtime tables for a router
        "policy_cache": "CP1-LC",
        "sticky_sessions": "CP1-LC",
        "rate_limits": "CP1-LC",
        "idempotency": "CP1-LC",
        "delivery_tracking": "CP1-LC",
        "workflow_runs": "CP1-LC",
        # CP2-LC: several tenants and tamper-evident history
        "multi_tenant": "CP2-LC",
        "hash_chained_audit": "CP2-LC",
        "change_feed": "CP2-LC",
        "case_receipts": "CP2-LC",
        "prometheus_metrics": "CP2-LC",
        # CP3-LC: clustered operation
        "cluster_hot_state": "CP3-LC",
        "nats_relay": "CP3-LC",
        "distributed_locks": "CP3-LC",
        "live_dashboard": "CP3-LC",
    }
)

#: The features available whatever the checkpoint.
BASELINE: frozenset[str] = frozenset(f for f, cp in FEATURES.items() if cp is None)


@dataclass(frozen=True, slots=True)
class GateStatus:
    """The effective checkpoint (``None``: baseline only), where it came from, and why, if it fell back."""

    checkpoint: str | None
    source: str
    reason: str | None
    features: frozenset[str]


def _features_for(checkpoint: str | None, table: Mapping[str, str | None]) -> frozenset[str]:
    if checkpoint is None:
        return frozenset(f for f, cp in table.items() if cp is None)
    rank = CHECKPOINTS.index(checkpoint)
    return frozenset(f for f, cp in table.items() if cp is None or CHECKPOINTS.index(cp) <= rank)


class Gates:
    """Read-only feature gating by the deployment's checkpoint.

    The checkpoint comes from, in order: the ``checkpoint`` argument; the ``STATELINE_CHECKPOINT``
    environment variable; the Store (tenant ``system``, namespace ``gates``, key ``checkpoint``: a
    string such as ``"CP2-LC"`` or ``{"checkpoint": "CP2-LC"}``), re-read at most every ``refresh``
    seconds. The first source that is set decides. A missing, unknown or unreadable checkpoint gives
    the baseline features; the reason is logged once (logger ``stateline.gates``) and nothing ever
    raises. Nothing here writes the checkpoint: an operator sets it outside stateline's code.
    """

    def __init__(
        self,
        store: Store | None,
        *,
        checkpoint: str | None = None,
        environ: Mapping[str, str] | None = None,
        refresh: float = 30.0,
        table: Mapping[str, str | None] | None = None,
    ) -> None:
        if store is not None and not isinstance(store, Store):
            raise InvalidArgument("store", f"must be a Store or None, got {type(store).__name__}")
        if checkpoint is not None and type(checkpoint) is not str:
            raise InvalidArgument("checkpoint", f"must be a string or None, got {type(checkpoint).__name__}")
        for name, mapping in (("environ", environ), ("table", table)):
            if mapping is not None and not isinstance(mapping, Mapping):
                raise InvalidArgument(name, f"must be a mapping or None, got {type(mapping).__name__}")
        self._store = store
        self._arg = checkpoint
        self._environ = environ
        self._refresh_us = round(check_number(refresh, "refresh", 0, 86400, unit="seconds") * 1_000_000)
        tbl = dict(FEATURES if table is None else table)
        for feature, cp in tbl.items():
            if cp is not None and cp not in CHECKPOINTS:
                raise InvalidArgument("table", f"feature {feature!r} needs unknown checkpoint {cp!r}")
        self.table: Mapping[str, str | None] = MappingProxyType(tbl)
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._silenced = False
        self._status: GateStatus | None = None
        self._read_at = 0

    # ---- resolution

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._logged:
                return
            if len(self._logged) >= MAX_WARNINGS:
                # callers may ask about any number of names: remember a bounded set, then say so once
                if self._silenced:
                    return
                self._silenced = True
                message, args = "feature gates: %d distinct warnings logged; further ones are not", (MAX_WARNINGS,)
            else:
                self._logged.add(key)
        log.warning(message, *args)

    def _normalise(self, raw: object, source: str) -> GateStatus:
        if isinstance(raw, dict):
            raw = raw.get("checkpoint")
        if isinstance(raw, str) and raw.strip().upper() in CHECKPOINTS:
            cp = raw.strip().upper()
            return GateStatus(cp, source, None, _features_for(cp, self.table))
        shown = repr(raw)[:80]
        reason = f"unknown checkpoint {shown} from the {source}"
        self._warn_once(f"unknown:{source}:{shown}", "feature gates: %s; using the baseline features", reason)
        return GateStatus(None, source, reason, _features_for(None, self.table))

    def _resolve(self) -> GateStatus:
        if self._arg is not None:
            return self._normalise(self._arg, "argument")
        env = os.environ if self._environ is None else self._environ
        value = env.get(ENV_VAR)
        if value:
            return self._normalise(value, "environment")
        if self._store is None:
            return self._baseline("store", f"no checkpoint configured ({ENV_VAR} is not set, no store)")
        try:
            item = self._store.get(SYSTEM_TENANT, NAMESPACE, KEY)
        except Exception as exc:  # noqa: BLE001 - gates never raise: any failure to read means the baseline
            return self._baseline("store", f"the checkpoint could not be read from the store ({type(exc).__name__})")
        if item is None:
            return self._baseline("store", f"no checkpoint configured ({ENV_VAR} is not set, none in the store)")
        return self._normalise(item.value, "store")

    def _baseline(self, source: str, reason: str) -> GateStatus:
        self._warn_once(f"baseline:{reason}", "feature gates: %s; using the baseline features", reason)
        return GateStatus(None, source, reason, _features_for(None, self.table))

    def status(self) -> GateStatus:
        """The effective checkpoint, its source, the fallback reason if any, and the features."""
        try:
            now = self._store.clock.now_us() if self._store is not None else 0
            status = self._status
            if status is not None and now - self._read_at < self._refresh_us:
                return status
            status = self._resolve()
            self._status, self._read_at = status, now
            return status
        except Exception as exc:  # noqa: BLE001 - belt and braces: gating must never break a caller
            return self._baseline("error", f"gate resolution failed ({type(exc).__name__})")

    # ---- public API

    @property
    def checkpoint(self) -> str | None:
        """The effective checkpoint, or ``None`` when only the baseline applies."""
        return self.status().checkpoint

    def features(self) -> frozenset[str]:
        """Every feature available now."""
        return self.status().features

    def available(self, feature: str) -> bool:
        """Whether ``feature`` is available now; an unknown feature is not (and is logged once)."""
        if not isinstance(feature, str) or feature not in self.table:
            self._warn_once(f"feature:{feature!r}", "feature gates: unknown feature %r is not available", feature)
            return False
        return feature in self.status().features
