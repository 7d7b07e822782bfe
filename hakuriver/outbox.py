"""A local, on-disk outbox: what a process must publish survives a broker outage and a crash.

Rows are added inside the caller's SQLite transaction (so "task recorded" and "event
to send" are one atomic fact), then a single drainer publishes them in order with
publisher confirms, pipelined in batches, and deletes each batch once confirmed.
``wait_confirmed(row_id)`` lets the caller hold a broker delivery until its event is
safely with the broker (the runner acks a task only then).

A row published but not yet deleted when the process dies is sent again on restart:
consumers de-duplicate by sequence number and byte offset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

# exchange name, routing key, body, headers -> awaitable confirm
Publish = Callable[[str, str, bytes, dict[str, Any] | None], Awaitable[None]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT
);
"""


class Outbox:
    def __init__(self, db: sqlite3.Connection, batch_size: int = 256):
        self.db = db
        self.db.executescript(SCHEMA)
        self.batch_size = batch_size
        self._wakeup = asyncio.Event()
        self._confirmed_upto = 0
        self._confirm_waiters: list[tuple[int, asyncio.Future]] = []

    def add(self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None) -> int:
        """Queue a message; call inside the caller's transaction. Returns the row id."""
        cursor = self.db.execute(
            "INSERT INTO outbox (exchange, routing_key, body, headers) VALUES (?, ?, ?, ?)",
            (exchange, routing_key, body, json.dumps(headers) if headers else None))
        self._wakeup.set()
        return cursor.lastrowid

    def pending(self) -> int:
        return self.db.execute("SELECT count(*) FROM outbox").fetchone()[0]

    async def wait_confirmed(self, row_id: int) -> None:
        if row_id <= self._confirmed_upto:
            return
        future = asyncio.get_running_loop().create_future()
        self._confirm_waiters.append((row_id, future))
        await future

    async def drain_forever(self, publish: Publish, retry_delay: float = 0.5) -> None:
        """Publish rows in order as they come; on a failure, wait and try the same rows again."""
        while True:
            rows = self.db.execute(
                "SELECT id, exchange, routing_key, body, headers FROM outbox ORDER BY id LIMIT ?",
                (self.batch_size,)).fetchall()
            if not rows:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await asyncio.gather(*(publish(exchange, key, body, json.loads(headers) if headers else None)
                                       for _, exchange, key, body, headers in rows))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker gone, channel closed: keep the rows, try again
                log.warning("outbox: publish failed (%s); %d message(s) kept for retry", exc, len(rows))
                await asyncio.sleep(retry_delay)
                continue
            last = rows[-1][0]
            with self.db:
                self.db.execute("DELETE FROM outbox WHERE id <= ?", (last,))
            self._release_waiters(last)

    def _release_waiters(self, upto: int) -> None:
        self._confirmed_upto = max(self._confirmed_upto, upto)
        still = []
        for row_id, future in self._confirm_waiters:
            if row_id <= upto:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((row_id, future))
        self._confirm_waiters = still
