"""Connecting to RabbitMQ and declaring the topology of :mod:`hakuriver.topology`.

Every process uses a robust connection: aio-pika reconnects and re-declares what was
declared through it, to the next broker address that answers when there are several
(:mod:`hakuriver.connection`). Publishes that matter wait for the
broker's confirm; events that nobody may be bound to are published non-mandatory.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aiormq import spec

from hakuriver import broker_address
from hakuriver.broker_address import split_urls
from hakuriver.connection import connect_any
from hakuriver.tls import describe_failure
from hakuriver.topology import NODE_EVENTS, POOL_KEY, TASK_EVENTS, Topology

log = logging.getLogger(__name__)

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT
RECONNECT_INTERVAL_S = 2.0  # between a robust connection's reconnect attempts (aio-pika's default is 5)


class BrokerUnreachable(Exception):
    """The broker could not be reached; the CLI turns this into exit code 3."""


async def connect(url: str, name: str, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None):
    """Open a robust connection named ``name`` (shown in the management UI).

    ``url`` is ``[broker] url``: one address or several separated by commas; the
    connection uses the first that answers and moves to the next on loss
    (:mod:`hakuriver.connection`). ``ssl_context``: :func:`hakuriver.tls.client_ssl_context`
    of the process's ``[broker]`` section (None for ``amqp://``)."""
    urls = split_urls(url)
    try:
        return await connect_any(urls, timeout=timeout, reconnect_interval=RECONNECT_INTERVAL_S,
                                 client_properties={"connection_name": name}, ssl_context=ssl_context)
    except (OSError, ConnectionError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise BrokerUnreachable(unreachable_message(urls, exc)) from None


def unreachable_message(urls: list[str], exc: BaseException) -> str:
    """One line: which addresses did not answer, and why (a TLS refusal said as such)."""
    return broker_address.unreachable_message(urls, exc, describe_failure(exc))


class Exchanges:
    """The declared exchanges of one channel."""

    def __init__(self, tasks: AbstractExchange, control: AbstractExchange,
                 events: AbstractExchange, dead: AbstractExchange):
        self.tasks, self.control, self.events, self.dead = tasks, control, events, dead


async def declare_exchanges(channel: AbstractChannel, topo: Topology) -> Exchanges:
    direct, topic, fanout = aio_pika.ExchangeType.DIRECT, aio_pika.ExchangeType.TOPIC, aio_pika.ExchangeType.FANOUT
    tasks = await channel.declare_exchange(topo.tasks, direct, durable=True)
    control = await channel.declare_exchange(topo.control, direct, durable=True)
    events = await channel.declare_exchange(topo.events, topic, durable=True)
    dead = await channel.declare_exchange(topo.dead, fanout, durable=True)
    dead_queue = await channel.declare_queue(topo.dead, durable=True, arguments=topo.durable_args(dead_letter=False))
    await dead_queue.bind(dead)
    return Exchanges(tasks, control, events, dead)


async def find_exchanges(connection, channel: AbstractChannel, topo: Topology) -> Exchanges:
    """The exchanges as runners and the host declared them, for a client user, who may not
    declare them (``configure``). Checked with a passive declare on a channel of its own (a
    missing one closes that channel, not ``channel``); :class:`BrokerUnreachable` saying so."""
    probe = await connection.channel()
    try:
        for name in (topo.tasks, topo.control, topo.events):
            await probe.declare_exchange(name, passive=True)
    except aio_pika.exceptions.ChannelClosed as exc:
        raise BrokerUnreachable(f"the broker has no exchanges of prefix {topo.prefix!r} yet: no runner or host "
                                f"has started with it ({exc})") from None
    finally:
        if not probe.is_closed:
            await probe.close()
    found = [await channel.get_exchange(name, ensure=False) for name in (topo.tasks, topo.control, topo.events, topo.dead)]
    return Exchanges(*found)


async def declare_pool_queue(channel: AbstractChannel, topo: Topology, exchanges: Exchanges):
    queue = await channel.declare_queue(topo.pool, durable=True, arguments=topo.dead_letter_args)
    await queue.bind(exchanges.tasks, POOL_KEY)
    return queue


def _content_type(headers: dict[str, Any] | None) -> str:
    # an output chunk (its metadata in headers, "stream" among them) is raw bytes; everything else JSON
    return "application/octet-stream" if headers is not None and "stream" in headers else "application/json"


def persistent(body: bytes, headers: dict[str, Any] | None = None, **properties) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=PERSISTENT, content_type=_content_type(headers),
                            headers=headers, **properties)


