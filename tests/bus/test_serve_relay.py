"""`stateline serve --relay`: writes made over HTTP reach JetStream from inside the service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import nats
import orjson

import stateline
from stateline.bus import Relay
from tests.conftest import require_service

NATS_URL = "nats://127.0.0.1:4222"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _drop_stream() -> None:
    nc = await nats.connect(NATS_URL)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream("STATELINE")
    await nc.close()


def test_serve_with_relay_publishes_http_writes(tmp_path: Path) -> None:
    require_service("nats")
    asyncio.run(_drop_stream())
    port, url = _free_port(), f"sqlite:///{tmp_path / 'serve.db'}"
    cmd = [sys.executable, "-c", "from stateline.cli import main; main()", "serve", "--url", url, "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--relay", "--nats", NATS_URL],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300", "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        token = None
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"sl_[0-9a-f]{12}_[A-Za-z0-9_\-]+", line):
                token = m.group(0)
                break
        assert token, "".join(lines)
        threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
        base, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        put = httpx.put(f"{base}/v1/docs/greeting", json={"hello": "nats"}, headers=h, timeout=10)
        assert put.status_code == 201, put.text
        store = stateline.open_store(url)
        relay = Relay(store, NATS_URL)
        revision = store.revision("default")
        deadline = time.monotonic() + 60
        while relay.cursor("default") < revision:
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        store.close()

        async def read() -> list[dict[str, object]]:
            nc = await nats.connect(NATS_URL)
            sub = await nc.jetstream().pull_subscribe("stateline.default.>", stream="STATELINE")
            msgs = await sub.fetch(100, timeout=5)
            await nc.close()
            return [orjson.loads(m.data) for m in msgs]

        bodies = asyncio.run(read())
        assert any(
            op.get("key") == "greeting" and op.get("value", {}).get("value") == {"hello": "nats"}  # type: ignore[attr-defined]
            for b in bodies
            for op in b["ops"]  # type: ignore[attr-defined]
        ), bodies
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        asyncio.run(_drop_stream())
