"""Reliability suite: crash, linearizability, invariants under contention, faults, tamper evidence.

``STATELINE_SOAK=1`` (``make soak``) scales every scenario up; CI runs the short pass.
"""

import os

SOAK = os.environ.get("STATELINE_SOAK", "") not in {"", "0"}


def scale(short: int, soak: int) -> int:
    """``short`` in CI, ``soak`` under ``make soak``."""
    return soak if SOAK else short
