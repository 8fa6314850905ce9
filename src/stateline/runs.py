"""Workflow runs and their steps: a DAG of steps leased to workers, with retries, dead letters and usage metering."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, NotFound
from stateline.store.protocol import (
    MAX_META_BYTES,
    MAX_OPS,
    PreparedAppend,
    PreparedCommit,
    PreparedDelete,
    PreparedEvent,
    PreparedIncr,
    PreparedOp,
    PreparedPut,
    Store,
)
from stateline.types import (
    Absent,
    Append,
    Check,
    Commit,
    Delete,
    Event,
    Incr,
    Item,
    LastWritten,
    NewEvent,
    Op,
    Put,
    VersionIs,
    check_key,
    check_list,
    check_number,
    check_tenant,
    same_secret,
)

__all__ = [
    "ASSIGNED_EVENT_FIELDS",
    "ASSIGNED_SUBJECT",
    "CORRELATION_FIELDS",
    "MAX_STEPS_PER_RUN",
    "RESULT_EVENT_FIELDS",
    "RESULT_SUBJECT",
    "RUN_STATUSES",
    "RUN_TRANSITIONS",
    "STEP_STATUSES",
    "STEP_TRANSITIONS",
    "USAGE_EVENT_FIELDS",
    "USAGE_SUBJECT",
    "Claim",
    "Heartbeat",
    "RetryPolicy",
    "Run",
    "Runs",
    "Step",
    "StepSpec",
    "Usage",
]

# ---------------------------------------------------------------- storage layout
#
# runs            <run_id>                                   the run document
# runs.steps      <run_id>/<step_id>                         one document per step
# runs.ready      <kind>/<due µs, 20 digits>/<run_id>/<step_id>
#                 the due index: a pending/retrying step is due when it may be claimed, an
#                 assigned/running step when its lease expires (then it may be re-claimed)
# runs.kinds      <kind>                                     every step kind ever created
# runs.open       <run_id>                                   counter: steps not yet settled
# runs.usage      <µs, 20 digits>/<run_id>/<step_id>         one usage record per metered step
# runs.by_status  <status>/<run_id>                          index for list(status=...)
# runs.by_flow    <flow_id>/<run_id>                         index for list(flow_id=...)
# stream runs:<run_id>                                       the run's history

NS_RUNS = "runs"
NS_STEPS = "runs.steps"
NS_READY = "runs.ready"
NS_KINDS = "runs.kinds"
NS_OPEN = "runs.open"
NS_USAGE = "runs.usage"
NS_BY_STATUS = "runs.by_status"
NS_BY_FLOW = "runs.by_flow"

MAX_STEPS_PER_RUN = 2000
"""A run is created, cancelled and resumed in single commits, so its size is bounded."""

MAX_LEASE_SECONDS = 7 * 86400.0
MAX_CLAIM_LIMIT = 1000
_KINDS_CACHE_SECONDS = 1.0
_HELD_MAX = 10_000
_MIN_WINDOW = 4
_MAX_WINDOW = 64
_MAX_RETRIES = 200  # bounded re-tries of a commit that lost a race on an item other than the caller's step

# ---------------------------------------------------------------- statuses and transitions

RUN_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
STEP_STATUSES = ("pending", "assigned", "running", "completed", "failed", "retrying", "dead", "cancelled")

RUN_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "pending": frozenset({"running", "cancelled"}),
    "running": frozenset({"completed", "failed", "cancelled"}),
    "failed": frozenset({"running", "cancelled"}),  # running again: retry_dead revived the last dead step
    "completed": frozenset(),
    "cancelled": frozenset(),
}
"""Legal run transitions: ``RUN_TRANSITIONS[from]`` is the set of statuses a run may move to."""

STEP_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "pending": frozenset({"assigned", "cancelled"}),
    "assigned": frozenset({"running", "completed", "failed", "retrying", "dead", "cancelled"}),
    "running": frozenset({"completed", "failed", "retrying", "dead", "cancelled"}),
    "retrying": frozenset({"assigned", "cancelled"}),
    "completed": frozenset(),
    "failed": frozenset({"pending", "cancelled"}),  # pending again: retry_dead
    "dead": frozenset({"pending", "cancelled"}),
    "cancelled": frozenset(),
}
"""Legal step transitions. An expired lease is ``assigned|running -> retrying`` (no delay), then
``retrying -> assigned`` for the next claimer, or ``-> dead`` when the attempts are used up."""

# ---------------------------------------------------------------- event shapes

CORRELATION_FIELDS = ("run_id", "flow_id", "step_id", "idempotency_key", "trace_id", "tenant_id")
"""Every event of a run's history carries these (``step_id`` is ``None`` on run events)."""

ASSIGNED_SUBJECT = "caf.exec.assigned.v1"
ASSIGNED_EVENT_FIELDS = ("assignment_id", "worker_id", "run_id", "step_id")
"""``step.assigned`` events carry these fields of the assignment subject (plus the correlation fields,
``attempt`` and ``lease_expires_at``); their ``meta.subject`` is ``ASSIGNED_SUBJECT``."""

RESULT_SUBJECT = "caf.exec.result.v1"
RESULT_EVENT_FIELDS = ("assignment_id", "status", "result", "error")
"""Events that end an assignment (``step.completed``, ``step.retrying``, ``step.failed``, ``step.dead``,
``step.lease_expired``, ``step.cancelled`` of an assigned step) carry these fields; ``status`` is one of
``success``, ``error``, ``timeout`` or ``cancelled``; their ``meta.subject`` is ``RESULT_SUBJECT``."""

USAGE_SUBJECT = "beamline.usage.v1.metered"
USAGE_EVENT_FIELDS = ("tenant_id", "run_id", "step_id", "tokens_used", "cost_usd")
"""``step.metered`` events (one per step completed with usage) carry these fields; ``meta.subject`` is
``USAGE_SUBJECT``."""

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")


def _check_id(value: object, field_name: str) -> str:
    if type(value) is not str:
        raise InvalidArgument(field_name, f"must be a string, got {type(value).__name__}")
    if _ID_RE.fullmatch(value) is None:
        raise InvalidArgument(
            field_name, f"{value[:80]!r} is not allowed: use letters, digits and _.:- (at most 128, no '/')"
        )
    return value


