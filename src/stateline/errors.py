"""The one error hierarchy: every error has a stable code, an HTTP status and a transient flag."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "ChangesTrimmed",
    "Conflict",
    "Forbidden",
    "InvalidArgument",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RateLimited",
    "StatelineError",
    "Unauthenticated",
    "Unavailable",
]


class StatelineError(Exception):
    """Base of every error stateline raises on purpose.

    ``code`` is stable (it is part of the HTTP API), ``status`` is the HTTP status,
    ``transient`` says whether retrying the same call later may succeed, and
    ``details`` carries structured context (JSON-serialisable).
    """

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    transient: ClassVar[bool] = False

    def __init__(self, message: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_dict(self) -> dict[str, Any]:
        """The error as the JSON body the HTTP API returns."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class InvalidArgument(StatelineError, ValueError):
    """Bad input: the call was refused and nothing was written."""

    code = "invalid_argument"
    status = 400

    def __init__(self, field: str, problem: str, *, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{field}: {problem}", details={**(details or {}), "field": field})
        self.field = field
        self.problem = problem


class Unauthenticated(StatelineError):
    """No credentials, or credentials that are unknown, expired or revoked."""

    code = "unauthenticated"
    status = 401


class Forbidden(StatelineError):
    """The caller is known but lacks the scope for this call."""

    code = "forbidden"
    status = 403


class NotFound(StatelineError, LookupError):
    """The named object does not exist (or is not visible to this tenant)."""

    code = "not_found"
    status = 404


class ChangesTrimmed(NotFound):
    """The change records a reader asked for were removed by retention (``Store.trim_changes``).

    The feed never skips: the reader must decide what to do (start again from ``first_available``
    after rebuilding what it derives from the feed, or report the loss). HTTP 410.
    """

    code = "changes_trimmed"
    status = 410

    def __init__(self, tenant: str, after_revision: int, first_available: int) -> None:
        super().__init__(
            f"the change feed of tenant {tenant!r} after revision {after_revision} was trimmed: its records "
            f"start at revision {first_available}",
            details={"tenant": tenant, "after_revision": after_revision, "first_available": first_available},
        )
        self.tenant = tenant
        self.after_revision = after_revision
        self.first_available = first_available


class Conflict(StatelineError):
    """A check of a commit failed, or a state transition is not allowed.

    ``failures`` lists every failed check (for Store commits, each a
    ``CheckFailure`` with what was found).
    """

    code = "conflict"
    status = 409
    transient = False

    def __init__(
        self,
        message: str,
        *,
        failures: Sequence[Any] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        merged = dict(details or {})
        if failures:
            merged.setdefault("failures", [_describe(f) for f in failures])
        super().__init__(message, details=merged)
        self.failures: tuple[Any, ...] = tuple(failures)


class PreconditionFailed(Conflict):
    """An HTTP precondition (If-Match / If-None-Match) did not hold."""

    code = "precondition_failed"
    status = 412


class PayloadTooLarge(StatelineError):
    """A value, key or request is over its configured size limit."""

    code = "payload_too_large"
    status = 413


class RateLimited(StatelineError):
    """Too many requests; ``retry_after`` says how many seconds to wait."""

    code = "rate_limited"
    status = 429
    transient = True

    def __init__(self, message: str, *, retry_after: float, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, details={"retry_after": retry_after, **(details or {})})
        self.retry_after = retry_after


class Unavailable(StatelineError):
    """The backing store or service cannot be reached now; the call may succeed later."""

    code = "unavailable"
    status = 503
    transient = True


def _describe(failure: Any) -> Any:
    describe = getattr(failure, "describe", None)
    return describe() if callable(describe) else repr(failure)
