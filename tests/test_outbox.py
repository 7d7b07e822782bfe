"""The on-disk outbox (hakuriver.outbox) on real SQLite, with no broker.

``publish`` here is a plain coroutine standing in for "the broker confirmed": it records
what was sent, in the order it was called, and can hold or fail a publish on demand.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from hakuriver.outbox import Outbox


class Broker:
    """Records publishes; ``hold`` keeps confirms back until released, ``fail_once`` fails a body's first send."""

    def __init__(self, fail_once: set[bytes] = frozenset()):
        self.calls: list[tuple[str, str, bytes, dict | None]] = []
        self.confirmed: list[bytes] = []
        self.released = asyncio.Event()
        self.released.set()
        self._fail_once = set(fail_once)

    def hold(self) -> None:
        self.released.clear()

    async def publish(self, exchange: str, key: str, body: bytes, headers: dict | None) -> None:
        self.calls.append((exchange, key, body, headers))
        await self.released.wait()
        if body in self._fail_once:
            self._fail_once.discard(body)
            raise ConnectionError(f"broker lost {body!r}")
        self.confirmed.append(body)

    @property
    def bodies(self) -> list[bytes]:
        return [body for _, _, body, _ in self.calls]


def open_outbox(path, **options) -> Outbox:
    return Outbox(sqlite3.connect(path), **options)


def rows_left(outbox: Outbox) -> int:
    return outbox.db.execute("SELECT count(*) FROM outbox").fetchone()[0]


async def drain_until_confirmed(outbox: Outbox, broker: Broker, row: int, **options) -> None:
    drainer = asyncio.create_task(outbox.drain_forever(broker.publish, retry_delay=0, **options))
    try:
        await asyncio.wait_for(outbox.wait_confirmed(row), 10)
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)


def add_many(outbox: Outbox, count: int) -> list[int]:
    with outbox.db:
        return [outbox.add("ex", f"key.{n}", str(n).encode(), {"n": n} if n % 2 else None) for n in range(count)]


async def test_rows_go_out_in_order_with_their_fields_and_are_deleted_once_confirmed(tmp_path):
    # 1,000 rows in batches of 64 with 8 batches in flight: the order must hold across batches.
    outbox, broker = open_outbox(tmp_path / "o.db", batch_size=64), Broker()
    rows = add_many(outbox, 1000)
    await drain_until_confirmed(outbox, broker, rows[-1])
    assert broker.calls == [("ex", f"key.{n}", str(n).encode(), {"n": n} if n % 2 else None) for n in range(1000)]
    assert rows_left(outbox) == 0


async def test_wait_confirmed_returns_only_once_the_broker_confirmed(tmp_path):
    outbox, broker = open_outbox(tmp_path / "o.db"), Broker()
    broker.hold()
    (row,) = add_many(outbox, 1)
    drainer = asyncio.create_task(outbox.drain_forever(broker.publish))
    waiter = asyncio.create_task(outbox.wait_confirmed(row))
    while not broker.calls:  # published, not confirmed
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not waiter.done() and rows_left(outbox) == 1
    broker.released.set()
    await asyncio.wait_for(waiter, 10)
    assert broker.confirmed == [b"0"] and rows_left(outbox) == 0
    await outbox.wait_confirmed(row)  # an already confirmed row returns at once
    drainer.cancel()
    await asyncio.gather(drainer, return_exceptions=True)


async def test_after_a_failed_publish_sending_starts_again_from_the_first_unconfirmed_row(tmp_path):
    # One row per batch, one batch in flight: the exact sequence of sends is known.
    outbox, broker = open_outbox(tmp_path / "o.db", batch_size=1), Broker(fail_once={b"3"})
    rows = add_many(outbox, 6)
    await drain_until_confirmed(outbox, broker, rows[-1], window=1)
    assert broker.bodies == [b"0", b"1", b"2", b"3", b"3", b"4", b"5"]
    assert broker.confirmed == [b"0", b"1", b"2", b"3", b"4", b"5"] and rows_left(outbox) == 0


async def test_a_failure_with_batches_in_flight_loses_nothing_and_resends_in_order(tmp_path):
    outbox, broker = open_outbox(tmp_path / "o.db", batch_size=4), Broker(fail_once={b"10"})
    rows = add_many(outbox, 40)
    await drain_until_confirmed(outbox, broker, rows[-1])
    sent = [int(body) for body in broker.bodies]
    restart = next(i for i in range(1, len(sent)) if sent[i] <= sent[i - 1])
    assert sent[:restart] == list(range(restart))            # in order up to the failure,
    assert sent[restart] <= 10                               # then again from at most the failed row,
    assert sent[restart:] == list(range(sent[restart], 40))  # in order to the end
    assert sorted(set(int(body) for body in broker.confirmed)) == list(range(40)) and rows_left(outbox) == 0


async def test_rows_not_confirmed_when_the_process_died_are_sent_after_a_restart(tmp_path):
    outbox, broker = open_outbox(tmp_path / "o.db"), Broker()
    broker.hold()  # published, never confirmed
    add_many(outbox, 3)
    drainer = asyncio.create_task(outbox.drain_forever(broker.publish))
    while len(broker.calls) < 3:
        await asyncio.sleep(0.01)
    drainer.cancel()  # the process dies
    await asyncio.gather(drainer, return_exceptions=True)
    outbox.db.close()

    again, after = open_outbox(tmp_path / "o.db"), Broker()
    (row,) = [r for (r,) in again.db.execute("SELECT max(id) FROM outbox")]
    await drain_until_confirmed(again, after, row)
    assert after.bodies == [b"0", b"1", b"2"] and rows_left(again) == 0


async def test_a_row_added_in_a_rolled_back_transaction_is_never_sent(tmp_path):
    outbox, broker = open_outbox(tmp_path / "o.db"), Broker()
    with pytest.raises(RuntimeError):
        with outbox.db:
            outbox.add("ex", "key", b"never")
            raise RuntimeError("the caller's transaction fails")
    (row,) = add_many(outbox, 1)
    await drain_until_confirmed(outbox, broker, row)
    assert broker.bodies == [b"0"]
