"""Calling the host's RPC queue (docs/protocol.md, "Queries"): the one client side of the ledger's queries.

Why it exists: the client and the tests ask the host the same questions the same way.
Requests are :class:`~hakuriver.messages.RpcRequest` JSON on the default exchange to
``<prefix>.rpc``; replies come back over RabbitMQ's direct reply-to
(``amq.rabbitmq.reply-to``), so no reply queue is declared and nothing is left behind.
A request carries an expiration equal to the caller's timeout, so requests that wait
for a host that is down do not pile up and get answered long after anyone listens.
Every request carries the AMQP ``user_id`` of its connection (:mod:`hakuriver.identity`):
the host answers a task's output and env values only to its owner and admins.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from hakuriver import broker, identity
from hakuriver.messages import RpcReply, RpcRequest
from hakuriver.topology import Topology

log = logging.getLogger(__name__)

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
DEFAULT_TIMEOUT = 10.0


class RpcError(Exception):
    """The host answered, and the answer was an error (``ok=false``)."""


class HostUnavailable(Exception):
    """No answer: no host consumes the RPC queue, or it did not answer in time."""


class RpcClient:
    """One direct reply-to consumer per channel, matching replies by correlation id.

    RabbitMQ allows a single reply-to consumer per channel, so calls on one channel
    share this object (see :func:`call`).
    """

    def __init__(self, channel: AbstractChannel, topo: Topology, user_id: str | None = None):
        self.channel = channel
        self.topo = topo
        self.user_id = user_id or connection_user(channel)
        self._pending: dict[str, asyncio.Future] = {}
        self._consuming: asyncio.Task | None = None
        self._consuming_on = None  # the AMQP channel under ``channel`` that the consumer is on

    async def _ensure_consumer(self) -> None:
        underlay = await self.channel.get_underlay_channel()
        if self._consuming_on is not underlay:
            # First call, or the robust channel was reopened after a reconnect: the reply-to
            # consumer is not one aio-pika restores (it is no declared queue), so make it again.
            async def consume() -> None:
                queue = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
                await queue.consume(self._on_reply, no_ack=True)
            self._consuming = asyncio.ensure_future(consume())
            self._consuming_on = underlay
        try:
            await asyncio.shield(self._consuming)
        except BaseException:
            self._consuming, self._consuming_on = None, None
            raise

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply to a call that already timed out
        try:
            future.set_result(RpcReply.from_bytes(message.body))
        except ValueError as exc:
            future.set_exception(RpcError(f"malformed reply from the host: {exc}"))

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float = DEFAULT_TIMEOUT, topo: Topology | None = None) -> Any:
        """Ask the host (of ``topo``, default this client's); returns the reply's
        ``result`` or raises :class:`RpcError` / :class:`HostUnavailable`."""
        topo = topo or self.topo
        request = RpcRequest(method=method, params=params or {})
        await self._ensure_consumer()
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            message = aio_pika.Message(request.to_bytes(), content_type="application/json",
                                       correlation_id=correlation_id, reply_to=DIRECT_REPLY_TO,
                                       expiration=timeout, user_id=self.user_id)
            try:
                returned = await self.channel.default_exchange.publish(message, routing_key=topo.rpc,
                                                                      mandatory=True)
            except aiormq.exceptions.DeliveryError:
                # a new channel (broker.renew_after_nack); the next call consumes replies again on it
                await broker.renew_after_nack(self.channel, self._consuming_on)
                raise HostUnavailable(f"the broker refused the {method!r} request; asking again on a new channel"
                                      ) from None
            if isinstance(returned, aiormq.abc.DeliveredMessage):
                raise HostUnavailable(f"no host is serving queries (queue {topo.rpc!r} does not exist)")
            try:
                reply: RpcReply = await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                raise HostUnavailable(f"the host did not answer {method!r} within {timeout:g} s") from None
        finally:
            self._pending.pop(correlation_id, None)
        if not reply.ok:
            raise RpcError(reply.error or f"{method} failed")
        return reply.result


def connection_user(channel: AbstractChannel) -> str:
    """The broker user ``channel``'s connection logged in as (the only ``user_id`` the broker lets it send)."""
    connection = getattr(channel, "_connection", None)  # aio-pika keeps it there; its URL names the user
    url = getattr(connection, "url", None)
    return identity.broker_user(str(url)) if url is not None else identity.DEFAULT_AMQP_USER


_clients: "weakref.WeakKeyDictionary[AbstractChannel, RpcClient]" = weakref.WeakKeyDictionary()


async def call(channel: AbstractChannel, topo: Topology, method: str, params: dict[str, Any] | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Call ``method`` on the host over ``channel``; see :meth:`RpcClient.call`."""
    client = _clients.get(channel)
    if client is None:
        client = _clients[channel] = RpcClient(channel, topo)
    return await client.call(method, params, timeout, topo=topo)
