"""The audit of writes made through the API: who (key id), what, which resource, from where, under which trace."""

from __future__ import annotations

import functools
import ipaddress
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from stateline.database import Database

__all__ = ["ApiAuditor", "AuditEntry"]

_log = logging.getLogger("stateline.audit")


@functools.lru_cache(maxsize=4096)
def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited write."""

    key_id: str
    action: str
    resource_type: str
    resource_id: str
    method: str
    path: str
    status: int
    ip: str | None
    trace_id: str | None
    details: dict[str, Any] = field(default_factory=dict)


class ApiAuditor:
    """Writes an ``AuditEntry`` for every successful write through the API, in the caller's tenant.

    Entries go to the tenant's audit log (the ``audit`` layer), and at DEBUG level to the
    ``stateline.audit`` logger.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, tenant: str, entry: AuditEntry) -> None:
        """Record ``entry`` for ``tenant``; raises if the audit log cannot be written."""
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("audit", extra={"audit": asdict(entry), "tenant": tenant})
        details = {"method": entry.method, "path": entry.path, "status": entry.status, **entry.details}
        ip = entry.ip
        if ip is not None and not _is_ip(ip):
            details["client"] = ip  # e.g. a unix socket peer: kept, but not as an IP
            ip = None
        self.db.tenant(tenant).audit.log(
            f"key:{entry.key_id}",
            entry.action,
            entry.resource_type,
            entry.resource_id or None,
            details,
            ip,
            entry.trace_id,
        )
