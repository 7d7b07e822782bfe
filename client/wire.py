"""A small blocking AMQP 0-9-1 client for the command line: one socket, pamqp's framing.

Why it exists: a command-line invocation talks to the broker for a few milliseconds, yet
importing aio-pika, aiormq and asyncio costs it ~100 ms before the first byte is sent.
pamqp (aio-pika's own codec, a maintained library) marshals and unmarshals every frame
here; this module only keeps the conversation: the handshake (PLAIN login, tuning,
heartbeats), channels, publisher confirms and mandatory returns, consumers, basic.get,
and the host's RPC over direct reply-to. The Python API (:mod:`client.api`) stays on
aio-pika; only :mod:`client.quick` uses this.

What it guarantees, as the aio-pika path does: a publish returns only once the broker
confirmed it (and says whether it came back unroutable); the connection sends heartbeats
while it waits and counts the broker silent (lost) after two missed ones; a broker that
closes a channel or the connection becomes an exception naming its reply code and text;
a lost connection is :class:`ConnectionLost`, so the caller can reconnect (to the next
address of a cluster, :func:`connect`) and carry on.

    wire = connect(["amqp://guest:guest@127.0.0.1/"], "hakuriver.client")
    ch = wire.open_channel(confirms=True)
    tag = wire.publish(ch, "hkt.tasks", "node1", body, properties, mandatory=True)
    returned = wire.wait_confirmed([tag])
"""

from __future__ import annotations

import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

from pamqp import body as amqp_body
from pamqp import frame, header
from pamqp import heartbeat as amqp_heartbeat
from pamqp.commands import Basic, Channel, Confirm, Queue
from pamqp.commands import Connection as Conn

from hakuriver.broker_address import redact

if TYPE_CHECKING:
    import ssl

Properties = Basic.Properties
FRAME_HEADER = struct.Struct(">BHI")
FRAME_MAX = 131072            # what we ask for (RabbitMQ's default); the broker may offer less
CONNECT_TIMEOUT_S = 10.0
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
CONNECTION_FORCED = 320       # the broker is shutting down or restarting: worth reconnecting


class WireError(Exception):
    """Something the broker or the network did that ends the conversation."""


class ConnectionLost(WireError):
    """The connection broke (broker restart, network, missed heartbeats); reconnecting may help."""


class BrokerRefused(WireError):
    """The broker closed the connection on purpose (wrong password, no such vhost, ...)."""


class ChannelClosed(WireError):
    """The broker closed one channel (a missing queue or exchange, a refused ``user_id``)."""

    def __init__(self, channel: int, code: int, text: str):
        super().__init__(f"{text} ({code})")
        self.channel, self.code, self.text = channel, code, text


class Delivery(NamedTuple):
    """A message the broker gave us: by a consumer (``method`` a Basic.Deliver), a basic.get
    (Basic.GetOk) or a return (Basic.Return)."""

    channel: int
    method: Any
    properties: Properties
    body: bytes


class BrokerAddress(NamedTuple):
    host: str
    port: int
    user: str
    password: str
    vhost: str
    tls: bool
    heartbeat: int | None        # ?heartbeat=N in the URL; None: the broker's proposal


def parse_url(url: str) -> BrokerAddress:
    """``amqp[s]://user:pass@host:port/vhost?heartbeat=N``, as aio-pika reads it; ValueError if it is not one."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError(f"not an amqp:// or amqps:// URL: {redact(url)!r}")
    tls = parts.scheme == "amqps"
    query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
    heartbeat = int(query["heartbeat"]) if query.get("heartbeat", "").isdigit() else None
    return BrokerAddress(parts.hostname, parts.port or (5671 if tls else 5672),
                         unquote(parts.username) if parts.username else "guest",
                         unquote(parts.password) if parts.password else "guest",
                         unquote(parts.path[1:]) or "/", tls, heartbeat)


def connect(urls: list[str], name: str, ssl_context: ssl.SSLContext | None = None,
            timeout: float = CONNECT_TIMEOUT_S, start: int = 0) -> "Wire":
    """Connect to the first of ``urls`` that answers, trying them in turn from index ``start``.

    ``ssl_context`` is used for amqps:// addresses (None: the system's default trust).
    Raises the last address's error (:class:`OSError` or :class:`WireError`) if none answers."""
    last: Exception | None = None
    for i in range(len(urls)):
        index = (start + i) % len(urls)
        try:
            wire = Wire.open(parse_url(urls[index]), name, ssl_context, timeout)
        except (OSError, WireError) as exc:
            last = exc
            continue
        wire.url_index = index
        return wire
    assert last is not None
    raise last


