"""The CLI: `stateline keys` against a store file and `serve --workers` metrics; JSON log lines with trace ids."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from typer.testing import CliRunner

import stateline
from stateline.api.auth import KeyStore
from stateline.cli import app
from stateline.errors import InvalidArgument, Unauthenticated
from stateline.observability import JsonFormatter
from tests.serving import serve


def test_keys_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    runner = CliRunner()
    made = runner.invoke(
        app, ["keys", "create", "--url", url, "--tenant", "acme", "--scopes", "read,docs:write", "--name", "ci"]
    )
    assert made.exit_code == 0, made.output
    token = made.output.strip().splitlines()[-1]
    assert token.startswith("sl_")
    key_id = token.split("_")[1]
    with stateline.open(url) as db:
        principal = KeyStore(db.store).authenticate(token)
    assert (principal.tenant, sorted(principal.scopes)) == ("acme", ["docs:write", "read"])
    listed = runner.invoke(app, ["keys", "list", "--url", url, "--tenant", "acme"])
    assert listed.exit_code == 0
    assert key_id in listed.output
    assert token not in listed.output
    revoked = runner.invoke(app, ["keys", "revoke", key_id, "--url", url])
    assert revoked.exit_code == 0, revoked.output
    with stateline.open(url) as db, pytest.raises(Unauthenticated, match="revoked"):
        KeyStore(db.store).authenticate(token)
    bad = runner.invoke(app, ["keys", "create", "--url", url, "--tenant", "acme", "--scopes", "root"])
    assert bad.exit_code != 0
    listed = runner.invoke(app, ["keys", "list", "--url", url, "--tenant", "not a tenant!"])
    assert isinstance(listed.exception, InvalidArgument), listed.output  # not an empty list
    for port in ("0", "65536"):
        served = runner.invoke(app, ["serve", "--url", url, "--port", port])
        assert served.exit_code == 2, served.output  # refused before anything starts
        assert "--port" in served.output


def test_json_log_lines_carry_the_trace_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("stateline.test.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("req") as span:
        log.info("hello %s", "world", extra={"tenant": "acme"})
        trace_id = format(span.get_span_context().trace_id, "032x")
    log.info("outside")
    log.removeHandler(handler)
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world"
    assert first["trace_id"] == trace_id
    assert first["tenant"] == "acme"
    assert first["level"] == "info"
    assert "trace_id" not in second
    assert trace.get_current_span().get_span_context().is_valid is False


def test_serve_with_workers_exposes_the_metrics_of_every_worker(tmp_path: Path) -> None:
    # Each scrape reaches one worker; each must count the requests that every worker served.
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["TMPDIR"] = str(tmp_path)
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    orphan = tmp_path / "stateline-metrics-999999999-abc"  # left by a serve killed with SIGKILL (no such pid)
    in_use = tmp_path / f"stateline-metrics-{os.getpid()}-abc"  # a running process's
    orphan.mkdir()
    in_use.mkdir()
    with serve(url, "--workers", "2", "--rate-limit", "0", "--sweep-interval", "0", env=env) as served:

        def put(i: int) -> int:  # a connection of its own each: the kernel hands them to either worker
            return httpx.put(
                f"{served.base}/v1/docs/d{i}", json={"i": i}, headers=served.headers, timeout=30
            ).status_code

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(put, range(60))) == [201] * 60
        line = 'stateline_http_requests_total{method="PUT",route="/v1/docs/{key:path}",status="201"} 60.0'
        for _ in range(10):
            assert line in httpx.get(f"{served.base}/metrics", timeout=10).text
        (metrics_dir,) = set(tmp_path.glob("stateline-metrics-*")) - {in_use}  # the orphan is gone
    assert not metrics_dir.exists()  # removed at shutdown
    assert in_use.exists()


def test_a_worker_killed_without_cleanup_leaves_no_live_gauge(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    killed = (
        "import os; from stateline.observability import Metrics; m = Metrics(); m.watchers.inc(2); "
        "m.requests.labels('/v1/x', 'GET', '200').inc(); os._exit(0)"  # no shutdown: as after SIGKILL
    )
    subprocess.run([sys.executable, "-c", killed], env=env, check=True, timeout=60)
    scrape = "from stateline.observability import Metrics; print(Metrics().exposition().decode())"
    text = subprocess.run(
        [sys.executable, "-c", scrape], env=env, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    assert 'stateline_http_requests_total{method="GET",route="/v1/x",status="200"} 1.0' in text  # counts stay
    assert "stateline_watchers 2.0" not in text  # the dead worker's open watchers are gone
