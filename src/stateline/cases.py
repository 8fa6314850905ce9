"""Cases: per-case workflow state, committed atomically with a hash-chained receipt per commit.

A *case* is one execution of a workflow. Its state is

* ``ctx`` -- a JSON object, the case's data;
* ``tokens`` -- logical threads of execution, ``id -> {id, scope, status, position, data, created_at}``;
* ``scopes`` -- nested cancel scopes, ``id -> {id, parent, status, tokens}`` (status ``active``,
  ``cancelled`` or ``exited``; ``tokens`` lists the ids of the tokens in the scope);
* ``metadata`` -- ``schema_version``, ``step_count``, ``created_at``, ``updated_at`` and custom fields;
* ``version`` -- how many commits the case has had (1 after ``create``).

A worker changes a case through a ``Case`` handle: it *buffers* mutations during a quantum of
work and then calls ``commit()``. The commit validates every buffered mutation against the state
as it would be after the ones before it and reports every problem at once; if there is none it
applies them to a copy and writes, in ONE Store commit guarded by the case version, the new
state, a receipt and the case events. Either all of that is written or none of it: a crash at any
point leaves the old state with its receipts, or the new state with its new receipt.

Storage (through the Store port only):

* the state is one item in namespace ``cases`` keyed by the case id; the item version is the case
  version. Besides the state the item records the seq and hash of the case's last receipt;
* receipts are events of type ``receipt`` on stream ``cases:<id>:receipts`` (seq = receipt seq);
* case events (one per mutation: ``token.added``, ``scope.cancelled``, ...) go to
  ``cases:<id>:events``.

The layer encodes each commit exactly once: every value it writes was built here from validated
JSON, so it hands the encoded bytes to ``Store.commit_prepared`` instead of having ``Store.commit``
re-validate and re-encode them. The state is stored in its canonical encoding (the bytes that are
hashed) with the receipt head appended, and the stored receipt is the hashed body plus its hash.
The commit checks the case version (``VersionIs``, ``Absent`` on create) and that the receipt
stream ends at the handle's last receipt (``StreamAt``).

Receipts form a hash chain. ``hash = sha256(canonical JSON of {case_id, seq, version, timestamp,
mutations, state_hash, prev_hash})`` where canonical JSON is UTF-8 with object keys sorted and no
whitespace, ``state_hash = sha256(canonical JSON of {ctx, tokens, scopes, metadata})`` after the
commit, and ``prev_hash`` is the previous receipt's hash (64 zeros for the first receipt). The
commit's revision is only known after the commit, so it is NOT part of the hashed content; it is
the revision of the receipt event and ``Receipt.revision`` is filled from it when read. Each
receipt's ``mutations`` records what changed -- for a callable the resulting change as a JSON
Patch (RFC 6902), never the function -- so ``verify`` can replay the whole history and check every
receipt's state hash as well as the chain.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import orjson

from stateline import codec
from stateline.errors import Conflict, InvalidArgument, NotFound, Unavailable
from stateline.store.protocol import PreparedAppend, PreparedCommit, PreparedEvent, PreparedPut, Store
from stateline.types import (
    Absent,
    CheckFailure,
    Event,
    StreamAt,
    VersionIs,
    check_tenant,
)

__all__ = [
    "GENESIS_HASH",
    "NAMESPACE",
    "SCHEMA_VERSION",
    "AddToken",
    "CancelScope",
    "Case",
    "CaseConflict",
    "Cases",
    "CommitRejected",
    "EnterScope",
    "ExitScope",
    "IncrementStepCount",
    "Mutation",
    "Problem",
    "Receipt",
    "RemoveToken",
    "SetCtx",
    "SetMetadata",
    "UpdateCtx",
    "UpdateToken",
    "Verification",
    "apply_patch",
    "json_diff",
    "state_hash",
]

JSON: TypeAlias = Any

NAMESPACE: Final = "cases"
SCHEMA_VERSION: Final = 1
GENESIS_HASH: Final = "0" * 64
TOKEN_STATUSES: Final = ("active", "waiting", "completed", "failed", "cancelled")
LIVE_TOKEN_STATUSES: Final = frozenset({"active", "waiting"})
SCOPE_STATUSES: Final = ("active", "cancelled", "exited")
RESERVED_METADATA: Final = frozenset({"schema_version", "step_count", "created_at", "updated_at"})
TOKEN_KEYS: Final = frozenset({"id", "scope", "status", "position", "data", "created_at"})
SCOPE_KEYS: Final = frozenset({"id", "parent", "status", "tokens"})
STATE_KEYS: Final = frozenset({"ctx", "tokens", "scopes", "metadata"})
MAX_ID_CHARS: Final = 256
MAX_STEP_INCREMENT: Final = 2**31

_CASE_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_SORTED = orjson.OPT_SORT_KEYS
_PAGE = 10_000


def _fault(stage: str) -> None:
    """Test seam: crash tests set ``_fault_hook`` to kill the process at a stage of ``commit``."""
    hook = _fault_hook
    if hook is not None:
        hook(stage)


_fault_hook: Callable[[str], None] | None = None


# ---------------------------------------------------------------- canonical JSON and hashes


def _canonical(value: JSON) -> bytes:
    return orjson.dumps(value, option=_SORTED)


def state_hash(state: Mapping[str, JSON]) -> str:
    """The sha256 (hex) of the canonical JSON of ``{ctx, tokens, scopes, metadata}``."""
    core = {"ctx": state["ctx"], "tokens": state["tokens"], "scopes": state["scopes"], "metadata": state["metadata"]}
    return hashlib.sha256(_canonical(core)).hexdigest()


def _receipt_hash(body: Mapping[str, JSON]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


def _copy(value: JSON) -> JSON:
    """A deep copy of a JSON value (only JSON is ever stored, so a round trip is exact)."""
    return orjson.loads(orjson.dumps(value))


# ---------------------------------------------------------------- JSON Patch (RFC 6902)


def _escape(token: str) -> str:
    if "~" not in token and "/" not in token:
        return token
    return token.replace("~", "~0").replace("/", "~1")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def json_diff(before: JSON, after: JSON) -> list[dict[str, JSON]]:
    """A JSON Patch (RFC 6902, ``add``/``remove``/``replace`` only) that turns ``before`` into ``after``.

    Values are compared strictly: ``1``, ``1.0`` and ``true`` differ. ``apply_patch(before, patch)``
    equals ``after``.
    """
    out: list[dict[str, JSON]] = []
    _diff(before, after, "", out)
    return out


def _diff(a: JSON, b: JSON, path: str, out: list[dict[str, JSON]]) -> None:
    ta, tb = type(a), type(b)
    if ta is dict and tb is dict:
        out.extend({"op": "remove", "path": f"{path}/{_escape(k)}"} for k in a if k not in b)
        for k, v in b.items():
            p = f"{path}/{_escape(k)}"
            if k in a:
                _diff(a[k], v, p, out)
            else:
                out.append({"op": "add", "path": p, "value": v})
        return
    if ta is list and tb is list:
        n = min(len(a), len(b))
        for i in range(n):
            _diff(a[i], b[i], f"{path}/{i}", out)
        out.extend({"op": "add", "path": f"{path}/{i}", "value": b[i]} for i in range(n, len(b)))
        out.extend({"op": "remove", "path": f"{path}/{i}"} for i in range(len(a) - 1, n - 1, -1))
        return
    if ta is tb and ta is not dict and ta is not list and a == b:
        return
    out.append({"op": "replace", "path": path, "value": b})


def apply_patch(doc: JSON, patch: list[dict[str, JSON]]) -> JSON:
    """Apply a JSON Patch made of ``add``/``remove``/``replace`` ops; returns a new document.

    ``doc`` is not modified (containers on the changed paths are copied). A patch that does not fit
    the document raises ``ValueError``.
    """
    if type(patch) is not list:
        raise ValueError("a patch is a list of operations")
    for op in patch:
        if type(op) is not dict or op.get("op") not in ("add", "remove", "replace") or type(op.get("path")) is not str:
            raise ValueError(f"unsupported patch operation {op!r}")
        path: str = op["path"]
        if path and not path.startswith("/"):
            raise ValueError(f"bad JSON pointer {path!r}")
        if op["op"] != "remove" and "value" not in op:
            raise ValueError(f"{op['op']} without a value")
        parts = [_unescape(p) for p in path.split("/")[1:]] if path else []
        doc = _patch_at(doc, parts, op)
    return doc


def _patch_at(node: JSON, parts: list[str], op: dict[str, JSON]) -> JSON:
    kind = op["op"]
    if not parts:
        if kind == "remove":
            raise ValueError("cannot remove the whole document")
        return op.get("value")
    head, rest = parts[0], parts[1:]
    if type(node) is dict:
        new_d = dict(node)
        if rest:
            if head not in node:
                raise ValueError(f"path member {head!r} does not exist")
            new_d[head] = _patch_at(node[head], rest, op)
        elif kind == "add":
            new_d[head] = op["value"]
        elif head not in node:
            raise ValueError(f"path member {head!r} does not exist")
        elif kind == "replace":
            new_d[head] = op["value"]
        else:
            del new_d[head]
        return new_d
    if type(node) is list:
        new_l = list(node)
        if head == "-" and not rest and kind == "add":
            new_l.append(op["value"])
            return new_l
        if not head.isdigit() or (len(head) > 1 and head[0] == "0"):
            raise ValueError(f"bad array index {head!r}")
        i = int(head)
        limit = len(node) if (kind == "add" and not rest) else len(node) - 1
        if i > limit:
            raise ValueError(f"array index {i} out of range")
        if rest:
            new_l[i] = _patch_at(node[i], rest, op)
        elif kind == "add":
            new_l.insert(i, op["value"])
        elif kind == "replace":
            new_l[i] = op["value"]
        else:
            del new_l[i]
        return new_l
    raise ValueError(f"cannot descend into a {type(node).__name__}")


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True, slots=True)
class SetCtx:
    """Replace the whole ``ctx`` with ``value`` (a JSON object), or, with ``key``, set ``ctx[key] = value``."""

    value: JSON
    key: str | None = None


@dataclass(frozen=True, slots=True)
class UpdateCtx:
    """Call ``fn(ctx)`` at commit time on a private copy of ``ctx``; its return value (a JSON object)
    becomes the new ``ctx`` (``None``: the copy, as ``fn`` changed it in place). The receipt records the
    resulting change as a JSON Patch."""

    fn: Callable[[dict[str, JSON]], dict[str, JSON] | None]


@dataclass(frozen=True, slots=True)
class AddToken:
    """Add a token with a new string id, optionally inside an active scope (status ``active`` or ``waiting``)."""

    token_id: str
    scope: str | None = None
    position: JSON = None
    data: JSON = None
    status: str = "active"


@dataclass(frozen=True, slots=True)
class RemoveToken:
    """Remove an existing token (and take it out of its scope)."""

    token_id: str


@dataclass(frozen=True, slots=True)
class UpdateToken:
    """Call ``fn(token)`` at commit time on a private copy of the token; its return value (or the copy,
    if it returns ``None``) becomes the token. ``id`` and ``created_at`` must not change; ``status``
    must be one of ``TOKEN_STATUSES``; a new ``scope`` must exist and be active."""

    token_id: str
    fn: Callable[[dict[str, JSON]], dict[str, JSON] | None]


@dataclass(frozen=True, slots=True)
class EnterScope:
    """Open a new cancel scope with a new id, nested in ``parent`` (which must exist and be active)."""

    scope: str
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class ExitScope:
    """Close an active scope normally; it must hold no live token and no active nested scope."""

    scope: str


@dataclass(frozen=True, slots=True)
class CancelScope:
    """Cancel an active scope, every active scope nested in it, and the live tokens of all of them."""

    scope: str


@dataclass(frozen=True, slots=True)
class IncrementStepCount:
    """Add ``by`` (a positive integer) to ``metadata.step_count``."""

    by: int = 1


@dataclass(frozen=True, slots=True)
class SetMetadata:
    """Set the custom metadata field ``key`` (not one of ``RESERVED_METADATA``) to a JSON ``value``."""

    key: str
    value: JSON


Mutation: TypeAlias = (
    SetCtx
    | UpdateCtx
    | AddToken
    | RemoveToken
    | UpdateToken
    | EnterScope
    | ExitScope
    | CancelScope
    | IncrementStepCount
    | SetMetadata
)

_MUTATION_TYPES: Final = (
    SetCtx,
    UpdateCtx,
    AddToken,
    RemoveToken,
    UpdateToken,
    EnterScope,
    ExitScope,
    CancelScope,
    IncrementStepCount,
    SetMetadata,
)

_OP_NAMES: Final[dict[type, str]] = {
    SetCtx: "set_ctx",
    UpdateCtx: "update_ctx",
    AddToken: "add_token",
    RemoveToken: "remove_token",
    UpdateToken: "update_token",
    EnterScope: "enter_scope",
    ExitScope: "exit_scope",
    CancelScope: "cancel_scope",
    IncrementStepCount: "increment_step_count",
    SetMetadata: "set_metadata",
}

EVENT_TYPES: Final[dict[str, str]] = {
    "create": "case.created",
    "restore": "case.restored",
    "set_ctx": "ctx.set",
    "update_ctx": "ctx.updated",
    "add_token": "token.added",
    "remove_token": "token.removed",
    "update_token": "token.updated",
    "enter_scope": "scope.entered",
    "exit_scope": "scope.exited",
    "cancel_scope": "scope.cancelled",
    "increment_step_count": "steps.incremented",
    "set_metadata": "metadata.set",
}


# ---------------------------------------------------------------- results and errors


@dataclass(frozen=True, slots=True)
class Problem:
    """Why one buffered mutation was refused: its position in the buffer, its op, the field and the problem."""

    index: int
    op: str
    field: str
    message: str

    def to_dict(self) -> dict[str, JSON]:
        return {"index": self.index, "op": self.op, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        return f"#{self.index} {self.op}: {self.field}: {self.message}"


class CommitRejected(InvalidArgument):
    """``commit()`` refused the buffer: ``problems`` lists EVERY invalid mutation. Nothing was written;
    the handle's state and buffer are unchanged."""

    def __init__(self, case_id: str, problems: list[Problem], buffered: int) -> None:
        listing = "; ".join(str(p) for p in problems)
        super().__init__(
            "mutations",
            f"case {case_id!r}: {len(problems)} of {buffered} buffered mutation(s) are invalid, nothing was "
            f"written and the buffer is kept: {listing}",
            details={"case_id": case_id, "problems": [p.to_dict() for p in problems]},
        )
        self.case_id = case_id
        self.problems: tuple[Problem, ...] = tuple(problems)


