"""Consuming relayed changes from JetStream: explicit acks, redelivery on failure, dead letters after N tries."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig

from stateline.bus.connection import NatsConnector
from stateline.errors import InvalidArgument

__all__ = ["Delivery", "consume", "consume_async"]

log = logging.getLogger("stateline.bus")

Handler = Callable[["Delivery"], Awaitable[object] | object]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered message: its subject, decoded JSON body, headers and how often it was delivered."""

    subject: str
    data: Any
    headers: dict[str, str]
    num_delivered: int
    msg_id: str | None


async def consume_async(
    subject: str,
    handler: Handler,
    *,
    durable: str,
    nats_url: str = "nats://127.0.0.1:4222",
    stream: str | None = None,
    max_deliver: int = 5,
    dead_letter_subject: str | None = None,
    batch: int = 64,
    fetch_timeout: float = 0.5,
    ack_wait: float = 30.0,
    retry_delay: float = 0.2,
    stop: asyncio.Event | None = None,
) -> None:
    """Consume ``subject`` with the durable consumer ``durable`` until ``stop`` is set.

    ``handler(delivery)`` (plain or async) returning normally acks the message. Raising makes
    JetStream redeliver it after ``retry_delay``; once it has been delivered ``max_deliver``
    times it is published to ``dead_letter_subject`` (default ``stateline-dlq.<durable>``, with
    the original subject and the error in headers) and terminated, so it is not delivered again.
    """
    if not durable or any(c in durable for c in " .*>"):
        raise InvalidArgument("durable", "must be a name without spaces, dots or wildcards")
    if max_deliver < 1:
        raise InvalidArgument("max_deliver", "must be at least 1")
    if not callable(handler):
        raise InvalidArgument("handler", "must be callable")
    dead_letter = dead_letter_subject or f"stateline-dlq.{durable}"
    stop = stop or asyncio.Event()
    nc = await NatsConnector(nats_url, f"consumer {durable}").connect()
    try:
        js = nc.jetstream()
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            filter_subject=subject,
        )
        sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                meta = msg.metadata
                delivery = Delivery(
                    msg.subject,
                    orjson.loads(msg.data) if msg.data else None,
                    dict(msg.headers or {}),
                    meta.num_delivered,
                    (msg.headers or {}).get("Nats-Msg-Id"),
                )
                try:
                    result = handler(delivery)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # noqa: BLE001 - a failing handler means redelivery, not a crash
                    if meta.num_delivered >= max_deliver:
                        await nc.publish(
                            dead_letter,
                            msg.data,
                            headers={"Stateline-Original-Subject": msg.subject, "Stateline-Error": repr(exc)[:500],
                                     "Stateline-Deliveries": str(meta.num_delivered)},
                        )  # fmt: skip
                        await msg.term()
                        log.warning("dead-lettered %s after %d deliveries: %r", msg.subject, meta.num_delivered, exc)
                    else:
                        await msg.nak(delay=retry_delay)
                    continue
                await msg.ack()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def consume(
    subject: str, handler: Handler, *, durable: str, stop: threading.Event | None = None, **options: Any
) -> None:
    """Blocking form of ``consume_async``; returns when ``stop`` (a ``threading.Event``) is set."""
    stop = stop or threading.Event()

    async def main() -> None:
        event = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(event.set)), daemon=True).start()
        await consume_async(subject, handler, durable=durable, stop=event, **options)

    asyncio.run(main())
