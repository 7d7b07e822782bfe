"""The host service: consumes every event into the ledger and answers queries.

Why it exists: runners and clients talk through the broker alone; the host is the one
process that remembers. It

- drains ``<prefix>.ledger`` (bound to ``task.#`` and ``node.#`` on the events exchange)
  in batches: one transaction per batch, then one multiple-ack, so ingestion keeps up
  with thousands of events per second and nothing is acked before it is committed;
- marks nodes that stopped sending heartbeats ``offline`` and their running tasks
  ``lost``, publishing that ``lost`` event (through an on-disk outbox, so it survives a
  broker outage) so waiting clients learn it. Silence only counts while the host itself
  is connected: after the host (re)connects, every runner gets a full window to be heard;
- answers :class:`~hakuriver.messages.RpcRequest` on ``<prefix>.rpc`` with
  :class:`~hakuriver.host.queries.Queries` (the caller's side is :mod:`hakuriver.rpc`).

Malformed messages go to the dead-letter queue with a reason; the consumers live on.
``Host`` runs in-process (tests, embedding); :func:`main` is ``hakuriver.host``.
Decoding is :mod:`hakuriver.host.ingest`, storage :mod:`hakuriver.host.ledger`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import click
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

from hakuriver import broker, identity
from hakuriver.cli_options import config_option
from hakuriver.config import Config, ConfigError, load_config
from hakuriver.host.ingest import Ingested, Malformed, ends_a_task, parse_event
from hakuriver.host.ledger import Ledger
from hakuriver.host.pipelines import Pipelines
from hakuriver.host.queries import LedgerChanges, Queries
from hakuriver.host.web import WebContext, WebServer
from hakuriver.messages import RpcReply, RpcRequest, StateEvent, one_line, state_event_combiner
from hakuriver.outbox import Outbox
from hakuriver.tls import client_ssl_context
from hakuriver.topology import Topology

log = logging.getLogger("hakuriver.host")

BATCH_MAX = 1000          # messages per transaction
BATCH_WINDOW = 0.02       # seconds a batch may keep collecting
BATCH_GAP = 0.002         # a batch closes when nothing arrives for this long
LEDGER_PREFETCH = 1000
RPC_PREFETCH = 64
SOURCE = "host"
# How long runners may take to be back after the broker is: the robust connection's
# reconnect interval plus a little.
RUNNER_RECONNECT_S = broker.RECONNECT_INTERVAL_S + 1.0


def may_judge_silence(connected: bool, since_start: float, offline_after: float, behind: bool) -> bool:
    """Whether a runner's silence may count now: not while the host is disconnected, not within
    a full window after it (re)connected (``since_start`` seconds ago; the last_seen times are
    from before it was away), and not while it is ``behind`` on the ledger queue: on a busy
    machine a burst of events can outrun ingestion, and the heartbeats wait behind them, so a
    node whose runner is alive would look silent (its tasks ``lost``) until the host caught up."""
    return connected and since_start >= offline_after and not behind


def batch_gap(since_last_batch: float, ends_a_task: bool) -> float:
    """How long a silence closes a batch that starts ``since_last_batch`` seconds after the
    last one closed: BATCH_GAP after a quiet spell, or once the batch holds an event that
    ends a task; otherwise, while the fabric is busy (the last batch closed within
    BATCH_WINDOW), none shorter than the window (see ``Host._collect_batch``)."""
    return BATCH_WINDOW if since_last_batch < BATCH_WINDOW and not ends_a_task else BATCH_GAP


def _take_waiting(inbox: asyncio.Queue, batch: list, limit: int) -> None:
    """Move what waits in ``inbox`` onto ``batch`` (up to ``limit`` in all)."""
    while len(batch) < limit and not inbox.empty():
        batch.append(inbox.get_nowait())


def _transient(exc: Exception) -> bool:
    """Would the same write succeed later (database or disk unavailable), as opposed to
    a message the database will never take?"""
    if isinstance(exc, (OperationalError, InterfaceError, OSError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Host:
    """The host service, startable in-process: ``await Host(config).start()`` ... ``await stop()``."""

    def __init__(self, config: Config):
        self.config = config
        self.topo = Topology(config.broker.prefix, config.broker.queue_type)
        self.ledger = Ledger(config.database_url, Path(config.paths.state_dir) / "logs")
        self.events_applied = 0       # state transitions the ledger took
        self.messages_ingested = 0    # every valid ledger-queue message stored
        self.changes = LedgerChanges()       # ingestion → "output" waiters
        self.queries = Queries(self.ledger, self.changes, self._counters, admins=config.security.admins)
        # whose events are believed (hakuriver.identity): the runners' and this host's broker users
        self.user = identity.broker_user(config.broker.url)
        self.services = identity.service_accounts(config.broker.url, config.security.service_accounts)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._connection = None
        self._rpc_channel: AbstractChannel | None = None
        self._exchanges: broker.Exchanges | None = None
        self._publish_channel: AbstractChannel | None = None  # the outbox's, with publisher confirms
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._loops: list[asyncio.Task] = []
        self._requests: set[asyncio.Task] = set()
        self._started_at = 0.0        # start, or last reconnect: offline checks wait a window after it
        self._connected = False
        self._outbox: Outbox | None = None
        self.pipelines: Pipelines | None = None  # holds --after tasks (hakuriver/host/pipelines.py)
        self._ingesting = False       # a batch is being stored (its deliveries have left the inbox)
        self._last_batch_at = float("-inf")  # loop time the last batch closed: is the fabric busy?
        self._depth_channel: AbstractChannel | None = None   # passive declares: the ledger queue's depth
        self.web: WebServer | None = None    # the dashboard, when [web] listen is set

    # -- life cycle ------------------------------------------------------------------

    async def start(self, retry: bool = False) -> None:
        """Open the ledger, connect (with ``retry``, until the broker answers), declare, consume."""
        await self.ledger.open()
        outbox_db = sqlite3.connect(Path(self.config.paths.state_dir) / "host-outbox.db")
        outbox_db.execute("PRAGMA journal_mode=WAL")
        self._outbox = Outbox(outbox_db, combine=state_event_combiner(self.topo.events))
        self.pipelines = Pipelines(self.ledger, self._outbox, self.topo, self.services, self.config.security.admins)
        await self.pipelines.open()
        self._connection = await self._connect(retry)
        self._connected = True
        self._connection.close_callbacks.add(self._on_disconnect)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._publish_channel = publish_channel = await self._connection.channel(publisher_confirms=True)
        self._exchanges = await broker.declare_exchanges(publish_channel, self.topo)

        ledger_channel = await self._connection.channel()
        await ledger_channel.set_qos(prefetch_count=LEDGER_PREFETCH)
        ledger_queue = await broker.declare_ledger_queue(ledger_channel, self.topo, self._exchanges)

        self._rpc_channel = await self._connection.channel()
        await self._rpc_channel.set_qos(prefetch_count=RPC_PREFETCH)
        rpc_queue = await self._rpc_channel.declare_queue(self.topo.rpc, durable=True,
                                                          arguments=self.topo.durable_args(delivery_limit=True))

        self._started_at = time.monotonic()
        self._loops = [asyncio.create_task(self._ingest_forever(), name="host-ingest"),
                       asyncio.create_task(self._watch_nodes_forever(), name="host-offline"),
                       asyncio.create_task(self._outbox.drain_forever(self._publish_event), name="host-outbox")]
        self._consumers = [(ledger_queue, await ledger_queue.consume(self._on_ledger_message)),
                           (rpc_queue, await rpc_queue.consume(self._on_rpc_request))]
        held_channel = await self._connection.channel()
        await held_channel.set_qos(prefetch_count=RPC_PREFETCH)
        self._consumers.append(await self.pipelines.consume(held_channel, self._exchanges))
        await self.pipelines.resolve()  # what ended while the host was away
        log.info("host serving %s (ledger %s, database %s)", self.topo.prefix, self.topo.ledger, self.ledger.dialect)
        if self.config.web.address is not None:
            await self._start_web(publish_channel)

    async def _start_web(self, channel: AbstractChannel) -> None:
        # The dashboard is a window, not the ledger's keeper: a port in use is logged and
        # the host serves on without it.
        web = WebServer(WebContext(config=self.config, ledger=self.ledger, changes=self.changes,
                                   counters=self._counters, connection=self._connection,
                                   control=self._exchanges.control))
        try:
            await web.start()
        except OSError as exc:
            log.error("web dashboard off: cannot listen on %s: %s", self.config.web.listen, one_line(exc))
            await web.stop()
            return
        self.web = web

    def _on_disconnect(self, *_: Any) -> None:
        self._connected = False

    def _on_reconnect(self, *_: Any) -> None:
        # The heartbeats missed while the host was away say nothing about the runners,
        # which may reconnect up to one reconnect interval after the host did.
        self._connected = True
        self._started_at = time.monotonic() + RUNNER_RECONNECT_S
        log.info("host reconnected to the broker")

    async def _publish_event(self, exchange: str, key: str, body: bytes, headers: dict | None) -> None:
        """The outbox's publisher: state events, and the tasks pipelines release (tasks exchange)."""
        await broker.publish_persistent(self._publish_channel, exchange, key, body, headers, self.user)

    async def _connect(self, retry: bool):
        delay = 1.0
        context = client_ssl_context(self.config.broker)  # a bad file is no reason to retry
        while True:
            try:
                return await broker.connect(self.config.broker.url, "hakuriver-host", ssl_context=context)
            except broker.BrokerUnreachable as exc:
                if not retry:
                    raise
                log.warning("%s; retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def stop(self) -> None:
        if self.web is not None:
            await self.web.stop()
            self.web = None
        for queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except Exception:  # the channel may already be gone; closing below settles it
                log.debug("cancelling consumer %s", tag, exc_info=True)
        self._consumers = []
        for task in [*self._loops, *self._requests]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._requests, return_exceptions=True)
        self._loops, self._requests = [], set()
        if self._connection is not None:
            # Deliveries still unacked (in the inbox) go back to the queue for the next start.
            await self._connection.close()
            self._connection = None
        if self._outbox is not None:
            self._outbox.db.close()
            self._outbox = None
        await self.ledger.close()

    # -- ingestion -------------------------------------------------------------------

    async def _on_ledger_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def _ingest_forever(self) -> None:
        while True:
            batch = await self._collect_batch()
            self._ingesting = True
            try:
                await self._ingest(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ingesting a batch of %d messages failed", len(batch))
            finally:
                self._ingesting = False

    async def _collect_batch(self) -> list[AbstractIncomingMessage]:
        """At least one message; then more until none arrives for BATCH_GAP, or BATCH_MAX,
        or BATCH_WINDOW. (Deliveries reach the inbox a few dozen per loop turn, so
        "nothing waiting right now" alone would close batches far too small.)

        It sleeps a gap at a time and takes what came meanwhile: one timer per gap, not a
        ``wait_for`` (a task and a timer) per message, which cost the host more CPU than
        storing the message when tasks trickle in.

        While the fabric is busy (this batch starts within BATCH_WINDOW of the last one's
        end) a gap does not close it: it collects for the whole window. Events of a busy
        runner come a few milliseconds apart, so a gap closed nearly every batch after one
        message, and a batch's fixed cost (a transaction, a thread hop, an ack: about 1.5 ms
        of CPU) was paid per event: 6 of the 18 CPU-ms a ``true`` task cost the whole
        machine in the 1,000-task benchmark. No event waits longer than before (at most
        BATCH_WINDOW); a lone event after a quiet spell is still stored after one gap, and
        so is a batch that holds the end of a task (:func:`~hakuriver.host.ingest.ends_a_task`):
        a client that saw the end may ask the ledger for the task's output at once, and the
        runner sends the output before the end, so it is in this batch or an earlier one."""
        batch = [await self._inbox.get()]
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + BATCH_WINDOW
        since_last = now - self._last_batch_at
        looked, ending = 0, False
        try:
            while True:
                _take_waiting(self._inbox, batch, BATCH_MAX)
                remaining = deadline - loop.time()
                if len(batch) >= BATCH_MAX or remaining <= 0:
                    return batch
                if since_last < BATCH_WINDOW and not ending:  # only a busy batch's gap depends on it
                    ending = any(ends_a_task(m.routing_key, m.body) for m in batch[looked:])
                    looked = len(batch)
                await asyncio.sleep(min(batch_gap(since_last, ending), remaining))
                if self._inbox.empty():  # nothing came during the gap
                    return batch
        finally:
            self._last_batch_at = loop.time()

    async def _ingest(self, batch: list[AbstractIncomingMessage]) -> None:
        usable: list[AbstractIncomingMessage] = []
        ingested = Ingested()
        for message in batch:
            try:
                self._parse(message, into=ingested)
            except Malformed as exc:
                await self._dead_letter(message, str(exc))
            else:
                usable.append(message)
        if not usable:
            return
        try:
            await self._store(ingested)
        except (SQLAlchemyError, OSError) as exc:
            if _transient(exc):
                await self._requeue_and_pause(usable[-1], len(usable), exc)
            else:
                await self._store_one_by_one(usable)
            return
        await self._settle(usable[-1])

    def _parse(self, message: AbstractIncomingMessage, into: Ingested | None = None) -> Ingested:
        from_tasks = message.exchange == self.topo.tasks
        if not from_tasks and message.user_id not in self.services:
            raise Malformed(f"event from {message.user_id or identity.NO_USER!r}, which is no service account "
                            f"([security] service_accounts)")
        return parse_event(message.routing_key or "", message.headers, message.body,
                           from_tasks=from_tasks, into=into,
                           owner=identity.task_owner(message.user_id, message.headers, self.services))

    async def _requeue_and_pause(self, last: AbstractIncomingMessage, count: int, exc: Exception) -> None:
        # The database or disk is unavailable: hand everything back and slow down.
        log.error("ledger unavailable, requeueing %d messages: %s", count, one_line(exc))
        await self._settle(last, requeue=True)
        await asyncio.sleep(1.0)

    async def _store_one_by_one(self, usable: list[AbstractIncomingMessage]) -> None:
        # Some message the database refuses: store one at a time, dead-letter the culprit.
        log.warning("a batch failed; storing its %d messages one by one", len(usable), exc_info=True)
        for message in usable:
            try:
                await self._store(self._parse(message))  # parsed before: it parses again
            except SQLAlchemyError as exc:
                await self._dead_letter(message, f"the ledger refused it: {one_line(exc)}")
            else:
                await self._settle(message, multiple=False)

    async def _store(self, ingested: Ingested) -> None:
        self.events_applied += await self.ledger.ingest(ingested.events, ingested.chunks, ingested.heartbeats)
        self.messages_ingested += len(ingested)
        if self.pipelines is not None and any(event.state.terminal for event in ingested.events):
            await self.pipelines.resolve()  # a task that ended may decide the tasks held after it
        await self._notify_changed()

    async def _settle(self, message: AbstractIncomingMessage, multiple: bool = True, requeue: bool | None = None) -> None:
        """Ack (or nack with requeue) ``message`` and, with ``multiple``, every earlier delivery.

        After a reconnect the delivery belongs to a dead channel; the broker redelivers
        it and the ledger's rules make the second application a no-op.
        """
        try:
            if requeue is None:
                await message.ack(multiple=multiple)
            else:
                await message.nack(multiple=multiple, requeue=requeue)
        except Exception as exc:
            log.warning("could not settle deliveries up to %s: %s", message.delivery_tag, exc)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        try:
            await broker.dead_letter(self._exchanges, message, reason, SOURCE)
        except Exception:
            log.exception("could not dead-letter a message (%s)", reason)

    async def _notify_changed(self) -> None:
        await self.changes.notify()

    def _counters(self) -> dict[str, int]:
        return {"events_applied": self.events_applied, "messages_ingested": self.messages_ingested}

    # -- offline detection -----------------------------------------------------------

    async def _watch_nodes_forever(self) -> None:
        timing = self.config.timing
        while True:
            await asyncio.sleep(max(timing.heartbeat_interval / 2, 0.05))
            # After a (re)start or reconnect, give every runner one full timeout to be heard
            # from: the last_seen times in the database are from before the host was away.
            since_start = time.monotonic() - self._started_at
            if not may_judge_silence(self._connected, since_start, timing.offline_after, behind=False):
                continue
            if not may_judge_silence(self._connected, since_start, timing.offline_after, behind=await self._behind()):
                continue
            try:
                await self.check_offline()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("offline check failed")

    async def _behind(self) -> bool:
        """Whether messages wait for ingestion: in the inbox, in the batch being stored, or
        still on the ledger queue (a passive declare tells; unknown counts as behind)."""
        if self._ingesting or not self._inbox.empty():
            return True
        try:
            if self._depth_channel is None or self._depth_channel.is_closed:
                self._depth_channel = await self._connection.channel()
            queue = await self._depth_channel.declare_queue(self.topo.ledger, passive=True)
            return queue.declaration_result.message_count > 0
        except Exception as exc:
            log.debug("ledger queue depth unknown: %s", exc)
            return True

    async def check_offline(self) -> list[StateEvent]:
        """Mark silent nodes offline and their running tasks lost; tell the world."""
        lost = await self.ledger.mark_offline(self.config.timing.offline_after)
        with self._outbox.db:  # sent when the broker confirms, also after an outage
            for event in lost:
                log.warning("task %d lost: %s", event.task_id, event.message)
                self._outbox.add(self.topo.events, Topology.state_key(event.task_id), event.to_bytes())
        if lost:
            await self._notify_changed()
            await self.pipelines.resolve()  # tasks held after a lost one never run
        return lost

    # -- RPC -------------------------------------------------------------------------

    async def _on_rpc_request(self, message: AbstractIncomingMessage) -> None:
        # Queries are reads: ack at once; a request lost with the host only times out
        # its caller. Tracked so stop() can end long "output" waits.
        task = asyncio.current_task()
        self._requests.add(task)
        try:
            await message.ack()
            await self._answer(message)
        finally:
            self._requests.discard(task)

    async def _answer(self, message: AbstractIncomingMessage) -> None:
        if not message.reply_to:
            log.warning("RPC request without reply_to dropped")
            return
        try:
            request = RpcRequest.from_bytes(message.body)
        except ValueError as exc:
            reply = RpcReply(ok=False, error=f"bad request: {one_line(exc)}")
        else:
            reply = await self.queries.handle(request.method, request.params, message.user_id)
        try:
            await self._rpc_channel.default_exchange.publish(
                aio_pika.Message(reply.to_bytes(), content_type="application/json",
                                 correlation_id=message.correlation_id),
                routing_key=message.reply_to, mandatory=False)
        except Exception:
            log.exception("could not send the reply to %s", message.reply_to)


# -- the service -----------------------------------------------------------------------

async def serve(config: Config) -> None:
    """Run a host until SIGTERM or SIGINT."""
    host = Host(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    starting = asyncio.create_task(host.start(retry=True))
    waiting = asyncio.create_task(stopping.wait())
    await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
    try:
        await starting  # re-raise a start failure (e.g. an unusable database URL)
        await waiting
    except asyncio.CancelledError:
        pass
    finally:
        waiting.cancel()
        log.info("host stopping")
        await host.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(config_file: str | None, verbose: bool) -> None:
    """The HakuRiver host: keeps the ledger and answers queries."""
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        click.echo(f"hakuriver.host: {exc}", err=True)
        sys.exit(2)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except ConfigError as exc:  # a [broker] TLS file that is no certificate
        click.echo(f"hakuriver.host: {exc}", err=True)
        sys.exit(2)
    except (SQLAlchemyError, OSError) as exc:
        click.echo(f"hakuriver.host: cannot open the ledger: {one_line(exc)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