class Wire:
    """One AMQP connection; every call blocks until its answer (or the deadline) arrives."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.url_index = 0
        self.frame_max = FRAME_MAX
        self.heartbeat = 0.0
        self._buffer = bytearray()
        self._start = 0                              # where the next unread frame begins in _buffer
        self._last_sent = self._last_received = time.monotonic()
        self._next_channel = 1
        self._replies: dict[int, deque] = {}         # synchronous replies, per channel
        self._content: dict[int, list] = {}          # a message being assembled: [method, properties, size, parts]
        self._confirm_tags: dict[int, int] = {}      # confirm channel -> last delivery tag used
        self._confirmed: dict[int, int] = {}         # confirm channel -> every tag up to this is settled
        self._settled: dict[int, set[int]] = {}      # confirm channel -> tags settled out of order
        self._nacked: set[tuple[int, int]] = set()
        self.returned: list[Delivery] = []
        self.deliveries: deque[Delivery] = deque()
        self.closed = False

    # ---- opening and closing ------------------------------------------------------------

    @classmethod
    def open(cls, address: BrokerAddress, name: str, ssl_context: ssl.SSLContext | None,
             timeout: float) -> "Wire":
        # An ASCII host goes as bytes: a str would be IDNA-encoded, importing encodings.idna,
        # stringprep and unicodedata (~1 ms of every invocation) to change nothing.
        host = address.host.encode("ascii") if address.host.isascii() else address.host
        sock = socket.create_connection((host, address.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if address.tls:
                import ssl  # only for amqps: the module costs start-up time

                context = ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=address.host)
            wire = cls(sock)
            wire._handshake(address, name, time.monotonic() + timeout)
        except BaseException:
            sock.close()
            raise
        return wire

    def _handshake(self, address: BrokerAddress, name: str, deadline: float) -> None:
        self.sock.sendall(header.ProtocolHeader().marshal())
        self._expect(0, Conn.Start, deadline)
        properties = {"product": "hakuriver.client", "connection_name": name,
                      "capabilities": {"publisher_confirms": True, "basic.nack": True,
                                       "consumer_cancel_notify": True, "authentication_failure_close": True}}
        self._send(0, Conn.StartOk(client_properties=properties, mechanism="PLAIN",
                                   response=f"\0{address.user}\0{address.password}", locale="en_US"))
        tune = self._expect(0, Conn.Tune, deadline)
        self.frame_max = min(tune.frame_max or FRAME_MAX, FRAME_MAX)
        heartbeat = tune.heartbeat if address.heartbeat is None else address.heartbeat
        self.heartbeat = float(heartbeat)
        self._send(0, Conn.TuneOk(channel_max=tune.channel_max or 2047, frame_max=self.frame_max,
                                  heartbeat=heartbeat))
        self._send(0, Conn.Open(virtual_host=address.vhost))
        self._expect(0, Conn.OpenOk, deadline)

    def close(self) -> None:
        """Say goodbye politely if the connection still works; never raises."""
        if self.closed:
            return
        try:
            self._send(0, Conn.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
            self._expect(0, Conn.CloseOk, time.monotonic() + 1.0)
        except (OSError, WireError):
            pass
        self._shut()

    def _shut(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- channels and methods -----------------------------------------------------------

    def open_channel(self, confirms: bool = False) -> int:
        number = self._next_channel
        self._next_channel += 1
        self._replies[number] = deque()
        self._send(number, Channel.Open())
        if confirms:
            self._send(number, Confirm.Select())
            self._confirm_tags[number] = self._confirmed[number] = 0
            self._settled[number] = set()
        self._expect(number, Channel.OpenOk)
        if confirms:
            self._expect(number, Confirm.SelectOk)
        return number

    def close_channel(self, channel: int) -> None:
        if channel in self._replies:
            self._send(channel, Channel.Close(reply_code=200, reply_text="done", class_id=0, method_id=0))
            self._expect(channel, Channel.CloseOk)
            self._forget(channel)

    def call(self, channel: int, method: Any, reply: type, deadline: float | None = None) -> Any:
        """Send a synchronous method and return the broker's reply to it."""
        self._send(channel, method)
        return self._expect(channel, reply, deadline)

    def declare_queue(self, channel: int, name: str = "", passive: bool = False,
                      exclusive: bool = False) -> Queue.DeclareOk:
        return self.call(channel, Queue.Declare(queue=name, passive=passive, exclusive=exclusive,
                                                auto_delete=exclusive), Queue.DeclareOk)

    def subscribe(self, channel: int, exchange: str, keys: list[str]) -> str:
        """A new exclusive queue bound to ``keys`` on ``exchange`` and consumed (no ack); its name.

        One broker round trip, not three: the declare, the binds and the consume are sent
        together, the binds and the consume naming the queue as "" (AMQP 0-9-1: the queue
        last declared on this channel), then the answers are read.
        """
        frames = [(channel, Queue.Declare(queue="", exclusive=True, auto_delete=True))]
        frames += [(channel, Queue.Bind(queue="", exchange=exchange, routing_key=key)) for key in keys]
        frames.append((channel, Basic.Consume(queue="", no_ack=True)))
        self._send_many(frames)
        name = self._expect(channel, Queue.DeclareOk).queue
        for _ in keys:
            self._expect(channel, Queue.BindOk)
        self._expect(channel, Basic.ConsumeOk)
        return name

    def consume(self, channel: int, queue: str, no_ack: bool = True) -> str:
        return self.call(channel, Basic.Consume(queue=queue, no_ack=no_ack), Basic.ConsumeOk).consumer_tag

    def get(self, channel: int, queue: str) -> Delivery | None:
        """basic.get without auto-ack: the message stays the broker's until :meth:`nack`."""
        self._send(channel, Basic.Get(queue=queue, no_ack=False))
        answer = self._expect(channel, (Basic.GetOk, Basic.GetEmpty))
        if isinstance(answer, Basic.GetEmpty):
            return None
        return answer  # _expect hands a GetOk over with its content, as a Delivery

    def nack(self, channel: int, delivery_tag: int, requeue: bool = True) -> None:
        self._send(channel, Basic.Nack(delivery_tag=delivery_tag, requeue=requeue))

    # ---- publishing ---------------------------------------------------------------------

    def publish(self, channel: int, exchange: str, routing_key: str, body: bytes,
                properties: Properties, mandatory: bool = False) -> int:
        """Send one message; returns its delivery tag on a confirm channel (0 otherwise)."""
        frames = [(channel, Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)),
                  (channel, header.ContentHeader(0, len(body), properties))]
        step = self.frame_max - 8  # a body frame's own header and end byte
        frames += [(channel, amqp_body.ContentBody(body[i:i + step])) for i in range(0, len(body), step)]
        self._send_many(frames)
        if channel not in self._confirm_tags:
            return 0
        self._confirm_tags[channel] += 1
        return self._confirm_tags[channel]

    def wait_confirmed(self, channel: int, tags: list[int], deadline: float | None = None) -> None:
        """Wait until the broker confirmed every one of ``tags``; :class:`WireError` if it refused one
        (basic.nack: it could not take the message). Returns of unroutable messages collect in ``returned``."""
        def settled(tag: int) -> bool:
            return tag <= self._confirmed[channel] or tag in self._settled[channel]
        while not all(settled(tag) for tag in tags):
            self._pump(deadline)
        refused = [tag for tag in tags if (channel, tag) in self._nacked]
        if refused:
            raise WireError(f"the broker refused {len(refused)} message(s) (basic.nack)")

    # ---- receiving ----------------------------------------------------------------------

    def next_delivery(self, deadline: float | None) -> Delivery | None:
        """The next consumed message; None once ``deadline`` passed without one."""
        while not self.deliveries:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            self._pump(deadline)
        return self.deliveries.popleft()

    def _expect(self, channel: int, kinds, deadline: float | None = None) -> Any:
        replies = self._replies.setdefault(channel, deque())
        while True:
            while replies:
                reply = replies.popleft()
                method = reply.method if isinstance(reply, Delivery) else reply
                if isinstance(method, kinds):
                    return reply
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectionLost("the broker did not answer in time")
            self._pump(deadline)

    def _pump(self, deadline: float | None) -> None:
        """Read and handle one frame (sending a heartbeat meanwhile if one is due)."""
        channel, value = self._read_frame(deadline)
        if value is None:
            return
        if channel == 0:
            self._on_connection_frame(value)
        elif isinstance(value, header.ContentHeader):
            content = self._content[channel]
            content[1], content[2] = value.properties, value.body_size
            if value.body_size == 0:
                self._content_done(channel)
        elif isinstance(value, amqp_body.ContentBody):
            content = self._content[channel]
            content[3].append(value.value)
            if sum(len(part) for part in content[3]) >= content[2]:
                self._content_done(channel)
        elif isinstance(value, (Basic.Deliver, Basic.GetOk, Basic.Return)):
            self._content[channel] = [value, None, 0, []]
        elif isinstance(value, (Basic.Ack, Basic.Nack)):
            self._on_confirm(channel, value)
        elif isinstance(value, Channel.Close):
            self._send(channel, Channel.CloseOk())
            self._forget(channel)
            raise ChannelClosed(channel, value.reply_code, value.reply_text)
        elif isinstance(value, Basic.Cancel):  # our queue went away under us (consumer_cancel_notify)
            raise ConnectionLost(f"the broker cancelled consumer {value.consumer_tag}")
        else:
            self._replies.setdefault(channel, deque()).append(value)

    def _content_done(self, channel: int) -> None:
        method, properties, _, parts = self._content.pop(channel)
        delivery = Delivery(channel, method, properties, b"".join(parts))
        if isinstance(method, Basic.Deliver):
            self.deliveries.append(delivery)
        elif isinstance(method, Basic.Return):
            self.returned.append(delivery)
        else:
            self._replies.setdefault(channel, deque()).append(delivery)

    def _on_confirm(self, channel: int, value) -> None:
        if isinstance(value, Basic.Nack):
            first = self._confirmed[channel] + 1 if value.multiple else value.delivery_tag
            self._nacked.update((channel, tag) for tag in range(first, value.delivery_tag + 1))
        if value.multiple:
            self._confirmed[channel] = max(self._confirmed[channel], value.delivery_tag)
        else:
            self._settled[channel].add(value.delivery_tag)

    def _on_connection_frame(self, value) -> None:
        if isinstance(value, Conn.Close):
            try:
                self._send(0, Conn.CloseOk())
            except OSError:
                pass
            self._shut()
            text = f"the broker closed the connection: {value.reply_text} ({value.reply_code})"
            raise (ConnectionLost if value.reply_code == CONNECTION_FORCED else BrokerRefused)(text)
        if not isinstance(value, (amqp_heartbeat.Heartbeat, Conn.Blocked, Conn.Unblocked)):
            self._replies.setdefault(0, deque()).append(value)

    def _forget(self, channel: int) -> None:
        for table in (self._replies, self._content, self._confirm_tags, self._confirmed, self._settled):
            table.pop(channel, None)

    # ---- frames on the socket -----------------------------------------------------------

    def _send(self, channel: int, value) -> None:
        self._send_many([(channel, value)])

    def _send_many(self, frames: list[tuple[int, Any]]) -> None:
        if self.closed:
            raise ConnectionLost("the connection is closed")
        data = b"".join(frame.marshal(value, channel) for channel, value in frames)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._shut()
            raise ConnectionLost(f"connection lost: {exc}") from None
        self._last_sent = time.monotonic()

    def _read_frame(self, deadline: float | None) -> tuple[int, Any]:
        """One whole frame from the socket; (0, None) when it is time to look at the clock again."""
        while True:
            if len(self._buffer) - self._start >= 7:
                kind, channel, size = FRAME_HEADER.unpack_from(self._buffer, self._start)
                end = self._start + 7 + size + 1
                if len(self._buffer) >= end:
                    data = bytes(self._buffer[self._start:end])
                    self._start = end   # the buffer is compacted before the next read, not per frame
                    return channel, frame.unmarshal(data)[2]
            if self._start:
                del self._buffer[:self._start]
                self._start = 0
            now = time.monotonic()
            wait = 1.0 if deadline is None else max(0.0, deadline - now)
            if self.heartbeat:
                if now - self._last_sent >= self.heartbeat / 2:
                    self._send_many([(0, amqp_heartbeat.Heartbeat())])
                if now - self._last_received > 2 * self.heartbeat:
                    self._shut()
                    raise ConnectionLost(f"no word from the broker for {2 * self.heartbeat:g} s (heartbeats)")
                wait = min(wait, self.heartbeat / 2)
            if deadline is not None and wait <= 0:
                return 0, None
            self.sock.settimeout(max(wait, 0.001))
            try:
                data = self.sock.recv(1 << 17)
            except (socket.timeout, TimeoutError):
                return 0, None
            except OSError as exc:
                self._shut()
                raise ConnectionLost(f"connection lost: {exc}") from None
            if not data:
                self._shut()
                raise ConnectionLost("the broker closed the connection")
            self._last_received = time.monotonic()
            self._buffer += data


