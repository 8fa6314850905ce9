"""The sweeper: a background thread that removes expired items from a store on a schedule."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Self

from stateline.errors import InvalidArgument, StatelineError
from stateline.store.protocol import Store

__all__ = ["Sweeper"]

log = logging.getLogger("stateline.sweeper")

MAX_BATCH = 10_000


class Sweeper:
    """Removes expired items of ``store`` every ``interval`` seconds, ``batch`` items per ``Store.sweep`` call.

    Expired items are invisible from the moment they expire; sweeping only gives their space back.
    Without it, every TTL write (cache entries, sessions, rate-limit windows, idempotency keys) stays
    on disk after it expires. A run calls ``sweep`` until a call removes fewer than ``batch`` items
    (each call is one short write transaction, so writers wait at most one batch) or ``max_per_run``
    items are gone; the rest waits for the next run.

    ``start()`` runs it on a daemon thread; ``stop()`` ends it. Any number of sweepers may run on
    one store, in one process or several: removing an expired item twice removes it once. A failing
    run (the store unavailable, say) is logged, counted in ``failures`` and tried again at the next
    interval; the thread never dies of it. ``on_swept(n)`` is called after each run that removed
    ``n > 0`` items (metrics). ``run_once()`` sweeps now, on the calling thread.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 60.0,
        batch: int = 1000,
        max_per_run: int = 1_000_000,
        on_swept: Callable[[int], object] | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise InvalidArgument("store", f"must be a Store, got {type(store).__name__}")
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not math.isfinite(interval):
            raise InvalidArgument("interval", f"must be a number of seconds, got {interval!r}")
        if not 0 < interval <= 86_400:
            raise InvalidArgument("interval", f"must be above 0 and at most 86400 seconds, got {interval!r}")
        if type(batch) is not int or not 1 <= batch <= MAX_BATCH:
            raise InvalidArgument("batch", f"must be an integer from 1 to {MAX_BATCH}, got {batch!r}")
        if type(max_per_run) is not int or max_per_run < batch:
            raise InvalidArgument("max_per_run", f"must be an integer of at least batch ({batch}), got {max_per_run!r}")
        if on_swept is not None and not callable(on_swept):
            raise InvalidArgument("on_swept", "must be callable")
        self.store = store
        self.interval = float(interval)
        self.batch = batch
        self.max_per_run = max_per_run
        self.on_swept = on_swept
        #: items removed, runs ended (with or without failure), runs that failed, the last failure
        self.swept = 0
        self.runs = 0
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one run at a time (the thread and run_once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the background thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> int:
        """Sweep now: remove expired items in batches until none are left or ``max_per_run`` are gone.

        Returns how many were removed. Raises what ``Store.sweep`` raises (``Unavailable``...), after
        counting the failure; what the failed run removed before it stays removed and counted.
        """
        return self._sweep(stoppable=False)

    def _sweep(self, *, stoppable: bool) -> int:
        with self._lock:
            removed = 0
            try:
                while removed < self.max_per_run and not (stoppable and self._stop.is_set()):
                    n = self.store.sweep(min(self.batch, self.max_per_run - removed))
                    removed += n
                    if n < self.batch:
                        break
            except BaseException as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self.swept += removed
                self.runs += 1
                if removed and self.on_swept is not None:
                    try:
                        self.on_swept(removed)
                    except Exception:
                        log.exception("sweeper: on_swept failed")
            return removed

    def start(self) -> Self:
        """Start the background thread (its first run is one ``interval`` from now). Returns ``self``."""
        if self.running:
            raise InvalidArgument("sweeper", "is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="stateline-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread: a run in progress ends after its current batch. Stopping twice is allowed."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                removed = self._sweep(stoppable=True)
            except StatelineError as exc:
                if self._stop.is_set():
                    return
                log.warning("sweeper: %s; trying again in %g s", exc, self.interval)
                continue
            except Exception:
                log.exception("sweeper: a run failed; trying again in %g s", self.interval)
                continue
            if removed:
                log.debug("sweeper: removed %d expired item(s) in %.3f s", removed, time.perf_counter() - started)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
