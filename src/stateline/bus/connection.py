"""Connections to NATS that report an outage in one log line, not a traceback per reconnect attempt."""

from __future__ import annotations

import logging
from typing import Any

import nats

log = logging.getLogger("stateline.bus")


class NatsConnector:
    """Connects ``what`` (a name for the log lines) to the NATS server at ``url``, retrying for ever.

    nats-py logs every failed connection attempt with a traceback, four times a second while the
    server is down. Through this, an outage is logged once as a warning and its end once as info,
    however many connections its user makes and drops meanwhile.
    """

    def __init__(self, url: str, what: str) -> None:
        self.url = url
        self.what = what
        self.down = False

    async def _on_error(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            log.warning("%s: NATS at %s unavailable (%s: %s); retrying", self.what, self.url, type(exc).__name__, exc)

    async def _on_connected(self) -> None:
        if self.down:
            self.down = False
            log.info("%s: NATS at %s is back", self.what, self.url)

    async def connect(self, **options: Any) -> Any:
        """A connected client (``options`` go to ``nats.connect``)."""
        settings: dict[str, Any] = {
            "connect_timeout": 2,
            "allow_reconnect": True,
            "reconnect_time_wait": 0.25,
            "max_reconnect_attempts": -1,
        }
        settings.update(options)
        nc = await nats.connect(self.url, error_cb=self._on_error, reconnected_cb=self._on_connected, **settings)
        await self._on_connected()
        return nc
