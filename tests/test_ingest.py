"""Event parsing on the host (hakuriver.host.ingest) as a pure function: no broker, no database.

Each test names one rule of what the ledger may take; the end-to-end path through a broker
is tests/test_host.py.
"""

from __future__ import annotations

import json
import re

import pytest

from hakuriver.host.ingest import Ingested, Malformed, parse_event
from hakuriver.messages import Heartbeat, OutputChunk, StateEvent, Task, combine_state_events
from hakuriver.states import TaskState
from hakuriver.topology import Topology

BEAT = dict(cores_total=4, cores_free=4, memory_total=8, memory_free=8)


def task(task_id: int = 5, **fields) -> Task:
    return Task(task_id=task_id, batch_id=1, command="echo", target="node1", submitted_at=1000.0, **fields)


def chunk_headers(task_id: int, stream: str, offset: int) -> dict:
    return OutputChunk(task_id=task_id, stream=stream, offset=offset).headers()


# -- what is taken, typed by kind --------------------------------------------------------

def test_a_submitted_task_is_its_pending_event():
    parsed = parse_event("node1", None, task(5).to_bytes(), from_tasks=True)
    (event,) = parsed.events
    assert (event.task_id, event.state, event.seq, event.time) == (5, TaskState.PENDING, 0, 1000.0)
    assert event.task == task(5)
    assert not parsed.chunks and not parsed.heartbeats and len(parsed) == 1


def test_a_state_event():
    sent = StateEvent(task_id=5, node="node1", state=TaskState.RUNNING, seq=2, time=1.0)
    parsed = parse_event(Topology.state_key(5), None, sent.to_bytes())
    assert parsed == Ingested(events=[sent])


def combined(*events: StateEvent) -> tuple[str, bytes]:
    """The routing key and body of ``events`` as one outbox message (a JSON array)."""
    (message,) = combine_state_events([("ev", Topology.state_key(e.task_id), e.to_bytes(), None) for e in events],
                                      events_exchange="ev")
    return message[1], message[2]


def test_a_combined_message_gives_each_of_its_events_in_order():
    events = [StateEvent(task_id=t, node="node1", state=TaskState.RUNNING, seq=2, time=1.0) for t in (5, 6)]
    events.append(StateEvent(task_id=5, node="node1", state=TaskState.COMPLETED, seq=3, time=2.0, exit_code=0))
    key, body = combined(*events)
    assert key == Topology.state_key(5)
    assert parse_event(key, None, body) == Ingested(events=events)
    # Routed on every task's key (BCC); the one it carries is one of them, whichever it is.
    assert parse_event(Topology.state_key(6), None, body) == Ingested(events=events)


def test_a_combined_message_with_one_bad_event_adds_nothing():
    good = StateEvent(task_id=5, state=TaskState.RUNNING, seq=2, time=1.0)
    carries_another = StateEvent(task_id=6, state=TaskState.QUEUED, seq=1, time=1.0, task=task(7))
    batch = Ingested()
    key, body = combined(good, carries_another)
    with pytest.raises(Malformed, match="state event of task 6 carries task 7"):
        parse_event(key, None, body, into=batch)
    with pytest.raises(Malformed, match="no state event of task 9 among the 2 on its routing key"):
        parse_event(Topology.state_key(9), None, combined(good, good)[1], into=batch)
    with pytest.raises(Malformed, match="at least 1 item"):
        parse_event(Topology.state_key(9), None, b"[]", into=batch)
    assert batch == Ingested()


def test_an_output_chunk_keeps_its_bytes():
    parsed = parse_event(Topology.output_key(5, "stderr"), chunk_headers(5, "stderr", 10), b"\x00bytes\xff")
    assert parsed == Ingested(chunks=[(OutputChunk(task_id=5, stream="stderr", offset=10), b"\x00bytes\xff")])


def test_a_heartbeat():
    beat = Heartbeat(node="gpu.box", time=1.0, **BEAT)
    assert parse_event(Topology.heartbeat_key("gpu.box"), None, beat.to_bytes()) == Ingested(heartbeats=[beat])


