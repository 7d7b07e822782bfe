"""The light path's conversation with the broker: one blocking connection per invocation.

Why it exists: :mod:`client.quick` carries out the everyday commands without aio-pika; this is
what it talks through, the blocking twin of :class:`client.api.Client` on :mod:`client.wire`:
connect (each broker address in turn), publish persistent and ``mandatory`` with confirms
awaited, ask the host over RPC (direct reply-to), read a node's retained info, and follow
tasks' state events until they end, through a broker restart (reconnect to the next address
first, subscribe again, ask the ledger every CATCH_UP_EVERY_S for ends that passed meanwhile,
as :meth:`client.api.Waiter.catch_up` does). Every message carries the broker user as AMQP
``user_id`` (:mod:`hakuriver.identity`).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from client import wire
from client.bodies import encode_rpc_request
from client.errors import BadRequest, NotYours
from client.light_config import ClientSettings
from hakuriver import identity
from hakuriver.broker_address import split_urls, unreachable_message
from hakuriver.states import TaskState

if TYPE_CHECKING:
    import ssl

PER_TASK_BINDINGS_UP_TO = 200   # beyond this, one wildcard binding and the others' events filtered here
CATCH_UP_EVERY_S = 2.0          # after a reconnect, how often --wait asks the ledger for missed ends
RECONNECT_INTERVAL_S = 2.0      # between rounds of connection attempts while --wait waits
QUERY_TIMEOUT = 5.0
NODE_INFO_TRIES = 50            # another client may hold a node's one info message for a moment


class Unreachable(Exception):
    """The broker or the host could not be reached (or went away); exit code 3."""


class TimedOut(Exception):
    """--timeout passed with ``pending`` tasks not finished; exit code 3."""

    def __init__(self, pending: int):
        super().__init__(pending)
        self.pending = pending


class Event(NamedTuple):
    """A task's state event, as much of it as the command line uses (render.outcome_line, exit codes)."""

    task_id: int
    state: TaskState
    node: str | None = None
    exit_code: int | None = None
    message: str = ""