async def publish_persistent(channel: AbstractChannel, exchange: str, routing_key: str, body: bytes,
                             headers: dict[str, Any] | None = None, user_id: str | None = None) -> None:
    """Publish ``body`` as :func:`persistent` does, non-mandatory, and wait for its confirm
    (a nack raises ``aiormq.exceptions.DeliveryError``); without an :class:`aio_pika.Message`.

    Why: the runner's outbox and output, and the host's outbox, publish every event this way,
    and aio-pika's ``Message`` (each attribute set through a checked ``__setattr__``, then
    copied into the pamqp properties) with ``Exchange.publish`` cost about 20 µs a message
    more than building the pamqp properties directly (measured here: 19.6 against 1.1 µs),
    about half of the runner's Python time per publish in a py-spy profile. The same wire
    message: the same properties, on the same (robust) channel, failing as fast while the
    broker is away.
    """
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    properties = spec.Basic.Properties(content_type=_content_type(headers), delivery_mode=PERSISTENT,
                                       headers=headers, user_id=user_id)
    underlay = await channel.get_underlay_channel()
    try:
        await underlay.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=properties,
                                     mandatory=False)
    except aiormq.exceptions.DeliveryError:
        await renew_after_nack(channel, underlay)
        raise


_renewing: "weakref.WeakKeyDictionary[AbstractChannel, asyncio.Lock]" = weakref.WeakKeyDictionary()


async def renew_after_nack(channel: AbstractChannel, nacked: Any) -> None:
    """Replace the AMQP channel under the robust ``channel`` after the broker nacked a message
    sent on it (``nacked``, that AMQP channel); once, however many of its messages were nacked.

    Why: after a broker node of a cluster was SIGKILLed, RabbitMQ 3.10 went on nacking every
    message a channel opened during the quorum queues' leader election sent, for minutes, while
    a new channel's were taken at once: a runner's outbox sent the same batch again and again on
    the same channel, 135 times in a minute (tests/test_failover.py, the runners' node killed),
    and the host's RPC requests likewise. Sending again after this goes out on a new channel.
    """
    lock = _renewing.setdefault(channel, asyncio.Lock())
    async with lock:
        try:
            if await channel.get_underlay_channel() is not nacked:
                return  # another nacked message renewed it already
            await channel.close()
            await channel.reopen()
        except Exception as exc:  # the connection went meanwhile: its reconnect opens the channel again
            log.debug("channel not renewed after a nack: %s", exc)


async def dead_letter(exchanges: Exchanges, message: AbstractIncomingMessage, reason: str, source: str) -> None:
    """Move ``message`` to the dead-letter queue with ``reason``, then ack it.

    The consumer goes on with its next message; a bad message never stops it.
    """
    log.warning("dead-lettering a message from %s: %s", source, reason)
    headers = dict(message.headers or {})
    headers.update({"x-hakuriver-reason": reason[:1000], "x-hakuriver-source": source,
                    "x-hakuriver-routing-key": message.routing_key or ""})
    await exchanges.dead.publish(aio_pika.Message(message.body, headers=headers, delivery_mode=PERSISTENT),
                                 routing_key="", mandatory=False)
    await message.ack()


async def declare_ledger_queue(channel: AbstractChannel, topo: Topology, exchanges: Exchanges):
    """The host's durable inbox of every event. Publishers declare it too, so events
    published before the host first starts are kept for it."""
    queue = await channel.declare_queue(topo.ledger, durable=True, arguments=topo.dead_letter_args)
    await queue.bind(exchanges.events, TASK_EVENTS)
    await queue.bind(exchanges.events, NODE_EVENTS)
    return queue
