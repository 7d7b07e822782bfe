"""hakuriver.broker.publish_persistent on the real broker: the same message as aio-pika's, confirmed or refused.

The light publish path (the runners' and the host's outboxes, output chunks) must put on the
wire what ``exchange.publish(broker.persistent(...))`` puts there, property by property, and
must fail the same way: a broker nack raises, a closed channel raises at once.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import pytest

from hakuriver import broker, identity
from harness.local_cluster import BROKER_URL

USER = identity.broker_user(BROKER_URL)
CHUNK_HEADERS = {"task_id": 7, "stream": "stdout", "offset": 65536, "attempt": 2}


async def _published_both_ways(queue_name: str, headers: dict | None) -> tuple[aio_pika.IncomingMessage, ...]:
    connection = await broker.connect(BROKER_URL, "test_publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True)
        try:
            await channel.default_exchange.publish(broker.persistent(b"old", headers, user_id=USER),
                                                   routing_key=queue_name, mandatory=False)
            await broker.publish_persistent(channel, "", queue_name, b"new", headers, USER)
            got = []
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    got.append(message)
                    if len(got) == 2:
                        break
            return tuple(got)
        finally:
            await queue.delete(if_unused=False, if_empty=False)


@pytest.mark.parametrize("headers", [None, CHUNK_HEADERS], ids=["event", "output chunk"])
def test_the_same_message_as_aio_pikas(prefix, headers):
    old, new = asyncio.run(_published_both_ways(f"{prefix}.publish", headers))
    assert (old.body, new.body) == (b"old", b"new")
    for name in ("content_type", "delivery_mode", "headers", "user_id", "expiration", "priority", "type"):
        assert getattr(new, name) == getattr(old, name), name
    assert new.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert new.content_type == ("application/json" if headers is None else "application/octet-stream")
    assert new.user_id == USER
    assert new.message_id  # aiormq names every message, as it does for aio-pika's


async def _publish_into_full_queue(queue_name: str) -> None:
    connection = await broker.connect(BROKER_URL, "test_publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True,
                                            arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        try:
            await broker.publish_persistent(channel, "", queue_name, b"refused", None, USER)
        finally:
            await queue.delete(if_unused=False, if_empty=False)


def test_a_nack_raises(prefix):
    # the outbox keeps a row until its publish returns: a refused one must raise, never pass as sent
    with pytest.raises(aiormq.exceptions.DeliveryError):
        asyncio.run(_publish_into_full_queue(f"{prefix}.full"))


async def _publish_while_the_connection_is_lost(prefix: str) -> None:
    connection = await broker.connect(BROKER_URL, "test_publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        await (await channel.get_underlay_channel()).connection.close()  # as a broker restart would
        await lost.wait()
        # the robust connection is reconnecting: the publish fails now (the outbox retries it),
        # not after the new connection is up
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await broker.publish_persistent(channel, "", f"{prefix}.nowhere", b"x", None, USER)
        assert not connection.connected.is_set(), "the publish waited for the reconnect"


def test_a_lost_connection_raises_at_once(prefix):
    asyncio.run(asyncio.wait_for(_publish_while_the_connection_is_lost(prefix), 20))


async def _nacked_together_then_sent(queue_name: str) -> tuple[int, bool, int]:
    connection = await broker.connect(BROKER_URL, "test_publish")
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        reopened = []
        channel.reopen_callbacks.add(lambda *_: reopened.append(1))
        full = await channel.declare_queue(queue_name, durable=True,
                                           arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
        try:
            nacked = await channel.get_underlay_channel()
            results = await asyncio.gather(*(broker.publish_persistent(channel, "", queue_name, b"refused", None, USER)
                                             for _ in range(5)), return_exceptions=True)
            refused = sum(isinstance(r, aiormq.exceptions.DeliveryError) for r in results)
            renewed = await channel.get_underlay_channel()
            opened_again = renewed is not nacked and not renewed.is_closed
            await broker.publish_persistent(channel, "", f"{queue_name}.nobody", b"taken", None, USER)
            return refused, opened_again, len(reopened)
        finally:
            await full.delete(if_unused=False, if_empty=False)


def test_a_nack_renews_the_channel_once_and_the_next_publish_goes_out_on_the_new_one(prefix):
    """After a broker node died, RabbitMQ 3.10 kept nacking whatever a channel opened during the
    quorum queues' leader election sent: sending again must use a new channel (broker.renew_after_nack)."""
    refused, opened_again, reopened = asyncio.run(_nacked_together_then_sent(f"{prefix}.full"))
    assert refused == 5
    assert opened_again          # a fresh AMQP channel under the same robust one, which then sent
    assert reopened == 1         # five nacks, one renewal