class CaseConflict(Conflict):
    """Another writer changed the case (or created it) first. Nothing was written; the handle keeps
    its old state and its buffer: ``refresh()`` and commit again."""

    def __init__(
        self, message: str, *, case_id: str, expected_version: int, found_version: int | None, failures: Any = ()
    ) -> None:
        super().__init__(
            message,
            failures=failures,
            details={"case_id": case_id, "expected_version": expected_version, "found_version": found_version},
        )
        self.case_id = case_id
        self.expected_version = expected_version
        self.found_version = found_version


class _Bad(Exception):
    """A validation problem inside the planner (turned into a ``Problem``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Receipt:
    """The immutable record of one commit of a case.

    ``mutations`` summarises what changed (for callables, the resulting JSON Patch); ``state_hash`` is
    the hash of the state after the commit; ``prev_hash`` the hash of the previous receipt;
    ``hash`` this receipt's own hash (see the module docstring). ``revision`` is the Store revision
    of the commit that wrote it (not hashed: it is only known once the commit is done).
    """

    case_id: str
    seq: int
    version: int
    timestamp: int
    mutations: tuple[dict[str, JSON], ...]
    state_hash: str
    prev_hash: str
    hash: str
    revision: int | None = None

    def body(self) -> dict[str, JSON]:
        """The hashed content of the receipt."""
        return {
            "case_id": self.case_id,
            "seq": self.seq,
            "version": self.version,
            "timestamp": self.timestamp,
            "mutations": list(self.mutations),
            "state_hash": self.state_hash,
            "prev_hash": self.prev_hash,
        }

    def to_dict(self) -> dict[str, JSON]:
        """The receipt as JSON (body, own hash and revision)."""
        return {**self.body(), "hash": self.hash, "revision": self.revision}

    def compute_hash(self) -> str:
        """Recompute the hash from the body (equal to ``hash`` unless the receipt was altered)."""
        return _receipt_hash(self.body())

    @classmethod
    def from_event(cls, event: Event) -> Receipt:
        """Decode a receipt event; ``ValueError`` if its data is not a well-formed receipt."""
        d = event.data
        if type(d) is not dict:
            raise ValueError("receipt data is not an object")
        try:
            muts = d["mutations"]
            if type(muts) is not list or any(type(m) is not dict for m in muts):
                raise ValueError("receipt mutations is not a list of objects")
            r = cls(
                d["case_id"],
                d["seq"],
                d["version"],
                d["timestamp"],
                tuple(muts),
                d["state_hash"],
                d["prev_hash"],
                d["hash"],
                event.revision,
            )
        except KeyError as exc:
            raise ValueError(f"receipt has no {exc.args[0]!r}") from None
        for name, typ in (("case_id", str), ("seq", int), ("version", int), ("timestamp", int)):
            if type(getattr(r, name)) is not typ:
                raise ValueError(f"receipt {name} is not a {typ.__name__}")
        for name in ("state_hash", "prev_hash", "hash"):
            if type(getattr(r, name)) is not str:
                raise ValueError(f"receipt {name} is not a string")
        if set(d) != {"case_id", "seq", "version", "timestamp", "mutations", "state_hash", "prev_hash", "hash"}:
            raise ValueError("receipt has unexpected fields")
        return r


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of ``Cases.verify``: ``ok``, or the first bad receipt and why.

    ``reason`` is ``None`` when ok, else one of ``missing`` (a receipt is gone), ``reordered`` (a
    receipt is at another receipt's place), ``edited`` (its content no longer matches its hash or
    cannot be read), ``chain`` (its ``prev_hash`` does not link to the receipt before),
    ``state_mismatch`` (replaying its mutations does not give its state hash), ``unexpected`` (a
    receipt the state does not account for) or ``state_edited`` (the stored state differs from what
    the receipts say; ``first_bad_seq`` is then ``None``).
    """

    case_id: str
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok


