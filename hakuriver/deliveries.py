"""A consumer that hands on deliveries as aiormq reads them, without aio-pika's ``IncomingMessage``.

Why it exists: the host's ledger queue carries every message of every task (the task as
submitted, then ``queued``, ``running`` and its end: four or more a task), and the host
only reads a few fields of each before it stores a whole batch in one transaction.
aio-pika wraps each delivery in an ``IncomingMessage`` (fifteen attributes, each set
through a checked ``__setattr__``) and starts one more asyncio task for it; in a py-spy
profile of 1,000 ``true`` tasks that was 15 % of the host's busy time, more than parsing
and checking the events. A :class:`Delivery` keeps only what the host reads.

The consumer lives on a robust channel: when aio-pika reopens the channel (after a lost
connection) it subscribes again, as aio-pika does for its own consumers; deliveries not
acked before the loss come again from the broker. Unlike aio-pika's consumers, a cancel
sent by the broker (the queue deleted under it) does not make the connection recover.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

log = logging.getLogger(__name__)


class Delivery:
    """One delivery: what the host reads of it, and how to settle it on the channel it came on."""

    __slots__ = ("body", "exchange", "routing_key", "headers", "user_id", "delivery_tag", "_channel")

    def __init__(self, message: DeliveredMessage):
        properties = message.header.properties
        self.body: bytes = message.body
        self.exchange: str = message.delivery.exchange
        self.routing_key: str = message.delivery.routing_key
        self.headers: dict[str, Any] | None = properties.headers
        self.user_id: str | None = properties.user_id
        self.delivery_tag: int = message.delivery.delivery_tag
        self._channel = message.channel

    async def ack(self, multiple: bool = False) -> None:
        """Ack this delivery (with ``multiple``, every earlier one of its channel too); raises
        ``aiormq.exceptions.ChannelInvalidStateError`` when that channel is gone."""
        await self._channel.basic_ack(self.delivery_tag, multiple=multiple)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await self._channel.basic_nack(self.delivery_tag, multiple=multiple, requeue=requeue)


class Consumer:
    """Consumes ``queue`` on ``channel`` into ``callback``, one :class:`Delivery` at a time,
    from :meth:`start` until :meth:`cancel`, across reconnects."""

    def __init__(self, channel: AbstractRobustChannel, queue: str, callback: Callable[[Delivery], Awaitable[None]]):
        self._channel = channel
        self._queue = queue
        self._callback = callback
        self.tag: str | None = None

    async def start(self) -> str:
        await self._subscribe()
        self._channel.reopen_callbacks.add(self._on_reopen)
        return self.tag

    async def cancel(self, tag: str | None = None) -> None:
        """Stop consuming (``tag``: only so this stands where an aio-pika queue's ``cancel`` does)."""
        self._channel.reopen_callbacks.discard(self._on_reopen)
        if self.tag is not None and not self._channel.is_closed:
            underlay = await self._channel.get_underlay_channel()
            await underlay.basic_cancel(self.tag)

    async def _subscribe(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        ok = await underlay.basic_consume(self._queue, self._on_message, consumer_tag=self.tag)
        self.tag = ok.consumer_tag

    async def _on_reopen(self, *_: Any) -> None:
        try:
            await self._subscribe()
        except Exception:  # the connection went again: the next reopen subscribes
            log.warning("could not consume %s again after a reconnect", self._queue, exc_info=True)

    async def _on_message(self, message: DeliveredMessage) -> None:
        await self._callback(Delivery(message))