def _check_seconds(value: object, field_name: str, *, minimum: float = 0.0, maximum: float, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(field_name, f"must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or v > maximum or (positive and v <= 0):
        raise InvalidArgument(
            field_name, f"must be {'positive and ' if positive else ''}at most {maximum:g}, got {v!r}"
        )
    return v


def _check_kinds(kinds: object) -> set[str] | None:
    """The step kinds a worker takes (``None``: every kind)."""
    if kinds is None:
        return None
    return {_check_id(k, "kinds[]") for k in check_list(kinds, "kinds")}


def _check_int(value: object, field_name: str, minimum: int, maximum: int) -> int:
    if type(value) is not int:
        raise InvalidArgument(field_name, f"must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidArgument(field_name, f"must be from {minimum} to {maximum}, got {value}")
    return value


def _check_json(value: object, field_name: str) -> Any:
    codec.encode(value, field_name)
    return value


def _us(value: object, field_name: str) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidArgument(field_name, "a datetime must be timezone-aware")
        return round(value.timestamp() * 1_000_000)
    if type(value) is not int or value < 0:
        raise InvalidArgument(field_name, "must be µs since the epoch (a non-negative int) or an aware datetime")
    return value


# ---------------------------------------------------------------- public value types


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: the delay before attempt ``n + 1`` after ``n`` failures is
    ``min(max_delay, initial_delay * multiplier ** (n - 1))``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` and capped at ``max_delay``."""

    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2

    def validate(self, field_name: str = "retry") -> RetryPolicy:
        """Return self if every field is in range, else raise ``InvalidArgument`` naming it."""
        _check_seconds(self.initial_delay, f"{field_name}.initial_delay", maximum=MAX_LEASE_SECONDS, positive=False)
        _check_seconds(self.multiplier, f"{field_name}.multiplier", minimum=1.0, maximum=100.0, positive=True)
        _check_seconds(self.max_delay, f"{field_name}.max_delay", maximum=MAX_LEASE_SECONDS, positive=False)
        _check_seconds(self.jitter, f"{field_name}.jitter", maximum=1.0, positive=False)
        if self.max_delay < self.initial_delay:
            raise InvalidArgument(f"{field_name}.max_delay", "must not be below initial_delay")
        return self

    def base_delay(self, failures: int) -> float:
        """The delay without jitter after ``failures`` failed attempts (``failures >= 1``)."""
        exp = min(max(failures - 1, 0), 1000)
        try:
            d = self.initial_delay * self.multiplier**exp
        except OverflowError:
            d = self.max_delay
        return min(self.max_delay, d)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The delay with jitter applied (seconds)."""
        base = self.base_delay(failures)
        r = (rng or random).uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return min(self.max_delay, base * r)

    def to_json(self) -> dict[str, float]:
        return {
            "initial_delay": float(self.initial_delay),
            "multiplier": float(self.multiplier),
            "max_delay": float(self.max_delay),
            "jitter": float(self.jitter),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RetryPolicy:
        return cls(raw["initial_delay"], raw["multiplier"], raw["max_delay"], raw["jitter"])


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step of a run as given to ``Runs.create``.

    ``id`` is unique within the run; ``kind`` selects the workers that may claim it; ``payload`` is any
    JSON value; ``depends_on`` names steps that must complete (or, if optional, be given up on) first;
    after ``max_attempts`` failed attempts the step is dead, and the run fails unless ``optional``.
    """

    id: str
    kind: str = "default"
    payload: Any = None
    depends_on: Sequence[str] = ()
    max_attempts: int = 3
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    optional: bool = False
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Metered usage: ``tokens``, ``cost_usd`` and how many metered ``steps`` contributed."""

    tokens: int = 0
    cost_usd: float = 0.0
    steps: int = 0


@dataclass(frozen=True, slots=True)
class Step:
    """A step as stored. Times are µs since the epoch. ``cancel_requested`` is true when the run was
    cancelled while this step was assigned or running (the worker learns it on its next heartbeat)."""

    run_id: str
    step_id: str
    kind: str
    payload: Any
    status: str
    depends_on: tuple[str, ...]
    optional: bool
    max_attempts: int
    attempts: int
    worker_id: str | None
    assignment_id: str | None
    lease_expires_at: int | None
    retry_at: int | None
    result: Any
    error: Any
    usage: Usage | None
    idempotency_key: str
    created_at: int
    updated_at: int
    started_at: int | None
    completed_at: int | None
    cancel_requested: bool
    version: int

    @property
    def key(self) -> str:
        """``<run_id>/<step_id>``: accepted wherever a step is named."""
        return f"{self.run_id}/{self.step_id}"


@dataclass(frozen=True, slots=True)
class Run:
    """A run as stored; ``steps`` is filled by ``Runs.get`` and empty in ``Runs.list``."""

    run_id: str
    flow_id: str
    status: str
    metadata: dict[str, Any]
    trace_id: str
    step_ids: tuple[str, ...]
    dead_steps: tuple[str, ...]
    created_at: int
    updated_at: int
    started_at: int | None
    finished_at: int | None
    version: int
    steps: tuple[Step, ...] = ()

    def step(self, step_id: str) -> Step:
        """The step called ``step_id`` (``Runs.get`` fills the steps)."""
        for s in self.steps:
            if s.step_id == step_id:
                return s
        raise NotFound(f"run {self.run_id} has no step {step_id!r} loaded")


@dataclass(frozen=True, slots=True)
class Claim:
    """A step assigned to a worker by ``Runs.claim``: pass it (or ``key``) and ``lease_token`` to
    ``heartbeat``, ``start``, ``complete`` and ``fail``."""

    run_id: str
    step_id: str
    flow_id: str
    kind: str
    payload: Any
    attempt: int
    worker_id: str
    assignment_id: str
    lease_token: str
    lease_expires_at: int
    idempotency_key: str
    trace_id: str

    @property
    def key(self) -> str:
        return f"{self.run_id}/{self.step_id}"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The answer to a heartbeat: the new lease expiry, or ``cancel_requested`` when the run was
    cancelled (the step is then cancelled and the lease released: stop working on it)."""

    lease_expires_at: int
    cancel_requested: bool


StepRef = str | tuple[str, str] | Step | Claim

# ---------------------------------------------------------------- helpers


def _pad(us: int) -> str:
    return f"{max(us, 0):020d}"


def _due_key(kind: str, due_us: int, run_id: str, step_id: str) -> str:
    return f"{kind}/{_pad(due_us)}/{run_id}/{step_id}"


def _illegal(what: str, frm: str, to: str) -> Conflict:
    return Conflict(
        f"{what}: transition {frm} -> {to} is not allowed",
        details={"reason": "illegal_transition", "from": frm, "to": to},
    )


def _require_step(what: str, frm: str, to: str) -> None:
    if to not in STEP_TRANSITIONS[frm]:
        raise _illegal(what, frm, to)


def _require_run(what: str, frm: str, to: str) -> None:
    if to not in RUN_TRANSITIONS[frm]:
        raise _illegal(what, frm, to)


def _step_ref(step: object) -> tuple[str, str]:
    if isinstance(step, Step | Claim):
        return step.run_id, step.step_id
    if isinstance(step, tuple) and len(step) == 2:
        return _check_id(step[0], "step.run_id"), _check_id(step[1], "step.step_id")
    if isinstance(step, str):
        run_id, sep, step_id = step.partition("/")
        if not sep:
            raise InvalidArgument("step", "must be '<run_id>/<step_id>', a (run_id, step_id) tuple, a Step or a Claim")
        return _check_id(run_id, "step.run_id"), _check_id(step_id, "step.step_id")
    raise InvalidArgument("step", f"must name a step, got {type(step).__name__}")


def _run_ref(run: object) -> str:
    if isinstance(run, Run):
        return run.run_id
    return _check_id(run, "run")


def _check_token(token: object) -> str:
    if type(token) is not str or not token or len(token) > 256:
        raise InvalidArgument("lease_token", "must be the non-empty string a claim returned")
    return token


class _Plan:
    """Checks and ops of one commit being built, plus the history events."""

    __slots__ = ("checks", "events", "ops", "other_runs")

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.ops: list[Op] = []
        self.events: list[NewEvent] = []  # of the run the commit is about
        self.other_runs: dict[str, list[NewEvent]] = {}  # events of other runs it also changes


# ---------------------------------------------------------------- the layer


class Runs:
    """Workflow runs of one tenant: create a DAG of steps, let workers claim them under leases, and
    follow every transition in the run's history.

    Every transition is one Store commit guarded by the versions of the items it read, with the
    history events appended in the same commit, so concurrent workers on any number of processes
    never both own a step and a stale worker can never overwrite the current owner's outcome.
    """

    def __init__(self, store: Store, tenant: str) -> None:
        self.store = store
        self.tenant = check_tenant(tenant)
        self._kinds: list[str] = []
        self._kinds_at = -math.inf
        self._kinds_lock = threading.Lock()
        self._window = _MIN_WINDOW
        # lease token -> (step doc, version) as this handle last wrote it: the holder's next call
        # commits against that version without reading it again (a stale entry only costs a retry)
        self._held = LastWritten(_HELD_MAX)
        # run id -> (run doc, version) and -> ({"left": open steps}, version) as this handle last
        # wrote or read them: a claim reads only the step, and the completion of a run's last open
        # step completes the run in the same commit (a stale entry only costs a retry)
        self._run_docs = LastWritten(_HELD_MAX)
        self._open_counts = LastWritten(_HELD_MAX)
        # step key -> (step doc, version) of steps this handle last wrote as pending or retrying: the
        # completion that releases them and the claim that takes them commit without reading them
        # (a stale entry only costs a retry, and a refused commit drops it)
        self._pending = LastWritten(_HELD_MAX)

    def _remember(self, token: str, doc: dict[str, Any], version: int) -> None:
        self._held.put(token, doc, version)

    def _recall(self, token: str, skey: str) -> tuple[dict[str, Any], int] | None:
        hit = self._held.get(token)
        if hit is None or f"{hit[0]['run_id']}/{hit[0]['step_id']}" != skey:
            return None
        return dict(hit[0]), hit[1]

    def _forget(self, token: str) -> None:
        self._held.drop(token)

    # ------------------------------------------------------------ events

    def _event(
        self,
        type_: str,
        doc: Mapping[str, Any],
        data: Mapping[str, Any],
        *,
        step: bool = True,
        subject: str | None = None,
    ) -> NewEvent:
        body: dict[str, Any] = {
            "run_id": doc["run_id"],
            "flow_id": doc["flow_id"],
            "step_id": doc["step_id"] if step else None,
            "idempotency_key": doc["idempotency_key"] if step else doc["run_id"],
            "trace_id": doc["trace_id"],
            "tenant_id": self.tenant,
        }
        body.update(data)
        return NewEvent(type_, body, {"subject": subject} if subject else None)

    def _commit(self, plan: _Plan, run_id: str, trace_id: str) -> Commit:
        ops = list(plan.ops)
        streams: dict[str, list[NewEvent]] = {run_id: list(plan.events)}
        for other, events in plan.other_runs.items():
            streams.setdefault(other, []).extend(events)
        ops += [Append(f"runs:{r}", events) for r, events in streams.items() if events]
        try:
            commit = self.store.commit_prepared(self._prepare(plan.checks, ops, trace_id))
        except Conflict as exc:
            for f in exc.failures:
                if getattr(f.check, "namespace", None) == NS_STEPS:
                    self._pending.drop(f.check.key)
            raise
        for op in ops:
            if isinstance(op, Put) and op.namespace == NS_STEPS:
                if op.value["status"] in ("pending", "retrying"):
                    self._pending.put(op.key, dict(op.value), commit.versions[(NS_STEPS, op.key)])
                else:
                    self._pending.drop(op.key)
            elif isinstance(op, Put) and op.namespace == NS_RUNS:
                # a copy: the caller may hand parts of the document (metadata) on to its own caller
                self._run_docs.put(op.key, copy.deepcopy(op.value), commit.versions[(NS_RUNS, op.key)])
            elif isinstance(op, Put | Incr) and op.namespace == NS_OPEN:
                left = op.value if isinstance(op, Put) else commit.counters[(NS_OPEN, op.key)]
                self._open_counts.put(op.key, {"left": left}, commit.versions[(NS_OPEN, op.key)])
        return commit

    def _prepare(self, checks: list[Check], ops: list[Op], trace_id: str) -> PreparedCommit:
        """Encode a commit of this layer. Its values are built from input checked on entry (with
        ``codec.encode``), so the Store's second walk of every document for non-JSON values is
        skipped; keys and ids were checked on entry too."""
        if len(ops) > MAX_OPS or len(checks) > MAX_OPS:
            raise InvalidArgument("ops", f"at most {MAX_OPS} checks and {MAX_OPS} ops per commit")
        limit = self.store.max_value_bytes
        out: list[PreparedOp] = []
        for op in ops:
            t = type(op)
            if t is Put:
                assert isinstance(op, Put)
                assert op.ttl is None  # runs writes no expiring items
                value = codec.encode_checked(op.value, f"{op.namespace}/{op.key}", limit)
                out.append(PreparedPut(op.namespace, op.key, value, None))
            elif t is Delete:
                assert isinstance(op, Delete)
                out.append(PreparedDelete(op.namespace, op.key))
            elif t is Incr:
                assert isinstance(op, Incr)
                assert op.ttl is None
                out.append(PreparedIncr(op.namespace, op.key, op.by, None))
            else:
                assert isinstance(op, Append)
                events = tuple(
                    PreparedEvent(
                        e.type,
                        codec.encode_checked(e.data, f"{op.stream} {e.type}", limit),
                        codec.encode_checked(e.meta, f"{op.stream} {e.type} meta", MAX_META_BYTES) if e.meta else b"{}",
                    )
                    for e in op.events
                )
                out.append(PreparedAppend(op.stream, events))
        meta = codec.encode_checked({"layer": "runs", "trace_id": trace_id}, "trace_id", MAX_META_BYTES)
        return PreparedCommit(self.tenant, tuple(checks), tuple(out), meta)

    def _known_run(self, run_id: str) -> Item | None:
        """The run as this handle last wrote or read it (maybe stale: commit against its version)."""
        hit = self._run_docs.get(run_id)
        return None if hit is None else Item(NS_RUNS, run_id, hit[0], hit[1], 0, 0, 0, None)

    # ------------------------------------------------------------ create

    def create(
        self,
        flow_id: str,
        steps: Sequence[StepSpec | Mapping[str, Any]],
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        trace_id: str | None = None,
    ) -> Run:
        """Create a run of ``flow_id`` with ``steps`` (``StepSpec`` or dicts with the same keys).

        The steps form a DAG through ``depends_on``: unknown ids, duplicates and cycles raise
        ``InvalidArgument`` and nothing is written. Steps without dependencies are claimable at once.
        ``run_id`` defaults to a new time-ordered id; an existing one raises ``Conflict``.
        """
        flow_id = _check_id(flow_id, "flow_id")
        if run_id is None:
            run_id = f"r{self.store.clock.now_us():x}-{secrets.token_hex(6)}"
        run_id = _check_id(run_id, "run_id")
        meta = {} if metadata is None else metadata
        if not isinstance(meta, Mapping):
            raise InvalidArgument("metadata", f"must be an object, got {type(meta).__name__}")
        meta = _check_json(dict(meta), "metadata")
        if trace_id is None:
            trace_id = secrets.token_hex(16)
        elif type(trace_id) is not str or not trace_id or len(trace_id) > 128:
            raise InvalidArgument("trace_id", "must be a non-empty string of at most 128 characters")
        specs = self._validate_steps(steps, run_id)

        now = self.store.clock.now_us()
        known = self._known_kinds()
        run_doc: dict[str, Any] = {
            "run_id": run_id,
            "flow_id": flow_id,
            "status": "pending",
            "metadata": meta,
            "trace_id": trace_id,
            "steps": [s.id for s in specs],
            "dead_steps": [],
            "created_at": now,
            "updated_at": now,
            "started_at": None,
            "finished_at": None,
        }
        plan = _Plan()
        plan.checks.append(Absent(NS_RUNS, run_id))
        plan.ops += [
            Put(NS_RUNS, run_id, run_doc),
            Put(NS_BY_STATUS, f"pending/{run_id}", 1),
            Put(NS_BY_FLOW, f"{flow_id}/{run_id}", 1),
            Put(NS_OPEN, run_id, len(specs)),
        ]
        dependents: dict[str, list[str]] = {s.id: [] for s in specs}
        for s in specs:
            for d in s.depends_on:
                dependents[d].append(s.id)
        new_kinds = sorted({s.kind for s in specs} - set(known))
        for k in new_kinds:
            plan.ops.append(Put(NS_KINDS, k, 1))
        for s in specs:
            due = _due_key(s.kind, now, run_id, s.id) if not s.depends_on else None
            doc = {
                "run_id": run_id,
                "step_id": s.id,
                "flow_id": flow_id,
                "trace_id": trace_id,
                "kind": s.kind,
                "payload": s.payload,
                "depends_on": list(s.depends_on),
                "dependents": dependents[s.id],
                "waiting": len(s.depends_on),
                "optional": s.optional,
                "max_attempts": s.max_attempts,
                "retry": s.retry.to_json(),
                "idempotency_key": s.idempotency_key or f"{run_id}/{s.id}",
                "status": "pending",
                "attempts": 0,
                "claims": 0,
                "released": False,
                "parked": False,
                "due_key": due,
                "worker_id": None,
                "assignment_id": None,
                "lease_token": None,
                "lease_seconds": None,
                "lease_expires_at": None,
                "retry_at": None,
                "result": None,
                "error": None,
                "usage": None,
                "created_at": now,
                "updated_at": now,
                "started_at": None,
                "completed_at": None,
            }
            plan.ops.append(Put(NS_STEPS, f"{run_id}/{s.id}", doc))
            if due is not None:
                plan.ops.append(Put(NS_READY, due, 1))
        plan.events.append(
            self._event(
                "run.created",
                run_doc,
                {"from": None, "to": "pending", "at": now, "steps": [s.id for s in specs], "metadata": meta},
                step=False,
            )
        )
        try:
            commit = self._commit(plan, run_id, trace_id)
        except Conflict as exc:
            raise Conflict(f"run {run_id} already exists", details={"reason": "exists", "run_id": run_id}) from exc
        if new_kinds:
            with self._kinds_lock:
                self._kinds = sorted(set(self._kinds) | set(new_kinds))
        return self._run_from(run_doc, commit.versions[(NS_RUNS, run_id)])

    def _validate_steps(self, steps: object, run_id: str) -> list[StepSpec]:
        if isinstance(steps, str | bytes | Mapping) or not isinstance(steps, Sequence):
            raise InvalidArgument("steps", "must be a list of StepSpec or objects")
        if not steps:
            raise InvalidArgument("steps", "a run needs at least one step")
        if len(steps) > MAX_STEPS_PER_RUN:
            raise InvalidArgument("steps", f"at most {MAX_STEPS_PER_RUN} steps per run, got {len(steps)}")
        specs: list[StepSpec] = []
        seen: set[str] = set()
        for i, raw in enumerate(steps):
            f = f"steps[{i}]"
            if isinstance(raw, StepSpec):
                spec = raw
            elif isinstance(raw, Mapping):
                unknown = set(raw) - set(StepSpec.__dataclass_fields__)
                if unknown:
                    raise InvalidArgument(f, f"unknown field(s) {sorted(unknown)}")
                if "id" not in raw:
                    raise InvalidArgument(f"{f}.id", "is required")
                kw = dict(raw)
                retry = kw.get("retry")
                if isinstance(retry, Mapping):
                    try:
                        kw["retry"] = RetryPolicy(**retry)
                    except TypeError as exc:
                        raise InvalidArgument(f"{f}.retry", str(exc)) from None
                spec = StepSpec(**kw)
            else:
                raise InvalidArgument(f, f"must be a StepSpec or an object, got {type(raw).__name__}")
            sid = _check_id(spec.id, f"{f}.id")
            if sid in seen:
                raise InvalidArgument(f"{f}.id", f"duplicate step id {sid!r}")
            seen.add(sid)
            _check_id(spec.kind, f"{f}.kind")
            _check_json(spec.payload, f"{f}.payload")
            deps = spec.depends_on
            if isinstance(deps, str | bytes) or not isinstance(deps, Sequence):
                raise InvalidArgument(f"{f}.depends_on", "must be a list of step ids")
            for j, d in enumerate(deps):
                _check_id(d, f"{f}.depends_on[{j}]")
            if len(set(deps)) != len(deps):
                raise InvalidArgument(f"{f}.depends_on", "lists a step twice")
            if sid in deps:
                raise InvalidArgument(f"{f}.depends_on", f"step {sid!r} depends on itself")
            _check_int(spec.max_attempts, f"{f}.max_attempts", 1, 1000)
            if not isinstance(spec.retry, RetryPolicy):
                raise InvalidArgument(f"{f}.retry", "must be a RetryPolicy or an object with its fields")
            spec.retry.validate(f"{f}.retry")
            if type(spec.optional) is not bool:
                raise InvalidArgument(f"{f}.optional", "must be a bool")
            if spec.idempotency_key is not None:
                check_key(spec.idempotency_key, f"{f}.idempotency_key")
            specs.append(
                StepSpec(
                    sid,
                    spec.kind,
                    spec.payload,
                    tuple(deps),
                    spec.max_attempts,
                    spec.retry,
                    spec.optional,
                    spec.idempotency_key,
                )
            )
        for i, s in enumerate(specs):
            for d in s.depends_on:
                if d not in seen:
                    raise InvalidArgument(f"steps[{i}].depends_on", f"unknown step {d!r}")
        cycle = _find_cycle({s.id: list(s.depends_on) for s in specs})
        if cycle:
            raise InvalidArgument("steps", f"dependency cycle: {' -> '.join(cycle)}", details={"cycle": cycle})
        check_key(f"runs:{run_id}", "run_id")
        return specs

    # ------------------------------------------------------------ kinds

    def _known_kinds(self, fresh: bool = False) -> list[str]:
        now = time.monotonic()
        if fresh or now - self._kinds_at > _KINDS_CACHE_SECONDS:
            kinds: list[str] = []
            while True:
                page = self.store.scan(self.tenant, NS_KINDS, after=kinds[-1] if kinds else None, limit=1000)
                kinds.extend(i.key for i in page)
                if len(page) < 1000:
                    break
            with self._kinds_lock:
                self._kinds = kinds
                self._kinds_at = now
        return self._kinds

    # ------------------------------------------------------------ claim

    def claim(
        self,
        worker_id: str,
        lease: float = 30.0,
        kinds: Iterable[str] | None = None,
        limit: int = 1,
    ) -> list[Claim]:
        """Assign up to ``limit`` ready steps to ``worker_id`` for ``lease`` seconds and return them.

        A step is ready when its dependencies have completed and any retry delay has passed, or when
        the lease of its previous owner expired (which counts that attempt; a step whose attempts are
        used up becomes dead instead). Each assignment is one commit guarded by the step's version,
        so under any number of concurrent claimers a step has one owner at a time. ``kinds`` limits
        the step kinds considered (default: every kind). Returns ``[]`` when nothing is ready.
        """
        worker_id = check_key(worker_id, "worker_id")
        lease = _check_seconds(lease, "lease", maximum=MAX_LEASE_SECONDS, positive=True)
        limit = _check_int(limit, "limit", 1, MAX_CLAIM_LIMIT)
        wanted = _check_kinds(kinds)
        if wanted is None:
            kind_list = None
        else:
            kind_list = sorted(wanted)
            if not kind_list:
                return []
        out: list[Claim] = []
        tried: set[str] = set()
        for _round in range(8):
            # claimers look at the oldest due steps and start at a random one of them; the window
            # widens while this handle loses races to other claimers and narrows when it does not
            window = max(self._window, 2 * limit)
            now = self.store.clock.now_us()
            candidates = self._due(kind_list, now, window, tried)
            if not candidates and kind_list is None and _round == 0:
                self._known_kinds(fresh=True)  # a kind created elsewhere in the last second
                candidates = self._due(kind_list, now, window, tried)
            if not candidates:
                break
            start = random.randrange(len(candidates))
            for item in candidates[start:] + candidates[:start]:
                tried.add(item.key)
                got = self._try_claim(item, worker_id, lease, now)
                if got is None:
                    self._window = min(_MAX_WINDOW, self._window * 2)
                    continue
                self._window = max(_MIN_WINDOW, self._window - 1)
                out.append(got)
                if len(out) >= limit:
                    return out
        return out

    def _due(self, kinds: list[str] | None, now: int, window: int, tried: set[str]) -> list[Item]:
        kind_list = kinds if kinds is not None else self._known_kinds()
        found: list[Item] = []
        for kind in kind_list:
            prefix = f"{kind}/"
            after: str | None = None
            while True:
                page = self.store.scan(self.tenant, NS_READY, prefix=prefix, after=after, limit=window)
                stop = len(page) < window
                for it in page:
                    due = int(it.key[len(prefix) : len(prefix) + 20])
                    if due > now:
                        stop = True
                        break
                    if it.key not in tried:
                        found.append(it)
                if stop or len(found) >= window:
                    break
                after = page[-1].key
        if len(kind_list) > 1:
            found.sort(key=lambda it: it.key.split("/", 2)[1])
        return found[:window]

    def _try_claim(self, due: Item, worker_id: str, lease: float, now: int, fresh: bool = False) -> Claim | None:
        _kind, _due_at, run_id, step_id = due.key.split("/", 3)
        skey = f"{run_id}/{step_id}"
        run_item = None if fresh else self._known_run(run_id)
        if run_item is None:
            fresh = True
            step_item, run_item = self.store.get_many(self.tenant, [(NS_STEPS, skey), (NS_RUNS, run_id)])
            if run_item is not None:
                self._run_docs.put(run_id, run_item.value, run_item.version)
        else:
            hit = self._pending.get(skey)
            if hit is not None and hit[0]["due_key"] == due.key:
                step_item = Item(NS_STEPS, skey, hit[0], hit[1], 0, 0, 0, None)
            else:
                if hit is not None:
                    self._pending.drop(skey)  # changed elsewhere (due again under another entry)
                step_item = self.store.get(self.tenant, NS_STEPS, skey)
        if step_item is None or run_item is None or step_item.value["due_key"] != due.key:
            # an index entry without its step (cannot be produced by this layer): drop it
            if step_item is None:
                with contextlib.suppress(Conflict):
                    self.store.commit(
                        self.tenant, [VersionIs(NS_READY, due.key, due.version)], [Delete(NS_READY, due.key)]
                    )
            return None
        doc = dict(step_item.value)
        run = run_item.value
        status = doc["status"]
        expired = status in ("assigned", "running")
        if expired and doc["lease_expires_at"] > now:
            return None
        if not expired and status not in ("pending", "retrying"):
            return None
        plan = _Plan()
        plan.checks += [VersionIs(NS_STEPS, skey, step_item.version), VersionIs(NS_RUNS, run_id, run_item.version)]
        try:
            if run["status"] == "cancelled":
                self._cancel_step_ops(plan, doc, now, skey, step_item.version, checked=True)
                self._commit(plan, run_id, doc["trace_id"])
                return None
            if expired and doc["attempts"] >= doc["max_attempts"]:
                self._terminal(
                    plan,
                    step_item.version,
                    doc,
                    "dead",
                    now,
                    {"error": "lease expired", "retry_at": None},
                    run_item=run_item,
                    checked=True,
                    result_status="timeout",
                )
                commit = self._commit(plan, run_id, doc["trace_id"])
                self._after_settle(commit, doc)
                return None
            plan.ops.append(Delete(NS_READY, due.key))
            if expired:
                plan.events.append(
                    self._end_event("step.lease_expired", doc, "retrying", "timeout", now, None, "lease expired")
                )
                doc.update(status="retrying", lease_token=None, lease_expires_at=None)
            if run["status"] == "failed":
                # park: the step waits until retry_dead revives the run
                doc.update(due_key=None, parked=True, updated_at=now)
                plan.ops.append(Put(NS_STEPS, skey, doc))
                self._commit(plan, run_id, doc["trace_id"])
                return None
        except Conflict as exc:
            if self._stale_run(exc, run_id, fresh):
                return self._try_claim(due, worker_id, lease, now, fresh=True)
            return None

        claim = self._assign(plan, doc, worker_id, lease, now)
        if run["status"] == "pending":
            self._run_transition(plan, run_item, "running", now)
        try:
            commit = self._commit(plan, run_id, doc["trace_id"])
        except Conflict as exc:
            if self._stale_run(exc, run_id, fresh):
                return self._try_claim(due, worker_id, lease, now, fresh=True)
            return None
        self._remember(claim.lease_token, doc, commit.versions[(NS_STEPS, skey)])
        return claim

    def _stale_run(self, exc: Conflict, run_id: str, fresh: bool) -> bool:
        """Whether a refused commit planned on this handle's memory of the run failed on the run: the
        run changed since (forget it and look again)."""
        if fresh or not any(getattr(f.check, "namespace", None) == NS_RUNS for f in exc.failures):
            return False
        self._run_docs.drop(run_id)
        return True

    def _assign(self, plan: _Plan, doc: dict[str, Any], worker_id: str, lease: float, now: int) -> Claim:
        """Plan ``pending|retrying -> assigned`` of ``doc`` to ``worker_id`` (the caller checks the
        step's version and removes its old due entry)."""
        run_id, step_id = doc["run_id"], doc["step_id"]
        skey = f"{run_id}/{step_id}"
        token = secrets.token_hex(16)
        expires = now + round(lease * 1_000_000)
        new_due = _due_key(doc["kind"], expires, run_id, step_id)
        attempt = doc["attempts"] + 1
        claims = doc["claims"] + 1
        assignment_id = f"{run_id}/{step_id}/{claims}"
        _require_step(f"step {skey}", doc["status"], "assigned")
        frm = doc["status"]
        doc.update(
            status="assigned",
            attempts=attempt,
            claims=claims,
            worker_id=worker_id,
            assignment_id=assignment_id,
            lease_token=token,
            lease_seconds=lease,
            lease_expires_at=expires,
            due_key=new_due,
            retry_at=None,
            updated_at=now,
        )
        plan.checks.append(Absent(NS_READY, new_due))  # new (its time is the lease's end): lets a store skip a read
        plan.ops += [Put(NS_STEPS, skey, doc), Put(NS_READY, new_due, 1)]
        plan.other_runs.setdefault(run_id, []).append(
            self._event(
                "step.assigned",
                doc,
                {
                    "from": frm,
                    "to": "assigned",
                    "at": now,
                    "assignment_id": assignment_id,
                    "worker_id": worker_id,
                    "attempt": attempt,
                    "lease_expires_at": expires,
                },
                subject=ASSIGNED_SUBJECT,
            )
        )
        return Claim(
            run_id,
            step_id,
            doc["flow_id"],
            doc["kind"],
            doc["payload"],
            attempt,
            worker_id,
            assignment_id,
            token,
            expires,
            doc["idempotency_key"],
            doc["trace_id"],
        )

    # ------------------------------------------------------------ worker calls

    def _leased(
        self, step: object, token: object, to: str | None, *, cached: bool = True
    ) -> tuple[str, str, int, dict[str, Any], int, bool]:
        run_id, step_id = _step_ref(step)
        token = _check_token(token)
        skey = f"{run_id}/{step_id}"
        hit = self._recall(token, skey) if cached else None
        if hit is not None:
            doc, version = hit
        else:
            item = self.store.get(self.tenant, NS_STEPS, skey)
            if item is None:
                raise NotFound(f"no step {skey}")
            doc, version = dict(item.value), item.version
        if hit is not None:
            try:
                return (*self._check_leased(run_id, step_id, skey, version, doc, token, to), True)
            except Conflict:
                self._forget(token)  # refuse only on what is stored now, not on this handle's memory
                return self._leased(step, token, to, cached=False)
        return (*self._check_leased(run_id, step_id, skey, version, doc, token, to), False)

    def _check_leased(
        self, run_id: str, step_id: str, skey: str, version: int, doc: dict[str, Any], token: str, to: str | None
    ) -> tuple[str, str, int, dict[str, Any], int]:
        if to is not None:
            _require_step(f"step {skey}", doc["status"], to)
        elif doc["status"] not in ("assigned", "running"):
            raise Conflict(
                f"step {skey}: is {doc['status']}, not leased",
                details={"reason": "not_leased", "status": doc["status"]},
            )
        now = self.store.clock.now_us()
        if doc["status"] not in ("assigned", "running") or not same_secret(doc["lease_token"] or "", token):
            raise Conflict(
                f"step {skey}: the lease token is not current (the step was re-assigned)",
                details={"reason": "stale_lease", "run_id": run_id, "step_id": step_id},
            )
        if doc["lease_expires_at"] <= now:
            raise Conflict(
                f"step {skey}: the lease expired",
                details={"reason": "lease_expired", "run_id": run_id, "step_id": step_id},
            )
        return run_id, skey, version, doc, now

    def heartbeat(self, step: StepRef, lease_token: str, lease: float | None = None) -> Heartbeat:
        """Extend the lease of a step you hold by ``lease`` seconds (default: the claim's lease).

        Raises ``Conflict`` if ``lease_token`` is not the current one or the lease already expired.
        If the run was cancelled, the step is cancelled now and ``cancel_requested`` is true.
        """
        if lease is not None:
            lease = _check_seconds(lease, "lease", maximum=MAX_LEASE_SECONDS, positive=True)
        for cached in (True, False):
            run_id, skey, version, doc, now, hit = self._leased(step, lease_token, None, cached=cached)
            run_item = self.store.get(self.tenant, NS_RUNS, run_id)
            assert run_item is not None
            plan = _Plan()
            if run_item.value["status"] == "cancelled":
                plan.checks.append(VersionIs(NS_RUNS, run_id, run_item.version))
                self._cancel_step_ops(plan, doc, now, skey, version)
                try:
                    self._commit_owned(plan, run_id, doc, skey)
                except Conflict:
                    if hit:
                        continue
                    raise
                finally:
                    self._forget(lease_token)
                return Heartbeat(now, True)
            expires = now + round((lease if lease is not None else doc["lease_seconds"]) * 1_000_000)
            new_due = _due_key(doc["kind"], expires, doc["run_id"], doc["step_id"])
            plan.checks.append(VersionIs(NS_STEPS, skey, version))
            if doc["due_key"] != new_due:
                plan.ops += [Delete(NS_READY, doc["due_key"]), Put(NS_READY, new_due, 1)]
            doc.update(lease_expires_at=expires, due_key=new_due, updated_at=now)
            if lease is not None:
                doc["lease_seconds"] = lease
            plan.ops.append(Put(NS_STEPS, skey, doc))
            try:
                commit = self._commit_owned(plan, run_id, doc, skey)
            except Conflict:
                self._forget(lease_token)
                if hit:
                    continue
                raise
            self._remember(lease_token, doc, commit.versions[(NS_STEPS, skey)])
            return Heartbeat(expires, False)
        raise AssertionError("unreachable")

    def _commit_owned(self, plan: _Plan, run_id: str, doc: Mapping[str, Any], skey: str) -> Commit:
        try:
            return self._commit(plan, run_id, doc["trace_id"])
        except Conflict as exc:
            raise Conflict(
                f"step {skey}: changed concurrently (lease lost or step re-assigned)",
                details={"reason": "stale_lease", "run_id": doc["run_id"], "step_id": doc["step_id"]},
            ) from exc

    def start(self, step: StepRef, lease_token: str) -> Step:
        """Mark a step you hold as running (``assigned -> running``)."""
        for cached in (True, False):
            run_id, skey, version, doc, now, hit = self._leased(step, lease_token, "running", cached=cached)
            plan = _Plan()
            plan.checks.append(VersionIs(NS_STEPS, skey, version))
            doc.update(status="running", started_at=now, updated_at=now)
            plan.ops.append(Put(NS_STEPS, skey, doc))
            plan.events.append(
                self._event(
                    "step.running",
                    doc,
                    {"from": "assigned", "to": "running", "at": now, "assignment_id": doc["assignment_id"]},
                )
            )
            try:
                commit = self._commit_owned(plan, run_id, doc, skey)
            except Conflict:
                self._forget(lease_token)
                if hit:
                    continue
                raise
            version = commit.versions[(NS_STEPS, skey)]
            self._remember(lease_token, doc, version)
            return self._step_from(doc, version, False)
        raise AssertionError("unreachable")

    def complete(
        self,
        step: StepRef,
        lease_token: str,
        result: Any = None,
        usage: Mapping[str, Any] | None = None,
    ) -> Step:
        """Record a step you hold as completed with ``result`` (any JSON value) and optional
        ``usage={"tokens": int, "cost_usd": float}``; dependents whose dependencies are now all
        complete become claimable, and the run completes with its last step.

        Raises ``Conflict`` if the token is stale or the lease expired (the outcome is then not
        recorded), or if the step's status does not allow completion.
        """
        return self._complete(step, lease_token, result, usage, None)[0]

    def complete_and_claim(
        self,
        step: StepRef,
        lease_token: str,
        result: Any = None,
        usage: Mapping[str, Any] | None = None,
        *,
        lease: float | None = None,
        kinds: Iterable[str] | None = None,
    ) -> tuple[Step, Claim | None]:
        """``complete``, and in the same commit assign to the same worker its next step (of one of
        ``kinds``, if given) for ``lease`` seconds (default: the completed step's lease): a dependent
        that this completion made ready if there is one, else a step that is ready now in a running
        run. Returns the completed step and that claim, or ``None`` when there was nothing to take
        (call ``claim`` then: it also handles first steps of new runs and expired leases). A worker
        thus pays one commit per step instead of two. (Like a step that was running when its run failed, a step
        claimed this way is not held back by a failure of its run that happened meanwhile.)"""
        if lease is not None:
            lease = _check_seconds(lease, "lease", maximum=MAX_LEASE_SECONDS, positive=True)
        return self._complete(step, lease_token, result, usage, (lease, _check_kinds(kinds)))

    def _complete(
        self,
        step: StepRef,
        lease_token: str,
        result: Any,
        usage: Mapping[str, Any] | None,
        then_claim: tuple[float | None, set[str] | None] | None,
    ) -> tuple[Step, Claim | None]:
        _check_json(result, "result")
        metered = None if usage is None else _check_usage(usage)
        run_id, step_id = _step_ref(step)
        skip: set[str] = set()
        for attempt in range(_MAX_RETRIES):
            run_id, skey, version, doc, now, _hit = self._leased(
                (run_id, step_id), lease_token, "completed", cached=attempt == 0
            )
            skip.add(skey)
            worker_id = doc["worker_id"]
            next_lease = doc["lease_seconds"]
            plan = _Plan()
            fields: dict[str, Any] = {"result": result, "error": None, "completed_at": now}
            if metered is not None:
                fields["usage"] = {"tokens": metered.tokens, "cost_usd": metered.cost_usd}
                plan.ops.append(
                    Put(
                        NS_USAGE,
                        f"{_pad(now)}/{skey}",
                        {"run_id": run_id, "step_id": step_id, "flow_id": doc["flow_id"], "at": now, **fields["usage"]},
                    )
                )
            released = self._terminal(plan, version, doc, "completed", now, fields)
            finishes = attempt == 0 and self._plan_finish(plan, run_id, now)
            if metered is not None:
                plan.events.append(
                    self._event(
                        "step.metered",
                        doc,
                        {"at": now, "tokens_used": metered.tokens, "cost_usd": metered.cost_usd},
                        subject=USAGE_SUBJECT,
                    )
                )
            claim: Claim | None = None
            nxt: dict[str, Any] | None = None
            nxt_key = ""
            if then_claim is not None:
                want_lease, wanted = then_claim
                for dep in released:
                    if wanted is None or dep["kind"] in wanted:
                        nxt = dep
                        break
                if nxt is not None:
                    # the dependent's Put and its ready entry were planned by _release: replace them
                    nxt_key = f"{run_id}/{nxt['step_id']}"
                    replaced = ((NS_READY, nxt["due_key"]), (NS_STEPS, nxt_key))
                    plan.ops = [
                        op for op in plan.ops if not (isinstance(op, Put) and (op.namespace, op.key) in replaced)
                    ]
                else:
                    nxt = self._ready_candidate(plan, wanted, now, skip)
                    if nxt is not None:
                        nxt_key = f"{nxt['run_id']}/{nxt['step_id']}"
                if nxt is not None:
                    claim = self._assign(plan, nxt, worker_id, want_lease or next_lease, now)
            try:
                commit = self._commit(plan, run_id, doc["trace_id"])
            except Conflict as exc:
                if finishes:  # this handle's memory of the run or its open count was stale
                    self._run_docs.drop(run_id)
                    self._open_counts.drop(run_id)
                if nxt is not None and any(
                    getattr(f.check, "key", None) in (nxt_key, nxt["run_id"]) for f in exc.failures
                ):
                    skip.add(nxt_key)  # lost the extra step to another claimer: complete without it
                    self._window = min(_MAX_WINDOW, self._window * 2)
                continue  # a dependent or the run changed (or the step: the next read refuses)
            self._forget(lease_token)
            if claim is not None and nxt is not None:
                self._window = max(_MIN_WINDOW, self._window - 1)
                self._remember(claim.lease_token, nxt, commit.versions[(NS_STEPS, nxt_key)])
            if not finishes:
                self._after_settle(commit, doc)
            return self._step_from(doc, commit.versions[(NS_STEPS, skey)], False), claim
        raise Conflict(f"step {run_id}/{step_id}: too much contention, gave up", details={"reason": "contention"})

    def _ready_candidate(self, plan: _Plan, wanted: set[str] | None, now: int, skip: set[str]) -> dict[str, Any] | None:
        """A pending or retrying step that is due now, of a running run, to be assigned in ``plan``
        (whose checks then include that step's and its run's versions); ``None`` if there is none."""
        kinds = sorted(wanted) if wanted is not None else None
        window = max(self._window, 2)
        items = self._due(kinds, now, window, set())
        if not items:
            return None
        start = random.randrange(len(items))
        looked = 0
        for due in items[start:] + items[:start]:
            _kind, _at, run_id, step_id = due.key.split("/", 3)
            key = f"{run_id}/{step_id}"
            if key in skip:
                continue
            looked += 1
            if looked > 3:
                return None  # leave the search to claim()
            step_item, run_item = self.store.get_many(self.tenant, [(NS_STEPS, key), (NS_RUNS, run_id)])
            if step_item is None or run_item is None:
                continue
            doc = dict(step_item.value)
            if doc["due_key"] != due.key or doc["status"] not in ("pending", "retrying"):
                continue
            if run_item.value["status"] not in ("running", "pending"):
                continue  # claim() handles the steps of failed and cancelled runs
            plan.checks.append(VersionIs(NS_STEPS, key, step_item.version))
            if not any(isinstance(c, VersionIs) and (c.namespace, c.key) == (NS_RUNS, run_id) for c in plan.checks):
                plan.checks.append(VersionIs(NS_RUNS, run_id, run_item.version))
            plan.ops.append(Delete(NS_READY, due.key))
            if run_item.value["status"] == "pending":
                self._run_transition(plan, run_item, "running", now)
            return doc
        return None

    def fail(self, step: StepRef, lease_token: str, error: Any, retryable: bool = True) -> Step:
        """Record a failed attempt of a step you hold. ``error`` is any JSON value (a message, an object).

        A retryable failure with attempts left makes the step ``retrying``: it is claimable again
        after the backoff of its retry policy. Otherwise the step is ``dead`` (attempts used up) or
        ``failed`` (not retryable); the run then fails, unless the step is optional, in which case
        its dependents go on without it. Raises ``Conflict`` for a stale token or expired lease.
        """
        if error is None:
            raise InvalidArgument("error", "must describe the failure")
        _check_json(error, "error")
        if type(retryable) is not bool:
            raise InvalidArgument("retryable", "must be a bool")
        run_id, step_id = _step_ref(step)
        for attempt in range(_MAX_RETRIES):
            run_id, skey, version, doc, now, _hit = self._leased(
                (run_id, step_id), lease_token, "retrying", cached=attempt == 0
            )
            plan = _Plan()
            if retryable and doc["attempts"] < doc["max_attempts"]:
                policy = RetryPolicy.from_json(doc["retry"])
                retry_at = now + round(policy.delay(doc["attempts"]) * 1_000_000)
                new_due = _due_key(doc["kind"], retry_at, run_id, step_id)
                plan.checks.append(VersionIs(NS_STEPS, skey, version))
                plan.ops += [Delete(NS_READY, doc["due_key"]), Put(NS_READY, new_due, 1)]
                frm = doc["status"]
                doc.update(
                    status="retrying",
                    error=error,
                    retry_at=retry_at,
                    due_key=new_due,
                    lease_token=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
                plan.ops.append(Put(NS_STEPS, skey, doc))
                plan.events.append(
                    self._end_event("step.retrying", doc, "retrying", "error", now, None, error, frm=frm)
                )
                plan.events[-1].data["retry_at"] = retry_at
                try:
                    commit = self._commit(plan, run_id, doc["trace_id"])
                except Conflict:
                    continue
                self._forget(lease_token)
                return self._step_from(doc, commit.versions[(NS_STEPS, skey)], False)
            to = "dead" if retryable else "failed"
            self._terminal(plan, version, doc, to, now, {"error": error, "retry_at": None})
            try:
                commit = self._commit(plan, run_id, doc["trace_id"])
            except Conflict:
                continue
            self._forget(lease_token)
            self._after_settle(commit, doc)
            return self._step_from(doc, commit.versions[(NS_STEPS, skey)], False)
        raise Conflict(f"step {run_id}/{step_id}: too much contention, gave up", details={"reason": "contention"})

    # ------------------------------------------------------------ transitions shared by several calls

    def _end_event(
        self,
        type_: str,
        doc: Mapping[str, Any],
        to: str,
        status: str,
        now: int,
        result: Any,
        error: Any,
        *,
        frm: str | None = None,
    ) -> NewEvent:
        return self._event(
            type_,
            doc,
            {
                "from": frm or doc["status"],
                "to": to,
                "at": now,
                "assignment_id": doc["assignment_id"],
                "worker_id": doc["worker_id"],
                "attempt": doc["attempts"],
                "status": status,
                "result": result,
                "error": error,
            },
            subject=RESULT_SUBJECT,
        )

    def _terminal(
        self,
        plan: _Plan,
        version: int,
        doc: dict[str, Any],
        to: str,
        now: int,
        fields: Mapping[str, Any],
        *,
        run_item: Item | None = None,
        checked: bool = False,
        result_status: str = "error",
    ) -> list[dict[str, Any]]:
        """Plan ``doc -> to`` for completed/failed/dead: settle the step (release dependents, count
        it down) when it completed or is optional, else fail the run. Returns the dependents this
        made ready (as planned)."""
        skey = f"{doc['run_id']}/{doc['step_id']}"
        _require_step(f"step {skey}", doc["status"], to)
        if not checked:
            plan.checks.append(VersionIs(NS_STEPS, skey, version))
        if doc["due_key"]:
            plan.ops.append(Delete(NS_READY, doc["due_key"]))
        settles = to == "completed" or doc["optional"]
        if to == "completed":
            plan.events.append(self._end_event("step.completed", doc, to, "success", now, fields.get("result"), None))
        else:
            plan.events.append(self._end_event(f"step.{to}", doc, to, result_status, now, None, fields.get("error")))
        doc.update(fields)
        doc.update(status=to, due_key=None, lease_token=None, lease_expires_at=None, updated_at=now)
        released: list[dict[str, Any]] = []
        if settles:
            if not doc["released"] and doc["dependents"]:
                released = self._release(plan, doc, now)
            doc["released"] = True
            plan.ops.append(Incr(NS_OPEN, doc["run_id"], -1))
        else:
            if run_item is None:
                run_item = self.store.get(self.tenant, NS_RUNS, doc["run_id"])
                assert run_item is not None
            run = dict(run_item.value)
            if run["status"] != "cancelled":
                if not any(
                    isinstance(c, VersionIs) and (c.namespace, c.key) == (NS_RUNS, doc["run_id"]) for c in plan.checks
                ):
                    plan.checks.append(VersionIs(NS_RUNS, doc["run_id"], run_item.version))
                run["dead_steps"] = sorted({*run["dead_steps"], doc["step_id"]})
                if run["status"] != "failed":
                    self._run_transition(plan, run_item, "failed", now, run, reason=f"step {doc['step_id']} {to}")
                else:
                    run["updated_at"] = now
                    plan.ops.append(Put(NS_RUNS, doc["run_id"], run))
        plan.ops.append(Put(NS_STEPS, skey, doc))
        return released

    def _release(self, plan: _Plan, doc: Mapping[str, Any], now: int) -> list[dict[str, Any]]:
        run_id = doc["run_id"]
        ready: list[dict[str, Any]] = []
        keys = [f"{run_id}/{d}" for d in doc["dependents"]]
        known = [self._pending.get(k) for k in keys]
        if all(hit is not None for hit in known):
            found = [(k, dict(hit[0]), hit[1]) for k, hit in zip(keys, known, strict=True) if hit is not None]
        else:
            items = self.store.get_many(self.tenant, [(NS_STEPS, k) for k in keys])
            found = [(it.key, dict(it.value), it.version) for it in items if it is not None]
        for dep_key, dep, dep_version in found:
            if dep["status"] != "pending":
                continue  # cancelled with its run
            dep["waiting"] = max(dep["waiting"] - 1, 0)
            dep["updated_at"] = now
            plan.checks.append(VersionIs(NS_STEPS, dep_key, dep_version))
            if dep["waiting"] == 0:
                dep["due_key"] = _due_key(dep["kind"], now, run_id, dep["step_id"])
                plan.checks.append(Absent(NS_READY, dep["due_key"]))  # a pending step has no due entry
                plan.ops.append(Put(NS_READY, dep["due_key"], 1))
                ready.append(dep)
            plan.ops.append(Put(NS_STEPS, dep_key, dep))
        return ready

    def _run_transition(
        self,
        plan: _Plan,
        run_item: Item,
        to: str,
        now: int,
        run: dict[str, Any] | None = None,
        *,
        reason: str | None = None,
    ) -> dict[str, Any]:
        run = dict(run_item.value) if run is None else run
        frm = run_item.value["status"]
        _require_run(f"run {run['run_id']}", frm, to)
        if not any(isinstance(c, VersionIs) and (c.namespace, c.key) == (NS_RUNS, run["run_id"]) for c in plan.checks):
            plan.checks.append(VersionIs(NS_RUNS, run["run_id"], run_item.version))
        run.update(status=to, updated_at=now)
        if to == "running" and run["started_at"] is None:
            run["started_at"] = now
        if to in ("completed", "failed", "cancelled"):
            run["finished_at"] = now
        elif to == "running":
            run["finished_at"] = None
        plan.ops += [
            Put(NS_RUNS, run["run_id"], run),
            Delete(NS_BY_STATUS, f"{frm}/{run['run_id']}"),
            Put(NS_BY_STATUS, f"{to}/{run['run_id']}", 1),
        ]
        data: dict[str, Any] = {"from": frm, "to": to, "at": now}
        if reason:
            data["reason"] = reason
        plan.other_runs.setdefault(run["run_id"], []).append(self._event(f"run.{to}", run, data, step=False))
        return run

    def _cancel_step_ops(
        self, plan: _Plan, doc: dict[str, Any], now: int, skey: str, version: int, *, checked: bool = False
    ) -> None:
        frm = doc["status"]
        _require_step(f"step {skey}", frm, "cancelled")
        if not checked:
            plan.checks.append(VersionIs(NS_STEPS, skey, version))
        if doc["due_key"]:
            plan.ops.append(Delete(NS_READY, doc["due_key"]))
        if frm in ("assigned", "running"):
            plan.events.append(self._end_event("step.cancelled", doc, "cancelled", "cancelled", now, None, None))
        else:
            plan.events.append(self._event("step.cancelled", doc, {"from": frm, "to": "cancelled", "at": now}))
        doc.update(status="cancelled", due_key=None, lease_token=None, lease_expires_at=None, updated_at=now)
        plan.ops.append(Put(NS_STEPS, skey, doc))

    def _plan_finish(self, plan: _Plan, run_id: str, now: int) -> bool:
        """Plan ``running -> completed`` of the run in ``plan``, which settles one of its steps, if this
        handle last saw that step as the run's only open one; the plan then checks the open count's
        version, so a stale memory only costs a refused commit."""
        counted = self._open_counts.get(run_id)
        run_item = self._known_run(run_id)
        if counted is None or counted[0]["left"] != 1 or run_item is None or run_item.value["status"] != "running":
            return False
        plan.checks.append(VersionIs(NS_OPEN, run_id, counted[1]))
        self._run_transition(plan, run_item, "completed", now)
        return True

    def _after_settle(self, commit: Commit, doc: Mapping[str, Any]) -> None:
        left = commit.counters.get((NS_OPEN, doc["run_id"]))
        if left is not None and left <= 0:
            self._finish(doc["run_id"])

    def _finish(self, run_id: str) -> None:
        """Complete a running run whose steps are all settled (idempotent; also heals a crash
        between a last step's commit and this one)."""
        for _ in range(_MAX_RETRIES):
            run_item, open_item = self.store.get_many(self.tenant, [(NS_RUNS, run_id), (NS_OPEN, run_id)])
            if run_item is None or open_item is None or open_item.value > 0:
                return
            if run_item.value["status"] != "running":
                return
            now = self.store.clock.now_us()
            plan = _Plan()
            plan.checks.append(VersionIs(NS_OPEN, run_id, open_item.version))
            run = self._run_transition(plan, run_item, "completed", now)
            try:
                self._commit(plan, run_id, run["trace_id"])
                return
            except Conflict:
                continue

    # ------------------------------------------------------------ operator calls

    def retry_dead(self, step: StepRef) -> Step:
        """Put a dead (or failed) step back to pending with its attempts reset; a failed run whose
        last dead step this was runs again, and its steps held back meanwhile become claimable."""
        run_id, step_id = _step_ref(step)
        skey = f"{run_id}/{step_id}"
        for _ in range(_MAX_RETRIES):
            item, run_item = self.store.get_many(self.tenant, [(NS_STEPS, skey), (NS_RUNS, run_id)])
            if item is None or run_item is None:
                raise NotFound(f"no step {skey}")
            doc = dict(item.value)
            _require_step(f"step {skey}", doc["status"], "pending")
            run = dict(run_item.value)
            now = self.store.clock.now_us()
            plan = _Plan()
            plan.checks += [VersionIs(NS_STEPS, skey, item.version), VersionIs(NS_RUNS, run_id, run_item.version)]
            if run["status"] in ("completed", "cancelled"):
                raise _illegal(f"run {run_id}", run["status"], "running")
            frm = doc["status"]
            due = _due_key(doc["kind"], now, run_id, step_id)
            doc.update(status="pending", attempts=0, due_key=due, retry_at=None, updated_at=now, parked=False)
            plan.ops += [Put(NS_STEPS, skey, doc), Put(NS_READY, due, 1)]
            plan.events.append(self._event("step.requeued", doc, {"from": frm, "to": "pending", "at": now}))
            if doc["optional"] and doc["released"]:
                plan.ops.append(Incr(NS_OPEN, run_id, 1))
            run["dead_steps"] = [s for s in run["dead_steps"] if s != step_id]
            if run["status"] == "failed" and not run["dead_steps"]:
                self._run_transition(plan, run_item, "running", now, run, reason=f"step {step_id} requeued")
                self._unpark(plan, run_id, skey, now)
            else:
                run["updated_at"] = now
                plan.ops.append(Put(NS_RUNS, run_id, run))
            try:
                commit = self._commit(plan, run_id, doc["trace_id"])
            except Conflict:
                continue
            return self._step_from(doc, commit.versions[(NS_STEPS, skey)], False)
        raise Conflict(f"step {skey}: too much contention, gave up", details={"reason": "contention"})

    def _unpark(self, plan: _Plan, run_id: str, skip: str, now: int) -> None:
        for sitem in self._step_items(run_id):
            s = sitem.value
            if sitem.key == skip or not s["parked"]:
                continue
            doc = dict(s)
            doc.update(parked=False, updated_at=now)
            doc["due_key"] = _due_key(doc["kind"], now, run_id, doc["step_id"])
            plan.checks.append(VersionIs(NS_STEPS, sitem.key, sitem.version))
            plan.ops += [Put(NS_STEPS, sitem.key, doc), Put(NS_READY, doc["due_key"], 1)]

    def cancel(self, run: str | Run, reason: str | None = None) -> Run:
        """Cancel a run: its pending and retrying steps are cancelled now; assigned and running steps
        are marked for cancellation, which their worker sees on its next heartbeat (a later claim of
        an expired one cancels it too). Cancelling a completed or cancelled run raises ``Conflict``."""
        run_id = _run_ref(run)
        if reason is not None and (type(reason) is not str or len(reason) > 1024):
            raise InvalidArgument("reason", "must be a string of at most 1024 characters")
        for _ in range(_MAX_RETRIES):
            run_item = self.store.get(self.tenant, NS_RUNS, run_id)
            if run_item is None:
                raise NotFound(f"no run {run_id}")
            _require_run(f"run {run_id}", run_item.value["status"], "cancelled")
            now = self.store.clock.now_us()
            plan = _Plan()
            doc = self._run_transition(plan, run_item, "cancelled", now, reason=reason)
            for sitem in self._step_items(run_id):
                if sitem.value["status"] in ("pending", "retrying", "dead", "failed"):
                    self._cancel_step_ops(plan, dict(sitem.value), now, sitem.key, sitem.version)
            try:
                commit = self._commit(plan, run_id, doc["trace_id"])
            except Conflict:
                continue
            return self._run_from(doc, commit.versions[(NS_RUNS, run_id)])
        raise Conflict(f"run {run_id}: too much contention, gave up", details={"reason": "contention"})

    # ------------------------------------------------------------ reads

    def _step_items(self, run_id: str) -> list[Item]:
        out: list[Item] = []
        prefix = f"{run_id}/"
        while True:
            page = self.store.scan(self.tenant, NS_STEPS, prefix=prefix, after=out[-1].key if out else None, limit=1000)
            out.extend(page)
            if len(page) < 1000:
                return out

    def get(self, run: str | Run) -> Run:
        """The run with all its steps (in creation order). Raises ``NotFound``."""
        run_id = _run_ref(run)
        item = self.store.get(self.tenant, NS_RUNS, run_id)
        if item is None:
            raise NotFound(f"no run {run_id}")
        if item.value["status"] == "running":
            open_item = self.store.get(self.tenant, NS_OPEN, run_id)
            if open_item is not None and open_item.value <= 0:
                self._finish(run_id)
                item = self.store.get(self.tenant, NS_RUNS, run_id)
                assert item is not None
        cancelled = item.value["status"] == "cancelled"
        by_id = {i.value["step_id"]: i for i in self._step_items(run_id)}
        steps = tuple(
            self._step_from(by_id[s].value, by_id[s].version, cancelled) for s in item.value["steps"] if s in by_id
        )
        return self._run_from(item.value, item.version, steps)

    def step(self, step: StepRef) -> Step:
        """One step. Raises ``NotFound``."""
        run_id, step_id = _step_ref(step)
        item, run_item = self.store.get_many(self.tenant, [(NS_STEPS, f"{run_id}/{step_id}"), (NS_RUNS, run_id)])
        if item is None or run_item is None:
            raise NotFound(f"no step {run_id}/{step_id}")
        return self._step_from(item.value, item.version, run_item.value["status"] == "cancelled")

    def history(self, run: str | Run, from_seq: int = 1, limit: int | None = None) -> list[Event]:
        """The run's events in order: every transition of the run and its steps."""
        run_id = _run_ref(run)
        _check_int(from_seq, "from_seq", 1, 2**62)
        if limit is not None:
            _check_int(limit, "limit", 1, 2**31)
        stream = f"runs:{run_id}"
        out: list[Event] = []
        seq = from_seq
        while limit is None or len(out) < limit:
            want = 10_000 if limit is None else min(10_000, limit - len(out))
            page = self.store.read_stream(self.tenant, stream, seq, None, want)
            out.extend(page)
            if len(page) < want:
                break
            seq = page[-1].seq + 1
        if not out and from_seq == 1 and self.store.get(self.tenant, NS_RUNS, run_id) is None:
            raise NotFound(f"no run {run_id}")
        return out

    def usage(self, run: str | Run) -> Usage:
        """The usage metered by the run's completed steps, summed."""
        run_id = _run_ref(run)
        if self.store.get(self.tenant, NS_RUNS, run_id) is None:
            raise NotFound(f"no run {run_id}")
        tokens, cost, n = 0, 0.0, 0
        for it in self._step_items(run_id):
            u = it.value["usage"]
            if u is not None:
                tokens += u["tokens"]
                cost += u["cost_usd"]
                n += 1
        return Usage(tokens, cost, n)

    def usage_by_tenant(self, from_: int | datetime | None = None, to: int | datetime | None = None) -> Usage:
        """The tenant's usage metered at ``from_ <= t < to`` (µs since the epoch or aware datetimes;
        ``None`` leaves that end open), summed over every run."""
        lo = None if from_ is None else _us(from_, "from_")
        hi = None if to is None else _us(to, "to")
        after = None if not lo else f"{_pad(lo - 1)}~"
        tokens, cost, n = 0, 0.0, 0
        while True:
            page = self.store.scan(self.tenant, NS_USAGE, after=after, limit=1000)
            for it in page:
                if hi is not None and int(it.key[:20]) >= hi:
                    return Usage(tokens, cost, n)
                tokens += it.value["tokens"]
                cost += it.value["cost_usd"]
                n += 1
            if len(page) < 1000:
                return Usage(tokens, cost, n)
            after = page[-1].key

    def list(
        self,
        status: str | None = None,
        flow_id: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Run]:
        """Runs in run-id order (ids default to creation order), optionally only those with
        ``status`` and/or of ``flow_id``, after run id ``after``, at most ``limit`` (steps not loaded)."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidArgument("status", f"must be one of {', '.join(RUN_STATUSES)}")
        if flow_id is not None:
            _check_id(flow_id, "flow_id")
        if after is not None:
            _check_id(after, "after")
        limit = _check_int(limit, "limit", 1, 10_000)
        if status is not None:
            ns, prefix = NS_BY_STATUS, f"{status}/"
        elif flow_id is not None:
            ns, prefix = NS_BY_FLOW, f"{flow_id}/"
        else:
            ns, prefix = NS_RUNS, ""
        cursor = None if after is None else f"{prefix}{after}"
        out: list[Run] = []
        while len(out) < limit:
            page = self.store.scan(self.tenant, ns, prefix=prefix, after=cursor, limit=min(1000, max(limit * 2, 50)))
            if not page:
                break
            cursor = page[-1].key
            if ns == NS_RUNS:
                items: list[Item | None] = list(page)
            else:
                items = self.store.get_many(self.tenant, [(NS_RUNS, i.key[len(prefix) :]) for i in page])
            for it in items:
                if it is None:
                    continue
                v = it.value
                if (status is None or v["status"] == status) and (flow_id is None or v["flow_id"] == flow_id):
                    out.append(self._run_from(v, it.version))
                    if len(out) >= limit:
                        break
        return out

    # ------------------------------------------------------------ conversions

    @staticmethod
    def _run_from(v: Mapping[str, Any], version: int, steps: tuple[Step, ...] = ()) -> Run:
        return Run(
            v["run_id"],
            v["flow_id"],
            v["status"],
            v["metadata"],
            v["trace_id"],
            tuple(v["steps"]),
            tuple(v["dead_steps"]),
            v["created_at"],
            v["updated_at"],
            v["started_at"],
            v["finished_at"],
            version,
            steps,
        )

    @staticmethod
    def _step_from(v: Mapping[str, Any], version: int, run_cancelled: bool) -> Step:
        u = v["usage"]
        return Step(
            v["run_id"],
            v["step_id"],
            v["kind"],
            v["payload"],
            v["status"],
            tuple(v["depends_on"]),
            v["optional"],
            v["max_attempts"],
            v["attempts"],
            v["worker_id"],
            v["assignment_id"],
            v["lease_expires_at"],
            v["retry_at"],
            v["result"],
            v["error"],
            None if u is None else Usage(u["tokens"], u["cost_usd"], 1),
            v["idempotency_key"],
            v["created_at"],
            v["updated_at"],
            v["started_at"],
            v["completed_at"],
            run_cancelled and v["status"] in ("assigned", "running"),
            version,
        )


def _check_usage(usage: object) -> Usage:
    if not isinstance(usage, Mapping):
        raise InvalidArgument("usage", "must be an object with tokens and cost_usd")
    unknown = set(usage) - {"tokens", "cost_usd"}
    if unknown:
        raise InvalidArgument("usage", f"unknown field(s) {sorted(unknown)}")
    tokens = usage.get("tokens", 0)
    cost = usage.get("cost_usd", 0.0)
    _check_int(tokens, "usage.tokens", 0, 2**53)
    return Usage(tokens, check_number(cost, "usage.cost_usd", 0, math.inf), 1)


def _find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle of ``graph`` (node -> nodes it points to) as a closed path, or ``[]``."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    for root in graph:
        if color[root] != white:
            continue
        path: list[str] = []
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0:
                color[node] = grey
                path.append(node)
            nexts = graph.get(node, ())
            if i < len(nexts):
                stack.append((node, i + 1))
                nxt = nexts[i]
                if color.get(nxt, black) == grey:
                    return [*path[path.index(nxt) :], nxt]
                if color.get(nxt) == white:
                    stack.append((nxt, 0))
            else:
                color[node] = black
                path.pop()
    return []
