"""Collects the figures of a reliability run (kills survived, operations checked, faults injected, ...)
and writes them to ``$STATELINE_RELIABILITY_REPORT`` at the end of the session when it is set."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import orjson
import pytest

FIGURES: Counter[str] = Counter()
_LOCK = threading.Lock()


def record(**counts: int) -> None:
    """Add to the run's figures, e.g. ``record(kills=1, operations_checked=96)``."""
    with _LOCK:
        FIGURES.update(counts)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("STATELINE_RELIABILITY_REPORT")
    if path and FIGURES:
        report = {**dict(sorted(FIGURES.items())), "failed_tests": session.testsfailed, "exit_status": int(exitstatus)}
        Path(path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
