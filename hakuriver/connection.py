"""One connection over several broker addresses: the first that answers, the next one on loss.

Why it exists: with a RabbitMQ cluster, every process must move to another node when
its node dies. aio-pika's robust connection already does the hard part (it reconnects
and re-declares every channel, queue, binding and consumer it made, then runs the
``reconnect_callbacks``) but it knows one URL only. :class:`FailoverConnection` is that
robust connection with a list of URLs: each connection attempt, the first one or one
after a loss, tries the addresses in turn and keeps the first that answers. After a
loss it starts with the address after the one it lost, so it does not wait on a dead
node first. When none answers, aio-pika waits its reconnect interval and tries again.

The one place it reaches into aio-pika: the robust connection's private
``__connect_transport`` step (one connect to ``self.url``), overridden here to walk the
list. :func:`check_supported` fails at import time, naming the reason, should a new
aio-pika rename it.

    connection = await connect_any(["amqp://a/", "amqp://b/"], reconnect_interval=2,
                                   client_properties={"connection_name": "x"}, timeout=10)
"""

from __future__ import annotations

import logging
from typing import Any

from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from hakuriver.broker_address import redact

log = logging.getLogger(__name__)

_CONNECT_STEP = "_RobustConnection__connect_transport"


def check_supported() -> None:
    if not callable(getattr(RobustConnection, _CONNECT_STEP, None)):
        raise ImportError(f"aio-pika's RobustConnection has no {_CONNECT_STEP}: this aio-pika version is not "
                          "supported by hakuriver.connection (see its docstring)")


check_supported()


def attempt_order(start: int, count: int) -> list[int]:
    """The addresses to try, by index: ``start`` first, then the ones after it, wrapping."""
    return [(start + i) % count for i in range(count)]


class FailoverConnection(RobustConnection):
    """A robust connection that tries a list of URLs on every (re)connect."""

    def __init__(self, urls: list[str], **kwargs: Any):
        if not urls:
            raise ValueError("no broker address")
        super().__init__(URL(urls[0]), **kwargs)
        self.urls = [URL(url) for url in urls]
        self.current = 0  # index of the address in use, or last in use

    async def _RobustConnection__connect_transport(self) -> None:
        last_error: BaseException | None = None
        for index in attempt_order(self.current, len(self.urls)):
            self.url = self.urls[index]
            try:
                await super()._RobustConnection__connect_transport()
            except CONNECTION_EXCEPTIONS as exc:
                last_error = exc
                log.info("broker %s did not answer: %s", self, exc or type(exc).__name__)
                continue
            self.current = index
            log.info("connected to broker %s", self)
            return
        assert last_error is not None
        raise last_error

    async def _on_connection_close(self, closing) -> None:
        if not self._close_called and len(self.urls) > 1:
            self.current = (self.current + 1) % len(self.urls)  # the lost node last
        await super()._on_connection_close(closing)


async def connect_any(urls: list[str], timeout: float, **kwargs: Any) -> FailoverConnection:
    """Connect to the first of ``urls`` that answers (each gets ``timeout`` seconds).

    Raises the last address's error when none answers."""
    connection = FailoverConnection(urls, **kwargs)
    await connection.connect(timeout=timeout)
    return connection
