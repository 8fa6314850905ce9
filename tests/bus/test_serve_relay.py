"""`stateline serve --relay`: writes made over HTTP reach JetStream from inside the service."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import httpx
import nats
import orjson

import stateline
from stateline.bus import Relay
from tests.conftest import require_service
from tests.serving import Served, serve

NATS_URL = "nats://127.0.0.1:4222"


async def _drop_stream() -> None:
    nc = await nats.connect(NATS_URL)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream("STATELINE")
    await nc.close()


def test_serve_with_relay_publishes_http_writes(tmp_path: Path) -> None:
    require_service("nats")
    asyncio.run(_drop_stream())
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    try:
        with serve(url, "--relay", "--nats", NATS_URL) as served:
            _check_relayed(served, url)
    finally:
        asyncio.run(_drop_stream())


def _check_relayed(served: Served, url: str) -> None:
    base, h, lines = served.base, served.headers, served.log
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
