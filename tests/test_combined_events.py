"""State events that wait in an outbox together travel as one message (docs/protocol.md, "State event").

What is checked: the pure combining rule (hakuriver.messages.combine_state_events) and its
reader (StateEvent.all_from_bytes); the outbox publishing combined messages and still
confirming, deleting and resending by row; and, on the real broker, the routing the design
rests on (RabbitMQ's sender-selected distribution: a ``BCC`` header of more routing keys),
read by the Python API's waiter and by the light client's.
"""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from client import light_broker
from client.api import Client
from client.light_config import ClientSettings
from hakuriver import broker
from hakuriver.bounds import COMBINED_EVENTS_BYTES, MAX_EVENTS_PER_MESSAGE, MAX_MESSAGE_BYTES
from hakuriver.config import BrokerConfig, Config
from hakuriver.identity import OWNER_HEADER
from hakuriver.messages import BCC_HEADER, StateEvent, combine_state_events, state_event_combiner
from hakuriver.states import TaskState
from hakuriver.topology import POOL_KEY, Topology
from harness.local_cluster import BROKER_URL
from test_outbox import Broker, drain_until_confirmed, open_outbox, rows_left

EVENTS = "p.events"


def event(task_id: int, state: str = "running", seq: int = 2, **fields) -> StateEvent:
    return StateEvent(task_id=task_id, node="n1", state=TaskState(state), seq=seq, time=1.0, **fields)


def row(ev: StateEvent, exchange: str = EVENTS) -> tuple:
    return exchange, Topology.state_key(ev.task_id), ev.to_bytes(), None


def combine(rows: list[tuple]) -> list[tuple]:
    return combine_state_events(rows, events_exchange=EVENTS)


def events_in(messages: list[tuple]) -> list[StateEvent]:
    return [ev for _, _, body, _ in messages for ev in StateEvent.all_from_bytes(body)]


# -- the pure rule ---------------------------------------------------------------------------

def test_consecutive_state_events_become_one_array_routed_on_every_tasks_key():
    evs = [event(1, "queued", 1), event(2), event(1), event(3, "completed", 3, exit_code=0)]
    (message,) = combine([row(ev) for ev in evs])
    exchange, key, body, headers = message
    assert (exchange, key) == (EVENTS, "task.1.state")
    assert headers == {BCC_HEADER: ["task.2.state", "task.3.state"]}  # each other key once, never the first's
    assert body == b"[" + b",".join(ev.to_bytes() for ev in evs) + b"]"
    assert StateEvent.all_from_bytes(body) == evs


def test_events_of_one_task_only_need_no_bcc():
    evs = [event(4, "queued", 1), event(4), event(4, "completed", 3)]
    assert combine([row(ev) for ev in evs]) == [
        (EVENTS, "task.4.state", b"[" + b",".join(ev.to_bytes() for ev in evs) + b"]", None)]


def test_a_lone_event_and_every_other_row_go_out_unchanged_and_in_their_place():
    one, two, three, four = event(1), event(2), event(3), event(4)
    pool_task = ("p.tasks", POOL_KEY, b'{"a": "task"}', {OWNER_HEADER: "bob"})
    node_named_like_a_key = ("p.tasks", "task.5.state", b"{}", None)  # a node may be called that
    with_headers = (EVENTS, "task.6.state", b"{}", {"x": 1})
    output = (EVENTS, "task.6.stdout", b"bytes", None)
    rows = [row(one), pool_task, row(two), row(three), node_named_like_a_key, row(four), with_headers, output]
    assert combine(rows) == [
        row(one), pool_task,
        (EVENTS, "task.2.state", b"[" + two.to_bytes() + b"," + three.to_bytes() + b"]",
         {BCC_HEADER: ["task.3.state"]}),
        node_named_like_a_key, row(four), with_headers, output]
    assert combine([]) == []


