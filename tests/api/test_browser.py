"""End to end: `stateline serve` in a child process, the dashboard in headless Chromium (Playwright),
a commit made through the API appears on the page without a reload; then a graceful shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import stateline
from tests.conftest import IN_CI
from tests.serving import Served, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def _ensure_chromium() -> str:
    """Debian's Chromium, installed here if missing (root and apt-get needed)."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900, check=False
        )
    if not Path(CHROMIUM).exists():
        _unavailable(f"Chromium is not installed at {CHROMIUM} and could not be installed (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Served]:
    with serve(f"sqlite:///{tmp_path / 'e2e.db'}") as served:
        assert any("dashboard: http" in line and "/ui/" in line for line in served.log)
        yield served


def test_dashboard_shows_commits_live(server: Served, tmp_path: Path) -> None:
    playwright_api = (
        pytest.importorskip("playwright.sync_api") if not IN_CI else __import__("playwright.sync_api").sync_api
    )
    executable = _ensure_chromium()
    base, admin, proc, log, url = server.base, server.admin, server.proc, server.log, server.url
    h = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=base, headers=h, timeout=10) as client:
        # Some state for the panels: a run with a completed step, a case with receipts.
        assert (
            client.post(
                "/v1/runs",
                json={
                    "flow_id": "checkout",
                    "run_id": "run-1",
                    "steps": [{"id": "plan"}, {"id": "pay", "depends_on": ["plan"]}],
                },
            ).status_code
            == 201
        )
        claim = client.post("/v1/steps/claim", json={"worker_id": "w1"}).json()["claims"][0]
        client.post(
            "/v1/runs/run-1/steps/plan/complete",
            json={"lease_token": claim["lease_token"], "usage": {"tokens": 42, "cost_usd": 0.01}},
        )
        client.post("/v1/cases", json={"case_id": "case-1", "ctx": {"order": 1}})
        client.post("/v1/cases/case-1/commit", json={"mutations": [{"type": "set_ctx", "key": "paid", "value": True}]})

        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{base}/ui/")
                page.fill("#api-key", admin)
                page.click("#connect")
                page.wait_for_selector("#status.on", timeout=20_000)
                page.wait_for_selector("#runs tbody tr[data-run='run-1']", timeout=20_000)
                page.click("#runs tbody tr[data-run='run-1']")
                page.wait_for_selector("#run-usage:has-text('42 tokens')", timeout=20_000)
                page.fill("#case-id", "case-1")
                page.press("#case-id", "Enter")
                page.wait_for_selector("#case-verify.ok", timeout=20_000)

                # A commit through the API shows up without a reload: in the feed and in the runs table.
                assert client.put("/v1/docs/hello", json={"greeting": "live"}).status_code == 201
                page.wait_for_selector("#feed li:has-text('put docs/hello v1')", timeout=20_000)
                client.post("/v1/runs", json={"flow_id": "refund", "run_id": "run-2", "steps": [{"id": "a"}]})
                page.wait_for_selector("#runs tbody tr[data-run='run-2']", timeout=20_000)
                client.post("/v1/cases/case-1/commit", json={"mutations": [{"type": "increment_step_count"}]})
                page.wait_for_selector("#receipts li:nth-child(3)", timeout=20_000)
                page.click("#audit-form button")
                page.wait_for_selector("#audit tbody tr:has-text('docs.put')", timeout=20_000)
                shot = Path(os.environ.get("STATELINE_SCREENSHOT") or tmp_path / "dashboard.png")
                page.screenshot(path=str(shot), full_page=True)

                # Retention overtakes the dashboard: it resumes from revision 1, gets a 410, and
                # follows from now on (it used to retry the refused resume forever).
                with stateline.open(url) as db:
                    db.store.trim_changes("default", db.store.revision("default"))
                page.evaluate("state.lastId = 1; follow(); null")  # follow() runs for good: do not await it
                assert client.put("/v1/docs/after-trim", json={"n": 1}).status_code == 201
                page.wait_for_selector("#feed li:has-text('put docs/after-trim v1')", timeout=20_000)
                assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # never reloaded
            finally:
                browser.close()
    # Graceful shutdown: SIGTERM ends the server cleanly, and what it acknowledged is on disk.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    server.drain.join(timeout=10)  # the output ends with the process
    assert any("Application shutdown complete" in line for line in log), "".join(log[-20:])
    with stateline.open(url) as db:
        doc = db.tenant("default").docs.get("hello")
        assert doc is not None
        assert doc.value == {"greeting": "live"}