def test_a_batch_collects_its_messages_by_kind_in_order_and_a_refused_one_adds_nothing():
    one = StateEvent(task_id=1, state=TaskState.QUEUED, seq=1, time=1.0)
    two = StateEvent(task_id=2, state=TaskState.QUEUED, seq=1, time=1.0)
    beat = Heartbeat(node="n", time=1.0, **BEAT)
    batch = Ingested()
    assert parse_event(Topology.state_key(1), None, one.to_bytes(), into=batch) is batch
    parse_event(Topology.heartbeat_key("n"), None, beat.to_bytes(), into=batch)
    with pytest.raises(Malformed):
        parse_event(Topology.state_key(3), None, one.to_bytes(), into=batch)  # task 1's event on task 3's key
    parse_event(Topology.state_key(2), None, two.to_bytes(), into=batch)
    assert batch == Ingested(events=[one, two], heartbeats=[beat]) and len(batch) == 3


# -- what is refused, with the reason -----------------------------------------------------

def state(task_id: int = 5, **fields) -> bytes:
    return StateEvent(task_id=task_id, state=TaskState.RUNNING, seq=fields.pop("seq", 1), **fields).to_bytes()


def with_task_field(body: bytes, **fields) -> bytes:
    """A message body whose task carries values the model itself would not build (a sender's bug)."""
    message = json.loads(body)
    target = message["task"] if "task" in message else message
    target.update(fields)
    return json.dumps(message).encode()


@pytest.mark.parametrize("key, headers, body, reason", [
    ("task.5.weird", None, state(), "unknown routing key 'task.5.weird'"),
    ("node.x", None, b"{}", "unknown routing key 'node.x'"),
    ("task.abc.state", None, state(), "unknown routing key"),
    ("task.5.state", None, b"{not json", "Invalid JSON"),
    ("task.5.state", None, json.dumps({"v": 2, "task_id": 5, "state": "running", "seq": 1}).encode(), "v:"),
    ("task.6.state", None, state(5), "state event of task 5 on the routing key of task 6"),
    ("task.5.state", None, state(5, task=task(6)), "state event of task 5 carries task 6"),
    ("task.5.state", None, state(5, seq=1 << 63), "out of the 64-bit range"),
    ("task.5.state", None, state(5, exit_code=-(1 << 63) - 1), "out of the 64-bit range"),
    ("task.5.state", None, with_task_field(state(5, task=task(5)), memory=1 << 63), "task.memory:"),
    ("task.5.stdout", None, b"x", "v: Input should be 1"),  # a chunk without its headers
    ("task.5.stdout", chunk_headers(6, "stdout", 0), b"x", "output chunk of task 6 stdout on routing key"),
    ("task.5.stdout", chunk_headers(5, "stderr", 0), b"x", "output chunk of task 5 stderr on routing key"),
    ("task.5.stdout", chunk_headers(5, "stdout", (1 << 62) - 1), b"x", "output offset"),
    ("task.5.stdout", chunk_headers(5, "stdout", 0), b"x" * (65 * 1024), "over the"),
    ("node.a.heartbeat", None, Heartbeat(node="b", **BEAT).to_bytes(), "heartbeat of node 'b' on routing key"),
])
def test_unusable_messages_say_why(key, headers, body, reason):
    with pytest.raises(Malformed, match=re.escape(reason)):
        parse_event(key, headers, body)


def test_a_submitted_task_with_numbers_past_their_bounds_is_refused():
    with pytest.raises(Malformed, match="numa: Input should be less than or equal to"):
        parse_event("node1", None, with_task_field(task(5).to_bytes(), numa=1 << 63), from_tasks=True)


def test_reasons_are_one_line():
    with pytest.raises(Malformed) as caught:
        parse_event("task.5.state", None, b'{"v": 1, "task_id": 5}')
    assert "\n" not in str(caught.value)