def test_a_combined_message_stops_at_its_event_and_byte_caps_and_loses_nothing():
    many = [event(n) for n in range(2 * MAX_EVENTS_PER_MESSAGE + 1)]
    messages = combine([row(ev) for ev in many])
    assert [len(StateEvent.all_from_bytes(body)) for _, _, body, _ in messages] == [MAX_EVENTS_PER_MESSAGE] * 2 + [1]
    assert events_in(messages) == many

    # Events of a third of the byte cap: three would pass it, so two go together.
    big = [event(n, message="x" * (COMBINED_EVENTS_BYTES // 3)) for n in range(5)]
    messages = combine([row(ev) for ev in big])
    assert [len(StateEvent.all_from_bytes(body)) for _, _, body, _ in messages] == [2, 2, 1]
    assert all(len(body) <= COMBINED_EVENTS_BYTES for _, _, body, _ in messages) and events_in(messages) == big

    # An event past the cap by itself goes alone, as the plain object it is.
    huge = event(9, message="x" * COMBINED_EVENTS_BYTES)
    rows = [row(event(1)), row(huge), row(event(2))]
    assert combine(rows) == rows


def test_an_array_of_exactly_the_byte_cap_still_goes_as_one():
    first = event(1)
    room = COMBINED_EVENTS_BYTES - len(first.to_bytes()) - len(b"[,]") - len(event(2).to_bytes())
    (message,) = combine([row(first), row(event(2, message="x" * room))])
    assert len(message[2]) == COMBINED_EVENTS_BYTES
    assert len(combine([row(first), row(event(2, message="x" * (room + 1)))])) == 2


@pytest.mark.parametrize("body, reason", [
    (b"[]", "at least 1 item"),
    (b"[" + b",".join([event(1).to_bytes()] * (MAX_EVENTS_PER_MESSAGE + 1)) + b"]", "at most 64 items"),
    (b"[" + b",".join([event(1, message="x" * 1000).to_bytes()] * 1100) + b"]", "over the"),
    (b"[" + event(1).to_bytes() + b', {"v": 2}]', "1.v"),
    (b"[" + event(1).to_bytes() + b", 7]", "1\n  Input should be an object"),
    (b"[" + event(1).to_bytes(), "EOF"),
])
def test_what_is_no_array_of_state_events_is_refused(body, reason):
    if reason == "over the":
        assert len(body) > MAX_MESSAGE_BYTES
    with pytest.raises(ValueError, match=reason):
        StateEvent.all_from_bytes(body)


def test_one_event_reads_as_before_and_an_array_may_start_with_white_space():
    assert StateEvent.all_from_bytes(event(1).to_bytes()) == [event(1)]
    assert StateEvent.all_from_bytes(b" \n[" + event(1).to_bytes() + b"]") == [event(1)]


# -- the outbox, combining ----------------------------------------------------------------

def runner_rows(events: str = "hk.events", tasks: str = "hk.tasks") -> list[tuple]:
    """Events of tasks 1, 2, 1, a pool task, an event of task 3: what a runner's outbox may hold at once."""
    return [row(event(1, "queued", 1), events), row(event(2), events), row(event(1), events),
            (tasks, POOL_KEY, b'{"the": "task"}', {OWNER_HEADER: "bob"}),
            row(event(3, "completed", 3, exit_code=0), events)]


def add_rows(outbox, rows: list[tuple]) -> list[int]:
    with outbox.db:
        return [outbox.add(*r) for r in rows]


async def test_the_outbox_sends_combined_messages_and_deletes_every_row_once_confirmed(tmp_path):
    outbox, sent = open_outbox(tmp_path / "o.db", combine=state_event_combiner("hk.events")), Broker()
    rows = runner_rows()
    ids = add_rows(outbox, rows)
    sent.hold()
    drainer = asyncio.create_task(outbox.drain_forever(sent.publish))
    middle = asyncio.create_task(outbox.wait_confirmed(ids[1]))  # the second event, inside the combined message
    while len(sent.calls) < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not middle.done() and rows_left(outbox) == 5   # published, not confirmed
    sent.released.set()
    await asyncio.wait_for(middle, 10)
    await asyncio.wait_for(outbox.wait_confirmed(ids[-1]), 10)
    drainer.cancel()
    await asyncio.gather(drainer, return_exceptions=True)
    assert sent.calls == combine_state_events(rows, events_exchange="hk.events")
    assert [key for _, key, _, _ in sent.calls] == ["task.1.state", POOL_KEY, "task.3.state"]
    assert rows_left(outbox) == 0


async def test_a_failed_combined_message_is_sent_again_with_all_its_rows(tmp_path):
    outbox = open_outbox(tmp_path / "o.db", batch_size=3, combine=state_event_combiner("hk.events"))
    rows = runner_rows()
    ids = add_rows(outbox, rows)
    combined = combine_state_events(rows[:3], events_exchange="hk.events")[0][2]
    sent = Broker(fail_once={combined})
    await drain_until_confirmed(outbox, sent, ids[-1], window=1)
    # Batches of three rows: [1, 2, 1] as one message (failed once, then again), then [pool task, 3].
    assert sent.bodies == [combined, combined, rows[3][2], rows[4][2]]
    assert sent.confirmed == [combined, rows[3][2], rows[4][2]] and rows_left(outbox) == 0


# -- on the real broker -------------------------------------------------------------------

async def test_the_broker_routes_a_combined_message_once_to_every_queue_bound_to_one_of_its_keys(tmp_path, prefix):
    topo = Topology(prefix)
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchanges = await broker.declare_exchanges(channel, topo)

        async def queue_bound_to(exchange, *keys):
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for key in keys:
                await queue.bind(exchange, key)
            return queue

        both = await queue_bound_to(exchanges.events, "task.1.state", "task.2.state")
        only_bcc = await queue_bound_to(exchanges.events, "task.2.state")
        wildcard = await queue_bound_to(exchanges.events, "task.*.state")
        lone = await queue_bound_to(exchanges.events, "task.3.state")
        none = await queue_bound_to(exchanges.events, "task.4.state")
        pool = await queue_bound_to(exchanges.tasks, POOL_KEY)

        outbox = open_outbox(tmp_path / "o.db", combine=state_event_combiner(topo.events))
        rows = runner_rows(topo.events, topo.tasks)
        ids = add_rows(outbox, rows)

        async def publish(exchange, key, body, headers):
            await broker.publish_persistent(channel, exchange, key, body, headers)

        drainer = asyncio.create_task(outbox.drain_forever(publish))
        await asyncio.wait_for(outbox.wait_confirmed(ids[-1]), 10)  # confirmed: routed into every queue
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        assert rows_left(outbox) == 0

        combined = b"[" + b",".join(body for _, _, body, _ in rows[:3]) + b"]"
        for queue in (both, only_bcc, wildcard):
            message = await queue.get(no_ack=True, fail=False)
            assert message is not None and message.body == combined
            assert message.routing_key == "task.1.state"
            assert BCC_HEADER not in (message.headers or {})  # the broker strips it
            if queue is wildcard:  # the lone event of task 3 came after it
                assert (await queue.get(no_ack=True, fail=False)).body == rows[4][2]
            assert await queue.get(no_ack=True, fail=False) is None  # one copy per queue
        message = await lone.get(no_ack=True, fail=False)
        assert message.body == rows[4][2] and message.headers in (None, {})  # a lone event: as always
        assert await none.get(no_ack=True, fail=False) is None
        message = await pool.get(no_ack=True, fail=False)
        assert message.body == rows[3][2] and message.headers == {OWNER_HEADER: "bob"}


def combined_message(*evs: StateEvent) -> tuple:
    (message,) = combine_state_events([row(ev, "x") for ev in evs], events_exchange="x")
    return message


async def publish_combined(prefix: str, *evs: StateEvent) -> None:
    _, key, body, headers = combined_message(*evs)
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await broker.publish_persistent(channel, Topology(prefix).events, key, body, headers)


async def declare(prefix: str) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        await broker.declare_exchanges(await connection.channel(), Topology(prefix))


async def test_the_api_waiter_takes_its_tasks_events_from_a_combined_message(prefix):
    await declare(prefix)
    seen: list[StateEvent] = []
    async with Client(Config(broker=BrokerConfig(url=BROKER_URL, prefix=prefix))) as client:
        waiter = await client.waiter([7, 8])
        waiter.on_state = seen.append
        # Routed on task 5's key; tasks 7 and 8 only by BCC.
        await publish_combined(prefix, event(5), event(7, "running"), event(5, "completed", 3),
                               event(7, "completed", 3, exit_code=0), event(8, "failed", 3, exit_code=1))
        results = await waiter.wait(10)
    assert [(e.task_id, e.state) for e in seen] == [(7, TaskState.RUNNING), (7, TaskState.COMPLETED),
                                                   (8, TaskState.FAILED)]
    assert results == {7: event(7, "completed", 3, exit_code=0), 8: event(8, "failed", 3, exit_code=1)}


def test_the_light_client_takes_its_tasks_events_from_a_combined_message(prefix):
    asyncio.run(declare(prefix))
    client = light_broker.Broker(ClientSettings(BROKER_URL, prefix), None)
    client.connect()
    try:
        client.subscribe([8])
        asyncio.run(publish_combined(prefix, event(5), event(8), event(5, "completed", 3),
                                     event(8, "killed", 3, message="by bob")))
        seen = []
        results = client.wait([8], timeout=10, on_state=seen.append)
    finally:
        client.close()
    assert seen == [light_broker.Event(8, TaskState.RUNNING, "n1"), light_broker.Event(8, TaskState.KILLED, "n1", None,
                                                                                       "by bob")]
    assert results == {8: seen[-1]}