class Broker:
    """This invocation's one connection: one confirm channel for publishing, RPC and events,
    and a side channel for passive declares (a missing queue closes the channel it was asked on)."""

    def __init__(self, settings: ClientSettings, ssl_context: ssl.SSLContext | None):
        self.urls = split_urls(settings.broker_url)
        self.prefix = settings.prefix
        self.ssl_context = ssl_context
        self.user = identity.broker_user(settings.broker_url)   # every message's user_id
        self.wire: wire.Wire | None = None
        self.channel = 0
        self._side = 0
        self._reply_consumer = ""
        self._events_queue = ""
        self._event_keys: list[str] = []
        self._events: deque[wire.Delivery] = deque()   # events read while waiting for an RPC reply
        self._next_index = 0

    # ---- the connection -------------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.wire = wire.connect(self.urls, "hakuriver.client", self.ssl_context, start=self._next_index)
            self.channel = self.wire.open_channel(confirms=True)
        except (OSError, ValueError, wire.WireError) as exc:
            self.wire = None
            why = None
            if self.ssl_context is not None:  # amqps://: a refused certificate said as such
                from hakuriver.tls import describe_failure

                why = describe_failure(exc)
            raise Unreachable(unreachable_message(self.urls, exc, why)) from None
        self._side, self._reply_consumer, self._events_queue = 0, "", ""

    def reconnect(self) -> None:
        """After a loss: the next address first (the lost one last), then subscribe the events again."""
        if self.wire is not None:
            self._next_index = (self.wire.url_index + 1) % len(self.urls)
            self.wire._shut()
        self.connect()
        if self._event_keys:
            self._subscribe(self._event_keys)

    def close(self) -> None:
        if self.wire is not None:
            self.wire.close()
            self.wire = None

    def _broker_error(self, exc: wire.WireError) -> Unreachable:
        if isinstance(exc, wire.ChannelClosed) and exc.code == 404 and "no exchange" in exc.text:
            return Unreachable(f"the broker has no exchanges of prefix {self.prefix!r} yet: no runner or host "
                               f"has started with it ({exc})")
        return Unreachable(f"broker: {exc}")

    # ---- publishing -----------------------------------------------------------------------

    def publish(self, exchange: str, items: list[tuple[str, bytes]], mandatory: bool = True) -> set[bytes]:
        """Publish persistent JSON messages ``(routing key, body)``, confirms awaited; the bodies
        that came back unroutable."""
        properties = wire.Properties(content_type="application/json", delivery_mode=2, user_id=self.user)
        try:
            tags = [self.wire.publish(self.channel, exchange, key, body, properties, mandatory)
                    for key, body in items]
            self.wire.wait_confirmed(self.channel, tags)
        except wire.WireError as exc:
            raise self._broker_error(exc) from None
        returned = {delivery.body for delivery in self.wire.returned}
        self.wire.returned.clear()
        return returned

    # ---- queries over RPC -----------------------------------------------------------------

    def query(self, method: str, params: dict[str, Any], timeout: float = QUERY_TIMEOUT) -> Any:
        """Ask the host; the reply's result. :class:`Unreachable` without an answer, BadRequest
        or NotYours for the host's refusal (as client.api.Client.query)."""
        topo_rpc = f"{self.prefix}.rpc"
        try:
            if not self._reply_consumer:
                self._reply_consumer = self.wire.consume(self.channel, wire.DIRECT_REPLY_TO)
            correlation_id = os.urandom(16).hex()
            properties = wire.Properties(content_type="application/json", correlation_id=correlation_id,
                                         reply_to=wire.DIRECT_REPLY_TO, expiration=str(int(timeout * 1000)),
                                         user_id=self.user)
            body = encode_rpc_request(method, params)
            tag = self.wire.publish(self.channel, "", topo_rpc, body, properties, mandatory=True)
            self.wire.wait_confirmed(self.channel, [tag])
            if any(d.body == body for d in self.wire.returned):
                self.wire.returned.clear()
                raise Unreachable(f"no host is serving queries (queue {topo_rpc!r} does not exist)")
            deadline = time.monotonic() + timeout
            while True:
                delivery = self.wire.next_delivery(deadline)
                if delivery is None:
                    raise Unreachable(f"the host did not answer {method!r} within {timeout:g} s")
                if delivery.method.consumer_tag != self._reply_consumer:
                    self._events.append(delivery)
                elif delivery.properties.correlation_id == correlation_id:
                    break
        except wire.WireError as exc:
            raise self._broker_error(exc) from None
        reply = json.loads(delivery.body)
        if not reply.get("ok"):
            error = reply.get("error") or f"{method} failed"
            raise (NotYours if identity.is_refusal(error) else BadRequest)(error)
        return reply.get("result")

    def node_view(self, node: str) -> tuple[dict[str, Any], bool] | None:
        """The runner's retained info (a NodeInfo as a dict) and whether its runner is connected
        now (it consumes its control queue whenever it is); None if the node is unknown."""
        try:
            if not self._side:
                self._side = self.wire.open_channel()
            queue = f"{self.prefix}.nodeinfo.{node}"
            try:
                self.wire.declare_queue(self._side, queue, passive=True)
                control = self.wire.declare_queue(self._side, f"{self.prefix}.control.{node}", passive=True)
            except wire.ChannelClosed:
                self._side = 0
                return None
            for _ in range(NODE_INFO_TRIES):
                message = self.wire.get(self._side, queue)
                if message is not None:
                    self.wire.nack(self._side, message.method.delivery_tag, requeue=True)
                    return json.loads(message.body), control.consumer_count > 0
                time.sleep(0.01)
        except wire.WireError as exc:
            raise self._broker_error(exc) from None
        return {"node": node}, control.consumer_count > 0

    # ---- events ---------------------------------------------------------------------------

    def subscribe(self, task_ids: list[int]) -> None:
        """Bind this connection's own queue to the state events of ``task_ids`` (before publishing,
        so no event can slip by)."""
        if len(task_ids) > PER_TASK_BINDINGS_UP_TO:
            keys = ["task.*.state"]
        else:
            keys = [f"task.{task_id}.state" for task_id in task_ids]
        self._event_keys = keys
        self._subscribe(keys)

    def _subscribe(self, keys: list[str]) -> None:
        try:
            self._events_queue = self.wire.subscribe(self.channel, f"{self.prefix}.events", keys)
        except wire.WireError as exc:
            raise self._broker_error(exc) from None

    def wait(self, task_ids: list[int], timeout: float | None, on_state: Callable[[Event], None]
             ) -> dict[int, Event]:
        """Until every task has ended: their final events; :class:`TimedOut` if ``timeout`` passes first."""
        pending, results = set(task_ids), {}
        deadline = None if timeout is None else time.monotonic() + timeout
        catch_up_at = None   # set after a reconnect: when to ask the ledger next

        def record(event: Event) -> None:
            if event.task_id not in pending:
                return
            on_state(event)
            if event.state.terminal:
                pending.discard(event.task_id)
                results[event.task_id] = event

        while pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimedOut(len(pending))
            if catch_up_at is not None and now >= catch_up_at:
                for event in self._missed_ends(sorted(pending)):
                    record(event)
                catch_up_at = time.monotonic() + CATCH_UP_EVERY_S
                continue
            until = min(t for t in (deadline, catch_up_at, now + 1.0) if t is not None)
            try:
                delivery = self._events.popleft() if self._events else self.wire.next_delivery(until)
            except wire.ConnectionLost:
                catch_up_at = self._reconnect_until(deadline)
                continue
            except wire.WireError as exc:
                raise self._broker_error(exc) from None
            if delivery is not None and delivery.method.routing_key.endswith(".state"):
                for event in parse_state_events(delivery.body):
                    record(event)
        return results

    def _reconnect_until(self, deadline: float | None) -> float:
        """Reconnect, trying every RECONNECT_INTERVAL_S until ``deadline``; when to catch up (now)."""
        while True:
            try:
                self.reconnect()
                return time.monotonic()
            except Unreachable:
                if deadline is not None and time.monotonic() + RECONNECT_INTERVAL_S >= deadline:
                    return time.monotonic()   # the wait's own deadline ends it
                time.sleep(RECONNECT_INTERVAL_S)

    def _missed_ends(self, task_ids: list[int]) -> list[Event]:
        """The ledger's final states of ``task_ids`` (events that passed while we were away)."""
        try:
            found = self.query("status", {"task_ids": task_ids}, timeout=QUERY_TIMEOUT)
        except (Unreachable, BadRequest, NotYours, wire.WireError):
            return []   # host or broker not back yet: asked again later
        events = []
        for task in found["tasks"]:
            state = TaskState(task["state"])
            if state.terminal:
                events.append(Event(task["task_id"], state, task.get("node"), task.get("exit_code"),
                                    task.get("message") or ""))
        return events


def parse_state_events(body: bytes) -> list[Event]:
    """The events of a state-event message: its one StateEvent object, or each of the array an
    outbox combined several into (docs/protocol.md); what is not one is left out (ignored, as
    client.api does)."""
    try:
        data = json.loads(body)
    except ValueError:
        return []
    events = (_state_event(item) for item in (data if isinstance(data, list) else [data]))
    return [event for event in events if event is not None]


def _state_event(data: Any) -> Event | None:
    try:
        if not isinstance(data, dict) or data.get("v") != 1 or type(data.get("task_id")) is not int:
            return None
        exit_code = data.get("exit_code")
        return Event(data["task_id"], TaskState(data["state"]), data.get("node"),
                     exit_code if type(exit_code) is int else None, str(data.get("message") or ""))
    except (ValueError, KeyError):
        return None