# ---------------------------------------------------------------- validation helpers


def _check_case_id(case_id: object, field: str = "case_id") -> str:
    if type(case_id) is not str:
        raise InvalidArgument(field, f"must be a string, got {type(case_id).__name__}")
    if _CASE_ID_RE.fullmatch(case_id) is None:
        raise InvalidArgument(
            field, f"{case_id[:80]!r} is not allowed: use letters, digits and _.-, at most 128 characters"
        )
    return case_id


def _json(value: JSON, field: str) -> JSON:
    """A private deep copy of ``value`` if it is plain JSON, else ``_Bad``."""
    t = type(value)
    if (t is int and -(2**63) <= value < 2**64) or t is bool or value is None or (t is str and value.isascii()):
        return value
    try:
        return orjson.loads(codec.encode(value, field))
    except InvalidArgument as exc:
        raise _Bad(field, exc.message.split(": ", 1)[-1]) from None


def _ident(value: object, field: str) -> str:
    if type(value) is not str:
        raise _Bad(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise _Bad(field, "must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise _Bad(field, f"must be at most {MAX_ID_CHARS} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad(field, "is not valid Unicode text") from None
    return value


# ---------------------------------------------------------------- the working state


class _Work:
    """The state as it would be after the mutations applied so far; copies each part on first write."""

    __slots__ = ("ctx", "metadata", "owned", "scopes", "tokens")

    def __init__(self, state: Mapping[str, JSON]) -> None:
        self.ctx: dict[str, JSON] = state["ctx"]
        self.tokens: dict[str, dict[str, JSON]] = state["tokens"]
        self.scopes: dict[str, dict[str, JSON]] = state["scopes"]
        self.metadata: dict[str, JSON] = state["metadata"]
        self.owned = 0

    def own_ctx(self) -> dict[str, JSON]:
        if not self.owned & 1:
            self.ctx = dict(self.ctx)
            self.owned |= 1
        return self.ctx

    def own_tokens(self) -> dict[str, dict[str, JSON]]:
        if not self.owned & 2:
            self.tokens = dict(self.tokens)
            self.owned |= 2
        return self.tokens

    def own_scopes(self) -> dict[str, dict[str, JSON]]:
        if not self.owned & 4:
            self.scopes = dict(self.scopes)
            self.owned |= 4
        return self.scopes

    def own_metadata(self) -> dict[str, JSON]:
        if not self.owned & 8:
            self.metadata = dict(self.metadata)
            self.owned |= 8
        return self.metadata

    def state(self) -> dict[str, JSON]:
        return {"ctx": self.ctx, "tokens": self.tokens, "scopes": self.scopes, "metadata": self.metadata}


def _active_scope(w: _Work, scope_id: object, field: str) -> dict[str, JSON]:
    sid = _ident(scope_id, field)
    scope = w.scopes.get(sid)
    if scope is None:
        raise _Bad(field, f"scope {sid!r} does not exist")
    if scope["status"] != "active":
        raise _Bad(field, f"scope {sid!r} is {scope['status']}, not active")
    return scope


def _call(fn: Callable[[dict[str, JSON]], dict[str, JSON] | None], arg: dict[str, JSON], what: str) -> JSON:
    try:
        result = fn(arg)
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported, nothing is written
        raise _Bad("fn", f"{what} raised {type(exc).__name__}: {exc}") from None
    return arg if result is None else result


def _plan(m: object, w: _Work, ts: int) -> dict[str, JSON]:
    """Validate one mutation against ``w`` and return its summary (what ``_apply`` will do)."""
    t = type(m)
    if t is SetCtx:
        assert isinstance(m, SetCtx)
        if m.key is None:
            value = _json(m.value, "value")
            if type(value) is not dict:
                raise _Bad("value", f"ctx must be a JSON object, got {type(m.value).__name__}")
            return {"op": "set_ctx", "value": value}
        key = _ident(m.key, "key")
        return {"op": "set_ctx", "key": key, "value": _json(m.value, "value")}
    if t is UpdateCtx:
        assert isinstance(m, UpdateCtx)
        if not callable(m.fn):
            raise _Bad("fn", "must be callable")
        result = _call(m.fn, _copy(w.ctx), "update_ctx function")
        new = _json(result, "fn result")
        if type(new) is not dict:
            raise _Bad("fn", f"must return a JSON object (or None), got {type(result).__name__}")
        return {"op": "update_ctx", "patch": json_diff(w.ctx, new)}
    if t is AddToken:
        assert isinstance(m, AddToken)
        tid = _ident(m.token_id, "token_id")
        if tid in w.tokens:
            raise _Bad("token_id", f"token {tid!r} already exists")
        if m.scope is not None:
            _active_scope(w, m.scope, "scope")
        if type(m.status) is not str or m.status not in ("active", "waiting"):
            raise _Bad("status", f"a new token is 'active' or 'waiting', got {m.status!r}")
        token = {
            "id": tid,
            "scope": m.scope,
            "status": m.status,
            "position": _json(m.position, "position"),
            "data": _json(m.data, "data"),
            "created_at": ts,
        }
        return {"op": "add_token", "token": token}
    if t is RemoveToken:
        assert isinstance(m, RemoveToken)
        tid = _ident(m.token_id, "token_id")
        if tid not in w.tokens:
            raise _Bad("token_id", f"token {tid!r} does not exist")
        return {"op": "remove_token", "id": tid}
    if t is UpdateToken:
        assert isinstance(m, UpdateToken)
        tid = _ident(m.token_id, "token_id")
        old = w.tokens.get(tid)
        if old is None:
            raise _Bad("token_id", f"token {tid!r} does not exist")
        patch: list[dict[str, JSON]] | None = None
        if type(m.fn) is _FieldSetter:  # update_token(id, status=..., ...): only the given fields change
            changes = {k: _json(v, f"fn.{k}") for k, v in m.fn.changes.items()}
            new = {**old, **changes}
            patch = []
            for k, v in changes.items():
                _diff(old[k], v, f"/{k}", patch)
        else:
            if not callable(m.fn):
                raise _Bad("fn", "must be callable")
            result = _call(m.fn, _copy(old), "update_token function")
            new = _json(result, "fn result")
            if type(new) is not dict:
                raise _Bad("fn", f"must return a token object (or None), got {type(result).__name__}")
        if set(new) != TOKEN_KEYS:
            raise _Bad("fn", f"a token has exactly the fields {sorted(TOKEN_KEYS)}, got {sorted(new)}")
        if new["id"] != tid or type(new["created_at"]) is not int or new["created_at"] != old["created_at"]:
            raise _Bad("fn", "a token's id and created_at cannot change")
        if type(new["status"]) is not str or new["status"] not in TOKEN_STATUSES:
            raise _Bad("fn", f"status must be one of {', '.join(TOKEN_STATUSES)}, got {new['status']!r}")
        if new["scope"] is not None and (new["scope"] != old["scope"] or new["status"] in LIVE_TOKEN_STATUSES):
            _active_scope(w, new["scope"], "fn.scope")
        return {"op": "update_token", "id": tid, "patch": json_diff(old, new) if patch is None else patch}
    if t is EnterScope:
        assert isinstance(m, EnterScope)
        sid = _ident(m.scope, "scope")
        if sid in w.scopes:
            raise _Bad("scope", f"scope {sid!r} already exists (scope ids are never reused)")
        if m.parent is not None:
            _active_scope(w, m.parent, "parent")
        return {"op": "enter_scope", "id": sid, "parent": m.parent}
    if t is ExitScope:
        assert isinstance(m, ExitScope)
        scope = _active_scope(w, m.scope, "scope")
        sid = scope["id"]
        live = [x for x in scope["tokens"] if w.tokens[x]["status"] in LIVE_TOKEN_STATUSES]
        if live:
            raise _Bad("scope", f"scope {sid!r} still has live token(s) {live}; remove, finish or cancel them first")
        nested = [s["id"] for s in w.scopes.values() if s["parent"] == sid and s["status"] == "active"]
        if nested:
            raise _Bad("scope", f"scope {sid!r} still has active nested scope(s) {nested}; exit or cancel them first")
        return {"op": "exit_scope", "id": sid}
    if t is CancelScope:
        assert isinstance(m, CancelScope)
        root = _active_scope(w, m.scope, "scope")
        children: dict[str, list[str]] = {}
        for s in w.scopes.values():
            if s["parent"] is not None:
                children.setdefault(s["parent"], []).append(s["id"])
        scopes: list[str] = []
        todo = [root["id"]]
        while todo:
            sid = todo.pop()
            if w.scopes[sid]["status"] == "active":
                scopes.append(sid)
                todo.extend(children.get(sid, ()))
        tokens = [x for s in scopes for x in w.scopes[s]["tokens"] if w.tokens[x]["status"] in LIVE_TOKEN_STATUSES]
        return {"op": "cancel_scope", "id": root["id"], "scopes": scopes, "tokens": tokens}
    if t is IncrementStepCount:
        assert isinstance(m, IncrementStepCount)
        if type(m.by) is not int or not 1 <= m.by <= MAX_STEP_INCREMENT:
            raise _Bad("by", f"must be an integer from 1 to {MAX_STEP_INCREMENT}, got {m.by!r}")
        return {"op": "increment_step_count", "by": m.by}
    if t is SetMetadata:
        assert isinstance(m, SetMetadata)
        key = _ident(m.key, "key")
        if key in RESERVED_METADATA:
            raise _Bad("key", f"{key!r} is maintained by the case; reserved: {', '.join(sorted(RESERVED_METADATA))}")
        return {"op": "set_metadata", "key": key, "value": _json(m.value, "value")}
    if t is _Restore:
        assert isinstance(m, _Restore)
        return {"op": "restore", "state": m.state}
    raise _Bad("mutation", f"{t.__name__} is not a case mutation")


def _apply(w: _Work, s: dict[str, JSON]) -> None:
    """Apply one summary (from ``_plan`` or read back from a receipt) to ``w``."""
    op = s["op"]
    if op == "set_ctx":
        if "key" in s:
            w.own_ctx()[s["key"]] = s["value"]
        else:
            # the summary's own object (so is an unchanged ctx after an empty patch, below): copied before
            # a later mutation of the batch writes into it
            w.ctx = s["value"]
            w.owned &= ~1
    elif op == "update_ctx":
        w.ctx = apply_patch(w.ctx, s["patch"])
        w.owned &= ~1
    elif op == "add_token":
        token = s["token"]
        w.own_tokens()[token["id"]] = token
        if token["scope"] is not None:
            scope = w.scopes[token["scope"]]
            w.own_scopes()[scope["id"]] = {**scope, "tokens": [*scope["tokens"], token["id"]]}
    elif op == "remove_token":
        token = w.own_tokens().pop(s["id"])
        if token["scope"] is not None:
            _unlink(w, token["scope"], token["id"])
    elif op == "update_token":
        old = w.tokens[s["id"]]
        new = apply_patch(old, s["patch"])
        w.own_tokens()[s["id"]] = new
        if new["scope"] != old["scope"]:
            if old["scope"] is not None:
                _unlink(w, old["scope"], s["id"])
            if new["scope"] is not None:
                scope = w.scopes[new["scope"]]
                w.own_scopes()[scope["id"]] = {**scope, "tokens": [*scope["tokens"], s["id"]]}
    elif op == "enter_scope":
        w.own_scopes()[s["id"]] = {"id": s["id"], "parent": s["parent"], "status": "active", "tokens": []}
    elif op == "exit_scope":
        w.own_scopes()[s["id"]] = {**w.scopes[s["id"]], "status": "exited"}
    elif op == "cancel_scope":
        scopes = w.own_scopes()
        for sid in s["scopes"]:
            scopes[sid] = {**scopes[sid], "status": "cancelled"}
        tokens = w.own_tokens()
        for tid in s["tokens"]:
            tokens[tid] = {**tokens[tid], "status": "cancelled"}
    elif op == "increment_step_count":
        md = w.own_metadata()
        md["step_count"] = md["step_count"] + s["by"]
    elif op == "set_metadata":
        w.own_metadata()[s["key"]] = s["value"]
    elif op in ("create", "restore"):
        st = s["state"]
        w.ctx, w.tokens, w.scopes, w.metadata = st["ctx"], st["tokens"], st["scopes"], st["metadata"]
        w.owned = 0
    else:
        raise ValueError(f"unknown op {op!r}")


def _unlink(w: _Work, scope_id: str, token_id: str) -> None:
    scope = w.scopes[scope_id]
    w.own_scopes()[scope_id] = {**scope, "tokens": [x for x in scope["tokens"] if x != token_id]}


# ---------------------------------------------------------------- strict state validation (restore)


def _validate_state(data: object, field: str = "data") -> dict[str, JSON]:
    """Check that ``data`` is a complete, consistent case state; return a private copy. Raises InvalidArgument."""
    if type(data) is not dict:
        raise InvalidArgument(field, f"must be an object, got {type(data).__name__}")
    try:
        st = orjson.loads(codec.encode(data, field))
    except InvalidArgument:
        raise
    missing, extra = STATE_KEYS - set(st), set(st) - STATE_KEYS
    if missing or extra:
        raise InvalidArgument(field, f"missing {sorted(missing)}" if missing else f"unexpected {sorted(extra)}")

    def bad(where: str, problem: str) -> InvalidArgument:
        return InvalidArgument(f"{field}.{where}", problem)

    ctx, tokens, scopes, md = st["ctx"], st["tokens"], st["scopes"], st["metadata"]
    if type(ctx) is not dict:
        raise bad("ctx", "must be an object")
    if type(md) is not dict:
        raise bad("metadata", "must be an object")
    if md.get("schema_version") != SCHEMA_VERSION or type(md.get("schema_version")) is not int:
        raise bad("metadata.schema_version", f"must be {SCHEMA_VERSION}, got {md.get('schema_version')!r}")
    for k in ("step_count", "created_at", "updated_at"):
        v = md.get(k)
        if type(v) is not int or v < 0:
            raise bad(f"metadata.{k}", f"must be a non-negative integer, got {v!r}")
    if type(tokens) is not dict:
        raise bad("tokens", "must be an object")
    if type(scopes) is not dict:
        raise bad("scopes", "must be an object")
    for sid, s in scopes.items():
        where = f"scopes.{sid}"
        if type(s) is not dict or set(s) != SCOPE_KEYS:
            raise bad(where, f"must be an object with exactly {sorted(SCOPE_KEYS)}")
        if s["id"] != sid or not sid or len(sid) > MAX_ID_CHARS:
            raise bad(f"{where}.id", f"must equal its key {sid!r} (1..{MAX_ID_CHARS} characters)")
        if s["status"] not in SCOPE_STATUSES:
            raise bad(f"{where}.status", f"must be one of {', '.join(SCOPE_STATUSES)}")
        if s["parent"] is not None and (type(s["parent"]) is not str or s["parent"] not in scopes):
            raise bad(f"{where}.parent", f"names no scope: {s['parent']!r}")
        if type(s["tokens"]) is not list or any(type(x) is not str for x in s["tokens"]):
            raise bad(f"{where}.tokens", "must be a list of token ids")
        if len(set(s["tokens"])) != len(s["tokens"]):
            raise bad(f"{where}.tokens", "lists a token twice")
        for x in s["tokens"]:
            tok = tokens.get(x)
            if type(tok) is not dict or tok.get("scope") != sid:
                raise bad(f"{where}.tokens", f"lists {x!r}, which is not a token of this scope")
    for sid, s in scopes.items():
        seen = {sid}
        p = s["parent"]
        while p is not None:
            if p in seen:
                raise bad(f"scopes.{sid}.parent", "scopes form a cycle")
            seen.add(p)
            p = scopes[p]["parent"]
        if s["status"] == "active" and s["parent"] is not None and scopes[s["parent"]]["status"] != "active":
            raise bad(f"scopes.{sid}.status", "an active scope cannot be nested in a cancelled or exited one")
    for tid, tok in tokens.items():
        where = f"tokens.{tid}"
        if type(tok) is not dict or set(tok) != TOKEN_KEYS:
            raise bad(where, f"must be an object with exactly {sorted(TOKEN_KEYS)}")
        if tok["id"] != tid or not tid or len(tid) > MAX_ID_CHARS:
            raise bad(f"{where}.id", f"must equal its key {tid!r} (1..{MAX_ID_CHARS} characters)")
        if tok["status"] not in TOKEN_STATUSES:
            raise bad(f"{where}.status", f"must be one of {', '.join(TOKEN_STATUSES)}")
        if type(tok["created_at"]) is not int or tok["created_at"] < 0:
            raise bad(f"{where}.created_at", "must be a non-negative integer")
        sc = tok["scope"]
        if sc is not None:
            if type(sc) is not str or sc not in scopes:
                raise bad(f"{where}.scope", f"names no scope: {sc!r}")
            if tid not in scopes[sc]["tokens"]:
                raise bad(f"{where}.scope", f"scope {sc!r} does not list this token")
            if tok["status"] in LIVE_TOKEN_STATUSES and scopes[sc]["status"] != "active":
                raise bad(f"{where}.status", f"a live token cannot be in a {scopes[sc]['status']} scope")
    return st  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the layer


def _streams(case_id: str) -> tuple[str, str]:
    return f"cases:{case_id}:receipts", f"cases:{case_id}:events"


_NO_META = b"{}"


def _persist(
    store: Store,
    tenant: str,
    cid: str,
    guard: VersionIs | Absent,
    head_seq: int,
    prev_hash: str,
    version: int,
    ts: int,
    state: dict[str, JSON],
    summaries: list[dict[str, JSON]],
) -> Receipt:
    """Write ``state``, its receipt and the case events in one Store commit; return the receipt.

    Every value here was built by this module from validated JSON, so it is encoded once, here,
    and handed to ``Store.commit_prepared``: the state's canonical encoding is both what is hashed
    and (with the receipt head appended) what is stored, and the stored receipt is exactly the
    hashed body plus its hash.
    """
    rstream, estream = _streams(cid)
    seq = head_seq + 1
    core = orjson.dumps(state, option=_SORTED)
    shash = hashlib.sha256(core).hexdigest()
    body = {
        "case_id": cid,
        "seq": seq,
        "version": version,
        "timestamp": ts,
        "mutations": summaries,
        "state_hash": shash,
        "prev_hash": prev_hash,
    }
    body_bytes = orjson.dumps(body, option=_SORTED)
    rhash = hashlib.sha256(body_bytes).hexdigest()
    limit = store.max_value_bytes
    receipt_data = codec.sized(b"".join((body_bytes[:-1], b',"hash":"', rhash.encode(), b'"}')), "receipt", limit)
    value = b"".join((core[:-1], b',"receipt":{"seq":', str(seq).encode(), b',"hash":"', rhash.encode(), b'"}}'))
    value = codec.sized(value, "case state", limit)
    # each event holds one summary of the receipt, so it is smaller than the receipt, whose size is checked
    events = tuple([PreparedEvent(EVENT_TYPES[s["op"]], orjson.dumps(s), _NO_META) for s in summaries])
    prepared = PreparedCommit(
        tenant,
        (guard, StreamAt(rstream, head_seq)),
        (  # the receipt first: the change feed names a change after its first op (``<tenant>.cases.receipt``)
            PreparedAppend(rstream, (PreparedEvent("receipt", receipt_data, _NO_META),)),
            PreparedPut(NAMESPACE, cid, value, None),
            PreparedAppend(estream, events),
        ),
        _NO_META,
    )
    c = store.commit_prepared(prepared)
    mutations = orjson.loads(body_bytes)["mutations"]  # the receipt's own copy
    return Receipt(cid, seq, version, ts, tuple(mutations), shash, prev_hash, rhash, c.revision)


class Cases:
    """The cases of one tenant: create, open, list, read receipts and verify them."""

    def __init__(self, store: Store, tenant: str) -> None:
        if not isinstance(store, Store):
            raise InvalidArgument("store", f"must be a Store, got {type(store).__name__}")
        self.store = store
        self.tenant = check_tenant(tenant)

    # ------------------------------------------------------------ create / open

    def create(self, case_id: str | None = None, ctx: Mapping[str, JSON] | None = None) -> Case:
        """Create a case (a random id if ``case_id`` is ``None``) with ``ctx`` (a JSON object, default ``{}``).

        Writes the state (version 1), the first receipt and a ``case.created`` event in one commit.
        Raises ``CaseConflict`` if the case already exists, ``InvalidArgument`` for a bad id or ctx.
        """
        cid = uuid.uuid4().hex if case_id is None else _check_case_id(case_id)
        if ctx is None:
            ctx = {}
        if not isinstance(ctx, Mapping):
            raise InvalidArgument("ctx", f"must be a JSON object, got {type(ctx).__name__}")
        ctx_copy = orjson.loads(codec.encode(dict(ctx), "ctx"))
        ts = self.store.clock.now_us()
        state = {
            "ctx": ctx_copy,
            "tokens": {},
            "scopes": {},
            "metadata": {"schema_version": SCHEMA_VERSION, "step_count": 0, "created_at": ts, "updated_at": ts},
        }
        return self._genesis(cid, state, "create", ts)

    def restore(self, data: Mapping[str, JSON], case_id: str | None = None) -> Case:
        """Create a case from ``snapshot()`` data (under ``case_id``, default the snapshot's id).

        The data is validated strictly (``InvalidArgument`` names the first bad field); its receipt
        chain starts afresh with a ``restore`` receipt holding the full state.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument("data", f"must be a snapshot object, got {type(data).__name__}")
        snap = _check_snapshot(data)
        cid = _check_case_id(snap["case_id"] if case_id is None else case_id)
        ts = self.store.clock.now_us()
        return self._genesis(cid, snap["state"], "restore", ts)

    def _genesis(self, cid: str, state: dict[str, JSON], op: str, ts: int) -> Case:
        summary = {"op": op, "state": state}
        try:
            receipt = _persist(
                self.store, self.tenant, cid, Absent(NAMESPACE, cid), 0, GENESIS_HASH, 1, ts, state, [summary]
            )
        except Conflict as exc:
            raise CaseConflict(
                f"case {cid!r} already exists (or has receipts); nothing was written",
                case_id=cid,
                expected_version=0,
                found_version=_found_version(exc),
                failures=exc.failures,
            ) from None
        return Case(self, cid, _copy(state), 1, receipt)

    def open(self, case_id: str) -> Case:
        """A handle on the last committed state of ``case_id`` (crash recovery: exactly what the last
        successful commit wrote). Raises ``NotFound`` if there is no such case."""
        cid = _check_case_id(case_id)
        item = self.store.get(self.tenant, NAMESPACE, cid)
        if item is None:
            raise NotFound(f"case {cid!r} does not exist", details={"case_id": cid})
        value = item.value
        try:
            head = value["receipt"]
            state = {
                "ctx": value["ctx"],
                "tokens": value["tokens"],
                "scopes": value["scopes"],
                "metadata": value["metadata"],
            }
            head_seq, head_hash = head["seq"], head["hash"]
        except (KeyError, TypeError):
            raise Conflict(
                f"case {cid!r}: the stored state is not a case state (written behind the layer's back?); "
                "verify() reports what is wrong",
                details={"case_id": cid},
            ) from None
        return Case(self, cid, state, item.version, None, head_seq=head_seq, head_hash=head_hash)

    def exists(self, case_id: str) -> bool:
        """Whether ``case_id`` has been created."""
        return self.store.get(self.tenant, NAMESPACE, _check_case_id(case_id)) is not None

    def list_ids(self, prefix: str = "", after: str | None = None, limit: int = 100) -> list[str]:
        """Case ids starting with ``prefix``, in order, after ``after``, at most ``limit``."""
        return [i.key for i in self.store.scan(self.tenant, NAMESPACE, prefix, after, limit)]

    # ------------------------------------------------------------ history

    def receipts(self, case_id: str, from_seq: int = 1, limit: int = 1000) -> list[Receipt]:
        """Receipts of ``case_id`` from ``from_seq``, in order (``revision`` filled from the stored event)."""
        cid = _check_case_id(case_id)
        return [
            Receipt.from_event(e) for e in self.store.read_stream(self.tenant, _streams(cid)[0], from_seq, None, limit)
        ]

    def events(self, case_id: str, from_seq: int = 1, limit: int = 1000) -> list[Event]:
        """Case events of ``case_id`` (one per applied mutation) from ``from_seq``, in order."""
        cid = _check_case_id(case_id)
        return self.store.read_stream(self.tenant, _streams(cid)[1], from_seq, None, limit)

    def verify(self, case_id: str) -> Verification:
        """Recompute the receipt chain of ``case_id``, replay its mutations and compare with the stored state.

        Returns a ``Verification`` naming the first receipt that is missing, reordered or edited (never
        raises for a damaged history). Raises ``NotFound`` only if the case has neither state nor receipts.
        """
        cid = _check_case_id(case_id)
        rstream = _streams(cid)[0]
        item = self.store.get(self.tenant, NAMESPACE, cid)
        events: list[Event] = []
        while True:
            page = self.store.read_stream(self.tenant, rstream, events[-1].seq + 1 if events else 1, None, _PAGE)
            events.extend(page)
            if len(page) < _PAGE:
                break
        if item is None and not events:
            raise NotFound(f"case {cid!r} does not exist", details={"case_id": cid})
        return _verify(cid, item.value if item is not None else None, item.version if item else None, events)


def _found_version(exc: Conflict) -> int | None:
    for f in exc.failures:
        if isinstance(f, CheckFailure) and not isinstance(f.check, StreamAt):
            return f.found
    return None


def _check_snapshot(data: Mapping[str, JSON]) -> dict[str, JSON]:
    expected = {"schema_version", "case_id", "version", "receipt_seq", "state"}
    keys = set(data)
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise InvalidArgument("data", f"not a case snapshot: missing {missing}, unexpected {extra}")
    if data["schema_version"] != SCHEMA_VERSION or type(data["schema_version"]) is not int:
        raise InvalidArgument(
            "data.schema_version", f"unsupported schema version {data['schema_version']!r} (this is {SCHEMA_VERSION})"
        )
    _check_case_id(data["case_id"], "data.case_id")
    for k in ("version", "receipt_seq"):
        if type(data[k]) is not int or data[k] < 1:
            raise InvalidArgument(f"data.{k}", f"must be a positive integer, got {data[k]!r}")
    return {"case_id": data["case_id"], "state": _validate_state(data["state"], "data.state")}


def _verify(cid: str, value: JSON, version: int | None, events: list[Event]) -> Verification:
    def fail(seq: int | None, reason: str, detail: str, checked: int) -> Verification:
        return Verification(cid, False, checked, seq, reason, detail)

    inner: list[int | None] = []
    for e in events:
        d = e.data
        inner.append(d.get("seq") if type(d) is dict and type(d.get("seq")) is int else None)
    prev = GENESIS_HASH
    w: _Work | None = None
    last: Receipt | None = None
    for i, e in enumerate(events):
        expected = i + 1
        if e.seq != expected:
            return fail(expected, "missing", f"receipt {expected} is not in the stream (next is {e.seq})", i)
        if inner[i] != expected:
            if expected in inner:
                return fail(expected, "reordered", f"position {expected} holds receipt {inner[i]}", i)
            return fail(expected, "missing", f"receipt {expected} is gone (position holds {inner[i]})", i)
        try:
            if e.type != "receipt":
                raise ValueError(f"event type is {e.type!r}")
            r = Receipt.from_event(e)
        except ValueError as exc:
            return fail(expected, "edited", f"receipt {expected} is malformed: {exc}", i)
        if r.case_id != cid or r.compute_hash() != r.hash:
            return fail(expected, "edited", f"receipt {expected} does not match its hash", i)
        if r.prev_hash != prev:
            return fail(expected, "chain", f"receipt {expected} does not link to receipt {expected - 1}", i)
        if r.version != (last.version + 1 if last is not None else 1):
            return fail(expected, "chain", f"receipt {expected} has version {r.version}", i)
        try:
            if w is None:
                if len(r.mutations) != 1 or r.mutations[0].get("op") not in ("create", "restore"):
                    raise ValueError("the first receipt must create or restore the case")
                w = _Work(_copy(r.mutations[0]["state"]))
            else:
                for s in r.mutations:
                    if s.get("op") == "create":
                        raise ValueError("only the first receipt creates the case")
                    _apply(w, _copy(s))
                md = w.own_metadata()
                md["updated_at"] = r.timestamp
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            return fail(expected, "state_mismatch", f"receipt {expected} cannot be replayed: {exc}", i)
        if state_hash(w.state()) != r.state_hash:
            return fail(expected, "state_mismatch", f"replaying receipt {expected} does not give its state hash", i)
        prev = r.hash
        last = r
    n = len(events)
    if value is None or last is None:
        if last is None:
            return fail(1, "missing", "the case has no receipts", 0)
        return fail(None, "state_edited", "the case state is missing", n)
    head = value.get("receipt") if type(value) is dict else None
    head_seq = head.get("seq") if type(head) is dict else None
    if type(head_seq) is not int:
        return fail(None, "state_edited", "the stored state is not a case state", n)
    if head_seq > last.seq:
        return fail(last.seq + 1, "missing", f"the state records receipt {head_seq}; the stream ends at {last.seq}", n)
    if head_seq != last.seq or head is None or head.get("hash") != last.hash:
        return fail(last.seq, "unexpected", f"the state records receipt {head_seq}, not {last.seq}", n)
    try:
        current = state_hash(value)
    except (KeyError, TypeError):
        return fail(None, "state_edited", "the stored state is malformed", n)
    if current != last.state_hash or version != last.version:
        return fail(None, "state_edited", "the stored state does not match the last receipt", n)
    return Verification(cid, True, n)


# ---------------------------------------------------------------- the handle

_UNSET: Any = object()


class Case:
    """A handle on one case: the last committed state plus a buffer of pending mutations.

    Accessors return copies of the committed state (buffered mutations are not visible until
    ``commit``). The mutators only buffer; ``commit`` validates and persists. A handle may be used
    from several threads (calls are serialised); it is meant for one worker at a time.
    """

    def __init__(
        self,
        cases: Cases,
        case_id: str,
        state: dict[str, JSON],
        version: int,
        receipt: Receipt | None,
        *,
        head_seq: int | None = None,
        head_hash: str | None = None,
    ) -> None:
        self._cases = cases
        self._store = cases.store
        self._tenant = cases.tenant
        self.case_id = case_id
        self._rstream, self._estream = _streams(case_id)
        self._state = state
        self._version = version
        self._last_receipt = receipt
        self._head_seq = receipt.seq if receipt is not None else (head_seq or 0)
        self._head_hash = receipt.hash if receipt is not None else (head_hash or GENESIS_HASH)
        self._buffer: list[Mutation] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        """The committed version (1 after ``create``, +1 per commit)."""
        return self._version

    @property
    def ctx(self) -> dict[str, JSON]:
        """A copy of the committed ``ctx``."""
        return _copy(self._state["ctx"])  # type: ignore[no-any-return]

    @property
    def tokens(self) -> dict[str, dict[str, JSON]]:
        """A copy of the committed tokens, ``id -> token``."""
        return _copy(self._state["tokens"])  # type: ignore[no-any-return]

    @property
    def scopes(self) -> dict[str, dict[str, JSON]]:
        """A copy of the committed scopes, ``id -> scope``."""
        return _copy(self._state["scopes"])  # type: ignore[no-any-return]

    @property
    def metadata(self) -> dict[str, JSON]:
        """A copy of the committed metadata (``schema_version``, ``step_count``, timestamps, custom fields)."""
        return dict(_copy(self._state["metadata"]))

    @property
    def step_count(self) -> int:
        """The committed step count."""
        return int(self._state["metadata"]["step_count"])

    @property
    def receipt_seq(self) -> int:
        """The seq of the last committed receipt."""
        return self._head_seq

    @property
    def last_receipt(self) -> Receipt | None:
        """The receipt of this handle's last commit (``None`` on a freshly opened handle)."""
        return self._last_receipt

    @property
    def pending(self) -> tuple[Mutation, ...]:
        """The buffered mutations, in order."""
        with self._lock:
            return tuple(self._buffer)

    def get_token(self, token_id: str) -> dict[str, JSON] | None:
        """A copy of the committed token ``token_id``, or ``None``."""
        tok = self._state["tokens"].get(token_id) if type(token_id) is str else None
        return None if tok is None else dict(_copy(tok))

    def get_scope(self, scope_id: str) -> dict[str, JSON] | None:
        """A copy of the committed scope ``scope_id``, or ``None``."""
        scope = self._state["scopes"].get(scope_id) if type(scope_id) is str else None
        return None if scope is None else dict(_copy(scope))

    def state(self) -> dict[str, JSON]:
        """A copy of the committed ``{ctx, tokens, scopes, metadata}``."""
        return dict(_copy(self._state))

    # ------------------------------------------------------------ buffering

    def buffer(self, mutation: Mutation) -> Case:
        """Record ``mutation`` (one of the ten mutation types) for the next ``commit``; validation happens there."""
        if type(mutation) not in _MUTATION_TYPES:
            raise InvalidArgument("mutation", f"must be a case mutation, got {type(mutation).__name__}")
        with self._lock:
            self._buffer.append(mutation)
        return self

    def set_ctx(self, ctx: dict[str, JSON]) -> Case:
        """Buffer: replace the whole ``ctx``."""
        return self.buffer(SetCtx(ctx))

    def put_ctx(self, key: str, value: JSON) -> Case:
        """Buffer: set ``ctx[key] = value``."""
        return self.buffer(SetCtx(value, key))

    def update_ctx(self, fn: Callable[[dict[str, JSON]], dict[str, JSON] | None]) -> Case:
        """Buffer: ``ctx = fn(copy of ctx)`` at commit time (see ``UpdateCtx``)."""
        return self.buffer(UpdateCtx(fn))

    def add_token(
        self,
        token_id: str,
        scope: str | None = None,
        *,
        position: JSON = None,
        data: JSON = None,
        status: str = "active",
    ) -> Case:
        """Buffer: add a token."""
        return self.buffer(AddToken(token_id, scope, position, data, status))

    def remove_token(self, token_id: str) -> Case:
        """Buffer: remove a token."""
        return self.buffer(RemoveToken(token_id))

    def update_token(
        self,
        token_id: str,
        fn: Callable[[dict[str, JSON]], dict[str, JSON] | None] | None = None,
        *,
        status: str = _UNSET,
        position: JSON = _UNSET,
        data: JSON = _UNSET,
        scope: str | None = _UNSET,
    ) -> Case:
        """Buffer: update a token with ``fn`` (see ``UpdateToken``) or by setting the given fields."""
        changes = {
            k: v
            for k, v in (("status", status), ("position", position), ("data", data), ("scope", scope))
            if v is not _UNSET
        }
        if (fn is None) == (not changes):
            raise InvalidArgument("fn", "give either fn or fields to set (status, position, data, scope), not both")
        if fn is None:
            fn = _FieldSetter(changes)
        return self.buffer(UpdateToken(token_id, fn))

    def enter_scope(self, scope: str, parent: str | None = None) -> Case:
        """Buffer: open a scope nested in ``parent``."""
        return self.buffer(EnterScope(scope, parent))

    def exit_scope(self, scope: str) -> Case:
        """Buffer: exit a scope normally."""
        return self.buffer(ExitScope(scope))

    def cancel_scope(self, scope: str) -> Case:
        """Buffer: cancel a scope, its nested scopes and their live tokens."""
        return self.buffer(CancelScope(scope))

    def increment_step_count(self, by: int = 1) -> Case:
        """Buffer: add ``by`` to the step count."""
        return self.buffer(IncrementStepCount(by))

    def set_metadata(self, key: str, value: JSON) -> Case:
        """Buffer: set a custom metadata field."""
        return self.buffer(SetMetadata(key, value))

    def rollback(self) -> int:
        """Drop the buffered mutations; returns how many were dropped. The committed state is untouched."""
        with self._lock:
            n = len(self._buffer)
            self._buffer.clear()
            return n

    # ------------------------------------------------------------ committing

    def validate(self) -> list[Problem]:
        """Every problem ``commit`` would report for the current buffer (calls the buffered functions)."""
        with self._lock:
            _, problems = self._plan_all(self._store.clock.now_us())
            return problems

    def _plan_all(self, ts: int) -> tuple[tuple[_Work, list[dict[str, JSON]]], list[Problem]]:
        w = _Work(self._state)
        summaries: list[dict[str, JSON]] = []
        problems: list[Problem] = []
        for i, m in enumerate(self._buffer):
            try:
                s = _plan(m, w, ts)
            except _Bad as bad:
                problems.append(Problem(i, _OP_NAMES.get(type(m), type(m).__name__), bad.field, bad.message))
                continue
            _apply(w, s)
            summaries.append(s)
        return (w, summaries), problems

    def commit(self) -> Receipt | None:
        """Validate, apply and persist the buffered mutations with a receipt, atomically.

        Each mutation is validated against the state as it would be after the valid ones before it
        (a refused mutation is left out when checking the rest), so one call reports every problem.
        Returns the new ``Receipt`` (``None`` if the buffer was empty: nothing is written). Raises
        ``CommitRejected`` listing every invalid mutation; ``CaseConflict`` if another writer committed
        first; ``Unavailable`` if the store cannot be reached (the commit may or may not have landed:
        ``refresh()`` tells). In every error case the handle keeps its old state and its buffer.
        """
        with self._lock:
            if not self._buffer:
                return None
            _fault("before_validate")
            ts = self._store.clock.now_us()
            (w, summaries), problems = self._plan_all(ts)
            if problems:
                raise CommitRejected(self.case_id, problems, len(self._buffer))
            md = w.own_metadata()
            md["updated_at"] = ts
            new_state = w.state()
            _fault("after_apply")
            _fault("before_store_commit")
            try:
                receipt = _persist(
                    self._store,
                    self._tenant,
                    self.case_id,
                    VersionIs(NAMESPACE, self.case_id, self._version),
                    self._head_seq,
                    self._head_hash,
                    self._version + 1,
                    ts,
                    new_state,
                    summaries,
                )
            except Conflict as exc:
                found = _found_version(exc)
                raise CaseConflict(
                    f"case {self.case_id!r}: another writer committed first (this handle has version "
                    f"{self._version}, the store has {found}); nothing was written, the handle keeps its old "
                    f"state and its {len(self._buffer)} buffered mutation(s): refresh() and commit again",
                    case_id=self.case_id,
                    expected_version=self._version,
                    found_version=found,
                    failures=exc.failures,
                ) from None
            except Unavailable as exc:
                raise Unavailable(
                    f"case {self.case_id!r}: the store is unavailable ({exc.message}); the handle keeps its old "
                    f"state (version {self._version}) and its {len(self._buffer)} buffered mutation(s); the commit "
                    "may or may not have landed: refresh() to find out",
                    details={"case_id": self.case_id, **exc.details},
                ) from exc
            _fault("after_store_commit")
            self._state = new_state
            self._version = receipt.version
            self._head_seq = receipt.seq
            self._head_hash = receipt.hash
            self._buffer.clear()
            self._last_receipt = receipt
            return receipt

    def refresh(self) -> Case:
        """Reload the last committed state from the store (the buffer is kept). ``NotFound`` if it is gone."""
        with self._lock:
            fresh = self._cases.open(self.case_id)
            self._state = fresh._state
            self._version = fresh._version
            self._head_seq = fresh._head_seq
            self._head_hash = fresh._head_hash
            self._last_receipt = None
            return self

    # ------------------------------------------------------------ snapshots

    def snapshot(self) -> dict[str, JSON]:
        """The committed state as JSON-serialisable data: ``{schema_version, case_id, version, receipt_seq, state}``."""
        with self._lock:
            return {
                "schema_version": SCHEMA_VERSION,
                "case_id": self.case_id,
                "version": self._version,
                "receipt_seq": self._head_seq,
                "state": _copy(self._state),
            }

    def restore(self, data: Mapping[str, JSON]) -> Receipt:
        """Replace this case's state with a snapshot's (of any case) in one commit with a ``restore`` receipt.

        The data is validated strictly; the buffer must be empty. Errors as for ``commit``.
        """
        if not isinstance(data, Mapping):
            raise InvalidArgument("data", f"must be a snapshot object, got {type(data).__name__}")
        snap = _check_snapshot(data)
        with self._lock:
            if self._buffer:
                raise InvalidArgument("buffer", "commit or roll back the buffered mutations before restore")
            self._buffer.append(_Restore(snap["state"]))  # type: ignore[arg-type]
            try:
                receipt = self.commit()
            finally:
                self._buffer.clear()
            assert receipt is not None
            return receipt

    # ------------------------------------------------------------ history

    def receipts(self, from_seq: int = 1, limit: int = 1000) -> list[Receipt]:
        """This case's receipts (see ``Cases.receipts``)."""
        return self._cases.receipts(self.case_id, from_seq, limit)

    def verify(self) -> Verification:
        """Verify this case's history (see ``Cases.verify``)."""
        return self._cases.verify(self.case_id)

    def __repr__(self) -> str:
        return f"<Case {self.case_id!r} version={self._version} pending={len(self._buffer)}>"


@dataclass(frozen=True, slots=True)
class _Restore:
    state: dict[str, JSON] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _FieldSetter:
    """The function ``Case.update_token(..., status=...)`` buffers: set the given fields."""

    changes: dict[str, JSON]

    def __call__(self, token: dict[str, JSON]) -> dict[str, JSON]:
        token.update(self.changes)
        return token
