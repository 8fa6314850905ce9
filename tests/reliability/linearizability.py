"""A linearizability checker for histories of a key-value register map (Wing & Gong, with memoisation).

A history is a list of operations, each with an invoke and a return time. ``check`` searches for an
order of the operations that respects real time (an operation that returned before another was
invoked comes first) and in which every operation's result is what a sequential key-value store
would have returned. Operations that timed out (``ok is None``) may or may not have taken effect
and may be placed anywhere after their invocation, or left out.

The search is Wing & Gong's: repeatedly pick a minimal pending operation (no other pending
operation returned before it was invoked), apply it to the model if its result fits, recurse, and
undo on failure. Memoising the set of linearized operations together with the model state (P-compositionality
is not needed for these small histories) prunes the exponential blow-up, as in Lowe's refinement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Op", "check"]

INF = float("inf")


@dataclass(frozen=True)
class Op:
    """One client operation.

    ``kind`` is ``get`` (``output`` = the value read, ``None`` if absent), ``put`` (``arg`` = the
    value), ``cas`` (``arg`` = (expected, new); ``output`` = whether it applied), or ``txn``
    (``arg`` = tuple of (key, expected, new) compare-and-set triples applied all-or-nothing;
    ``output`` = whether it applied). ``ok`` is True when the call returned, None when it timed out
    or failed in a way that leaves its effect unknown.
    """

    client: int
    kind: str
    key: str
    arg: Any
    output: Any
    invoke: float
    ret: float
    ok: bool | None = True


def _apply(state: dict[str, Any], op: Op) -> tuple[bool, dict[str, Any] | None]:
    """Whether ``op``'s observed output fits ``state``, and the state after it (None: unchanged)."""
    if op.kind == "get":
        return op.ok is None or state.get(op.key) == op.output, None
    if op.kind == "put":
        return True, {**state, op.key: op.arg}
    if op.kind == "cas":
        expected, new = op.arg
        applies = state.get(op.key) == expected
        if op.ok is None:  # unknown outcome: the caller tries both branches
            return applies, ({**state, op.key: new} if applies else None)
        if applies != op.output:
            return False, None
        return True, ({**state, op.key: new} if applies else None)
    if op.kind == "txn":
        applies = all(state.get(k) == exp for k, exp, _ in op.arg)
        if op.ok is not None and applies != op.output:
            return False, None
        if not applies:
            return True, None
        return True, {**state, **{k: new for k, _, new in op.arg}}
    raise ValueError(f"unknown op kind {op.kind!r}")


def check(history: list[Op], initial: dict[str, Any] | None = None, budget: int = 2_000_000) -> bool:
    """True if ``history`` is linearizable from ``initial``; raises ``RuntimeError`` past ``budget`` steps."""
    ops = sorted(history, key=lambda o: o.invoke)
    n = len(ops)
    rets = [INF if o.ok is None else o.ret for o in ops]
    start = dict(initial or {})
    seen: set[tuple[int, tuple[tuple[str, Any], ...]]] = set()
    steps = 0

    def freeze(state: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted((k, repr(v)) for k, v in state.items()))

    def search(done: int, state: dict[str, Any]) -> bool:
        nonlocal steps
        steps += 1
        if steps > budget:
            raise RuntimeError("linearizability search budget exceeded")
        if done == (1 << n) - 1:
            return True
        key = (done, freeze(state))
        if key in seen:
            return False
        seen.add(key)
        pending = [i for i in range(n) if not done >> i & 1]
        # a pending op is minimal if no other pending op returned before it was invoked
        horizon = min(rets[i] for i in pending)
        for i in pending:
            op = ops[i]
            if op.invoke > horizon:
                break  # ops are sorted by invoke: none after this one is minimal
            fits, nxt = _apply(state, op)
            if fits and search(done | 1 << i, state if nxt is None else nxt):
                return True
            if op.ok is None and search(done | 1 << i, state):  # a timed-out op may never have applied
                return True
        return False

    return search(0, start)
