"""`stateline serve` in a child process, for the tests that need the real server."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

_KEY = re.compile(r"sl_[0-9a-f]{12}_[A-Za-z0-9_\-]+")


@dataclass
class Served:
    """A running `stateline serve`: its base URL, bootstrap admin key, process, store URL and output (kept
    whole by a thread that drains the pipe until the process ends)."""

    base: str
    admin: str
    proc: subprocess.Popen[str]
    url: str
    log: list[str]
    drain: threading.Thread

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(url: str, *args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Start `stateline serve --url url *args` on a free port, wait until it is ready, and stop it after
    (killed if it still runs: a test that wants a graceful stop signals it itself)."""
    port = free_port()
    cmd = [sys.executable, "-c", "from stateline.cli import main; main()", "serve", "--url", url]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**(os.environ if env is None else env), "COLUMNS": "300", "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    log: list[str] = []
    token = None
    for line in proc.stdout:  # the banner comes before the server starts
        log.append(line)
        if m := _KEY.search(line):
            token = m.group(0)
            break
    drain = threading.Thread(target=lambda: log.extend(proc.stdout or ()), daemon=True)
    drain.start()
    try:
        assert token, "".join(log)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, "".join(log)
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        yield Served(base, token, proc, url, log, drain)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        drain.join(timeout=10)
        proc.stdout.close()
