"""hakuriver.deliveries on the real broker: what the host reads of each delivery, settling, and reconnects.

The host's ledger consumer takes its deliveries from here instead of aio-pika's queue
consumer; what it reads must be what aio-pika would have given, an ack must settle the
deliveries it names, and the consumer must consume again once the robust connection is back.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from hakuriver import broker, identity
from hakuriver.deliveries import Consumer, Delivery
from harness.local_cluster import BROKER_URL

USER = identity.broker_user(BROKER_URL)


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()

    async def put(self, delivery: Delivery) -> None:
        self.queue.put_nowait(delivery)

    async def take(self, count: int) -> list[Delivery]:
        return [await asyncio.wait_for(self.queue.get(), 20) for _ in range(count)]


@contextlib.asynccontextmanager
async def _consuming(name: str):
    """A robust connection, a confirm channel to publish on, and a :class:`Consumer` of queue
    ``name`` (bound to ``task.#`` of exchange ``name.x``) into an :class:`Inbox`; both deleted after."""
    connection = await broker.connect(BROKER_URL, "test_deliveries")
    async with connection:
        publish = await connection.channel(publisher_confirms=True)
        consume = await connection.channel()
        exchange = await publish.declare_exchange(f"{name}.x", "topic", durable=True)
        queue = await consume.declare_queue(name, durable=True)
        await queue.bind(f"{name}.x", "task.#")
        try:
            inbox = Inbox()
            consumer = Consumer(consume, queue.name, inbox.put)
            await consumer.start()
            yield publish, consume, exchange, consumer, inbox
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()


async def _fields_and_ack(name: str) -> None:
    async with _consuming(name) as (publish, _, exchange, consumer, inbox):
        headers = {"task_id": 5, "stream": "stderr", "offset": 3, "attempt": 1}
        await broker.publish_persistent(publish, exchange.name, "task.5.stderr", b"abc", headers, USER)
        await broker.publish_persistent(publish, exchange.name, "task.5.state", b"{}", None, USER)
        first, second = await inbox.take(2)
        assert (first.body, first.exchange, first.routing_key, first.headers, first.user_id) == (
            b"abc", exchange.name, "task.5.stderr", headers, USER)
        assert (second.body, second.routing_key, second.headers) == (b"{}", "task.5.state", None)
        assert second.delivery_tag > first.delivery_tag
        await second.ack(multiple=True)  # settles the first too
        await consumer.cancel()
        declared = await publish.declare_queue(name, passive=True)
        assert declared.declaration_result.message_count == 0
        assert declared.declaration_result.consumer_count == 0


def test_fields_as_aio_pika_gives_them_and_a_multiple_ack(prefix):
    asyncio.run(_fields_and_ack(f"{prefix}.deliveries"))


async def _across_a_reconnect(name: str) -> None:
    async with _consuming(name) as (publish, consume, exchange, _, inbox):
        await broker.publish_persistent(publish, exchange.name, "task.1.state", b"before", None, USER)
        (unacked,) = await inbox.take(1)
        reopened = {publish: asyncio.Event(), consume: asyncio.Event()}
        for channel, event in reopened.items():  # added after the consumer's: runs after it
            channel.reopen_callbacks.add(lambda *_, event=event: event.set())
        await (await consume.get_underlay_channel()).connection.close()  # as a broker restart would
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in reopened.values())), 30)
        with pytest.raises(Exception):  # its channel is gone: the broker gives it again
            await unacked.ack()
        await broker.publish_persistent(publish, exchange.name, "task.1.state", b"after", None, USER)
        bodies = sorted(d.body for d in await inbox.take(2))
        assert bodies == [b"after", b"before"]


def test_consumes_again_after_a_reconnect(prefix):
    asyncio.run(_across_a_reconnect(f"{prefix}.deliveries"))
