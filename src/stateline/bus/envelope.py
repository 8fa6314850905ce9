"""How a change becomes a NATS message: its subject, its envelope and its seed-subject aliases."""

from __future__ import annotations

import re
from typing import Any

from stateline.types import Change, ChangeOp

__all__ = ["ALIASES", "ENVELOPE_FIELDS", "SEED_SUBJECTS", "alias_messages", "envelope_of", "subject_of"]

# The seed subjects the platform already consumes. A run event names its own in ``meta.subject``
# (the runs layer does); events without one fall back to this table by type.
SEED_SUBJECTS = frozenset({"caf.exec.assigned.v1", "caf.exec.result.v1", "beamline.usage.v1.metered"})
ALIASES: dict[str, str] = {
    "step.assigned": "caf.exec.assigned.v1",
    "step.completed": "caf.exec.result.v1",
    "step.failed": "caf.exec.result.v1",
    "step.dead": "caf.exec.result.v1",
    "step.metered": "beamline.usage.v1.metered",
}

ENVELOPE_FIELDS = ("run_id", "flow_id", "step_id", "idempotency_key", "trace_id")

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def _token(text: str) -> str:
    # NATS splits subjects on '.', and '*', '>' and white space are special: keep one token per part.
    return _UNSAFE.sub("_", text) or "_"


def _layer_and_event(op: ChangeOp) -> tuple[str, str]:
    name = op.stream if op.op in ("append", "trim") else op.namespace
    layer = re.split(r"[.:]", name, maxsplit=1)[0]
    if op.op == "append" and op.events:
        return layer, op.events[-1].type
    return layer, op.op


def subject_of(change: Change, prefix: str = "stateline") -> str:
    """``<prefix>.<tenant>.<layer>.<event>`` from the change's first op (characters NATS reserves become ``_``)."""
    layer, event = _layer_and_event(change.ops[0]) if change.ops else ("none", "none")
    return f"{prefix}.{_token(change.tenant)}.{_token(layer)}.{_token(event)}"


def _fields(change: Change) -> dict[str, Any]:
    found: dict[str, Any] = {}
    sources: list[dict[str, Any]] = [change.meta]
    for op in change.ops:
        for e in op.events:
            sources.append(e.meta)
            if isinstance(e.data, dict):
                sources.append(e.data)
        if op.op == "put" and isinstance(op.value, dict):
            sources.append(op.value)
    for name in ENVELOPE_FIELDS:
        for src in sources:
            value = src.get(name)
            if value is not None:
                found[name] = value
                break
    return found


def _op_dict(op: ChangeOp) -> dict[str, Any]:
    if op.op == "append":
        return {
            "op": "append",
            "stream": op.stream,
            "events": [{"seq": e.seq, "type": e.type, "data": e.data, "meta": e.meta} for e in op.events],
        }
    if op.op == "trim":
        return {"op": "trim", "stream": op.stream, "before_seq": op.before_seq}
    out: dict[str, Any] = {"op": op.op, "namespace": op.namespace, "key": op.key, "version": op.version}
    if op.op != "delete":
        out["value"] = op.value
        out["expires_at"] = op.expires_at
    return out


def envelope_of(change: Change) -> dict[str, Any]:
    """The message body for a change: ids, the commit's meta, its ops, and the run fields where they apply."""
    return {
        "id": f"{change.tenant}:{change.revision}",
        "tenant_id": change.tenant,
        "revision": change.revision,
        "committed_at": change.committed_at,
        "meta": change.meta,
        "ops": [_op_dict(op) for op in change.ops],
        **_fields(change),
    }


def alias_messages(change: Change, alias_prefix: str = "") -> list[tuple[str, str, dict[str, Any]]]:
    """``(subject, message id, body)`` for every appended event that has a seed-subject alias."""
    out = []
    for op in change.ops:
        for e in op.events:
            tagged = e.meta.get("subject")
            alias = tagged if tagged in SEED_SUBJECTS else ALIASES.get(e.type)
            if alias is None:
                continue
            body: dict[str, Any] = {
                "tenant_id": change.tenant,
                "revision": change.revision,
                "event": e.type,
                "seq": e.seq,
                "stream": e.stream,
            }
            for src in (change.meta, e.meta, e.data if isinstance(e.data, dict) else {}):
                for name in ENVELOPE_FIELDS:
                    if src.get(name) is not None:
                        body[name] = src[name]
            body["data"] = e.data
            out.append((f"{alias_prefix}{alias}", f"{change.tenant}:{change.revision}:{e.seq}:{alias}", body))
    return out
