"""Observability: JSON logs carrying the trace id, OpenTelemetry tracer providers and Prometheus metrics."""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import IO, Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

__all__ = [
    "JsonFormatter",
    "Metrics",
    "configure_logging",
    "current_trace_id",
    "make_tracer_provider",
    "multiprocess_dir",
    "otlp_configured",
]

_log = logging.getLogger("stateline.observability")

# Attributes every LogRecord has; anything else passed with ``extra=`` is emitted as a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


def current_trace_id() -> str | None:
    """The hex trace id of the current span, or ``None`` outside a recorded span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``trace_id`` and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None) or current_trace_id()
        if trace_id:
            out["trace_id"] = trace_id
        for k, v in record.__dict__.items():
            if k not in _STANDARD and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str | int = "INFO", stream: IO[str] | None = None) -> None:
    """Send every log record to ``stream`` (stderr by default) as JSON lines, replacing other handlers."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def otlp_configured() -> bool:
    """Whether the environment asks for spans to be exported over OTLP."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def make_tracer_provider(service_name: str = "stateline") -> TracerProvider | None:
    """A tracer provider of its own (the global one is left alone) that exports over OTLP, or ``None``
    when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is not set: recording spans
    nobody receives is pure cost, so the service then only propagates trace ids (to logs, commit
    meta and audit entries). Exporting needs ``opentelemetry-exporter-otlp-proto-http`` installed
    (the ``otlp`` extra).
    """
    if not otlp_configured():
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    try:
        exporter_mod = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    except ImportError:
        _log.warning(
            "an OTLP endpoint is configured but its exporter is not installed (pip install 'stateline[otlp]'): "
            "spans are not exported"
        )
        return provider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415  # only with OTLP

    provider.add_span_processor(BatchSpanProcessor(exporter_mod.OTLPSpanExporter()))
    return provider


MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess mode: with this variable naming a directory when a process starts,
its metrics are kept in files there and the exposition sums every process's (``stateline serve
--workers N`` sets it up)."""


_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")
_METRICS_DIR = re.compile(r"stateline-metrics-(\d+)-\w+")


def _running(pid: int) -> bool:
    if sys.platform == "win32":  # no signal 0 there; --workers is for POSIX hosts
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _gone(directory: str) -> set[int]:
    """The processes that left live-gauge files in ``directory`` and no longer run."""
    pids = {int(m.group(1)) for name in os.listdir(directory) if (m := _LIVE_GAUGE_FILE.fullmatch(name))}
    return {pid for pid in pids if not _running(pid)}


def multiprocess_dir() -> str:
    """A new directory for prometheus-client's multiprocess mode, named after this process. Those that
    processes which no longer run left behind (killed before they could remove theirs) are removed."""
    base = tempfile.gettempdir()
    for entry in os.scandir(base):
        m = _METRICS_DIR.fullmatch(entry.name)
        if m is not None and entry.is_dir(follow_symlinks=False) and not _running(int(m.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"stateline-metrics-{os.getpid()}-", dir=base)


class Metrics:
    """The service's Prometheus metrics, on a registry of their own (one per app).

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the process started) ``exposition()``
    gives the sum over every process writing to that directory, so each scrape of any worker sees the
    whole service instead of one worker's share."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR) or None
        r = self.registry
        self.requests = Counter(
            "stateline_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "stateline_http_request_duration_seconds",
            "HTTP request latency by route and method.",
            ["route", "method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.commits = Counter("stateline_commits", "Store commits that succeeded.", registry=r)
        self.conflicts = Counter("stateline_conflicts", "Store commits refused because a check failed.", registry=r)
        self.store_errors = Counter(
            "stateline_store_errors", "Store calls that failed other than by conflict.", ["call", "code"], registry=r
        )
        self.store_latency = Histogram(
            "stateline_store_call_duration_seconds",
            "Store call latency by call.",
            ["call"],
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.rate_limited = Counter(
            "stateline_rate_limited", "Requests refused by the per-tenant rate limit.", registry=r
        )
        self.watchers = Gauge(
            "stateline_watchers",
            "Open change-feed subscriptions (SSE and long polls).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.swept = Counter("stateline_swept_items", "Expired items removed by the sweeper.", registry=r)
        self.trimmed = Counter(
            "stateline_trimmed_changes", "Change records removed by the sweeper's retention.", registry=r
        )

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format: this registry's, or every process's in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        for pid in _gone(self.multiprocess_dir):  # killed without process_exit: its live gauges go now
            multiprocess.mark_process_dead(pid, self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(registry)

    def process_exit(self) -> None:
        """In multiprocess mode, drop this process's live gauges (its counters keep counting in the sum)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped upstream
